"""Errors raised by the registry, and the one rule for showing any moea error to a user.

Every message is one line that says what is wrong and how to fix it. This module sits at the bottom of
moea's layers (registry <- moe_adapters <- serving <- the command line), so every package shares the rule.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# The top-level packages moea installs; an exception class defined in one of them is written for users.
OWN_PACKAGES = ("moe_adapters", "registry", "serving")


def is_user_facing(error: BaseException) -> bool:
    """True for exceptions raised deliberately by moea (their class lives in one of our packages)."""
    return any(cls.__module__.split(".")[0] in OWN_PACKAGES for cls in type(error).__mro__)


@contextlib.contextmanager
def user_facing_errors() -> Iterator[None]:
    """Print moea's own errors as `Error: <message>` on stderr and exit 1; let bugs raise with a traceback.

    Exits with SystemExit (not click.ClickException) so the rule holds both inside a click command and
    around `group.main()` in the console entry point, where click no longer catches anything.
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - filtered right below
        if not is_user_facing(error):
            raise
        import click

        click.echo(f"Error: {error}", err=True)
        sys.exit(1)


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""


class NotFoundError(RegistryError, LookupError):
    """An expert, version, alias, router or experiment does not exist."""


class IntegrityError(RegistryError):
    """An artifact on disk no longer matches the hashes recorded when it was registered."""


class ValidationError(RegistryError, ValueError):
    """A name, alias, reference, run dir or import file is malformed."""


class ConflictError(RegistryError):
    """The operation contradicts the registry's current state (e.g. archiving the prod version)."""
