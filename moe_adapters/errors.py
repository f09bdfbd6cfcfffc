"""Errors moea shows to users, and the CLI's rule for printing them.

Every exception class defined inside moea's own packages is written for users: its message says what
is wrong and how to fix it, so the CLI prints it as one line. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

_OWN_PACKAGES = ("moe_adapters", "registry", "serving")


def is_user_facing(error: BaseException) -> bool:
    """True for exceptions raised deliberately by moea (their class lives in one of our packages)."""
    return any(cls.__module__.split(".")[0] in _OWN_PACKAGES for cls in type(error).__mro__)


@contextlib.contextmanager
def user_facing_errors() -> Iterator[None]:
    """Print moea's own errors as `Error: <message>` and exit 1; let bugs raise with a traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - filtered right below
        if not is_user_facing(error):
            raise
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
