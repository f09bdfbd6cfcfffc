"""Preference pairs: the one file format that ``moea feedback export`` writes and ``moea train --dpo`` reads.

One JSON object per line::

    {"prompt": "Classify: great film", "chosen": "positive", "rejected": "It sounds positive to me!"}
    {"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}

``prompt`` (one user message) or ``messages`` (the client's messages, ending with a user turn) — exactly one
of the two; ``chosen`` and ``rejected`` are the two assistant answers, different and non-empty. Every other
key (``expert``, ``request_ids``, ``reward_gap``, …) is kept as metadata and ignored by training. Pairs
written by hand are checked by the same :func:`read_preferences` as exported ones: every problem is reported
as ``file:line: what is wrong``, and nothing is trained on a file with any problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_adapters.data_rows import CHAT_ROLES

PAIR_KEYS = ("prompt", "messages", "chosen", "rejected")


class PreferenceFileError(ValueError):
    """A bad preference file; ``problems`` lists every bad line as ``file:line: what is wrong``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} problem(s) in the preference file; fix them and rerun:"
        super().__init__(head + "\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer."""

    messages: tuple[tuple[str, str], ...]
    """The client's messages as ``(role, content)``; the last one is the user's."""
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False)
    """``file:line`` for error messages (empty for pairs built in memory)."""

    @property
    def prompt(self) -> str:
        """The last user message (what the router reads)."""
        return self.messages[-1][1]

    def client_messages(self) -> list[dict[str, str]]:
        """The messages as a client sends them."""
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_record(self) -> dict[str, Any]:
        """The JSON object of one line: ``prompt`` for a lone user message, else ``messages``."""
        single = len(self.messages) == 1
        head: dict[str, Any] = {"prompt": self.prompt} if single else {"messages": self.client_messages()}
        return {**head, "chosen": self.chosen, "rejected": self.rejected, **self.meta}


def pair_from_record(record: Any, source: str, problems: list[str]) -> PreferencePair | None:
    """The pair of one decoded line; None, with every problem appended to ``problems``, when it is bad."""
    if not isinstance(record, dict):
        problems.append(f"{source}: expected a JSON object, got {type(record).__name__}")
        return None
    start = len(problems)
    has_prompt, has_messages = record.get("prompt") is not None, record.get("messages") is not None
    messages: tuple[tuple[str, str], ...] = ()
    if has_prompt == has_messages:
        problems.append(f"{source}: give exactly one of 'prompt' (text) or 'messages' (a chat list)")
    elif has_prompt:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            problems.append(f"{source}: 'prompt' must be non-empty text")
        else:
            messages = (("user", record["prompt"]),)
    else:
        messages = _messages(record["messages"], source, problems)
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{source}: {key!r} must be non-empty text")
    if isinstance(record.get("chosen"), str) and record.get("chosen") == record.get("rejected"):
        problems.append(f"{source}: 'chosen' and 'rejected' are the same answer (nothing to prefer)")
    if len(problems) > start:
        return None
    meta = {k: v for k, v in record.items() if k not in PAIR_KEYS}
    return PreferencePair(messages, record["chosen"], record["rejected"], meta, source)


def _messages(value: Any, source: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        problems.append(f"{source}: 'messages' must be a non-empty list of {{role, content}} objects")
        return ()
    out: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            problems.append(
                f"{source}: messages[{i}] must be {{'role': one of {list(CHAT_ROLES)}, 'content': text}}"
            )
            return ()
        out.append((role, content))
    if out[-1][0] != "user" or not out[-1][1].strip():
        problems.append(f"{source}: the last message must be a non-empty user message (the prompt)")
        return ()
    return tuple(out)


def read_preferences(path: Path | str) -> list[PreferencePair]:
    """Every pair of a preference JSONL file, checked; raises :class:`PreferenceFileError` listing every bad
    line (blank lines are skipped), or when the file holds no pair at all."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceFileError([f"{path}: no such file"])
    problems: list[str] = []
    pairs: list[PreferencePair] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{source}: not valid JSON ({exc.msg})")
                continue
            pair = pair_from_record(record, source, problems)
            if pair is not None:
                pairs.append(pair)
    if not problems and not pairs:
        problems.append(f"{path}: no preference pairs in the file")
    if problems:
        raise PreferenceFileError(problems)
    return pairs


def write_preferences(path: Path | str, pairs: Iterable[PreferencePair]) -> str:
    """Write ``pairs`` as JSONL atomically (a temp file renamed over ``path``); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for pair in pairs:
                handle.write(json.dumps(pair.to_record(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return preference_file_sha256(path)


def preference_file_sha256(path: Path | str) -> str:
    """The sha256 of the file's bytes (recorded as the lineage of a DPO-trained version)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
