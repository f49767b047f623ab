"""Settings: every option checked once, when it is given, before anything touches a database."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bootmigrate import InvalidTarget, Settings, migrate
from bootmigrate.integrations.aiohttp import migrate_context
from bootmigrate.integrations.fastapi import migrate_lifespan

SECONDS = (
    "wait_timeout",
    "lease",
    "max_poll_interval",
    "stream_idle_wait",
    "max_write_retry_interval",
    "migration_timeout",
)


@pytest.mark.parametrize("name", SECONDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, -1.5])
def test_durations_must_be_positive_and_finite(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive, finite number of seconds"):
        Settings(**{name: value})


@pytest.mark.parametrize("name", SECONDS)
@pytest.mark.parametrize("value", [True, False, "30"])
def test_durations_refuse_booleans_and_text(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds"):
        Settings(**{name: value})


@pytest.mark.parametrize("name", ["wait_timeout", "lease", "max_poll_interval"])
def test_required_durations_refuse_none(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a number of seconds"):
        Settings(**{name: None})


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"target": "newest"}, InvalidTarget, "target must be 'latest' or a version number"),
        ({"target": True}, InvalidTarget, "target must be 'latest' or a version number"),
        ({"target": -1}, InvalidTarget, "target must be 'latest' or a version number"),
        ({"rerun": 0}, InvalidTarget, "rerun must be a positive version number"),
        ({"rerun": True}, InvalidTarget, "rerun must be a positive version number"),
        ({"floor": -3}, ValueError, "floor must be a non-negative version number"),
        ({"fresh": "skipp"}, ValueError, "fresh must be 'run' or 'skip'"),
        ({"on_ahead": "ignore"}, ValueError, "on_ahead must be 'warn' or 'error'"),
        ({"collection": ""}, ValueError, "collection must be a non-empty collection name"),
        ({"collection": "a$b"}, ValueError, "not a usable collection name"),
        ({"history_collection": "system.x"}, ValueError, "not a usable collection name"),
        ({"build": 7}, ValueError, "build must be text"),
        ({"validate": "false"}, ValueError, "validate must be True or False"),
        ({"retry_failed_on_new_build": 1}, ValueError, "must be True or False"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Settings(**options)


def test_defaults_are_those_of_migrate() -> None:
    settings = Settings()
    assert (settings.collection, settings.history_name) == ("migrations", "migrations_history")
    assert (settings.wait_timeout, settings.lease, settings.target) == (300.0, 30.0, "latest")


def test_history_collection_defaults_from_the_collection_and_can_be_named() -> None:
    assert Settings(collection="schema").history_name == "schema_history"
    assert Settings(collection="schema", history_collection="").history_name == "schema_history"
    assert Settings(collection="schema", history_collection="audit").history_name == "audit"


def test_stream_and_write_retry_intervals_follow_the_poll_interval_unless_given() -> None:
    policy = Settings(max_poll_interval=0.5).waiting
    assert (policy.stream_idle_wait, policy.max_write_retry_interval) == (0.5, 0.5)


def test_the_three_waiting_intervals_are_separate() -> None:
    policy = Settings(
        max_poll_interval=0.5, stream_idle_wait=1.5, max_write_retry_interval=4.0
    ).waiting
    assert (policy.max_poll_interval, policy.stream_idle_wait, policy.max_write_retry_interval) == (
        0.5,
        1.5,
        4.0,
    )


def test_updated_checks_again_and_refuses_unknown_names() -> None:
    settings = Settings(lease=10.0)
    assert settings.updated(wait_timeout=5.0) == Settings(lease=10.0, wait_timeout=5.0)
    with pytest.raises(TypeError, match="unknown bootmigrate option: leese"):
        settings.updated(leese=3)
    with pytest.raises(ValueError, match="lease must be a positive, finite number"):
        settings.updated(lease=math.nan)


@pytest.mark.anyio
async def test_migrate_refuses_a_bad_option_before_touching_the_database() -> None:
    # Not a database at all: the option is refused before the database is even looked at.
    with pytest.raises(ValueError, match="wait_timeout must be a positive, finite number"):
        await migrate(object(), [], wait_timeout=math.nan)


def test_integrations_check_options_when_the_app_is_built() -> None:
    with pytest.raises(TypeError, match="unknown bootmigrate option: leese"):
        migrate_lifespan(object(), "migrations", leese=3)
    with pytest.raises(ValueError, match="lease must be a positive, finite number"):
        migrate_context(object(), "migrations", lease=math.inf)
    with pytest.raises(ValueError, match="lease must be a number of seconds"):
        migrate_lifespan(object(), "migrations", settings=Settings(), lease="30")
