"""Instruction templates (FLAN-style): one task, many wordings of its instruction around a raw input.

A task that sets ``templates`` (or ``templates_file``) in the mixture keeps only the raw input in its
``prompt_field`` column. Every row is rendered with one of the templates, drawn by a hash of the task
name and the raw input — the same row always gets the same wording, whatever the file order, the
split or a resumed run. The experts thereby see each task in many wordings; the router is trained on
*every* rendering of each training row, so it learns the task rather than one template.

A template is a ``str.format`` string with the placeholder ``{input}``; literal braces are written
``{{`` and ``}}`` (e.g. ``'Return JSON like {{"name": ...}} for: {input}'``). Every other field
(``{text}``, ``{0}``, ``{input!r}``, ``{input:>10}``) is rejected, so a typo cannot silently leave
an instruction without its input.

Pure functions only: no file or config state beyond :func:`read_templates_file`.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

PLACEHOLDER = "input"
"""Name of the one placeholder a template may use: ``{input}``."""
TEXT_SUFFIXES = (".txt", ".text")
YAML_SUFFIXES = (".yaml", ".yml")


class TemplateError(ValueError):
    """Templates that cannot be used; the message says which one and how to fix it."""


@dataclass(frozen=True)
class TemplateChoice:
    """Which template rendered a row, and the raw input it wrapped (to render every wording again)."""

    index: int
    """Position of the template in the task's ``templates`` list."""
    input: str
    """The raw input (the row's ``prompt_field`` value)."""


def template_problem(template: object) -> str | None:
    """What is wrong with one template (None: usable)."""
    if not isinstance(template, str):
        return f"must be a string, got {type(template).__name__}"
    if not template.strip():
        return "is empty"
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as error:  # a lone "{" or "}"
        return f"{error}; write literal braces as {{{{ and }}}} (the only placeholder is {{input}})"
    others = sorted({"{" + name + "}" for name, _, _ in fields if name != PLACEHOLDER})
    if others:
        return (
            f"has placeholder(s) {', '.join(others)}; the only placeholder is {{input}} "
            "(write literal braces as {{ and }})"
        )
    if any(spec or conversion for _, spec, conversion in fields):
        return "uses {input} with a conversion or format spec; write it as plain {input}"
    if not fields:
        return "has no {input} placeholder: the raw input would be dropped"
    return None


def validate_templates(templates: object) -> list[str]:
    """Every problem of a template list (empty: usable), each naming the template by its index."""
    if not isinstance(templates, list) or not templates:
        return ["must be a non-empty list of strings, each with the placeholder {input}"]
    problems = []
    for i, template in enumerate(templates):
        problem = template_problem(template)
        if problem is not None:
            problems.append(f"[{i}] {template!r} {problem}")
    return problems


def read_templates_file(path: Path) -> list[str]:
    """Templates from a YAML/JSON list of strings (or ``{templates: [...]}``) or a text file.

    A text file holds one template per line; ``\\n`` in a line stands for a line break, blank lines and
    lines starting with ``#`` are skipped. Raises :class:`TemplateError` when the file cannot be read;
    the templates themselves are checked by :func:`validate_templates`.
    """
    if not path.is_file():
        raise TemplateError(f"templates file {path} not found (paths are relative to the mixture YAML)")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        lines = [line.rstrip("\r") for line in text.splitlines()]
        return [line.replace("\\n", "\n") for line in lines if line.strip() and not line.startswith("#")]
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise TemplateError(f"templates file {path}: cannot be parsed ({error})") from error
    if isinstance(data, dict) and "templates" in data:
        data = data["templates"]
    if not isinstance(data, list):
        raise TemplateError(
            f"templates file {path}: expected a list of strings (or a 'templates' key holding one); "
            f"use {', '.join(YAML_SUFFIXES + ('.json',) + TEXT_SUFFIXES)}"
        )
    return data


def template_index(n_templates: int, task_name: str, raw_input: str) -> int:
    """The template a row gets: a hash of the task name and the raw input, modulo the template count.

    Seeded by the row's content, not its position, so splits, resumed runs and eval agree."""
    digest = hashlib.sha256(f"{task_name}\x00{raw_input}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n_templates


def render(template: str, raw_input: str) -> str:
    """One template filled with the raw input (braces inside the input are kept verbatim)."""
    return template.format(input=raw_input)


def render_row(
    templates: Sequence[str] | None, task_name: str, raw_input: str
) -> tuple[str, TemplateChoice | None]:
    """The prompt of a row and the template choice; without templates, the input itself and None."""
    if not templates:
        return raw_input, None
    index = template_index(len(templates), task_name, raw_input)
    return render(templates[index], raw_input), TemplateChoice(index, raw_input)


def render_all(templates: Sequence[str], raw_input: str) -> list[str]:
    """Every wording of one raw input (what the router trains on), in template order."""
    return [render(template, raw_input) for template in templates]
