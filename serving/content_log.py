"""Request content for the request log (`moea serve --log-content`): the client's messages and the answer
text of one exchange. Off by default; when off no exchange carries a :class:`Content` and nothing here runs.

The answer is the first choice's text (``n > 1`` samples beyond the first are not kept): ``message.content``
of a chat answer, ``text`` of a completion, and for a streamed answer the ``delta.content`` / ``text`` pieces
of its events joined in order (what the client assembled; a stream cut short keeps what was sent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def capture_content(enabled: bool, endpoint: str, data: dict[str, Any]) -> Content | None:
    """A :class:`Content` holding what the client asked (chat: its ``messages`` as sent, before the expert's
    system prompt is added; completions: its ``prompt``), or None when content logging is off."""
    if not enabled:
        return None
    return Content(data.get("messages") if endpoint == "chat" else data.get("prompt"))


@dataclass
class Content:
    """The content of one exchange, filled in as the answer is relayed."""

    messages: Any
    parts: list[str] = field(default_factory=list)
    answered: bool = False
    """The engine sent a first choice (its text may be empty)."""

    @property
    def answer(self) -> str | None:
        """The first choice's text; None when no choice came back (an error)."""
        return "".join(self.parts) if self.answered else None

    def take_body(self, body: bytes) -> None:
        """Read the answer of a plain JSON response body."""
        try:
            choice = _first_choice(json.loads(body))
        except ValueError:
            return
        if choice is not None:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            self._add(text)

    def take_events(self, events: bytes) -> None:
        """Read the answer pieces in complete server-sent events (``data: {json}`` lines)."""
        for line in events.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue  # blank separators, `data: [DONE]`
            try:
                choice = _first_choice(json.loads(line[len(b"data: ") :]))
            except ValueError:
                continue
            if choice is not None:
                delta = choice.get("delta")
                self._add(delta.get("content") if isinstance(delta, dict) else choice.get("text"))

    def _add(self, text: Any) -> None:
        self.answered = True
        if isinstance(text, str):
            self.parts.append(text)


def _first_choice(payload: Any) -> dict[str, Any] | None:
    """The choice with index 0 of an answer (or answer chunk); None when it has none."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None
