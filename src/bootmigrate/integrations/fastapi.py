"""FastAPI lifespan: FastAPI apps are Starlette apps, so this is the Starlette helper."""

from .starlette import Lifespan, migrate_lifespan

__all__ = ["Lifespan", "migrate_lifespan"]
