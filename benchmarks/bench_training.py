"""Training throughput for N experts: moea's multi-adapter trainer vs. HF Trainer + PEFT, one expert after another.

Question (issue 7): how many training tokens per second does ``moea train`` (one base model, one LoRA
per task, temperature-sampled steps) reach compared with what a user would otherwise do — train the
same experts one after another with ``transformers.Trainer`` + ``peft`` — on the same data, for the
same number of optimizer steps per expert, with the same batch size? Target: ratio ≥ 1.3.

Both sides run in this process on the same machine with the same torch thread count:

- **moea**: :func:`moe_adapters.train.train_mixture` on the example mixture restricted to N experts
  (early stopping and checkpoints off so every sampled step runs). Its steps per expert come from
  ``metrics.json``.
- **baseline**: for each expert, load the base, ``get_peft_model`` (same r/alpha/dropout/targets),
  ``Trainer.train`` for exactly the steps moea gave that expert, same batch size, learning rate,
  warmup, grad clip, weight decay and base dtype; the same tokenized train rows
  (``moe_adapters.data.load_mixture_data``, chat template + prompt masking), with replay rows mixed
  in at ``train.replay_share``; then ``save_pretrained``.

Tokens are real (non-padding) tokens fed to the model in training steps, counted the same way on
both sides. Reported per N: training-loop throughput per wall second (headline; moea's own
``metrics.json`` step time vs. the time of ``Trainer.train()``), per CPU-second of the training loop
(``time.process_time`` around moea's ``run_training`` and around ``Trainer.train()``: on a shared,
busy machine wall time depends on what else runs, CPU time much less), the end-to-end wall time
(baseline: load + train + save per expert; moea: the whole ``train_mixture`` call with the router
off, including its final one-batch evaluation per expert), and the baseline's padding share
(moea buckets batches by length).

    python benchmarks/bench_training.py --quick      # N=4, 5 steps per expert, ~1-2 min idle
    python benchmarks/bench_training.py              # N in 1, 2, 4; ~50 steps per expert
    python benchmarks/bench_training.py --smoke      # N=2, 2 steps per expert (CI)
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, machine_info, mode, ratio, standard_parser, summary, write_result  # noqa: E402

from moe_adapters.config_paths import relocate_raw_mixture  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MIXTURE = REPO_ROOT / "examples" / "mixture.yaml"
TARGET_RATIO = 1.3
SIZES: dict[str, dict[str, Any]] = {
    # experts: the N values measured; steps_per_expert: moea's max_steps = N * this.
    "smoke": {"experts": [2], "steps_per_expert": 2, "repeats": 1},
    "quick": {"experts": [4], "steps_per_expert": 5, "repeats": 1},
    "full": {"experts": [1, 2, 4], "steps_per_expert": 50, "repeats": 2},
}


@dataclass
class SideResult:
    """What one side (moea or baseline) measured for one N."""

    train_tokens: int
    padded_tokens: int
    train_seconds: float
    wall_seconds: float
    cpu_seconds: float
    train_cpu_seconds: float
    steps: dict[str, int]

    @property
    def tokens_per_s(self) -> float:
        """Real training tokens per second of training-loop time."""
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        """Real training tokens per CPU-second of the training loop (robust to other load on the machine)."""
        return self.train_tokens / self.train_cpu_seconds if self.train_cpu_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        return {
            "tokens_per_s": round(self.tokens_per_s, 1),
            "tokens_per_cpu_s": round(self.tokens_per_cpu_s, 1),
            "train_cpu_seconds": round(self.train_cpu_seconds, 2),
            "train_tokens": self.train_tokens,
            "padding_share": round(1 - self.train_tokens / self.padded_tokens, 4)
            if self.padded_tokens
            else None,
            "train_seconds": round(self.train_seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "steps": self.steps,
        }


def write_bench_mixture(
    source: Path, n_experts: int, steps_per_expert: int, workdir: Path, threads: int | None
) -> Path:
    """A copy of ``source`` with its first ``n_experts`` expert tasks (+ replay) and benchmark settings."""
    raw = relocate_raw_mixture(yaml.safe_load(source.read_text()), source.parent)  # the copy lives elsewhere
    experts = [t for t in raw["tasks"] if not t.get("replay")]
    if n_experts > len(experts):
        raise SystemExit(f"{source} has {len(experts)} expert tasks; cannot benchmark N={n_experts}")
    tasks = experts[:n_experts] + [t for t in raw["tasks"] if t.get("replay")]
    raw["tasks"] = tasks
    raw["name"] = f"bench-training-{n_experts}"
    # Every sampled step runs (no early stop); no mid-run checkpoints or evaluations, one final eval
    # batch, no router: the run is the training the baseline also does.
    raw.setdefault("train", {}).update(
        max_steps=n_experts * steps_per_expert,
        patience=0,
        checkpoint_every=0,
        eval_every=0,
        eval_batches=1,
        num_threads=threads,
    )
    raw.setdefault("router", {})["enabled"] = False
    path = workdir / f"mixture-{n_experts}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_moea(mixture: Path, workdir: Path) -> tuple[SideResult, Path]:
    """Train with ``train_mixture``; throughput from its metrics.json (its own training-loop timing)."""
    from moe_adapters import train
    from moe_adapters.train import train_mixture

    # CPU time of moea's training loop: wrap run_training (a measurement, the call is unchanged).
    loop_cpu: list[float] = []
    original = train.run_training

    def timed_run_training(*args: Any, **kwargs: Any) -> Any:
        cpu = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            loop_cpu.append(time.process_time() - cpu)

    train.run_training = timed_run_training
    start, cpu_start = time.perf_counter(), time.process_time()
    run_dir = train_mixture(mixture, workdir / f"moea-{mixture.stem}-{time.monotonic_ns()}", progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    train.run_training = original
    metrics = json.loads((run_dir / "metrics.json").read_text())
    experts = metrics["experts"]
    tokens = sum(int(e["train_tokens"]) for e in experts.values())
    train_seconds = float(metrics["train"]["step_time_s"])
    padded = int(metrics["train"].get("padded_tokens", 0))
    steps = {name: int(e["steps"]) for name, e in experts.items()}
    return SideResult(tokens, padded, train_seconds, wall, cpu, sum(loop_cpu), steps), run_dir


def _baseline_dataset(
    task_examples: list[Any], replay_examples: list[Any], replay_share: float, seed: int
) -> list:
    """The expert's train rows plus replay rows making up ``replay_share`` of the whole (as moea's batches)."""
    import random

    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in task_examples]
    if replay_examples and replay_share > 0:
        n_replay = round(len(rows) * replay_share / (1 - replay_share))
        rng = random.Random(seed)
        rows += [
            {"input_ids": e.input_ids, "labels": e.labels}
            for e in (rng.choice(replay_examples) for _ in range(n_replay))
        ]
    return rows


def run_baseline(mixture: Path, steps: dict[str, int], workdir: Path) -> SideResult:
    """HF Trainer + PEFT, one expert after another, for the given steps per expert."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.config_load import load_mixture
    from moe_adapters.data import load_mixture_data
    from moe_adapters.data_batches import collate
    from moe_adapters.hardware import pick_device

    hf_logging.disable_progress_bar()
    config = load_mixture(mixture)
    base = resolve_base_model(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_mixture_data(config, tokenizer)
    replay = [e for t in data.tasks.values() if t.config.replay for e in t.train_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device, dtype = pick_device()  # moea's choice: CUDA bf16, else CPU fp32 — both sides compute alike
    tr, lo = config.train, config.lora

    class CountingTrainer(Trainer):
        """Counts the real and padded tokens of every training batch."""

        real_tokens = 0
        padded_tokens = 0

        def compute_loss(self, model, inputs, *args, **kwargs):  # type: ignore[override]
            mask = inputs["attention_mask"]
            CountingTrainer.real_tokens += int(mask.sum())
            CountingTrainer.padded_tokens += mask.numel()
            return super().compute_loss(model, inputs, *args, **kwargs)

    CountingTrainer.real_tokens = CountingTrainer.padded_tokens = 0
    train_seconds = train_cpu = 0.0
    start_all, cpu_start = time.perf_counter(), time.process_time()
    for task, n_steps in steps.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
        model.config.use_cache = False
        model = get_peft_model(
            model,
            LoraConfig(
                r=lo.r,
                lora_alpha=lo.alpha,
                lora_dropout=lo.dropout,
                target_modules=list(lo.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
        args = TrainingArguments(
            output_dir=str(workdir / "hf" / task),
            per_device_train_batch_size=tr.batch_size,
            max_steps=n_steps,
            learning_rate=tr.lr,
            warmup_steps=min(tr.warmup_steps, max(n_steps - 1, 0)),
            # moea: linear warmup, then cosine to 10% of the peak LR, per expert.
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            max_grad_norm=tr.grad_clip if tr.grad_clip > 0 else 1e9,
            weight_decay=tr.weight_decay,
            seed=tr.seed,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=dtype == torch.bfloat16,
            dataloader_num_workers=0,
        )
        dataset = _baseline_dataset(data.tasks[task].train_examples, replay, tr.replay_share, tr.seed)
        trainer = CountingTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=_Collator(pad_id, collate)
        )
        trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        train_seconds += time.perf_counter() - start
        train_cpu += time.process_time() - cpu
        model.save_pretrained(str(workdir / "hf" / task / "adapter"))
        del trainer, model
        gc.collect()
    wall, cpu = time.perf_counter() - start_all, time.process_time() - cpu_start
    return SideResult(
        CountingTrainer.real_tokens,
        CountingTrainer.padded_tokens,
        train_seconds,
        wall,
        cpu,
        train_cpu,
        dict(steps),
    )


class _Collator:
    """Adapts moea's ``collate(examples, pad_id)`` to the dict rows the HF Trainer hands over."""

    def __init__(self, pad_id: int, collate: Any) -> None:
        self.pad_id = pad_id
        self._collate = collate

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        from moe_adapters.data_tokenize import Example

        return self._collate([Example(r["input_ids"], r["labels"]) for r in rows], self.pad_id)


def _median_side(results: list[SideResult]) -> SideResult:
    """The repeat with the median training-loop throughput."""
    ordered = sorted(results, key=lambda r: r.tokens_per_s)
    return ordered[(len(ordered) - 1) // 2]


def measure(n_experts: int, steps_per_expert: int, mixture: Path, repeats: int, threads: int | None) -> dict:
    """Both sides for one N, ``repeats`` times in alternating order (ABBA…); the median repeat counts."""
    moea_runs: list[SideResult] = []
    baseline_runs: list[SideResult] = []
    with tempfile.TemporaryDirectory(prefix="moea-bench-training-") as tmp:
        workdir = Path(tmp)
        bench_mixture = write_bench_mixture(mixture, n_experts, steps_per_expert, workdir, threads)
        for repeat in range(repeats):
            # moea decides the steps per expert (seeded, so every repeat gives the same counts).
            order = ("moea", "baseline") if repeat % 2 == 0 or not moea_runs else ("baseline", "moea")
            for side in order:
                gc.collect()
                if side == "moea":
                    moea_runs.append(run_moea(bench_mixture, workdir)[0])
                else:
                    baseline_runs.append(run_baseline(bench_mixture, moea_runs[0].steps, workdir))
    moea, baseline = _median_side(moea_runs), _median_side(baseline_runs)
    # Ratios come from the reported (rounded) numbers, so they agree with the summary rows built from them.
    moea_dict, baseline_dict = moea.as_dict(), baseline.as_dict()
    result = {
        "experts": n_experts,
        "moea": moea_dict,
        "baseline": baseline_dict,
        "repeats": {
            "moea_tokens_per_s": [round(r.tokens_per_s, 1) for r in moea_runs],
            "baseline_tokens_per_s": [round(r.tokens_per_s, 1) for r in baseline_runs],
        },
        "ratio_tokens_per_s": ratio(moea_dict["tokens_per_s"], baseline_dict["tokens_per_s"]),
        "ratio_tokens_per_cpu_s": ratio(moea_dict["tokens_per_cpu_s"], baseline_dict["tokens_per_cpu_s"]),
        "ratio_wall": ratio(baseline_dict["wall_seconds"], moea_dict["wall_seconds"]),
    }
    print(
        f"N={n_experts}: moea {moea.tokens_per_s:,.0f} tok/s (wall {moea.wall_seconds:.1f}s) | "
        f"HF Trainer+PEFT sequential {baseline.tokens_per_s:,.0f} tok/s (wall {baseline.wall_seconds:.1f}s) | "
        f"ratio {result['ratio_tokens_per_s']}x tokens/s, {result['ratio_tokens_per_cpu_s']}x tokens/CPU-s, "
        f"{result['ratio_wall']}x wall"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--mixture", type=Path, default=DEFAULT_MIXTURE, help="Mixture YAML (default: examples)."
    )
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="N values (default by size).")
    parser.add_argument(
        "--steps-per-expert", type=int, default=None, help="Steps per expert (default by size)."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Repeats per N, alternating order.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: torch's). On a busy shared CPU use 1: OpenMP threads "
        "that wait for a descheduled sibling make 2-thread steps 10-20x slower.",
    )
    args = parser.parse_args(argv)
    size = mode(args)
    plan = SIZES[size]
    experts = args.experts or plan["experts"]
    steps = args.steps_per_expert or plan["steps_per_expert"]
    repeats = args.repeats or plan["repeats"]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = machine_info()["load_avg_1_5_15"]
    print(
        f"bench_training ({size}): N={experts}, {steps} steps/expert, {repeats} repeat(s), load {load_before}"
    )
    results = [measure(n, steps, args.mixture.resolve(), repeats, args.threads) for n in experts]
    largest = results[-1]
    payload = {
        "mode": size,
        "mixture": str(args.mixture),
        "steps_per_expert": steps,
        "repeats": repeats,
        "threads": args.threads,
        "load_avg_before": load_before,
        "results": results,
        "summary": summary(
            f"training throughput, N={largest['experts']} experts",
            "tokens/s (training loop, wall)",
            largest["moea"]["tokens_per_s"],
            largest["baseline"]["tokens_per_s"],
            unit="tok/s",
            higher_is_better=True,
            target=TARGET_RATIO,
            baseline_name="HF Trainer+PEFT sequential",
        ),
        "summaries": [
            summary(
                f"training throughput, N={r['experts']} experts",
                f"tokens/{unit} (training loop)",
                r["moea"][key],
                r["baseline"][key],
                unit=f"tok/{unit}",
                higher_is_better=True,
                target=TARGET_RATIO,
                baseline_name="HF Trainer+PEFT sequential",
            )
            for r in results
            for key, unit in (("tokens_per_s", "s"), ("tokens_per_cpu_s", "CPU-s"))
        ],
        "machine": machine_info(),
    }
    path = write_result("training", payload, results_dir=args.results_dir)
    verdict = "meets" if (largest["ratio_tokens_per_s"] or 0) >= TARGET_RATIO else "MISSES"
    print(f"ratio {largest['ratio_tokens_per_s']}x {verdict} the ≥{TARGET_RATIO}x target; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
