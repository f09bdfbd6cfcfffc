"""moea: registry — the system of record for experts, routers, aliases and experiments.

`from registry import Registry` works, but is resolved lazily so that importing `registry.cli`
(mounted by `moea`) does not pull in SQLAlchemy/alembic until a command actually runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConflictError, IntegrityError, NotFoundError, RegistryError, ValidationError

MOEA_PACKAGE = "registry"  # marker checked by moe_adapters.check_sibling_packages

if TYPE_CHECKING:
    from .service import Registry

__all__ = ["ConflictError", "IntegrityError", "NotFoundError", "Registry", "RegistryError", "ValidationError"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        from .service import Registry

        return Registry
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
