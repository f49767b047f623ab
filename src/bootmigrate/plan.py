"""What a call has to do, decided from the database version alone (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .control import Control
from .errors import DatabaseAhead, InvalidMigrations, InvalidTarget, UnsupportedUpgrade
from .migrations import Migration, MigrationStep

Target = int | Literal["latest"]
#: How a step runs its migration: forward, backward, or forward again in place.
Direction = Literal["up", "down", "rerun"]


@dataclass(frozen=True)
class Step:
    """One migration to run in one direction, and the versions before and after it.

    ``rerun`` runs ``up`` again and leaves the version where it was; ``down`` reverts.
    """

    migration: Migration
    direction: Direction
    version_before: int
    version_after: int

    @property
    def reverts(self) -> bool:
        """Whether this step undoes its migration (``down``)."""
        return self.direction == "down"

    @property
    def function(self) -> MigrationStep:
        """The migration's ``up`` or ``down``, whichever this step runs."""
        function = self.migration.down if self.reverts else self.migration.up
        assert function is not None  # the planner refuses a down step without `down`
        return function

    @property
    def wants_context(self) -> bool:
        """Whether the step's function takes ``ctx`` as its second parameter."""
        return self.migration.wants_context(self.direction)

    @property
    def checksum(self) -> str | None:
        """The code's checksum, recorded when the step applies that code (not on ``down``)."""
        return None if self.reverts else self.migration.checksum

    def running(self) -> dict[str, Any]:
        """How the control document names this step while it runs."""
        return {
            "version": self.migration.version,
            "name": self.migration.name,
            "direction": self.direction,
        }

    def unfinished(self) -> dict[str, Any]:
        """How the control document names this step from its start until it completes
        (``unfinished``), and in a failure: also where it started and where it goes."""
        return {
            **self.running(),
            "from_version": self.version_before,
            "to_version": self.version_after,
        }

    def is_step(self, recorded: dict[str, Any]) -> bool:
        """Whether this step runs the step ``recorded`` on the control document: the same
        migration in the same direction."""
        return (
            recorded.get("version") == self.migration.version
            and (recorded.get("direction") or "up") == self.direction
        )


@dataclass(frozen=True)
class Plan:
    """The steps that take the database from ``from_version`` to ``to_version``."""

    from_version: int
    to_version: int
    steps: tuple[Step, ...]
    ahead: bool = False

    def resumes(self, recorded: dict[str, Any]) -> bool:
        """Whether this plan starts with the step ``recorded`` as unfinished: the only kind of
        plan that may run while a step is unfinished (it finishes that step first, in its
        own direction)."""
        return bool(self.steps) and self.steps[0].is_step(recorded)

    def describe(self) -> str:
        """What this plan would run, in a few words (for a refusal)."""
        first = self.steps[0]
        more = f" and {len(self.steps) - 1} more" if len(self.steps) > 1 else ""
        return f"run migration {first.migration.version} ({first.direction}){more}"


def latest_version(known: list[Migration]) -> int:
    return known[-1].version if known else 0


def resolve_target(target: Target, known: list[Migration]) -> int:
    """``"latest"`` or a version; an int must be 0 or a version this build knows."""
    if target == "latest":
        return latest_version(known)
    if isinstance(target, bool) or not isinstance(target, int):
        raise InvalidTarget(f"target must be 'latest' or a version number, got {target!r}")
    if target != 0 and target not in {m.version for m in known}:
        raise InvalidTarget(
            f"target {target} is not a version this build knows "
            f"(known: {_span(known)}); pass 'latest', 0, or one of those versions"
        )
    return target


def make_plan(
    version: int,
    known: list[Migration],
    target: Target,
    *,
    floor: int | None,
    fresh: bool,
    floor_release: str | None = None,
) -> Plan:
    """Plan a move from ``version`` to ``target``, refusing what must not be attempted."""
    wanted = resolve_target(target, known)
    latest = latest_version(known)
    if version > latest:
        if target == "latest":
            return Plan(version, version, (), ahead=True)
        raise DatabaseAhead(db_version=version, latest=latest, wanted=wanted)
    if version < wanted:
        lowest = default_floor(known) if floor is None else floor
        if not fresh and version < lowest:
            raise UnsupportedUpgrade(
                db_version=version, floor=lowest, known=_span(known), release=floor_release
            )
        ups = [m for m in known if version < m.version <= wanted]
        befores = [version] + [m.version for m in ups[:-1]]
        steps = tuple(
            Step(m, "up", before, m.version) for m, before in zip(ups, befores, strict=True)
        )
        return Plan(version, wanted, steps)
    if version > wanted:
        lowest = default_floor(known) if floor is None else floor
        if wanted < lowest:
            raise InvalidTarget(
                f"cannot migrate down to {wanted}: below version {lowest}, the oldest this "
                f"build knows how to reach (its migrations: {_span(known)})"
            )
        undo = [m for m in reversed(known) if wanted < m.version <= version]
        missing = [m.label() for m in undo if m.down is None]
        if missing:
            raise InvalidMigrations(
                f"cannot migrate down from {version} to {wanted}: no `down` in "
                f"{', '.join(missing)}; add `async def down(db)` to each, or pick a higher target"
            )
        befores = [version] + [m.version for m in undo[1:]]
        afters = [m.version for m in undo[1:]] + [wanted]
        steps = tuple(
            Step(m, "down", before, after)
            for m, before, after in zip(undo, befores, afters, strict=True)
        )
        return Plan(version, wanted, steps)
    return Plan(version, version, ())


def make_rerun_plan(version: int, known: list[Migration], rerun: int) -> Plan:
    """Run one applied migration's ``up`` again, leaving the version as it is (Rocket.Chat's
    ``N,rerun``)."""
    found = [m for m in known if m.version == rerun]
    if not found:
        raise InvalidTarget(
            f"cannot rerun version {rerun}: this build has no such migration "
            f"(known: {_span(known)})"
        )
    if rerun > version:
        raise InvalidTarget(
            f"cannot rerun version {rerun}: the database is at version {version}, so it has "
            "not been applied yet; migrate up instead"
        )
    return Plan(version, version, (Step(found[0], "rerun", version, version),))


def plan_for(
    control: Control,
    known: list[Migration],
    *,
    target: Target = "latest",
    floor: int | None = None,
    rerun: int | None = None,
    floor_release: str | None = None,
) -> Plan:
    """The plan of a call that read ``control``: a rerun, or a move to ``target``."""
    if rerun is not None:
        return make_rerun_plan(control.version, known, rerun)
    return make_plan(
        control.version,
        known,
        target,
        floor=floor,
        fresh=not control.exists or control.version == 0,
        floor_release=floor_release,
    )


def default_floor(known: list[Migration]) -> int:
    """The database must already be at the version just before this build's oldest
    migration: anything older needs migrations this build no longer ships."""
    return known[0].version - 1 if known else 0


def _span(known: list[Migration]) -> str:
    if not known:
        return "none"
    return f"{known[0].version}..{known[-1].version}"
