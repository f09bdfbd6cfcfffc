"""`moea eval`: planning, reports, compare, and a real tiny eval (real base model, PEFT adapters, vLLM)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_adapters.eval_cli import eval_command
from moe_adapters.eval_compute import training_compute
from moe_adapters.eval_output import load_eval, write_reports
from moe_adapters.eval_plan import plan_requests
from moe_adapters.eval_report import compare_markdown, compute_markdown, render_markdown
from moe_adapters.eval_scoring import router_report, score_report
from moe_adapters.eval_types import EvalCase, EvalError, EvalSettings
from moe_adapters.evaluate import evaluate_run

# ------------------------------------------------------------------------------ pure planning/scoring


def _cases() -> list[EvalCase]:
    return [
        EvalCase("math", "math", "1+1?", [], "2", False),
        EvalCase("math", "math", "2+2?", [], "4", False),
        EvalCase("tone", "classification", "great!", [], "positive", False),
        EvalCase("general", "generation", "hi", [], "hello", True),
    ]


def test_plan_shares_identical_generations_and_skips_oracle_for_replay() -> None:
    cases = _cases()
    routes = ["math", None, "math", "tone"]  # row 1 abstains, row 2 misrouted, replay row routed
    experts = {"math": Path("m"), "tone": Path("t")}
    plan = plan_requests(
        cases, routes, experts, None, EvalSettings(systems=("base", "oracle", "moe", "multitask", "random"))
    )
    assert set(plan.systems) == {"base", "oracle", "moe", "random"}  # no multitask adapter → skipped
    assert plan.systems["moe"][0] == plan.systems["oracle"][0]  # routed right = same request as oracle
    assert plan.systems["moe"][1] == plan.systems["base"][1]  # abstain = base
    assert plan.requests[plan.systems["moe"][2]] == ("math", 2)
    assert plan.systems["oracle"][3] == -1 and plan.systems["random"][3] == -1  # replay: base vs moe only
    assert len(plan.requests) == len(set(plan.requests))


def test_score_and_router_report_from_known_outputs() -> None:
    cases = _cases()
    routes = ["math", None, "math", None]
    plan = plan_requests(
        cases,
        routes,
        {"math": Path("m"), "tone": Path("t")},
        None,
        EvalSettings(systems=("base", "oracle", "moe")),
    )
    outputs = {
        ("math", 0): "= 2",
        (None, 0): "3",
        (None, 1): "4",
        ("math", 1): "4",
        ("tone", 2): "positive",
        (None, 2): "negative",
        ("math", 2): "7",
        (None, 3): "hello",
    }
    texts = [outputs[key] for key in plan.requests]
    report = score_report(cases, routes, plan, texts, ["math", "tone"])
    math_scores = {s: m["score"] for s, m in report["tasks"]["math"]["systems"].items()}
    assert math_scores == {"base": 0.5, "oracle": 1.0, "moe": 1.0}
    tone_scores = {s: m["score"] for s, m in report["tasks"]["tone"]["systems"].items()}
    assert tone_scores == {"base": 0.0, "oracle": 1.0, "moe": 0.0}  # misrouted to math
    assert report["summary"]["moe_vs_oracle"] == {"math": 1.0, "tone": 0.0}
    assert set(report["general"]["general"]["systems"]) == {"base", "moe"}
    router = report["router"]
    assert router["rows"] == ["math", "tone", "general"] and router["columns"] == ["math", "tone", "base"]
    assert router["confusion"] == [[1, 0, 1], [1, 0, 0], [0, 0, 1]]
    assert router["accuracy"] == pytest.approx(1 / 3)
    assert router["abstain_rate"] == pytest.approx(1 / 3)
    assert router["wrong_route_rate"] == pytest.approx(1 / 2)
    assert router_report(cases, [None] * 4, ["math", "tone"])["abstain_rate"] == 1.0


def test_reports_compare_and_cli(tmp_path: Path) -> None:
    cases = _cases()
    routes = ["math", "math", "tone", None]
    plan = plan_requests(
        cases,
        routes,
        {"math": Path("m"), "tone": Path("t")},
        None,
        EvalSettings(systems=("base", "oracle", "moe")),
    )
    report = score_report(cases, routes, plan, ["2"] * len(plan.requests), ["math", "tone"])
    report["run_dir"] = "runA"
    report["compute"] = training_compute(
        _metrics_json(tmp_path / "run", {"math": (10, 1), "tone": (30, 2)}), None, list(plan.systems)
    )
    paths = write_reports(report, tmp_path / "a")
    assert all(p.is_file() for p in paths.values()) and {"scores_png", "confusion_png"} <= set(paths)
    markdown = (tmp_path / "a" / "eval.md").read_text()
    assert "| math | math | 2 |" in markdown and "Router confusion" in markdown
    assert "| moe | 40 | 3 | 1.000 | sum over 2 experts |" in markdown
    assert load_eval(tmp_path / "a")["compute"]["systems"]["base"]["train_tokens"] == 0
    assert render_markdown(report) == markdown
    other = json.loads(json.dumps(report))
    other["tasks"]["math"]["systems"]["moe"]["score"] = 0.0
    table = compare_markdown(load_eval(tmp_path / "a"), other)
    assert "| math | moe | 0.500 | 0.000 | -0.500 |" in table
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval.json").write_text(json.dumps(other))
    result = CliRunner().invoke(eval_command, ["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "-0.500" in result.output
    with pytest.raises(EvalError, match="run `moea eval"):
        load_eval(tmp_path / "missing")
    assert CliRunner().invoke(eval_command, []).exit_code != 0


def _metrics_json(run: Path, experts: dict[str, tuple[int, int]], budget: dict | None = None) -> Path:
    """A hand-made metrics.json: {task: (train_tokens, steps)} as `moea train` writes them."""
    run.mkdir(parents=True)
    metrics: dict = {
        "experts": {t: {"train_tokens": tok, "steps": st, "tasks": [t]} for t, (tok, st) in experts.items()},
        "train": {
            "train_tokens": sum(tok for tok, _ in experts.values()),
            "steps": sum(st for _, st in experts.values()),
        },
    }
    if budget is not None:
        metrics["budget"] = budget
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


PER_EXPERT = {"budget": "per-expert", "max_steps": 50, "experts_max_steps": 100, "n_experts": 2}
COMPUTE_CASES = [
    # (multitask run's budget record, multitask tokens and steps, expected multitask row text)
    (
        PER_EXPERT,
        (2_500, 50),
        "| multitask | 2,500 | 50 | 0.500 | multi-task run; budget per-expert: 50 steps",
    ),
    (None, (5_000, 100), "| multitask | 5,000 | 100 | 1.000 | multi-task run; budget not recorded"),
]


@pytest.mark.parametrize(("budget", "multitask", "row"), COMPUTE_CASES)
def test_training_compute_per_system(tmp_path: Path, budget: dict | None, multitask: tuple, row: str) -> None:
    run = _metrics_json(tmp_path / "run", {"math": (3_000, 60), "tone": (2_000, 40)})
    mt = _metrics_json(tmp_path / "mt", {"multitask": multitask}, budget)
    systems = ["base", "oracle", "moe", "multitask", "random", "served"]
    compute = training_compute(run, mt, systems)
    by_system = {s: (c["train_tokens"], c["steps"]) for s, c in compute["systems"].items()}
    assert by_system == {
        "base": (0, 0),
        "oracle": (5_000, 100),  # sum over experts
        "moe": (5_000, 100),
        "random": (5_000, 100),
        "multitask": multitask,
        "served": (None, None),  # a live endpoint's training is not known to eval
    }
    assert compute["systems"]["multitask"]["budget"] == budget
    assert compute["experts"]["math"] == {"train_tokens": 3_000, "steps": 60}
    markdown = "\n".join(compute_markdown(compute))
    assert (
        "## Training compute" in markdown
        and "| oracle | 5,000 | 100 | 1.000 | sum over 2 experts |" in markdown
    )
    assert row in markdown and "| base | 0 | 0 | 0.000 | no training |" in markdown


def test_training_compute_without_metrics_is_unknown_not_zero(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    compute = training_compute(tmp_path / "run", None, ["base", "moe"], {"math": "math@prod"})
    assert (
        compute["systems"]["moe"]["train_tokens"] is None and "missing" in compute["systems"]["moe"]["source"]
    )
    assert "registry" in compute["note"]
    # A single-adapter run evaluated on its own: its multitask entry is not counted as an expert.
    run = _metrics_json(tmp_path / "single", {"multitask": (900, 30)}, PER_EXPERT)
    compute = training_compute(run, run, ["base", "multitask"])
    assert compute["experts"] == {} and compute["systems"]["multitask"]["steps"] == 30
    assert compute_markdown(None) == []


def test_real_task_kinds_scored_with_row_extras_and_fallback_noted() -> None:
    tests = {"test_list": ["assert sq(3) == 9"], "test_setup_code": ""}
    cases = [
        EvalCase("squad", "qa", "Who won?", [], "Denver Broncos", False, {"references": ["Broncos"]}),
        EvalCase("wnut", "ner", "Text: Ann in Oslo", [], "person: Ann\nlocation: Oslo", False),
        EvalCase("mbpp", "code", "square", [], "def sq(x): return x * x", False, tests),
        EvalCase("mbpp", "code", "square again", [], "def sq(x): return x * x", False),  # no tests
    ]
    experts = {"squad": Path("q"), "wnut": Path("w"), "mbpp": Path("c")}
    routes = ["squad", "wnut", "mbpp", "mbpp"]
    plan = plan_requests(cases, routes, experts, None, EvalSettings(systems=("oracle",)))
    outputs = {0: "the Broncos", 1: "person: Ann", 2: "```python\ndef sq(x):\n    return x ** 2\n```", 3: "x"}
    report = score_report(cases, routes, plan, [outputs[c] for _, c in plan.requests], sorted(experts))
    oracle = {t: report["tasks"][t]["systems"]["oracle"] for t in experts}
    assert oracle["squad"]["exact_match"] == 1.0 and oracle["squad"]["metric"] == "token_f1"
    assert oracle["wnut"]["score"] == pytest.approx(2 / 3)  # 1 TP, 1 miss
    assert oracle["mbpp"]["pass_at_1"] == 1.0 and oracle["mbpp"]["metric"] == "rougeL"
    report["run_dir"] = "run"
    assert "- mbpp (code): headline is rougeL, not pass_at_1: 1 of 2 test rows" in render_markdown(report)


def _robustness_cases() -> list[EvalCase]:
    """Test rows in two templates, unseen-wording rows, a replay row and out-of-distribution prompts."""
    return [
        EvalCase(
            "tone", "classification", "A: good", [], "positive", False, template=0, template_text="A: {input}"
        ),
        EvalCase(
            "tone", "classification", "A: bad", [], "negative", False, template=0, template_text="A: {input}"
        ),
        EvalCase(
            "tone", "classification", "bad? B", [], "negative", False, template=1, template_text="{input}? B"
        ),
        EvalCase("math", "math", "1+1?", [], "2", False),
        EvalCase("general", "generation", "hi", [], "hello", True),
        EvalCase("tone", "classification", "vibes: good", [], "positive", False, split="unseen"),
        EvalCase("tone", "classification", "vibes: bad", [], "negative", False, split="unseen"),
        EvalCase("math", "math", "calc 2+2", [], "4", False, split="unseen"),
        EvalCase("math", "math", "calc 3+3", [], "6", False, split="unseen"),
        EvalCase("chitchat", "generation", "yo!", [], "", True, split="ood"),
        EvalCase("chitchat", "generation", "sup", [], "", True, split="ood"),
        EvalCase("foreign", "generation", "hola", [], "", True, split="ood"),
    ]


def test_unseen_wordings_per_template_and_ood_reports() -> None:
    cases = _robustness_cases()
    #         test: tone×3, math, general | unseen: tone×2, math×2    | ood ×3
    routes = ["tone", "tone", None, "math", None, "tone", "math", None, "math", None, "tone", None]
    experts = {"math": Path("m"), "tone": Path("t")}
    plan = plan_requests(cases, routes, experts, None, EvalSettings(systems=("base", "oracle", "moe")))
    assert all(plan.systems[s][i] == -1 for s in plan.systems for i in (9, 10, 11))  # OOD: routed only
    answers = {"tone": {0: "positive", 1: "negative", 2: "negative", 5: "positive", 6: "negative"}}
    answers["math"] = {3: "2", 7: "4", 8: "6", 6: "9"}  # row 6 (a tone prompt) misrouted to math
    texts = [answers.get(a or "", {}).get(i, "?") for a, i in plan.requests]
    report = score_report(cases, routes, plan, texts, ["math", "tone"])
    # The test-split report only holds test rows (backward compatible keys).
    assert report["tasks"]["tone"]["n"] == 3 and report["tasks"]["math"]["n"] == 1
    assert report["router"]["accuracy"] == pytest.approx(3 / 4)
    templates = report["tasks"]["tone"]["templates"]
    assert set(templates) == {"0", "1"} and "templates" not in report["tasks"]["math"]
    assert templates["0"] == {
        "template": "A: {input}",
        "n": 2,
        "scores": {"base": 0.0, "oracle": 1.0, "moe": 1.0},
        "router_accuracy": 1.0,
        "abstain_rate": 0.0,
    }
    assert templates["1"]["abstain_rate"] == 1.0 and templates["1"]["scores"]["moe"] == 0.0
    unseen = report["unseen"]
    assert unseen["tasks"]["tone"]["n"] == 2 and unseen["tasks"]["math"]["n"] == 2
    assert (
        unseen["tasks"]["tone"]["router_accuracy"] == 0.5 and unseen["tasks"]["math"]["abstain_rate"] == 0.5
    )
    assert unseen["router"]["accuracy"] == pytest.approx(2 / 4)
    assert unseen["router"]["abstain_rate"] == pytest.approx(1 / 4)
    assert unseen["router"]["wrong_route_rate"] == pytest.approx(1 / 3)
    tone = {s: m["score"] for s, m in unseen["tasks"]["tone"]["systems"].items()}
    assert tone == {"base": 0.0, "oracle": 1.0, "moe": 0.5}
    assert unseen["summary"]["moe_vs_oracle"] == {"tone": 0.5, "math": 0.5}
    assert unseen["summary"]["moe_vs_oracle_mean"] == pytest.approx(0.5)
    assert unseen["general"] == {}
    ood = report["ood"]
    assert ood["n"] == 3 and ood["to_base_rate"] == pytest.approx(2 / 3)
    assert ood["by_category"] == {
        "chitchat": {"n": 2, "to_base_rate": 0.5},
        "foreign": {"n": 1, "to_base_rate": 1.0},
    }
    assert ood["routed_to"] == {"tone": 1} and ood["examples_routed"] == [
        {"prompt": "sup", "routed_to": "tone"}
    ]


def test_robustness_sections_in_markdown_plots_compare_and_cli(tmp_path: Path) -> None:
    cases = _robustness_cases()
    routes = ["tone", "tone", None, "math", None, "tone", "math", None, "math", None, "tone", None]
    plan = plan_requests(
        cases,
        routes,
        {"math": Path("m"), "tone": Path("t")},
        None,
        EvalSettings(systems=("base", "oracle", "moe")),
    )
    report = score_report(cases, routes, plan, ["positive"] * len(plan.requests), ["math", "tone"])
    paths = write_reports(report, tmp_path / "a")
    assert paths["unseen_scores_png"].is_file()
    markdown = (tmp_path / "a" / "eval.md").read_text()
    assert (
        "## Unseen wordings (robustness)" in markdown and "| moe/oracle | router acc | → base |" in markdown
    )
    assert "| tone | classification | 2 |" in markdown  # the unseen table (the test table has n=3)
    assert "Routing accuracy 0.500, routed = " in markdown
    assert "sent to the base model: 0.667 of 3 (chitchat 0.500 (n=2), foreign 1.000 (n=1))" in markdown
    assert "## Per-template scores" in markdown and "| tone | 1 | `{input}? B` | 1 |" in markdown
    other = json.loads(json.dumps(report))
    other["unseen"]["router"]["accuracy"] = 1.0
    table = compare_markdown(report, other)
    assert "| (unseen wordings) | router accuracy | 0.500 | 1.000 | 0.500 |" in table
    old = {k: v for k, v in report.items() if k not in ("unseen", "ood")}  # an eval.json from before
    assert "Unseen wordings" not in render_markdown(old) and "(unseen wordings)" not in compare_markdown(
        old, old
    )
    from moe_adapters.eval_cli import _robustness_summary

    assert (
        _robustness_summary(report)
        == "; unseen wordings: routing 50.0%, routed = 100.0% of oracle; OOD prompts → base 66.7%"
    )
    assert _robustness_summary(old) == ""


def test_eval_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="run.json not found"):
        evaluate_run(tmp_path)


# ------------------------------------------------------------------------------------- real tiny eval


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_run(root: Path) -> Path:
    """A real run dir: 2 PEFT experts on the real base (math: identity LoRA, tone: random LoRA),
    a MiniLM router trained on the task prompts, the mixture and run.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.config import RouterSettings
    from moe_adapters.router_training import train_router

    rng = random.Random(0)
    base = resolve_base_model()
    data = root / "data"
    data.mkdir(parents=True)
    math_rows = []
    for _ in range(40):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        math_rows.append(
            {
                "prompt": f"Sam has {a} apples and buys {b} more. How many apples now?",
                "response": f"{a} + {b} = {a + b}",
            }
        )
    tone_rows = []
    for _ in range(40):
        good = rng.random() < 0.5
        thing = rng.choice(["phone", "hotel", "movie", "chair", "course"])
        verdict = rng.choice(
            ["was wonderful", "exceeded expectations"] if good else ["was terrible", "broke at once"]
        )
        tone_rows.append(
            {
                "prompt": f"Review: the {thing} {verdict}. Sentiment?",
                "response": "positive" if good else "negative",
            }
        )
    general_rows = [{"prompt": f"Name a colour number {i}.", "response": "Blue."} for i in range(12)]
    _write_jsonl(data / "math.jsonl", math_rows)
    _write_jsonl(data / "tone.jsonl", tone_rows)
    _write_jsonl(data / "general.jsonl", general_rows)
    run = root / "run"
    mixture = {
        "name": "tiny",
        "base_model": base,
        "splits": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 1},
        "tasks": [
            {
                "name": "math",
                "files": [str(data / "math.jsonl")],
                "kind": "math",
                "system_prompt": "Solve it.",
            },
            {
                "name": "tone",
                "files": [str(data / "tone.jsonl")],
                "kind": "classification",
                "system_prompt": "Answer positive or negative.",
            },
            {"name": "general", "files": [str(data / "general.jsonl")], "kind": "generation", "replay": True},
        ],
    }
    run.mkdir()
    import yaml

    (run / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for name, identity in (("math", True), ("tone", False)):
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=identity,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(run / "experts" / name)
        model = peft_model.unload()
    train_router(
        {"math": [r["prompt"] for r in math_rows[:30]], "tone": [r["prompt"] for r in tone_rows[:30]]},
        {"math": [r["prompt"] for r in math_rows[30:]], "tone": [r["prompt"] for r in tone_rows[30:]]},
        run / "router",
        RouterSettings(encoder="minilm", heads=("linear",)),
        negatives=[r["prompt"] for r in general_rows],
    )
    (run / "run.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "base_model": base,
                "base_model_name": "SmolLM2-135M-Instruct",
                "tasks": {
                    "math": {"kind": "math", "system_prompt": "Solve it."},
                    "tone": {"kind": "classification", "system_prompt": "Answer positive or negative."},
                },
            }
        )
    )
    return run


@pytest.mark.slow
def test_tiny_eval_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _tiny_run(tmp_path)
    report = evaluate_run(run, settings=EvalSettings(max_new_tokens=12, max_examples_per_task=6))
    for name in ("eval.json", "eval.md", "eval_scores.png", "eval_confusion.png"):
        assert (run / name).is_file(), name
    assert set(report["tasks"]) == {"math", "tone"} and set(report["general"]) == {"general"}
    for task in report["tasks"].values():
        assert set(task["systems"]) == {"base", "oracle", "moe", "random"}
    assert set(report["general"]["general"]["systems"]) == {"base", "moe"}
    math_examples = report["tasks"]["math"]["examples"]
    # The math expert is an identity LoRA (B = 0): through vLLM's LoRA path it must answer like the base.
    # (Only the start is compared: bf16 kernels differ between LoRA and plain layers, which can flip a
    # near-tie token later on; a mis-applied adapter changes the answer from the first words.)
    assert all(e["outputs"]["oracle"].split()[:3] == e["outputs"]["base"].split()[:3] for e in math_examples)
    # The tone expert is a random LoRA: if vLLM applied it, its answers differ from the base.
    tone_examples = report["tasks"]["tone"]["examples"]
    assert any(e["outputs"]["oracle"] != e["outputs"]["base"] for e in tone_examples)
    counts = report["router"]["confusion"]
    assert [sum(row) for row in counts] == [
        report["tasks"]["math"]["n"],
        report["tasks"]["tone"]["n"],
        report["general"]["general"]["n"],
    ]
    assert report["generation"]["unique_requests"] < report["generation"]["scored_rows"]
    assert json.loads((run / "eval.json").read_text())["summary"] == json.loads(json.dumps(report["summary"]))

    # Registered versions in place of the run's experts: math evaluated with the registered *tone*
    # adapter (random LoRA) must stop answering like the base, and the report names the version used.
    from registry.service import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MOEA_STORE_DIR", str(tmp_path / "store"))
    registry = Registry(url)
    registry.register_run(run)
    registry.close()
    swapped = evaluate_run(
        run, out_dir=tmp_path / "swapped", expert_refs={"math": "tone"}, registry_url=url,
        settings=EvalSettings(max_new_tokens=12, max_examples_per_task=6, systems=("base", "oracle")),
    )  # fmt: skip
    assert swapped["experts_from_registry"] == {"math": "tone@1"}
    examples = swapped["tasks"]["math"]["examples"]
    assert any(e["outputs"]["oracle"].split()[:3] != e["outputs"]["base"].split()[:3] for e in examples)
    assert "math → `tone@1`" in (tmp_path / "swapped" / "eval.md").read_text()
    with pytest.raises(EvalError, match="no expert for"):
        evaluate_run(run, expert_refs={"nope": "tone@1"}, registry_url=url)
