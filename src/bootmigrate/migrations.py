"""Migrations: the :class:`Migration` record, loading it from files or packages, validation.

A :class:`Catalog` knows a source's versions and names from its file names alone; a module is
imported only when its migration is needed (a step that will run, ``validate``, the CLI).
Loading is pure: it imports code and checks it, and never touches the database, so a bad
migration that is about to run is refused before any lock is taken.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple, Union

from .errors import InvalidMigrations

MigrationStep = Callable[..., Awaitable[Any]]
MigrationSource = Union[str, "os.PathLike[str]", Iterable["Migration"]]

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>\w+)$")


@dataclass(frozen=True)
class Migration:
    """One migration: ``up`` (and optionally ``down``) as ``async def step(db[, ctx])``.

    ``idempotent=True`` declares that running ``up`` twice is harmless, which lets a process
    that takes over from a dead holder re-run a migration the holder was interrupted in.
    ``timeout`` (seconds) fails the migration if it runs longer. ``transactional=True`` runs
    it in a transaction (``ctx.session``) committed together with its version and history
    record; it must then finish within half the lease.
    """

    version: int
    up: MigrationStep
    down: MigrationStep | None = None
    name: str = ""
    idempotent: bool = False
    transactional: bool = False
    timeout: float | None = None
    description: str = ""
    source: str = ""
    # sha256 of the module's source file; for a Migration made in code, of its steps' source.
    checksum: str = ""
    # Positional parameters of up and down (1: db; 2: db, ctx), read once when created.
    _arities: dict[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.description:
            object.__setattr__(self, "description", self.name.replace("_", " "))
        if not self.checksum:
            object.__setattr__(self, "checksum", _steps_checksum(self.up, self.down))
        # Checked once, here, so that loading the same set again costs nothing.
        object.__setattr__(self, "_arities", _check_migration(self))

    def safe_to_repeat(self, direction: str | None = "up") -> bool:
        """Whether a step in ``direction`` may run again after an interruption: run in a
        transaction (which the interruption aborted, leaving nothing behind), or an ``up`` (a
        ``rerun`` is one) declared idempotent. ``idempotent`` says nothing of ``down``."""
        return self.transactional or (self.idempotent and direction != "down")

    def wants_context(self, direction: str) -> bool:
        """Whether the step for ``direction`` takes ``ctx`` as its second parameter."""
        return self._arities["down" if direction == "down" else "up"] == 2

    def label(self) -> str:
        """``0007 backfill_emails``: how logs and errors name this migration."""
        return f"{self.version:04d} {self.name}".rstrip()


def load_migrations(source: MigrationSource) -> list[Migration]:
    """Load and validate migrations from a directory, a dotted package name, or objects.

    Returns them sorted by version. Raises :class:`InvalidMigrations` naming the offending
    file or version for: duplicate versions, a file without a version prefix, a missing or
    synchronous ``up``, a step with the wrong parameters, or a module that fails to import.
    Imports every module; :func:`catalog` lists them without importing any.
    """
    return catalog(source).load_all()


class Entry(NamedTuple):
    """A migration as its file name tells it, before its module is imported."""

    version: int
    name: str
    # The file's path (a directory) or the module's dotted name (a package).
    origin: str
    # The name the module is imported under (a package's own dotted name).
    module: str

    def label(self) -> str:
        return f"{self.version:04d} {self.name}".rstrip()


class Catalog(Mapping[int, Migration]):
    """The migrations of one source by version, known from file names alone.

    Versions and names come from one directory listing; a module is imported only when its
    migration is looked up (``catalog[v]``) or loaded (:meth:`load`), so a boot with nothing to
    run imports none, and a bad module that will not run blocks nothing. What the names say
    (a missing version prefix, a version declared twice) is refused when the catalog is made.
    """

    def __init__(self, entries: Iterable[Entry], loaded: Iterable[Migration] = ()) -> None:
        self.entries = tuple(sorted(entries, key=lambda e: e.version))
        self._by_version = {e.version: e for e in self.entries}
        self._loaded = {m.version: m for m in loaded}

    @classmethod
    def of(cls, migrations: Iterable[Migration]) -> Catalog:
        """A catalog of migrations made in code (nothing to import)."""
        found = _sorted_unique(list(migrations))
        entries = [Entry(m.version, m.name, m.source, "") for m in found]
        return cls(entries, found)

    @property
    def versions(self) -> list[int]:
        return [e.version for e in self.entries]

    @property
    def latest(self) -> int:
        return self.entries[-1].version if self.entries else 0

    def load(self, versions: Iterable[int]) -> list[Migration]:
        """The migrations of ``versions``, importing their modules (once); raises
        :class:`InvalidMigrations` for a module that fails to import or to validate."""
        versions = sorted(set(versions))
        for version in versions:
            if version not in self._loaded:
                self._loaded[version] = _load_entry(self._by_version[version])
        return [self._loaded[v] for v in versions]

    def load_all(self) -> list[Migration]:
        """Every migration, imported and validated (``validate``, the CLI)."""
        return self.load(self.versions)

    def __getitem__(self, version: int) -> Migration:
        if version not in self._by_version:
            raise KeyError(version)
        return self.load([version])[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.versions)

    def __len__(self) -> int:
        return len(self.entries)


def catalog(source: MigrationSource) -> Catalog:
    """The migrations of ``source`` (a directory, a dotted package name, or ``Migration``
    objects) by version, without importing any migration module."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return Catalog(_check_entries(_list_directory(path)))
        if isinstance(source, str) and _looks_like_package(source):
            return Catalog(_check_entries(_list_package(source)))
        raise InvalidMigrations(
            f"migrations source {str(source)!r} is neither a directory nor an importable "
            "package; pass a directory path, a dotted package name, or Migration objects"
        )
    found = list(source)
    for item in found:
        if not isinstance(item, Migration):
            raise InvalidMigrations(
                f"expected Migration objects, got {type(item).__name__}: {item!r}"
            )
    return Catalog.of(found)


@dataclass(frozen=True)
class Floor:
    """The oldest database version a release upgrades from, and the release to pass through
    for anything older (``FLOOR`` and ``FLOOR_RELEASE`` in the migrations package)."""

    version: int
    release: str | None = None


def declared_floor(source: MigrationSource) -> Floor | None:
    """``FLOOR`` (and ``FLOOR_RELEASE``) from the migrations package's ``__init__``, if any."""
    module: ModuleType | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        init = path / "__init__.py"
        if path.is_dir():
            if init.exists():
                module = _import_init(init)
        elif isinstance(source, str) and _looks_like_package(source):
            try:
                module = importlib.import_module(source)
            except Exception as exc:
                raise InvalidMigrations(
                    f"migrations package {source!r} cannot be imported: {exc!r}"
                ) from exc
    if module is None or getattr(module, "FLOOR", None) is None:
        return None
    version, release = module.FLOOR, getattr(module, "FLOOR_RELEASE", None)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidMigrations(
            f"FLOOR in {module.__name__} must be a non-negative version number, got {version!r}"
        )
    if release is not None and not isinstance(release, str):
        raise InvalidMigrations(f"FLOOR_RELEASE in {module.__name__} must be text, got {release!r}")
    return Floor(version, release)


def floor_in_force(
    source: MigrationSource, floor: int | None = None, release: str | None = None
) -> tuple[int | None, str | None]:
    """The floor and its release a call works to: its own arguments, else the declared ones."""
    declared = declared_floor(source)
    if declared is None:
        return floor, release
    return (
        declared.version if floor is None else floor,
        declared.release if release is None else release,
    )


def _import_init(init: Path) -> ModuleType:
    stamp = (str(init.resolve()), init.stat().st_mtime_ns, init.stat().st_size)
    if stamp not in _INITS:
        digest = hashlib.sha1(stamp[0].encode()).hexdigest()[:10]
        _INITS[stamp] = _import_file(init, f"_bootmigrate_{digest}_package")
    return _INITS[stamp]


_INITS: dict[tuple[str, int, int], ModuleType] = {}


def _looks_like_package(name: str) -> bool:
    return all(part.isidentifier() or part.isdigit() for part in name.split("."))


def _list_directory(directory: Path) -> list[Entry]:
    # A per-directory prefix keeps two migration directories with equal file names apart
    # in sys.modules.
    prefix = "_bootmigrate_" + hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    found = []
    with os.scandir(directory) as listing:  # one listing; no file is opened or stat'ed
        for item in listing:
            if item.name.endswith(".py") and not item.name.startswith("_"):
                stem = item.name[:-3]
                version, name = _parse_file_name(stem, item.path)
                found.append(Entry(version, name, item.path, f"{prefix}_{stem}"))
    return found


def _list_package(package_name: str) -> list[Entry]:
    try:
        # Finds the package's directory; imports its parents, never its migration modules.
        spec = importlib.util.find_spec(package_name)
    except (ImportError, ValueError) as exc:
        raise InvalidMigrations(
            f"migrations package {package_name!r} cannot be imported: {exc}"
        ) from exc
    if spec is None:
        raise InvalidMigrations(
            f"migrations package {package_name!r} cannot be imported: no module named "
            f"{package_name!r}"
        )
    paths = spec.submodule_search_locations
    if paths is None:
        raise InvalidMigrations(
            f"{package_name!r} is a module, not a package; migrations must be modules inside "
            "a package (a directory with __init__.py)"
        )
    found = []
    for info in pkgutil.iter_modules(list(paths)):
        if info.name.startswith("_"):
            continue
        origin = f"{package_name}.{info.name}"
        version, name = _parse_file_name(info.name, origin)
        found.append(Entry(version, name, origin, origin))
    return found


def _check_entries(entries: list[Entry]) -> list[Entry]:
    """Refuse what the file names alone show to be wrong: a version that is not positive, or
    one declared twice."""
    by_version: dict[int, Entry] = {}
    for entry in entries:
        if entry.version <= 0:
            raise InvalidMigrations(
                f"migration {entry.origin}: version must be a positive int, got {entry.version!r}"
            )
        other = by_version.setdefault(entry.version, entry)
        if other is not entry:
            first, second = sorted([other.origin, entry.origin])
            raise InvalidMigrations(
                f"version {entry.version} is declared twice: by {first!r} and by {second!r}; "
                "give one of them the next free version"
            )
    return entries


# Migrations imported from files, by path, time and size: another migrate() call in the same
# process imports nothing again, and an edited file is imported anew.
_FILES: dict[tuple[str, int, int], Migration] = {}


def _load_entry(entry: Entry) -> Migration:
    if entry.module == entry.origin:  # a module of a package
        try:
            module = importlib.import_module(entry.module)
        except Exception as exc:
            raise InvalidMigrations(f"migration {entry.origin} failed to import: {exc!r}") from exc
        return _from_module(module, entry.version, entry.name, entry.origin)
    file = Path(entry.origin)
    stat = file.stat()
    stamp = (entry.origin, stat.st_mtime_ns, stat.st_size)
    if stamp not in _FILES:
        module = _import_file(file, entry.module)
        _FILES[stamp] = _from_module(module, entry.version, entry.name, entry.origin)
    return _FILES[stamp]


def _parse_file_name(stem: str, origin: object) -> tuple[int, str]:
    match = _FILE_NAME.match(stem)
    if match is None:
        raise InvalidMigrations(
            f"migration file {origin} has no version prefix; name it like "
            f"0001_{stem if stem.isidentifier() else 'describe_change'}.py"
        )
    return int(match["version"]), match["name"]


def _import_file(file: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise InvalidMigrations(f"migration file {file} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise InvalidMigrations(f"migration file {file} failed to import: {exc!r}") from exc
    return module


def _from_module(module: ModuleType, version: int, name: str, origin: str) -> Migration:
    up = getattr(module, "up", None)
    if up is None:
        raise InvalidMigrations(f"migration {origin} defines no `async def up(db)`")
    doc = (module.__doc__ or "").strip().splitlines()
    migration = Migration(
        version=version,
        up=up,
        down=getattr(module, "down", None),
        name=name,
        idempotent=bool(getattr(module, "idempotent", False)),
        transactional=bool(getattr(module, "transactional", False)),
        timeout=getattr(module, "timeout", None),
        description=doc[0] if doc else "",
        source=origin,
        checksum=_file_checksum(getattr(module, "__file__", None)),
    )
    return migration


def _file_checksum(path: str | None) -> str:
    if not path:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _steps_checksum(*steps: object) -> str:
    try:
        text = "".join(inspect.getsource(step) for step in steps if step is not None)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""  # no source to read (a builtin, or code made at run time)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_migration(migration: Migration) -> dict[str, int]:
    where = migration.source or f"version {migration.version!r}"
    if (
        isinstance(migration.version, bool)
        or not isinstance(migration.version, int)
        or migration.version <= 0
    ):
        raise InvalidMigrations(
            f"migration {where}: version must be a positive int, got {migration.version!r}"
        )
    timeout = migration.timeout
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise InvalidMigrations(
            f"migration {where}: timeout must be a positive number of seconds, got {timeout!r}"
        )
    arities = {"up": _check_step(migration.up, "up", where), "down": 1}
    if migration.down is not None:
        arities["down"] = _check_step(migration.down, "down", where)
    return arities


def _check_step(step: object, kind: str, where: str) -> int:
    if not callable(step):
        raise InvalidMigrations(f"migration {where}: `{kind}` is not callable")
    if not inspect.iscoroutinefunction(step):
        raise InvalidMigrations(
            f"migration {where}: `{kind}` must be declared `async def {kind}(db)`; "
            "a synchronous function would block every replica's event loop"
        )
    try:
        count = step_arity(step)
    except ValueError:
        return 1  # no signature to read (a C callable): called with the database alone
    if count not in (1, 2):
        raise InvalidMigrations(
            f"migration {where}: `{kind}` takes {count} positional parameters; "
            f"declare `async def {kind}(db)` or `async def {kind}(db, ctx)`"
        )
    return count


def step_arity(step: object) -> int:
    """How many positional parameters a step takes (1: ``db``; 2: ``db, ctx``)."""
    params = inspect.signature(step).parameters.values()  # type: ignore[arg-type]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _sorted_unique(found: list[Migration]) -> list[Migration]:
    by_version: dict[int, Migration] = {}
    for migration in found:
        other = by_version.get(migration.version)
        if other is not None:
            raise InvalidMigrations(
                f"version {migration.version} is declared twice: by "
                f"{other.source or other.name!r} and by {migration.source or migration.name!r}; "
                "give one of them the next free version"
            )
        by_version[migration.version] = migration
    return [by_version[v] for v in sorted(by_version)]
