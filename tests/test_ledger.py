"""The ledger's arithmetic and the history survey it stands for (pure: no database)."""

from __future__ import annotations

from bootmigrate.ledger import Ledger, Recorded, digest_of, survey


def test_the_digest_ignores_order_and_a_version_added_twice_is_gone() -> None:
    assert digest_of([1, 2, 4]) == digest_of([4, 1, 2])
    assert digest_of([1, 2, 4, 3, 3]) == digest_of([1, 2, 4])
    assert digest_of([1, 2, 4]) != digest_of([1, 2, 3, 4])


def test_a_ledger_agrees_with_the_files_it_was_kept_for_and_not_with_a_late_one() -> None:
    ledger = Ledger.of([1, 2, 4], since=0, upto=4)

    assert ledger.agrees([1, 2, 4], 4)
    assert not ledger.agrees([1, 2, 3, 4], 4)  # 3 merged late
    assert ledger.agrees([1, 2, 4, 5], 4)  # 5 is merely pending


def test_a_version_moved_without_the_ledger_leaves_it_to_the_history() -> None:
    ledger = Ledger.of([1, 2], since=0, upto=2)

    assert not ledger.agrees([1, 2, 3, 4], 3)  # raised by hand, or by an older bootmigrate
    assert not ledger.agrees([1, 2, 3], 1)  # set back by hand


def test_each_move_keeps_the_ledger_in_step_with_the_version() -> None:
    ledger = Ledger.of([1, 2], since=0, upto=2)

    up = ledger.after_move(3, "up", 3)
    assert up == Ledger.of([1, 2, 3], since=0, upto=3)
    assert up.after_move(3, "down", 2) == Ledger.of([1, 2], since=0, upto=2)
    assert up.after_move(2, "rerun", 3) == up
    late = up.after_move(5, "up", 3)  # out of order: the version stays
    assert (late.upto, late.count) == (3, 4)


def test_a_survey_finds_the_version_never_applied() -> None:
    found = survey(
        [1, 2, 3, 4], 4, Ledger.of([1, 2, 4], since=0, upto=4), Recorded(frozenset({1, 2, 4}))
    )

    assert found.missing == (3,)
    assert found.presumed == ()
    assert found.ledger == Ledger.of([1, 2, 4], since=1, upto=4)


def test_without_a_ledger_the_database_is_taken_as_it_stands() -> None:
    # Rocket.Chat ran 1 and 2 (no records); bootmigrate then ran 3 and 5; 4 has no record:
    # a hand skip or a gap, which nothing can tell apart. Presumed done, never refused.
    found = survey([1, 2, 3, 4, 5], 5, None, Recorded(frozenset({3, 5})))

    assert found.missing == ()
    assert (found.presumed, found.why) == ((1, 2, 4), "baseline")
    assert found.ledger == Ledger.of([1, 2, 3, 4, 5], since=1, upto=5)


def test_the_ledger_counts_versions_this_build_does_not_ship() -> None:
    """So that an older build and a newer one, which know different files, agree on it."""
    found = survey(
        [1, 2, 4], 4, Ledger.of([1, 2, 4], since=0, upto=4), Recorded(frozenset({1, 2, 3, 4}))
    )

    assert found.ledger == Ledger.of([1, 2, 3, 4], since=1, upto=4)


def test_versions_set_by_hand_are_presumed_skipped() -> None:
    found = survey([1, 2, 3, 4], 3, Ledger.of([1, 2], since=0, upto=2), Recorded(frozenset({1, 2})))

    assert (found.missing, found.presumed, found.why) == ((), (3,), "set-by-hand")
    assert found.ledger == Ledger.of([1, 2, 3], since=1, upto=3)


def test_a_build_that_dropped_old_files_moves_the_ledgers_start() -> None:
    kept = Ledger.of([1, 2, 3, 4], since=0, upto=4)
    assert not kept.agrees([3, 4, 5], 4)  # costs a history read...

    found = survey([3, 4, 5], 4, kept, Recorded(frozenset({3, 4})))

    assert found.missing == ()  # ...but refuses nothing
    assert found.ledger.agrees([3, 4, 5], 4)
    assert found.ledger.since == 3


def test_a_version_moved_by_runs_the_ledger_did_not_count_is_not_a_hand_skip() -> None:
    """An older bootmigrate applied 7 past the ledger's 5: a late 6 below it is missing; a
    hand edit from 7 to 8 on top of that skipped 8."""
    ran = Recorded(frozenset({1, 2, 3, 4, 5, 7}), ran=frozenset({1, 2, 3, 4, 5, 7}))

    found = survey([1, 2, 3, 4, 5, 6, 7, 8], 8, Ledger.of([1, 2, 3, 4, 5], since=0, upto=5), ran)

    assert found.missing == (6,)
    assert (found.presumed, found.why) == ((8,), "set-by-hand")
