"""Errors raised by the registry. Every message is one line that says what is wrong and how to fix it."""

from __future__ import annotations


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
