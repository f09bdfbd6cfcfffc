"""Reading and writing mixture YAML files.

:func:`load_mixture` reads a mixture YAML, applies dotted ``overrides``
(``{"train.max_steps": 20, "tasks.sentiment.kind": "generation"}``), builds the
:mod:`moe_adapters.config` dataclasses, resolves paths relative to the YAML, reads templates files and
validates, raising :class:`~moe_adapters.config.ConfigError` listing every problem at once.
:func:`write_resolved_mixture` writes the resolved mixture a run dir keeps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from moe_adapters.config import ConfigError, MixtureConfig
from moe_adapters.config_paths import resolve_paths
from moe_adapters.config_validate import build_config, validate_mixture
from moe_adapters.templates import TemplateError, read_templates_file, validate_templates


def load_mixture(path: str | Path, overrides: dict[str, Any] | None = None) -> MixtureConfig:
    """Load, override, resolve paths and validate a mixture YAML; raise ConfigError listing all problems."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"mixture file {path} not found: pass the path of a mixture YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a 'tasks' list")
    raw.pop("probabilities", None)  # present in a resolved mixture.yaml written to a run dir
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value)
    errors: list[str] = []
    config = build_config(MixtureConfig, raw, "", errors)
    if config is not None and not errors:  # range checks need well-typed values
        resolve_paths(config, path.parent)
        config.source_path = path
        errors += _read_templates(config)
        errors += validate_mixture(config)
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    assert config is not None
    return config


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b]... = value`` for ``"a.b..."``; in ``tasks`` a segment is an index or a task name."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, dotted)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _list_index(items: list[Any], part: str, dotted: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    raise ConfigError(f"override {dotted!r}: no list item {part!r} (use an index or a task name)")


def _read_templates(config: MixtureConfig) -> list[str]:
    """Read every ``templates_file`` into ``templates`` (then cleared) and check every task's templates."""
    errors = []
    for i, task in enumerate(config.tasks):
        key = f"tasks[{i}]({task.name})"
        if task.templates_file is not None:
            if task.templates is not None:
                errors.append(f"{key}: set templates or templates_file, not both")
                continue
            try:
                task.templates = read_templates_file(task.templates_file)
            except TemplateError as error:
                errors.append(f"{key}.templates_file: {error}")
                continue
            where = f"{key}.templates_file ({task.templates_file.name})"
            task.templates_file = None
        else:
            where = f"{key}.templates"
        for problem in validate_templates(task.templates) if task.templates is not None else []:
            errors.append(f"{where}{problem}" if problem.startswith("[") else f"{where}: {problem}")
    return errors


def mixture_to_dict(config: MixtureConfig, probabilities: dict[str, float] | None = None) -> dict[str, Any]:
    """Plain dict of the resolved mixture (absolute paths, all defaults) + optional ``probabilities``."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = plain(dataclasses.asdict(config))
    data.pop("source_path", None)
    if probabilities is not None:
        data["probabilities"] = {k: float(v) for k, v in probabilities.items()}
    return data


def mixture_yaml(config: MixtureConfig, probabilities: dict[str, float] | None = None) -> str:
    """The resolved mixture as YAML text (what ``RUN_DIR/mixture.yaml`` holds)."""
    return yaml.safe_dump(mixture_to_dict(config, probabilities), sort_keys=False, allow_unicode=True)


def write_resolved_mixture(
    config: MixtureConfig, path: Path, probabilities: dict[str, float] | None = None
) -> None:
    """Write the resolved mixture YAML to ``path``."""
    path.write_text(mixture_yaml(config, probabilities))
