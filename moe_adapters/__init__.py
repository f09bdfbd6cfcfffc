"""moea: moe_adapters — everything that turns data into artifacts (training, routing, eval).

moea installs three top-level packages: `moe_adapters`, `registry` and `serving`. The last two have
generic names that another distribution could also install, or a folder on `sys.path` could shadow.
Each of moea's packages says so in its `__init__` with `MOEA_PACKAGE = "<name>"`; importing this
package (which `serving` and every `moea` command do first) checks the other two and stops with one
line that names the impostor's path, instead of failing later with a confusing AttributeError.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

MOEA_PACKAGE = "moe_adapters"


class PackageConflictError(ImportError):
    """A top-level package moea needs (`registry`, `serving`) resolves to someone else's package."""


def check_sibling_packages(names: tuple[str, ...] = ("registry", "serving")) -> None:
    """Raise PackageConflictError unless each of `names` resolves to moea's own package.

    Uses `find_spec` and reads the package's `__init__` text, so nothing is imported or executed.
    """
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise PackageConflictError(
                f"moea's package {name!r} is not installed next to moe_adapters; reinstall moea (pip install -e .)"
            )
        origin = Path(spec.origin) if spec.origin and spec.origin != "namespace" else None
        marker = f'MOEA_PACKAGE = "{name}"'
        if origin is None or origin.name != "__init__.py" or marker not in origin.read_text(encoding="utf-8"):
            where = origin or ", ".join(spec.submodule_search_locations or []) or "?"
            raise PackageConflictError(
                f"'import {name}' finds {where}, which is not moea's {name!r} package (another distribution "
                f"or a folder on sys.path shadows it); install moea in its own virtual environment, or remove "
                f"or rename the other {name!r}"
            )


check_sibling_packages()

# bitsandbytes' CPU backend (QLoRA, moe_adapters.quantize) logs a warning at import that an optional kernel
# download from the Hub failed, and peft imports bitsandbytes whenever it is installed, so every run would
# print it; its built-in fallback quantizes and trains correctly (tests/moe_adapters/test_train_parallel.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
