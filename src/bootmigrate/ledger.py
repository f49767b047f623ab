"""Which migrations the database has applied or skipped, in four numbers on the control
document, so that a boot can tell from the file names alone that none is missing.

A migration merged late, numbered below the database's version, would otherwise never run:
every boot plans from the version, which is already past it. History knows what ran, but
reading it costs every boot a second round trip. The ledger (``applied`` on the control
document) is a summary of it that the holder keeps in the writes it makes anyway:

- ``since``: versions below it are presumed done (they predate the ledger, or this build no
  longer ships them);
- ``upto``: the version the ledger was last brought to; a ``version`` that differs was moved
  without it (by hand, Rocket.Chat's documented skip, or by a bootmigrate that keeps no
  ledger), and the history tells which;
- ``count`` and ``digest``: how many of the versions from ``since`` to ``upto`` are applied or
  skipped, and the XOR of a 64-bit hash of each (:func:`digest_of`).

A boot computes the same two numbers from its file names; equal, nothing is missing. Unequal,
the history decides (:func:`survey`): the ledger is only ever a shortcut to it, so a stale one
costs a read, never a wrong refusal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

_BITS64 = (1 << 64) - 1


def digest_of(versions: Iterable[int]) -> int:
    """The XOR of a 64-bit hash of each of ``versions`` (SplitMix64's finaliser: a bijection
    that spreads every input bit over the output, and cheap enough in pure Python that a
    thousand versions cost a boot about a quarter of a millisecond). Order does not matter,
    and adding a version twice removes it, so one operation both records and forgets. Signed,
    as BSON stores 64-bit integers."""
    digest = 0
    for version in versions:
        z = (version + 0x9E3779B97F4A7C15) & _BITS64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _BITS64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _BITS64
        digest ^= z ^ (z >> 31)
    return digest - (1 << 64) if digest >> 63 else digest


@dataclass(frozen=True)
class Ledger:
    """A reading of the control document's ``applied`` sub-document (see the module)."""

    since: int
    upto: int
    count: int = 0
    digest: int = 0

    @classmethod
    def of(cls, versions: Iterable[int], *, since: int, upto: int) -> Ledger:
        """The ledger of exactly ``versions``, covering ``since`` to ``upto``."""
        chosen = sorted(set(versions))
        return cls(since, upto, len(chosen), digest_of(chosen))

    def as_document(self) -> dict[str, Any]:
        """How the control document stores it."""
        return asdict(self)

    def tracked(self, files: Sequence[int], version: int) -> list[int]:
        """The versions of ``files`` this ledger speaks for, the database being at
        ``version``: from ``since`` to ``upto`` or ``version``, whichever is lower."""
        top = min(version, self.upto)
        return [v for v in files if self.since <= v <= top]

    def agrees(self, files: Sequence[int], version: int) -> bool:
        """Whether every version of ``files`` up to ``version`` is applied or skipped: the
        check an up-to-date boot makes, with no I/O. ``False`` whenever the version moved
        without the ledger (set by hand, or by a bootmigrate that keeps none): the history
        then decides."""
        if version != self.upto:
            return False
        tracked = self.tracked(files, version)
        return len(tracked) == self.count and digest_of(tracked) == self.digest

    def with_versions(
        self, added: Iterable[int] = (), removed: Iterable[int] = (), *, upto: int | None = None
    ) -> Ledger:
        """This ledger with ``added`` recorded and ``removed`` forgotten (each assumed absent,
        and present, before), brought to ``upto`` if given."""
        plus, minus = list(added), list(removed)
        return replace(
            self,
            upto=self.upto if upto is None else upto,
            count=self.count + len(plus) - len(minus),
            digest=self.digest ^ digest_of(plus) ^ digest_of(minus),
        )

    def after_move(self, version: int, direction: str | None, version_after: int) -> Ledger:
        """This ledger once migration ``version`` ran in ``direction`` and left the database
        at ``version_after``: an ``up`` records it (an out-of-order one leaves ``upto``
        alone), a ``down`` forgets it, a ``rerun`` changes nothing."""
        if direction == "down":
            return self.with_versions(removed=[version], upto=version_after)
        if direction == "rerun":
            return self
        return self.with_versions(added=[version], upto=max(self.upto, version_after))


def read_ledger(raw: Any) -> Ledger | None:
    """The ledger of a control document's ``applied`` field (already checked by
    ``parse_control``); ``None`` if it has none."""
    if not isinstance(raw, Mapping):
        return None
    return Ledger(**{name: int(raw[name]) for name in LEDGER_FIELDS})


LEDGER_FIELDS = tuple(f.name for f in fields(Ledger))

#: Why versions nobody ran are taken as done when the ledger is brought up to date: the
#: version was set past them by hand, or they predate the history (a database that came from
#: Rocket.Chat, or from a bootmigrate that kept no ledger).
Presumed = Literal["set-by-hand", "baseline"]


@dataclass(frozen=True)
class Recorded:
    """What the history says: the versions applied or skipped and not reverted since
    (``done``), and among them those a recorded ``up`` ran (``ran``)."""

    done: frozenset[int]
    ran: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Survey:
    """What the history says of this build's migrations at or below the database's version.

    ``missing``: known migrations never applied nor skipped (out of order, refused unless
    allowed). ``presumed``: versions taken as done without a record, and why; the holder
    records them, so the history agrees from then on. ``ledger``: what the control document's
    ledger should say, the missing ones left out."""

    version: int
    missing: tuple[int, ...]
    presumed: tuple[int, ...]
    why: Presumed | None
    ledger: Ledger


def survey(
    files: Sequence[int],
    version: int,
    ledger: Ledger | None,
    recorded: Recorded,
) -> Survey:
    """Compare ``files`` (this build's versions) with what the history ``recorded``, the
    database being at ``version``.

    Without a ledger (a database from Rocket.Chat, or from a bootmigrate that kept none), the
    database is taken as it stands: known versions at or below ``version`` with no record
    are presumed done (``baseline``), since a hand skip made back then cannot be told from a
    gap, and refusing would stop a service that booted fine the day before. With a ledger,
    a known version it covers with no record is ``missing``. So is one between its ``upto``
    and ``version`` below a version the history records running there (the version was
    moved by runs its keeper did not count: an older bootmigrate's); above the last such run,
    the version was set by hand, and those are presumed skipped (``set-by-hand``). The ledger
    to write counts every version in effect, known to this build or not (so that builds that
    know different files agree on it), from ``since``: this build's oldest file, if it no
    longer ships older ones."""
    done = set(recorded.done)
    below = [v for v in files if v <= version]
    oldest = files[0] if files else version + 1
    why: Presumed
    if ledger is None:
        presumed = [v for v in below if v not in done]
        missing: list[int] = []
        since, why = oldest, "baseline"
    else:
        upto = ledger.upto
        last_run = max((v for v in recorded.ran if upto < v <= version), default=upto)
        checked = [v for v in below if v >= ledger.since and (v <= upto or v < last_run)]
        missing = [v for v in checked if v not in done]
        presumed = [v for v in below if max(upto, last_run) < v and v not in done]
        since, why = max(ledger.since, oldest), "set-by-hand"
    kept = [v for v in done | set(presumed) if since <= v <= version]
    return Survey(
        version=version,
        missing=tuple(missing),
        presumed=tuple(presumed),
        why=why if presumed else None,
        ledger=Ledger.of(kept, since=since, upto=version),
    )
