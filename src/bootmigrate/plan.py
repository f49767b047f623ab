"""What a call has to do, decided from the database version alone (pure, no I/O).

A :class:`Route` is decided from versions alone, so a call with nothing to do imports no
migration module; :meth:`Route.plan` imports the modules of the steps that will run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from .control import Control
from .errors import DatabaseAhead, InvalidMigrations, InvalidTarget, UnsupportedUpgrade
from .migrations import Catalog, Migration, MigrationStep

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
    def out_of_order(self) -> bool:
        """Whether this step runs a migration below the database's version that never ran:
        an ``up`` that leaves the version where it is."""
        return self.direction == "up" and self.version_before == self.version_after

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


#: What a planner reads: in-code migrations, or a catalog whose modules are imported only for
#: the steps a plan runs.
Known = Catalog | Sequence[Migration]


@dataclass(frozen=True)
class Move:
    """One step of a route: a migration's version, the direction, the versions around it."""

    version: int
    direction: Direction
    version_before: int
    version_after: int


@dataclass(frozen=True)
class Route:
    """A plan decided from versions alone (file names), before any migration is imported:
    enough to tell that nothing is to be done, or where a wait-only call waits for."""

    from_version: int
    to_version: int
    moves: tuple[Move, ...]
    ahead: bool = False

    def with_missing(self, missing: Sequence[int]) -> Route:
        """This route with the ``missing`` migrations (below the database's version, never
        applied) run first, out of order: each an ``up`` that leaves the version as it is."""
        if not missing:
            return self
        first = tuple(Move(v, "up", self.from_version, self.from_version) for v in missing)
        return replace(self, moves=first + self.moves)

    def plan(self, known: Known) -> Plan:
        """The plan that runs this route: imports the modules of its steps only (through
        ``known`` if it is a catalog), and refuses a down step with no ``down``."""
        found = _catalog(known).load(m.version for m in self.moves)
        by_version = {m.version: m for m in found}
        missing = [
            by_version[m.version].label()
            for m in self.moves
            if m.direction == "down" and by_version[m.version].down is None
        ]
        if missing:
            raise InvalidMigrations(
                f"cannot migrate down from {self.from_version} to {self.to_version}: no `down` "
                f"in {', '.join(missing)}; add `async def down(db)` to each, or pick a higher "
                "target"
            )
        steps = tuple(
            Step(by_version[m.version], m.direction, m.version_before, m.version_after)
            for m in self.moves
        )
        return Plan(self.from_version, self.to_version, steps, self.ahead)


def latest_version(known: Known) -> int:
    versions = _versions(known)
    return versions[-1] if versions else 0


def resolve_target(target: Target, known: Known) -> int:
    """``"latest"`` or a version; an int must be 0 or a version this build knows."""
    if target == "latest":
        return latest_version(known)
    if isinstance(target, bool) or not isinstance(target, int):
        raise InvalidTarget(f"target must be 'latest' or a version number, got {target!r}")
    if target != 0 and target not in _versions(known):
        raise InvalidTarget(
            f"target {target} is not a version this build knows "
            f"(known: {_span(known)}); pass 'latest', 0, or one of those versions"
        )
    return target


def make_plan(
    version: int,
    known: Known,
    target: Target,
    *,
    floor: int | None,
    fresh: bool,
    floor_release: str | None = None,
) -> Plan:
    """Plan a move from ``version`` to ``target``, refusing what must not be attempted."""
    route = make_route(
        version, known, target, floor=floor, fresh=fresh, floor_release=floor_release
    )
    return route.plan(known)


def make_route(
    version: int,
    known: Known,
    target: Target,
    *,
    floor: int | None,
    fresh: bool,
    floor_release: str | None = None,
) -> Route:
    """:func:`make_plan` from the versions alone: imports nothing."""
    versions = _versions(known)
    wanted = resolve_target(target, known)
    latest = latest_version(known)
    if version > latest:
        if target == "latest":
            return Route(version, version, (), ahead=True)
        raise DatabaseAhead(db_version=version, latest=latest, wanted=wanted)
    if version < wanted:
        lowest = default_floor(known) if floor is None else floor
        if not fresh and version < lowest:
            raise UnsupportedUpgrade(
                db_version=version, floor=lowest, known=_span(known), release=floor_release
            )
        ups = [v for v in versions if version < v <= wanted]
        befores = [version, *ups[:-1]]
        moves = tuple(Move(v, "up", before, v) for v, before in zip(ups, befores, strict=True))
        return Route(version, wanted, moves)
    if version > wanted:
        lowest = default_floor(known) if floor is None else floor
        if wanted < lowest:
            raise InvalidTarget(
                f"cannot migrate down to {wanted}: below version {lowest}, the oldest this "
                f"build knows how to reach (its migrations: {_span(known)})"
            )
        undo = [v for v in reversed(versions) if wanted < v <= version]
        befores = [version, *undo[1:]]
        afters = [*undo[1:], wanted]
        moves = tuple(
            Move(v, "down", before, after)
            for v, before, after in zip(undo, befores, afters, strict=True)
        )
        return Route(version, wanted, moves)
    return Route(version, version, ())


def make_rerun_plan(version: int, known: Known, rerun: int) -> Plan:
    """Run one applied migration's ``up`` again, leaving the version as it is (Rocket.Chat's
    ``N,rerun``)."""
    return make_rerun_route(version, known, rerun).plan(known)


def make_rerun_route(version: int, known: Known, rerun: int) -> Route:
    """:func:`make_rerun_plan` from the versions alone: imports nothing."""
    if rerun not in _versions(known):
        raise InvalidTarget(
            f"cannot rerun version {rerun}: this build has no such migration "
            f"(known: {_span(known)})"
        )
    if rerun > version:
        raise InvalidTarget(
            f"cannot rerun version {rerun}: the database is at version {version}, so it has "
            "not been applied yet; migrate up instead"
        )
    return Route(version, version, (Move(rerun, "rerun", version, version),))


def plan_for(
    control: Control,
    known: Known,
    *,
    target: Target = "latest",
    floor: int | None = None,
    rerun: int | None = None,
    floor_release: str | None = None,
) -> Plan:
    """The plan of a call that read ``control``: a rerun, or a move to ``target``."""
    route = route_for(
        control, known, target=target, floor=floor, rerun=rerun, floor_release=floor_release
    )
    return route.plan(known)


def route_for(
    control: Control,
    known: Known,
    *,
    target: Target = "latest",
    floor: int | None = None,
    rerun: int | None = None,
    floor_release: str | None = None,
) -> Route:
    """:func:`plan_for` from the versions alone: imports nothing."""
    if rerun is not None:
        return make_rerun_route(control.version, known, rerun)
    return make_route(
        control.version,
        known,
        target,
        floor=floor,
        fresh=not control.exists or control.version == 0,
        floor_release=floor_release,
    )


def default_floor(known: Known) -> int:
    """The database must already be at the version just before this build's oldest
    migration: anything older needs migrations this build no longer ships."""
    versions = _versions(known)
    return versions[0] - 1 if versions else 0


def _versions(known: Known) -> list[int]:
    if isinstance(known, Catalog):
        return known.versions
    return [m.version for m in known]


def _catalog(known: Known) -> Catalog:
    return known if isinstance(known, Catalog) else Catalog.of(known)


def _span(known: Known) -> str:
    versions = _versions(known)
    if not versions:
        return "none"
    return f"{versions[0]}..{versions[-1]}"
