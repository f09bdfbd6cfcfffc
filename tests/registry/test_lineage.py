"""Lineage of a version trained from another (``moea train --dpo``): recorded by ``moea register`` from
run.json, shown by ``moea registry show`` and ``history``; a bad or foreign lineage is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_run_dir

from registry.cli import main
from registry.errors import ValidationError
from registry.lineage import lineage_line, parent_label
from registry.service import Registry

SHA = "ab" * 32


def derived_run(root: Path, parent_version: object = 1, **extra: object) -> Path:
    """A one-expert run dir of `summarize` whose run.json says it was DPO-trained from `parent_version`."""
    run = make_run_dir(root, ("summarize",), router=False, seed=7)
    record = json.loads((run / "run.json").read_text())
    record["lineage"] = {
        "summarize": {
            "method": "dpo",
            "parent": "summarize@prod",
            "parent_version": parent_version,
            "preferences_file": "/data/prefs.jsonl",
            "preferences_sha256": SHA,
            "pairs": 120,
            **extra,
        }
    }
    (run / "run.json").write_text(json.dumps(record))
    return run


def test_register_records_the_parent_and_the_preference_hash(registry: Registry, tmp_path: Path) -> None:
    registry.register_run(make_run_dir(tmp_path / "a", ("summarize",), router=False, seed=1))
    registry.register_run(make_run_dir(tmp_path / "b", ("summarize",), router=False, seed=2))
    # Trained from v1 (prod), registered after v2: the parent is v1, not the previous version.
    view = registry.register_run(derived_run(tmp_path / "dpo")).experts[0]
    assert (view.version, view.parent_version) == (3, 1)
    assert view.config["lineage"]["preferences_sha256"] == SHA and view.aliases == []
    assert registry.resolve("summarize@3").config["lineage"]["parent"] == "summarize@prod"
    assert parent_label(view) == "1 (dpo)"
    assert lineage_line(view) == (
        f"summarize@3 ← summarize@1 (from summarize@prod) by dpo on prefs.jsonl (120 pairs, sha256 {SHA[:12]}…)"
    )
    plain = registry.resolve("summarize@2")
    assert (plain.parent_version, parent_label(plain), lineage_line(plain)) == (None, "-", None)


def test_a_parent_this_registry_lacks_is_refused_and_nothing_registered(
    registry: Registry, tmp_path: Path
) -> None:
    registry.register_run(make_run_dir(tmp_path / "a", ("summarize",), router=False, seed=1))
    with pytest.raises(ValidationError, match=r"trained from summarize@5, which this registry does not have"):
        registry.register_run(derived_run(tmp_path / "dpo", parent_version=5))
    assert [v.version for v in registry.list_versions("summarize")] == [1]


@pytest.mark.parametrize(
    ("parent_version", "extra", "message"),
    [
        ("1", {}, "parent_version must be a version number"),
        (0, {}, "parent_version must be a version number"),
        (1, {"preferences_sha256": "not-a-hash"}, "preferences_sha256 must be a sha256 hex digest"),
    ],
)
def test_malformed_lineage_is_a_one_line_error(
    registry: Registry, tmp_path: Path, parent_version: object, extra: dict, message: str
) -> None:
    registry.register_run(make_run_dir(tmp_path / "a", ("summarize",), router=False, seed=1))
    with pytest.raises(ValidationError, match=message) as caught:
        registry.register_run(derived_run(tmp_path / "dpo", parent_version, **extra))
    assert "\n" not in str(caught.value) and "run.json" in str(caught.value)


def test_show_and_history_display_the_lineage(tmp_path: Path) -> None:
    common = ["--registry-url", f"sqlite:///{tmp_path / 'r.db'}", "--store-dir", str(tmp_path / "store")]

    def moea(*args: str) -> str:
        result = CliRunner().invoke(main, [*args, *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    moea("register", str(make_run_dir(tmp_path / "a", ("summarize",), router=False, seed=1)))
    moea("register", str(derived_run(tmp_path / "dpo")))
    line = "lineage: summarize@2 ← summarize@1 (from summarize@prod) by dpo on prefs.jsonl (120 pairs, sha256"
    show = moea("registry", "show", "summarize")
    assert "1 (dpo)" in show and line in show
    assert line in moea("registry", "history", "summarize")
    assert json.loads(moea("registry", "show", "summarize", "--json"))[1]["config"]["lineage"]["pairs"] == 120
