"""The project's own settings: the ``[tool.bootmigrate]`` section of the nearest
``pyproject.toml``, from the working directory upward.

The CLI reads it between the environment and its built-in defaults: a flag wins over an
environment variable, which wins over the section, which wins over the default
(``bootmigrate config`` shows where each value came from). A relative ``migrations`` is read
from the section's own directory, so the command works from anywhere in the project.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the standard library has it from 3.11
    import tomli as tomllib

# Section keys (dashes or underscores), by the option of every command they set.
SHARED = ("db", "migrations", "collection", "history_collection", "driver", "timeout")
# Keys for `up` alone, and the one the library's Settings takes without a flag.
UP_ONLY = ("wait_timeout", "shutdown_grace", "allow_out_of_order")
# The one `plan` takes too: it shows what `up` would run.
PLAN_TOO = ("allow_out_of_order",)
SETTINGS_ONLY = ("lease",)
KEYS = (*SHARED, *UP_ONLY, *SETTINGS_ONLY)
# The ones that are `migrate()` options too (the rest are the CLI's: how to connect).
MIGRATE_KEYS = ("migrations", "collection", "history_collection", *UP_ONLY, *SETTINGS_ONLY)


class ConfigError(ValueError):
    """The ``[tool.bootmigrate]`` section cannot be used: the message names the file, the key
    and the fix."""


@dataclass(frozen=True)
class ProjectConfig:
    """The section found (``path`` is ``None`` when there is none) and its values, by the
    option name they set."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def default_map(self, commands: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The defaults each command takes from the section (click's ``default_map``)."""
        shared = {k: v for k, v in self.values.items() if k in SHARED}
        up = {k: v for k, v in self.values.items() if k in UP_ONLY}
        plan = {k: v for k, v in up.items() if k in PLAN_TOO}
        own = {"up": up, "plan": plan}
        return {name: {**shared, **own.get(name, {})} for name in commands}


def find_config(start: Path) -> ProjectConfig:
    """The ``[tool.bootmigrate]`` section of the nearest ``pyproject.toml`` at or above
    ``start``; the nearest file decides, with or without a section."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return read_config(candidate)
    return ProjectConfig()


def read_config(path: Path) -> ProjectConfig:
    """The section of ``path``, checked: known keys only, a relative ``migrations`` made
    relative to the file's directory."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as TOML: {exc}") from None
    section = data.get("tool", {}).get("bootmigrate")
    if section is None:
        return ProjectConfig()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tool.bootmigrate] must be a table of settings")
    values: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in KEYS:
            allowed = ", ".join(k.replace("_", "-") for k in KEYS)
            raise ConfigError(
                f"{path}: [tool.bootmigrate] has no setting {key!r}; the settings are: {allowed}"
            )
        values[name] = value
    migrations = values.get("migrations")
    if isinstance(migrations, str) and (path.parent / migrations).exists():
        values["migrations"] = str((path.parent / migrations).resolve())
    return ProjectConfig(path, values)


def pyproject_options(start: str | Path | None = None) -> dict[str, Any]:
    """The ``migrate()`` options that ``[tool.bootmigrate]`` sets, in the nearest
    pyproject.toml at or above ``start`` (default: the working directory): ``migrations``,
    ``collection``, ``history_collection``, ``wait_timeout``, ``shutdown_grace``,
    ``allow_out_of_order``, ``lease``.
    Empty without a section. The service's and the CLI's settings then live in one place:

    >>> await migrate(db, **pyproject_options())  # doctest: +SKIP
    """
    found = find_config(Path.cwd() if start is None else Path(start))
    return {k: v for k, v in found.values.items() if k in MIGRATE_KEYS}
