"""Training recipes: shared warm-up then specialization (train.shared_steps) and keep-if-better.

Pure decisions and config checks run instantly; the runs use the tiny mixture of test_train.py (a few
steps on the real base model, CPU, one thread).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_adapters import shared_phase, train_loop
from moe_adapters.config import RECIPE_FIELDS, ConfigError, TrainConfig
from moe_adapters.config_load import load_mixture
from moe_adapters.eval_plan import plan_requests
from moe_adapters.eval_scoring import router_report
from moe_adapters.eval_types import EvalCase, EvalSettings
from moe_adapters.recipes import (
    format_decisions,
    keep_if_better,
    keep_if_better_by_metric,
    read_serving,
    relabel_router_prompts,
    serving_adapters,
)
from moe_adapters.sweep_run import write_task_mixture
from moe_adapters.train import drop_recipes_for_single_adapter, train_mixture
from moe_adapters.train_state import RunSchedule, warmup_cosine

FIXTURES = Path(__file__).parent / "fixtures"
MIXTURE = FIXTURES / "mixture.yaml"
RECIPE = {
    "train.num_threads": 1,
    "train.max_steps": 8,
    "train.shared_steps": 4,
    "train.eval_every": 2,
    "train.lr": 1e-3,
}

# ------------------------------------------------------------------------------------ pure decisions

DECISION_CASES = [
    # (expert val loss, shared val loss, expert kept)
    (1.0, 2.0, True),  # expert better
    (2.0, 1.0, False),  # shared better
    (1.5, 1.5, False),  # a tie goes to the shared adapter (one adapter fewer to serve)
    (None, 1.0, True),  # no val rows: nothing shows the shared adapter is better
    (math.inf, 1.0, True),  # never evaluated
    (1.0, math.nan, True),
]


@pytest.mark.parametrize(("expert", "shared", "kept"), DECISION_CASES)
def test_keep_if_better_decision(expert: float | None, shared: float | None, kept: bool) -> None:
    decision = keep_if_better({"t": expert}, {"t": shared})["t"]
    assert decision["kept"] is kept
    assert serving_adapters({"t": decision}) == {"t": "t" if kept else "shared"}
    json.dumps(decision, allow_nan=False)  # finite numbers or null only: metrics.json stays strict JSON


def test_keep_if_better_by_metric_decision() -> None:
    losses = keep_if_better(
        {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, {"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0}
    )
    acc = lambda score: {"metric": "accuracy", "score": score, "n": 4}  # noqa: E731
    decisions = keep_if_better_by_metric(
        {"a": acc(0.75), "b": acc(0.5), "c": acc(0.5), "d": None},
        {"a": acc(0.5), "b": acc(0.75), "c": acc(0.5), "d": None},
        losses,
    )
    # the metric decides, not the loss (every expert has the lower loss here); a tie goes to shared
    assert {t: d["kept"] for t, d in decisions.items()} == {"a": True, "b": False, "c": False, "d": True}
    assert decisions["a"]["expert_val_metric"] == 0.75 and decisions["a"]["shared_val_metric"] == 0.5
    assert decisions["b"]["val_metric"] == "accuracy" and decisions["b"]["expert_val_loss"] == 1.0
    assert decisions["d"]["val_metric"] is None and "no validation rows" in decisions["d"]["reason"]
    assert "val accuracy 0.5000 vs shared 0.7500" in format_decisions(decisions)[1]


def test_router_prompts_relabel_losing_tasks_and_serving_map_reads_back() -> None:
    serving = {"a": "a", "b": "shared", "c": "shared"}
    merged = relabel_router_prompts({"a": ["1"], "b": ["2"], "c": ["3", "4"]}, serving)
    assert merged == {"a": ["1"], "shared": ["2", "3", "4"]}
    assert relabel_router_prompts({"a": ["1"]}, None) == {"a": ["1"]}
    assert read_serving({"recipe": {"serving": serving}}) == serving
    assert read_serving({}) == {} and read_serving(None) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.shared_steps": 12}, "train.shared_steps: must be >= 0 and < train.max_steps=12"),
        ({"train.shared_steps": -1}, "train.shared_steps"),
        ({"train.keep_if_better": True}, "train.keep_if_better: .* needs train.shared_steps > 0"),
        ({"train.shared_steps": 2, "tasks.0.name": "shared"}, "'shared' names the shared adapter"),
        (
            {"train.expert_start": "continue"},
            "train.expert_start: 'continue' .* needs train.shared_steps > 0",
        ),
        (
            {"train.shared_steps": 2, "train.expert_start": "resume"},
            "train.expert_start: 'resume' is not one",
        ),
        (
            {"train.shared_steps": 2, "train.keep_if_better_by": "val_metric"},
            "train.keep_if_better_by: .* set train.keep_if_better: true",
        ),
    ],
)
def test_recipe_settings_are_validated(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_mixture(MIXTURE, overrides)


def test_single_adapter_runs_and_sweep_trials_set_every_recipe_off(tmp_path) -> None:
    """One rule (``TrainConfig.recipes_off``) for ``--single-adapter`` and the sweep's one-task mixtures: with
    every recipe setting on, both come back as plain experts (each field at its default)."""
    recipes_on = {
        "train.shared_steps": 2,
        "train.expert_start": "continue",
        "train.keep_if_better": True,
        "train.keep_if_better_by": "val_metric",
    }
    assert {f"train.{name}" for name in RECIPE_FIELDS} == set(recipes_on)
    defaults = TrainConfig()
    config = load_mixture(MIXTURE, recipes_on)
    assert config.train.uses_recipes()
    drop_recipes_for_single_adapter(config, single_adapter=False)
    assert config.train.uses_recipes()  # an experts run keeps them
    drop_recipes_for_single_adapter(config, single_adapter=True)
    assert not config.train.uses_recipes()
    assert all(getattr(config.train, n) == getattr(defaults, n) for n in RECIPE_FIELDS)

    config = load_mixture(MIXTURE, recipes_on)
    task = config.expert_tasks[0].name
    written = load_mixture(write_task_mixture(config, task, tmp_path / task))
    assert [t.name for t in written.expert_tasks] == [task]
    assert not written.train.uses_recipes()
    assert config.train.uses_recipes()  # the sweep's own mixture is left as it was


def test_eval_scores_oracle_with_the_serving_adapter() -> None:
    cases = [
        EvalCase("math", "math", "1+1?", [], "2", False),
        EvalCase("tone", "classification", "ok", [], "x", False),
    ]
    experts = {"math": Path("m"), "shared": Path("s")}  # tone lost to shared
    serving = {"math": "math", "tone": "shared"}
    plan = plan_requests(
        cases, ["math", "shared"], experts, None, EvalSettings(systems=("oracle", "moe")), serving
    )
    assert [plan.requests[i] for i in plan.systems["oracle"]] == [("math", 0), ("shared", 1)]
    assert plan.systems["moe"] == plan.systems["oracle"]
    assert router_report(cases, ["math", "shared"], sorted(experts), serving)["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ tiny runs


def _run(out: Path, **overrides: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_mixture(MIXTURE, out, overrides={**RECIPE, **overrides}, progress=False)


def test_run_schedule_is_one_decay_over_the_run() -> None:
    full = warmup_cosine(warmup_steps=5, total_steps=300)
    shared = RunSchedule(5, 300, offset=0, own_steps=300)  # the shared adapter: the multi-task schedule
    assert [shared(s) for s in range(300)] == [full(s) for s in range(300)]
    expert = RunSchedule(5, 300, offset=250, own_steps=10)  # 10 of the last 50 global steps (share 0.2)
    assert expert(0) == full(250)  # no new warmup: it goes on at the warm-up's last learning rate
    assert expert(4) == pytest.approx(full(270)) and expert(10) == pytest.approx(full(300)) == 0.1
    factors = [expert(s) for s in range(12)]
    assert all(a > b for a, b in zip(factors[:10], factors[1:10], strict=False)) and factors[11] == 0.1
    expert.restart_at(200, 20)  # the warm-up ended at step 200 (stopped early): 20 of 100 steps
    assert expert(0) == full(200) and expert(10) == pytest.approx(full(250))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_shared_warmup_then_keep_if_better_run_dir(tmp_path, monkeypatch):
    from peft import get_peft_model_state_dict

    from registry.rundir import read_run_dir

    at_switch: dict[str, dict[str, torch.Tensor]] = {}
    real_end, real_decide = train_loop.end_shared_phase, shared_phase.keep_if_better

    def end_and_capture(trainer):
        message = real_end(trainer)
        for name, e in trainer.experts.items():
            state = get_peft_model_state_dict(trainer.model, adapter_name=e.adapter)
            at_switch[name] = {k: v.detach().clone() for k, v in state.items()}
        assert trainer.global_step == 4 and all(
            e.steps == 0 for n, e in trainer.experts.items() if n != "shared"
        )
        return message

    def sentiment_loses(expert_losses, shared_losses):  # the real rule, with the shared adapter made to win
        return real_decide(expert_losses, {**shared_losses, "sentiment": 0.0})

    monkeypatch.setattr(train_loop, "end_shared_phase", end_and_capture)
    monkeypatch.setattr(shared_phase, "keep_if_better", sentiment_loses)
    router = {
        "router.enabled": True,
        "router.encoder": "minilm",
        "router.heads": ["linear"],
        "router.epochs": 5,
    }
    out = _run(tmp_path / "run", **{"train.keep_if_better": True, **router})

    for name in ("sentiment", "arithmetic"):  # every expert starts as a copy of the shared weights
        for key, tensor in at_switch["shared"].items():
            assert torch.equal(at_switch[name][key], tensor), f"{name}/{key} is no copy of shared"
    metrics = json.loads((out / "metrics.json").read_text())
    experts, recipe = metrics["experts"], metrics["recipe"]
    assert experts["shared"]["steps"] == recipe["shared_steps_taken"] == 4
    assert experts["sentiment"]["steps"] + experts["arithmetic"]["steps"] == recipe["expert_steps"] == 4
    assert recipe["serving"] == {"sentiment": "shared", "arithmetic": "arithmetic"}
    assert recipe["decisions"]["arithmetic"]["shared_val_loss"] > 0 and recipe["metric"] == "val_loss"
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["arithmetic", "shared"]
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["sentiment"]
    trained, shared = _weights(out / "experts" / "arithmetic"), _weights(out / "experts" / "shared")
    assert any(not torch.equal(trained[k], shared[k]) for k in shared), (
        "the expert did not train after the copy"
    )
    router_json = json.loads((out / "router" / "router.json").read_text())
    assert router_json["labels"] == ["arithmetic", "shared"]
    plan = read_run_dir(out)  # the registry accepts it: every router label is an expert folder
    assert {e.name for e in plan.experts} == {"arithmetic", "shared"}
    assert plan.router is not None and set(plan.router.labels) <= {e.name for e in plan.experts}
    assert plan.experts[1].metrics["steps"] == 4  # shared's training record travels with its version


@pytest.mark.slow
def test_keep_if_better_by_val_metric_scores_the_saved_adapters_as_served(tmp_path, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.data import load_mixture_data, training_prompt_spec
    from moe_adapters.data_tokenize import render_prompt
    from moe_adapters.metrics import score_task

    overrides = {"train.keep_if_better": True, "train.keep_if_better_by": "val_metric"}
    out = _run(tmp_path / "run", **overrides)
    recipe = json.loads((out / "metrics.json").read_text())["recipe"]
    assert recipe["metric"] == "val_metric"
    progress = capfd.readouterr().err
    for adapter, task in [("shared", "sentiment"), ("shared", "arithmetic"), ("arithmetic", "arithmetic")]:
        assert f"keep-if-better by val metric: {adapter} on {task}: " in progress
    base = resolve_base_model(None)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = load_mixture(MIXTURE, {**RECIPE, **overrides})
    data = load_mixture_data(config, tokenizer)
    limit = config.train.eval_batches * config.train.batch_size

    def score(adapter_dir: Path, task: str, single: bool) -> float:  # an independent greedy pass
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).eval()
        rows = data.tasks[task].val[:limit]
        spec = training_prompt_spec(data.tasks[task].config, single_adapter=single)
        answers = []
        for row in rows:
            ids = tokenizer(render_prompt(tokenizer, row.client_messages(), spec), add_special_tokens=False,
                            return_tensors="pt")["input_ids"]  # fmt: skip
            with torch.no_grad():
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=96, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            answers.append(tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True).strip())
        kind = data.tasks[task].config.kind
        return score_task(kind, answers, [r.response for r in rows], None, [r.extra for r in rows])["score"]

    placed = {p.name: p for folder in ("experts", "candidates") for p in (out / folder).iterdir()}
    for task in ("sentiment", "arithmetic"):
        decision = recipe["decisions"][task]
        assert (
            decision["val_metric"] == {"sentiment": "accuracy", "arithmetic": "final_number_accuracy"}[task]
        )
        assert decision["expert_val_metric"] == pytest.approx(score(placed[task], task, single=False))
        assert decision["shared_val_metric"] == pytest.approx(score(placed["shared"], task, single=True))
        assert decision["kept"] == (decision["expert_val_metric"] > decision["shared_val_metric"])
        assert recipe["serving"][task] == (task if decision["kept"] else "shared")


def _cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}  # AdamW updates its moments in place


@pytest.mark.slow
def test_continue_gives_each_expert_the_shared_optimizer_and_schedule(tmp_path, monkeypatch):
    at_switch: dict[str, tuple[float, dict[int, dict[str, torch.Tensor]]]] = {}
    real_end = train_loop.end_shared_phase

    def end_and_capture(trainer):
        shared = trainer.experts["shared"]
        moments = {i: _cloned(shared.optimizer.state[p]) for i, p in enumerate(shared.params)}
        at_switch["shared"] = (shared.optimizer.param_groups[0]["lr"], moments)
        message = real_end(trainer)
        for name in ("sentiment", "arithmetic"):
            e = trainer.experts[name]
            moments = {i: _cloned(e.optimizer.state[p]) for i, p in enumerate(e.params)}
            at_switch[name] = (e.optimizer.param_groups[0]["lr"], moments)
        return message

    monkeypatch.setattr(train_loop, "end_shared_phase", end_and_capture)
    out = _run(tmp_path / "run", **{"train.expert_start": "continue", "train.warmup_steps": 1})
    lr, shared_moments = at_switch["shared"]
    # after its 4 steps the shared adapter stands at the run-long (8-step) schedule's factor of step 4
    assert lr == pytest.approx(1e-3 * warmup_cosine(1, 8)(4))
    for name in ("sentiment", "arithmetic"):
        expert_lr, moments = at_switch[name]
        assert expert_lr == pytest.approx(1e-3 * warmup_cosine(1, 8)(4)), name  # continues, no new warmup
        assert moments.keys() == shared_moments.keys() and moments
        for i, state in shared_moments.items():
            for key, tensor in state.items():
                assert torch.equal(moments[i][key], tensor), f"{name}: AdamW {key} of param {i} is no copy"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experts"]["shared"]["steps"] == 4
    assert metrics["experts"]["sentiment"]["steps"] + metrics["experts"]["arithmetic"]["steps"] == 4


class _Crash(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.parametrize(
    ("expert_start", "checkpoint_every", "crash_at"),
    [
        ("fresh", 3, 5),  # checkpoint at step 3 (warm-up), crash at step 5 (experts)
        ("continue", 5, 7),  # checkpoint at step 5 (after the switch: the experts' RunSchedules), crash at 7
    ],
)
def test_resume_across_the_shared_phase_boundary_is_exact(
    tmp_path, monkeypatch, expert_start, checkpoint_every, crash_at
):
    overrides = {"train.checkpoint_every": checkpoint_every, "train.expert_start": expert_start}
    reference = _run(tmp_path / "reference", **overrides)

    real_step, calls = train_loop.train_step, []

    def crash_at_step(trainer):
        calls.append(trainer.global_step)
        if len(calls) == crash_at:
            raise _Crash
        return real_step(trainer)

    monkeypatch.setattr(train_loop, "train_step", crash_at_step)
    with pytest.raises(_Crash):
        _run(tmp_path / "resumed", **overrides)
    monkeypatch.setattr(train_loop, "train_step", real_step)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = train_mixture(
        MIXTURE, tmp_path / "resumed", resume=True, overrides={**RECIPE, **overrides}, progress=False
    )
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    res_metrics = json.loads((resumed / "metrics.json").read_text())
    assert res_metrics["recipe"] == ref_metrics["recipe"]
    for name in ("shared", "sentiment", "arithmetic"):
        assert res_metrics["experts"][name]["best_val_loss"] == ref_metrics["experts"][name]["best_val_loss"]
    for folder in ("experts/sentiment", "experts/arithmetic", "candidates/shared"):
        expected, got = _weights(reference / folder), _weights(resumed / folder)
        assert expected.keys() == got.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, got[key]), f"{folder}/{key} differs after resume"


@pytest.mark.slow
def test_shared_adapter_stopping_early_hands_its_steps_to_the_experts(tmp_path, capfd):
    # lr so small that no val loss improves: shared stops at its 2nd eval, each expert at its 2nd.
    overrides = {
        **RECIPE,
        "train.shared_steps": 6,
        "train.lr": 1e-12,
        "train.eval_every": 1,
        "train.patience": 1,
        "train.warmup_steps": 0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train_mixture(MIXTURE, tmp_path / "run", overrides=overrides, progress=True)
    assert "step 2: shared warm-up done after 2 steps (stopped early" in capfd.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["shared_steps_taken"] == 2 and metrics["recipe"]["shared_stopped_early"] is True
    for name in ("sentiment", "arithmetic"):
        assert metrics["experts"][name]["steps"] == 2 and metrics["experts"][name]["stopped_early"] is True
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["arithmetic", "sentiment"]
    assert (out / "candidates" / "shared" / "adapter_model.safetensors").is_file()
