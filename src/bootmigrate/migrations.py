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
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Union

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


class Catalog(Mapping[int, Migration]):
    """The migrations of one source by version, known from file names alone.

    Versions come from one directory listing; a module is imported only when its migration
    is looked up (``catalog[v]``) or loaded (:meth:`load`), so a boot with nothing to run
    imports none, and a bad module that will not run blocks nothing. What the names say (a
    missing version prefix, a version declared twice) is refused when the catalog is made.

    ``stems`` maps each version to its module's name (``0007_backfill``) in ``package`` (a
    dotted name) or, without one, in ``folder`` (a directory path ending in a separator),
    imported under ``prefix`` + ``_`` + the name.
    """

    def __init__(
        self,
        stems: Mapping[int, str] | None = None,
        *,
        folder: str = "",
        prefix: str = "",
        package: str = "",
        loaded: Iterable[Migration] = (),
    ) -> None:
        self._stems = dict(stems or {})
        self._folder, self._prefix, self._package = folder, prefix, package
        self._loaded = {m.version: m for m in loaded}
        self.versions = sorted(self._stems.keys() | self._loaded.keys())

    @classmethod
    def of(cls, migrations: Iterable[Migration]) -> Catalog:
        """A catalog of migrations made in code (nothing to import)."""
        return cls(loaded=_sorted_unique(list(migrations)))

    @property
    def latest(self) -> int:
        return self.versions[-1] if self.versions else 0

    def origin(self, version: int) -> str:
        """Where migration ``version`` is: its file's path, or its module's dotted name."""
        stem = self._stems[version]
        return f"{self._package}.{stem}" if self._package else f"{self._folder}{stem}.py"

    def load(self, versions: Iterable[int]) -> list[Migration]:
        """The migrations of ``versions``, importing their modules (once); raises
        :class:`InvalidMigrations` for a module that fails to import or to validate."""
        versions = sorted(set(versions))
        for version in versions:
            if version not in self._loaded:
                self._loaded[version] = self._import(version)
        return [self._loaded[v] for v in versions]

    def load_all(self) -> list[Migration]:
        """Every migration, imported and validated (``validate``, the CLI)."""
        return self.load(self.versions)

    def _import(self, version: int) -> Migration:
        stem, origin = self._stems[version], self.origin(version)
        name = stem.partition("_")[2]
        if self._package:
            try:
                module = importlib.import_module(origin)
            except Exception as exc:
                raise InvalidMigrations(
                    f"migration {origin} failed to import: {import_failure(exc, None)}"
                ) from exc
            return _from_module(module, version, name, origin)
        stat = os.stat(origin)
        stamp = (origin, stat.st_mtime_ns, stat.st_size)
        if stamp not in _FILES:
            module = _import_file(Path(origin), f"{self._prefix}_{stem}")
            _FILES[stamp] = _from_module(module, version, name, origin)
        return _FILES[stamp]

    def __getitem__(self, version: int) -> Migration:
        if version not in self._stems and version not in self._loaded:
            raise KeyError(version)
        return self.load([version])[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.versions)

    def __len__(self) -> int:
        return len(self.versions)


# Migrations imported from files, by path, time and size: another migrate() call in the same
# process imports nothing again, and an edited file is imported anew.
_FILES: dict[tuple[str, int, int], Migration] = {}


def catalog(source: MigrationSource) -> Catalog:
    """The migrations of ``source`` (a directory, a dotted package name, or ``Migration``
    objects) by version, without importing any migration module."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _list_directory(path)
        if isinstance(source, str) and _looks_like_package(source):
            return _list_package(source)
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


def _list_directory(directory: Path) -> Catalog:
    # A per-directory prefix keeps two migration directories with equal file names apart
    # in sys.modules.
    prefix = "_bootmigrate_" + hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:10]
    folder = os.path.join(directory, "")
    versions, stems = [], []
    # One listing, no file opened or stat'ed: this runs on every boot, for every file.
    for file_name in os.listdir(directory):
        if file_name.endswith(".py") and not file_name.startswith("_"):
            stem = file_name[:-3]
            head, _, tail = stem.partition("_")
            if head.isdecimal() and tail.isidentifier():  # the common case, without a regex
                versions.append(int(head))
            else:
                versions.append(_parse_file_name(stem, folder + file_name)[0])
            stems.append(stem)
    found = _checked(versions, stems, lambda stem: f"{folder}{stem}.py")
    return Catalog(found, folder=folder, prefix=prefix)


def _list_package(package_name: str) -> Catalog:
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
    versions, stems = [], []
    for info in pkgutil.iter_modules(list(paths)):
        if not info.name.startswith("_"):
            versions.append(_parse_file_name(info.name, f"{package_name}.{info.name}")[0])
            stems.append(info.name)
    found = _checked(versions, stems, lambda stem: f"{package_name}.{stem}")
    return Catalog(found, package=package_name)


def _checked(versions: list[int], stems: list[str], origin: Callable[[str], str]) -> dict[int, str]:
    """Versions to module names, refusing what the names alone show to be wrong: version 0,
    or a version declared twice."""
    found = dict(zip(versions, stems, strict=True))
    if 0 in found:
        raise InvalidMigrations(
            f"migration {origin(found[0])}: version must be a positive int, got 0"
        )
    if len(found) != len(stems):
        seen: dict[int, str] = {}
        for version, stem in zip(versions, stems, strict=True):
            other = seen.setdefault(version, stem)
            if other != stem:
                first, second = sorted([origin(other), origin(stem)])
                raise InvalidMigrations(
                    f"version {version} is declared twice: by {first!r} and by {second!r}; "
                    "give one of them the next free version"
                )
    return found


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
        raise InvalidMigrations(
            f"migration file {file} failed to import: {import_failure(exc, file)}"
        ) from exc
    return module


def import_failure(exc: BaseException, file: Path | None) -> str:
    """Why a migration module did not import, where in it: the error and its line (for a
    syntax error, the line the parser stopped at; otherwise the last line of ``file`` the
    error went through), not the exception's raw repr."""
    if isinstance(exc, SyntaxError):
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        text = (exc.text or "").strip()
        return f"SyntaxError: {exc.msg} ({where}{f': {text}' if text else ''})"
    line = None
    if file is not None:
        resolved = str(file.resolve())
        for frame in traceback.extract_tb(exc.__traceback__):
            if str(Path(frame.filename).resolve()) == resolved:
                line = frame.lineno
    where = f" (line {line})" if line is not None else ""
    return f"{type(exc).__name__}: {exc}{where}"


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
