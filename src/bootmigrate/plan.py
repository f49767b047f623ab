"""What a call has to do, decided from the database version alone (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .control import Control
from .errors import DatabaseAhead, InvalidMigrations, InvalidTarget, UnsupportedUpgrade
from .migrations import Migration

Target = int | Literal["latest"]
Direction = Literal["up", "down", "rerun"]


@dataclass(frozen=True)
class Step:
    """One migration to run in one direction, and the version recorded once it is done."""

    migration: Migration
    direction: Direction
    version_after: int

    def running(self) -> dict[str, Any]:
        """How the control document names this step while it runs."""
        return {
            "version": self.migration.version,
            "name": self.migration.name,
            "direction": self.direction,
        }


@dataclass(frozen=True)
class Plan:
    """The steps that take the database from ``from_version`` to ``to_version``."""

    from_version: int
    to_version: int
    steps: tuple[Step, ...]
    ahead: bool = False


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
        raise DatabaseAhead(
            f"the database is at version {version}, newer than this build's latest migration "
            f"({latest}); it cannot migrate down through versions it does not know. Run the "
            "down migration from a build that has them."
        )
    if version < wanted:
        lowest = default_floor(known) if floor is None else floor
        if not fresh and version < lowest:
            through = (
                f"release {floor_release}"
                if floor_release
                else f"a release that has the migrations after {version} up to {lowest}"
            )
            raise UnsupportedUpgrade(
                f"the database is at version {version}, older than version {lowest}, the "
                f"oldest this build upgrades from (its migrations: {_span(known)}). Upgrade "
                f"through {through} first; if those migrations were applied another way, "
                f"record that with `bootmigrate set-version {lowest}`."
            )
        steps = tuple(Step(m, "up", m.version) for m in known if version < m.version <= wanted)
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
        afters = [m.version for m in undo[1:]] + [wanted]
        steps = tuple(Step(m, "down", after) for m, after in zip(undo, afters, strict=True))
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
    return Plan(version, version, (Step(found[0], "rerun", version),))


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
