"""FastAPI lifespan: FastAPI apps are Starlette apps, so this is the Starlette helper."""

from .starlette import BOOT_STATE, BootMigration, Lifespan, migrate_lifespan, readiness

__all__ = ["BOOT_STATE", "BootMigration", "Lifespan", "migrate_lifespan", "readiness"]
