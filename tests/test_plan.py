"""The planner alone: what a call would do, decided from a version and the migrations this
build knows. Pure functions, so no server and no database: every case is in-code
Migration objects and Control values."""

from __future__ import annotations

from typing import Any

import pytest

from bootmigrate import (
    DatabaseAhead,
    InvalidMigrations,
    InvalidTarget,
    Migration,
    UnsupportedUpgrade,
)
from bootmigrate.control import Control
from bootmigrate.plan import (
    Plan,
    default_floor,
    latest_version,
    make_plan,
    make_rerun_plan,
    plan_for,
    resolve_target,
)


async def never_run(db: Any) -> None:
    """A step body; the planner only reads migrations, it never runs one."""


def known(*versions: int, without_down: tuple[int, ...] = ()) -> list[Migration]:
    """This build's migrations, sorted as load_migrations returns them; the versions in
    ``without_down`` have no ``down``."""
    return [
        Migration(
            version=v,
            up=never_run,
            down=None if v in without_down else never_run,
            name=f"step_{v}",
        )
        for v in sorted(versions)
    ]


def steps(plan: Plan) -> list[tuple[int, str, int]]:
    """Each step as (migration version, direction, version recorded once it is done)."""
    return [(s.migration.version, s.direction, s.version_after) for s in plan.steps]


def at(version: int) -> Control:
    """A control document that exists and records ``version``, unlocked."""
    return Control(exists=True, version=version)


def plan_from(
    version: int,
    migrations: list[Migration],
    target: Any = "latest",
    *,
    floor: int | None = None,
    fresh: bool = False,
    floor_release: str | None = None,
) -> Plan:
    """make_plan with the defaults of an existing database and no declared floor."""
    return make_plan(
        version, migrations, target, floor=floor, fresh=fresh, floor_release=floor_release
    )


# Up plans


def test_a_fresh_database_plans_every_migration_up_in_version_order() -> None:
    plan = plan_from(0, known(1, 2, 3), fresh=True)

    assert (plan.from_version, plan.to_version, plan.ahead) == (0, 3, False)
    assert steps(plan) == [(1, "up", 1), (2, "up", 2), (3, "up", 3)]


def test_only_migrations_newer_than_the_database_are_planned() -> None:
    plan = plan_from(1, known(1, 2, 3))

    assert (plan.from_version, plan.to_version) == (1, 3)
    assert steps(plan) == [(2, "up", 2), (3, "up", 3)]


def test_an_up_to_date_database_plans_nothing() -> None:
    assert plan_from(3, known(1, 2, 3)) == Plan(3, 3, ())


def test_gapped_versions_are_planned_as_they_are() -> None:
    assert steps(plan_from(0, known(10, 20, 35), fresh=True)) == [
        (10, "up", 10),
        (20, "up", 20),
        (35, "up", 35),
    ]


def test_a_version_between_two_known_ones_plans_from_the_next() -> None:
    # A version set by hand (a skip) need not be one this build knows.
    assert steps(plan_from(15, known(10, 20, 35))) == [(20, "up", 20), (35, "up", 35)]


def test_a_step_names_itself_for_the_control_document() -> None:
    (step,) = plan_from(2, known(1, 2, 3)).steps

    assert step.running() == {"version": 3, "name": "step_3", "direction": "up"}


# Targets


def test_latest_is_the_newest_known_version() -> None:
    assert resolve_target("latest", known(1, 2, 7)) == 7
    assert latest_version(known(1, 2, 7)) == 7


def test_latest_with_no_migrations_is_zero() -> None:
    assert resolve_target("latest", []) == 0
    assert latest_version([]) == 0


def test_zero_is_a_valid_target_whatever_the_migrations() -> None:
    assert resolve_target(0, known(5, 6)) == 0
    assert resolve_target(0, []) == 0


def test_a_known_version_is_its_own_target() -> None:
    assert resolve_target(20, known(10, 20, 35)) == 20


def test_an_int_target_stops_the_up_plan_there() -> None:
    plan = plan_from(0, known(1, 2, 3), 2, fresh=True)

    assert plan.to_version == 2
    assert steps(plan) == [(1, "up", 1), (2, "up", 2)]


@pytest.mark.parametrize("target", [True, False, "3", "newest", 2.0, None])
def test_a_target_that_is_not_latest_or_an_int_is_refused(target: Any) -> None:
    # bool is refused explicitly: False == 0 and True == 1 would otherwise pass as versions.
    with pytest.raises(InvalidTarget, match="must be 'latest' or a version number"):
        resolve_target(target, known(1, 2, 3))


@pytest.mark.parametrize("target", [4, 15, -1])
def test_a_version_this_build_does_not_know_is_refused_as_a_target(target: int) -> None:
    with pytest.raises(InvalidTarget, match=rf"target {target} is not a version this build"):
        resolve_target(target, known(1, 2, 3, 10, 20))


@pytest.mark.parametrize("version", [0, 1, 3, 9])
def test_an_unknown_target_is_refused_whatever_the_database_version(version: int) -> None:
    with pytest.raises(InvalidTarget, match=r"target 7 is not a version .* \(known: 1\.\.3\)"):
        plan_from(version, known(1, 2, 3), 7)
    with pytest.raises(InvalidTarget, match="target 7 is not a version this build knows"):
        plan_for(at(version), known(1, 2, 3), target=7)


# Down plans


def test_a_lower_target_plans_down_steps_newest_first() -> None:
    plan = plan_from(3, known(1, 2, 3), 1)

    assert (plan.from_version, plan.to_version) == (3, 1)
    assert steps(plan) == [(3, "down", 2), (2, "down", 1)]


def test_down_to_zero_reverts_every_migration() -> None:
    assert steps(plan_from(3, known(1, 2, 3), 0)) == [
        (3, "down", 2),
        (2, "down", 1),
        (1, "down", 0),
    ]


def test_each_down_step_records_the_next_lower_known_version_across_gaps() -> None:
    plan = plan_from(35, known(10, 20, 35), 0, floor=0)

    assert steps(plan) == [(35, "down", 20), (20, "down", 10), (10, "down", 0)]


def test_down_from_a_version_between_two_known_ones_starts_at_the_one_below() -> None:
    assert steps(plan_from(30, known(10, 20, 35), 10)) == [(20, "down", 10)]


def test_a_down_plan_is_refused_when_a_step_it_undoes_has_no_down() -> None:
    with pytest.raises(InvalidMigrations, match="no `down` in 0003 step_3, 0002 step_2"):
        plan_from(3, known(1, 2, 3, without_down=(2, 3)), 1)


def test_only_the_steps_a_down_plan_undoes_need_a_down() -> None:
    plan = plan_from(3, known(1, 2, 3, without_down=(1,)), 1)

    assert steps(plan) == [(3, "down", 2), (2, "down", 1)]


def test_down_below_the_floor_is_refused() -> None:
    with pytest.raises(InvalidTarget, match="cannot migrate down to 0: below version 1"):
        plan_from(3, known(2, 3), 0)


def test_an_explicit_floor_allows_down_to_a_lower_target() -> None:
    assert steps(plan_from(3, known(2, 3), 0, floor=0)) == [(3, "down", 2), (2, "down", 0)]


# Rerun plans


def test_a_rerun_plan_runs_one_applied_migration_and_keeps_the_version() -> None:
    plan = make_rerun_plan(3, known(1, 2, 3), 2)

    assert (plan.from_version, plan.to_version, plan.ahead) == (3, 3, False)
    assert steps(plan) == [(2, "rerun", 3)]


def test_the_migration_at_the_current_version_can_be_rerun() -> None:
    assert steps(make_rerun_plan(2, known(1, 2, 3), 2)) == [(2, "rerun", 2)]


def test_a_rerun_of_a_version_this_build_does_not_know_is_refused() -> None:
    with pytest.raises(InvalidTarget, match="cannot rerun version 9: this build has no such"):
        make_rerun_plan(3, known(1, 2, 3), 9)


def test_a_rerun_of_a_migration_not_applied_yet_is_refused() -> None:
    with pytest.raises(InvalidTarget, match=r"cannot rerun version 2: .* not been applied yet"):
        make_rerun_plan(1, known(1, 2, 3), 2)


def test_plan_for_with_rerun_plans_the_rerun_whatever_the_target() -> None:
    plan = plan_for(at(3), known(1, 2, 3), target=1, rerun=2)

    assert steps(plan) == [(2, "rerun", 3)]


# The floor


def test_the_default_floor_is_the_version_just_before_the_oldest_migration() -> None:
    assert default_floor(known(20, 21)) == 19
    assert default_floor(known(1, 2)) == 0


def test_with_no_migrations_the_default_floor_is_zero() -> None:
    assert default_floor([]) == 0


def test_a_database_below_the_floor_is_refused_with_the_way_through() -> None:
    with pytest.raises(UnsupportedUpgrade) as caught:
        plan_from(5, known(20, 21, 22))

    message = str(caught.value)
    assert "at version 5, older than version 19" in message
    assert "a release that has the migrations after 5 up to 19" in message
    assert "bootmigrate set-version 19" in message


def test_a_database_below_the_floor_is_told_the_floor_release() -> None:
    with pytest.raises(UnsupportedUpgrade, match=r"Upgrade through release 6\.0 first"):
        plan_from(5, known(20, 21, 22), floor_release="6.0")


def test_a_database_at_the_floor_is_upgraded() -> None:
    assert steps(plan_from(19, known(20, 21))) == [(20, "up", 20), (21, "up", 21)]


def test_an_explicit_floor_lets_an_older_database_upgrade() -> None:
    assert steps(plan_from(5, known(20, 21), floor=5)) == [(20, "up", 20), (21, "up", 21)]


def test_an_explicit_floor_above_the_default_one_refuses_what_the_default_allows() -> None:
    with pytest.raises(UnsupportedUpgrade, match="older than version 20"):
        plan_from(19, known(20, 21), floor=20)


@pytest.mark.parametrize(
    "control", [Control(exists=False), at(0)], ids=["no control document", "at version 0"]
)
def test_a_fresh_database_runs_everything_whatever_the_floor(control: Control) -> None:
    plan = plan_for(control, known(20, 21, 22), floor_release="6.0")

    assert (plan.from_version, plan.to_version) == (0, 22)
    assert steps(plan) == [(20, "up", 20), (21, "up", 21), (22, "up", 22)]


def test_plan_for_refuses_an_existing_database_below_the_floor() -> None:
    with pytest.raises(UnsupportedUpgrade, match=r"Upgrade through release 6\.0 first"):
        plan_for(at(5), known(20, 21, 22), floor_release="6.0")


def test_no_migrations_and_no_control_document_plans_nothing() -> None:
    assert plan_for(Control(exists=False), []) == Plan(0, 0, ())


# The database ahead of this build


@pytest.mark.parametrize("migrations", [known(1, 2, 3), []], ids=["some", "none"])
def test_a_database_ahead_of_latest_gets_an_ahead_plan_with_no_steps(
    migrations: list[Migration],
) -> None:
    assert plan_from(9, migrations) == Plan(9, 9, (), ahead=True)
    assert plan_for(at(9), migrations) == Plan(9, 9, (), ahead=True)


@pytest.mark.parametrize("target", [3, 2, 0])
def test_a_database_ahead_with_an_explicit_target_is_refused(target: int) -> None:
    with pytest.raises(
        DatabaseAhead, match=r"at version 9, newer than this build's latest .*\(3\)"
    ):
        plan_from(9, known(1, 2, 3), target)


def test_each_step_knows_the_version_before_it() -> None:
    # A database set to 3 by hand over a gap (2 was never shipped): the first step starts
    # from 3, each later one from the step before it.
    ups = plan_from(3, known(1, 5, 6))
    downs = plan_from(6, known(1, 5, 6), 1)
    rerun = make_rerun_plan(6, known(1, 5, 6), 5)

    assert [(s.version_before, s.version_after) for s in ups.steps] == [(3, 5), (5, 6)]
    assert [(s.version_before, s.version_after) for s in downs.steps] == [(6, 5), (5, 1)]
    assert [(s.version_before, s.version_after) for s in rerun.steps] == [(6, 6)]


def test_a_step_runs_the_function_of_its_direction() -> None:
    async def up(db: Any) -> None:
        """Forward."""

    async def down(db: Any) -> None:
        """Backward."""

    migrations = [Migration(version=1, up=up, down=down, name="one")]
    forward = plan_from(0, migrations, fresh=True).steps[0]
    backward = plan_from(1, migrations, 0).steps[0]
    again = make_rerun_plan(1, migrations, 1).steps[0]

    assert (forward.function, forward.reverts) == (up, False)
    assert forward.checksum == migrations[0].checksum != ""  # recorded when the code applies
    assert (backward.function, backward.reverts, backward.checksum) == (down, True, None)
    assert (again.function, again.reverts) == (up, False)
