"""The browser dashboard of `moea serve` under /ui: experts, routing, experiments and engines, read from the
registry and the gateway's own state and counters; admin actions behind a confirmation step."""

from .routes import mount_ui

__all__ = ["mount_ui"]
