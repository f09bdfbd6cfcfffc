"""Gateway API keys: names and scopes (`moea serve --api-key NAME:KEY:SCOPES`, MOEA_API_KEYS).

A key spec is one of

* ``KEY`` — a bare key (today's form): the client scopes ``chat,feedback,read``, named
  ``key-`` + the first 8 hex digits of its SHA-256 (stable across restarts, never the key itself);
* ``NAME:KEY`` — a named key with the client scopes;
* ``NAME:KEY:SCOPES`` — a named key with the comma-separated scopes (the key may contain ``:``; the
  name ends at the first one, the scopes start after the last one).

Scopes: ``chat`` (POST /v1/chat/completions, /v1/completions; GET /v1/models), ``feedback``
(POST /v1/feedback on the key's own responses), ``read`` (GET /v1/models, /metrics, /health details),
``admin`` (everything, and rating any response, replacing another key's rating). Only a key given
``admin`` explicitly is an admin. The key's *name* is what the request log records.

MOEA_API_KEYS holds specs separated by whitespace or ``;``; a piece without ``:`` may list several bare
keys separated by commas (the old ``k1,k2`` form), e.g. ``MOEA_API_KEYS="app:K1:chat,feedback ops:K2:admin"``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

SCOPES = ("chat", "feedback", "read", "admin")
CLIENT_SCOPES = frozenset({"chat", "feedback", "read"})
"""The scopes of a key given without any (a bare `--api-key KEY` or `NAME:KEY`)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class ApiKeySpecError(ValueError):
    """A `--api-key` / MOEA_API_KEYS entry that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ApiKey:
    """One accepted key, as the gateway knows it (the secret itself is only a lookup key)."""

    name: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        """Admin keys may do everything, including rating (and re-rating) any response."""
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        """True when the key has `scope` (admin has every scope)."""
        return self.admin or scope in self.scopes


def bare_key_name(secret: str) -> str:
    """The name of a key given without one: `key-` + 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def parse_key_spec(spec: str) -> tuple[str, ApiKey]:
    """(secret, ApiKey) of one `KEY`, `NAME:KEY` or `NAME:KEY:SCOPES` spec; ApiKeySpecError if bad."""
    spec = spec.strip()
    if ":" not in spec:
        if not spec:
            raise ApiKeySpecError("empty --api-key: give KEY, NAME:KEY or NAME:KEY:SCOPES")
        return spec, ApiKey(bare_key_name(spec), CLIENT_SCOPES)
    name, rest = spec.split(":", 1)
    secret, scopes = rest.rsplit(":", 1) if ":" in rest else (rest, None)
    if not _NAME_RE.match(name):
        raise ApiKeySpecError(
            f"bad API key name {name!r} in --api-key NAME:KEY[:SCOPES]: use 1-64 letters, digits, '_', '.', "
            "'@' or '-' (separate several MOEA_API_KEYS entries with spaces or ';')"
        )
    if not secret:
        raise ApiKeySpecError(f"API key {name!r} has an empty key: give --api-key {name}:KEY[:SCOPES]")
    if scopes is None:
        return secret, ApiKey(name, CLIENT_SCOPES)
    given = [scope.strip() for scope in scopes.split(",") if scope.strip()]
    unknown = sorted(set(given) - set(SCOPES))
    if unknown or not given:
        raise ApiKeySpecError(
            f"API key {name!r}: unknown or missing scopes {unknown or scopes!r}; use a comma-separated "
            f"subset of {', '.join(SCOPES)}"
        )
    return secret, ApiKey(name, frozenset(given))


def split_env(value: str) -> list[str]:
    """The key specs in a MOEA_API_KEYS value (see the module docstring)."""
    specs: list[str] = []
    for piece in re.split(r"[\s;]+", value):
        if ":" in piece:
            specs.append(piece)
        else:
            specs += [key for key in piece.split(",") if key]
    return specs


class KeyRing:
    """The keys one gateway accepts (empty: no authentication, every caller may do everything)."""

    def __init__(self, specs: Iterable[str]) -> None:
        self._keys: dict[bytes, ApiKey] = {}
        secrets: dict[str, ApiKey] = {}
        names: dict[str, str] = {}
        for spec in specs:
            secret, key = parse_key_spec(spec)
            if secrets.get(secret, key) != key:
                raise ApiKeySpecError(f"one key is given twice with different names/scopes ({key.name!r})")
            if names.setdefault(key.name, secret) != secret:
                raise ApiKeySpecError(f"two API keys are named {key.name!r}: give each key its own name")
            secrets[secret] = key
            self._keys[_digest(secret)] = key

    @property
    def enabled(self) -> bool:
        """False when no key is configured (open gateway)."""
        return bool(self._keys)

    @property
    def keys(self) -> list[ApiKey]:
        """The accepted keys (names and scopes only)."""
        return list(self._keys.values())

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key an `Authorization: Bearer KEY` header carries; None when absent or not accepted."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._keys.get(_digest(token.strip()))


def _digest(secret: str) -> bytes:
    # Looked up by digest: the table never holds the keys as dict keys compared byte by byte.
    return hashlib.sha256(secret.encode()).digest()


def require(ring: KeyRing, authorization: str | None, *scopes: str) -> ApiKey | None:
    """The caller's key when it has one of `scopes` (None on an open gateway); else the 401/403 APIError."""
    from .errors import APIError

    if not ring.enabled:
        return None
    key = ring.identify(authorization)
    if key is None:
        raise APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>` with a key given to moea serve "
            "(--api-key or MOEA_API_KEYS)",
            code="invalid_api_key",
        )
    if not any(key.allows(scope) for scope in scopes):
        raise APIError(
            403,
            f"API key {key.name!r} lacks the scope this endpoint needs ({' or '.join(scopes)}); it has "
            f"{', '.join(sorted(key.scopes))}",
            code="insufficient_scope",
        )
    return key
