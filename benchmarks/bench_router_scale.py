"""How does the router scale with the number of experts? Target: p50 ≤ 5 ms at batch 1 with 64 experts (CPU).

For each task count in ``--tasks`` (4, 16, 64) a router is trained with the project's own
``moe_adapters.router_training.train_router`` on the embedded all-MiniLM-L6-v2 encoder, on synthetic
tasks written by this script (seeded): a task is an *operation* (summarise, translate, list the
names, ...) combined with an *output constraint* (one sentence, bullet points, for a child, ...). Every
operation and every constraint has several paraphrased wordings, the wording and its place (before or
after the text) are drawn per prompt, and the text the instruction applies to comes from one pool
shared by all tasks, so no single keyword (and no passage) identifies a task: the router has to read
both halves of the instruction. Tasks with the same operation differ only by the constraint.

Measured per task count: router latency (p50/p99 per ``Router.route`` call, batch 1 and 32, plain
float32 encoder; at the largest count also compiled as ``moea serve`` runs it, bf16 +
``torch.compile``), test accuracy against TF-IDF + logistic regression fitted on the same split, and
the share of test prompts the router abstains on (sent to the base model; counted as wrong in the
accuracy), and the base-abstain rate on a generated out-of-distribution set (chit-chat, trivia, requests that are
no task here). Writes ``benchmarks/results/router_scale.json`` and ``router_scale.png``.

    .venv/bin/python benchmarks/bench_router_scale.py --threads 1            # 4/16/64 tasks, 60 prompts/task
    .venv/bin/python benchmarks/bench_router_scale.py --quick --threads 1    # 4/16/64 tasks, 30 prompts/task
    .venv/bin/python benchmarks/bench_router_scale.py --smoke --threads 1    # 4/16 tasks, 10 prompts/task (CI)
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import latency, routing_accuracy, tfidf_test_accuracy  # noqa: E402
from common import curve, mode, pyplot, save_plot, standard_parser, summary, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_P50_MS = 5.0
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"tasks": [4, 16], "train": 10, "eval": 4, "ood": 20, "repeats": {1: 10, 32: 3}, "compile": False},
    "quick": {"tasks": [4, 16, 64], "train": 30, "eval": 8, "ood": 60, "repeats": {1: 60, 32: 10}, "compile": True},
    "full": {"tasks": [4, 16, 64], "train": 60, "eval": 15, "ood": 120, "repeats": {1: 200, 32: 30}, "compile": True},
}  # fmt: skip
"""Per mode: task counts, prompts per task (train; val and test get ``eval`` each), OOD prompts, timed
``route`` calls per batch size, and whether the largest router is also compiled."""

OPERATIONS: dict[str, list[str]] = {
    "summarize": ["Summarize the text below", "Give me the gist of this passage", "Condense the following",
                  "Boil this down to its main point", "What is this passage saying, briefly"],
    "translate_fr": ["Translate this into French", "Render the passage below in French",
                     "How would a French speaker write the following", "Put this text into French",
                     "Say the following the way people in Paris would"],
    "sentiment": ["Is the tone of this text positive or negative", "Judge the mood of the following passage",
                  "Tell me how the writer feels in this text", "Rate the sentiment of the passage below"],
    "names": ["List every person mentioned in the text", "Which people appear in this passage",
              "Pull out the names of the people in the following", "Who is named in this text"],
    "title": ["Write a headline for this text", "Suggest a title for the passage below",
              "Come up with a heading for the following", "Give this passage a catchy name"],
    "questions": ["Write quiz questions about this text", "Make up questions a teacher could ask about this",
                  "Turn the following passage into exam questions", "Draft a few comprehension questions on this", "Quiz me on the passage below"],
    "grammar": ["Fix the grammar of this text", "Correct any mistakes in the passage below",
                "Proofread the following", "Clean up the spelling and grammar here"],
    "simplify": ["Rewrite this in plain words", "Make the passage below easier to read",
                 "Reword the following without jargon", "Say the same thing more simply"],
    "dates": ["Extract the dates and times from this text", "When do the events in this passage happen",
              "List every date mentioned in the following", "Find the points in time named here"],
    "keywords": ["Give me the keywords of this text", "Which terms best describe the passage below",
                 "Tag the following with a few topic words", "Name the main concepts in this text"],
    "continue": ["Continue this story", "Write what happens next after the passage below",
                 "Carry the following text on", "Add the next part to this story"],
    "formal": ["Make this text more formal", "Rewrite the passage below for a business letter",
               "Give the following a professional tone", "Polish this so it suits an official report"],
    "opposite": ["Argue against what this text says", "Write a rebuttal to the passage below",
                 "Take the opposing side of the following", "Counter the claims made here"],
    "email": ["Turn this text into an email", "Write the passage below as a message to a colleague",
              "Draft an email that tells someone the following", "Send this as a note to my team"],
    "facts": ["Check the claims in this text", "Which statements in the passage below might be false",
              "Fact-check the following", "Point out anything doubtful in this text"],
    "emoji": ["Retell this text with emoji", "Express the passage below using emoji",
              "Turn the following into a string of emoji with a few words", "Illustrate this with emoji",
              "Use little pictures and smileys to tell the following"],
}  # fmt: skip
"""Operations → paraphrased instructions (at most 16 operations)."""

CONSTRAINTS: dict[str, list[str]] = {
    "one_sentence": ["in one sentence", "using a single sentence", "in no more than one line", "in one short line"],
    "bullets": ["as bullet points", "as a bulleted list", "as a list with dashes", "point by point"],
    "child": ["so that a child understands it", "for a seven-year-old", "in words a kid would get",
              "as if talking to a young child"],
    "json": ["as JSON", "formatted as a JSON object", "in JSON with one key per item",
             "as machine-readable JSON"],
}  # fmt: skip
"""Output constraints → paraphrased wordings (tasks = operations × constraints, at most 64)."""

SUBJECTS = ["Maria", "the mayor", "Dr. Okafor", "our neighbours", "the committee", "Tom and Lena", "the pilot",
            "a young engineer", "the bakery owner", "Professor Ito", "the volunteers", "my grandmother"]  # fmt: skip
EVENTS = ["opened a new library on Monday", "postponed the harvest festival until June",
          "found a leak in the old water tower", "won the regional chess tournament last spring",
          "announced cheaper bus tickets from 3 May", "lost the keys to the museum on Friday night",
          "planted two hundred trees along the river", "moved the market to the town square in 2019",
          "repaired the bridge after the storm in October", "started a night class on astronomy"]  # fmt: skip
COMMENTS = ["Nobody expected it.", "Many people were pleased.", "Some residents complained loudly.",
            "The local paper called it a turning point.", "It cost more than planned.",
            "Children seemed to enjoy it most.", "The decision was made in a hurry.", ""]  # fmt: skip
OOD_TEMPLATES = [
    "Hi there, how is your {day} going?", "What's the capital of {country}?", "Tell me a joke about {thing}.",
    "Who won the football match between {country} and its neighbour?", "I feel {mood} today, any advice?",
    "Recommend a movie for a {mood} {day}.", "How many legs does a {animal} have?",
    "What is {number} times {number2}?", "Can you explain how a {thing} works?",
    "Good {day_part}! Do you like {animal}s?", "What should I cook with {food} tonight?",
    "Is it going to rain in {country} this week?",
]  # fmt: skip
OOD_FILL = {
    "day": ["Monday", "weekend", "day", "holiday"], "country": ["Peru", "Norway", "Kenya", "Japan", "Chile"],
    "thing": ["a bicycle", "a fridge", "a rainbow", "a printer", "a volcano"], "mood": ["tired", "happy", "bored"],
    "animal": ["spider", "horse", "octopus", "penguin"], "number": ["7", "12", "31"], "number2": ["4", "9", "13"],
    "day_part": ["morning", "evening"], "food": ["lentils", "spinach", "rice", "eggs"],
}  # fmt: skip


def task_names(count: int) -> list[tuple[str, str]]:
    """``count`` tasks as (operation, constraint): all operations first, then more constraints per operation.

    4 tasks = 4 operations × 1 constraint, 16 = 16 × 1, 64 = 16 × 4."""
    per_operation = max(1, -(-count // len(OPERATIONS)))
    if per_operation > len(CONSTRAINTS):
        raise ValueError(f"at most {len(OPERATIONS) * len(CONSTRAINTS)} synthetic tasks, asked for {count}")
    pairs = [(op, c) for c in list(CONSTRAINTS)[:per_operation] for op in OPERATIONS]
    return pairs[:count]


def passage(rng: random.Random) -> str:
    """A short text from the pool every task shares (so the text never identifies the task)."""
    sentences = [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(EVENTS)}." for _ in range(rng.randint(1, 2))
    ]
    return " ".join([*sentences, rng.choice(COMMENTS)]).strip()


def task_prompt(operation: str, constraint: str, rng: random.Random) -> str:
    """One prompt of the task: a paraphrase of the operation and of the constraint around a shared text."""
    instruction = f"{rng.choice(OPERATIONS[operation])} {rng.choice(CONSTRAINTS[constraint])}"
    text = passage(rng)
    return f"{instruction}:\n{text}" if rng.random() < 0.6 else f"{text}\n\n{instruction}, please."


def make_tasks(count: int, per_task: dict[str, int], seed: int) -> dict[str, dict[str, list[str]]]:
    """``{"train"|"val"|"test": {task: prompts}}`` for ``count`` synthetic tasks (seeded, disjoint splits)."""
    rng = random.Random(f"{seed}:{count}")
    splits: dict[str, dict[str, list[str]]] = {name: {} for name in per_task}
    for operation, constraint in task_names(count):
        label = f"{operation}-{constraint}"
        prompts: list[str] = []
        while len(prompts) < sum(per_task.values()):
            prompt = task_prompt(operation, constraint, rng)
            if prompt not in prompts:
                prompts.append(prompt)
        start = 0
        for name, size in per_task.items():
            splits[name][label] = prompts[start : start + size]
            start += size
    return splits


def ood_prompts(count: int, seed: int) -> list[str]:
    """``count`` generated out-of-distribution prompts (none asks for any of the operations)."""
    rng = random.Random(f"ood:{seed}")
    out: list[str] = []
    while len(out) < count:
        template = rng.choice(OOD_TEMPLATES)
        out.append(template.format(**{key: rng.choice(values) for key, values in OOD_FILL.items()}))
    return out


def measure(count: int, plan: dict[str, Any], seed: int, compile_cpu: bool) -> dict[str, Any]:
    """Train a router on ``count`` synthetic tasks and measure accuracy, OOD abstain rate and latency."""
    from moe_adapters.router import Router
    from moe_adapters.router_training import train_router

    splits = make_tasks(count, {"train": plan["train"], "val": plan["eval"], "test": plan["eval"]}, seed)
    ood = ood_prompts(plan["ood"], seed)
    with tempfile.TemporaryDirectory(prefix="moea-bench-router-scale-") as tmp:
        started = time.perf_counter()
        metrics = train_router(splits["train"], splits["val"], Path(tmp) / "router", {"encoder": "minilm"})
        train_s = time.perf_counter() - started
        router = Router.load(Path(tmp) / "router", device="cpu")
    # latency only needs realistic prompts (and at least 32 of them): every split's
    pool = [p for split in splits.values() for prompts in split.values() for p in prompts]
    result: dict[str, Any] = {
        "tasks": count,
        "train_prompts_per_task": plan["train"],
        "test_prompts_per_task": plan["eval"],
        "train_s": round(train_s, 1),
        "head": metrics.get("head"),
        "threshold": metrics.get("threshold"),
        "val_accuracy": metrics.get("val_accuracy"),  # argmax over tasks, before the abstain threshold
        "val_coverage": metrics.get("coverage"),  # share of val prompts above the threshold (not abstained)
        "test": routing_accuracy(router, splits["test"]),
        "tfidf_test_accuracy": tfidf_test_accuracy(splits["train"], splits["test"]),
        "ood_prompts": len(ood),
        "ood_to_base": round(sum(d.label is None for d in router.route(ood)) / len(ood), 4),
        "latency": {"cpu": latency(router, pool, plan["repeats"])},
    }
    if compile_cpu:
        result["compile_s"] = round(router.compile_for_cpu(), 1)
        result["latency"]["cpu-compiled"] = latency(router, pool, plan["repeats"])
        result["test_compiled"] = routing_accuracy(router, splits["test"])
    cpu = result["latency"].get("cpu-compiled", result["latency"]["cpu"])
    print(
        f"{count:>3} tasks: test accuracy {result['test']['accuracy']:.3f} (TF-IDF {result['tfidf_test_accuracy']:.3f}), "
        f"OOD→base {result['ood_to_base']:.2f}, p50 batch 1 {cpu['1']['p50_ms']:.2f} ms, batch 32 "
        f"{cpu['32']['p50_ms']:.1f} ms/call; trained in {train_s:.0f} s",
        flush=True,
    )
    return result


def plot(results: list[dict[str, Any]], name: str, results_dir: Path | None) -> Path:
    """Latency (batch 1 and 32) and accuracy / OOD abstain rate against the number of tasks."""
    import matplotlib.ticker

    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = [r["tasks"] for r in results]
    for size, style in (("1", "-o"), ("32", "-s")):
        left.plot(
            counts, [r["latency"]["cpu"][size]["p50_ms"] for r in results], style, label=f"batch {size}, fp32"
        )
    compiled = [r for r in results if "cpu-compiled" in r["latency"]]
    if compiled:
        left.plot([r["tasks"] for r in compiled], [r["latency"]["cpu-compiled"]["1"]["p50_ms"] for r in compiled],
                  "*", markersize=12, label="batch 1, compiled (moea serve)")  # fmt: skip
    left.axhline(TARGET_P50_MS, color="grey", linestyle=":", label="5 ms target (batch 1)")
    left.set(xscale="log", yscale="log", xlabel="tasks (experts)", ylabel="p50 ms per route() call")
    left.set_xticks(counts, [str(c) for c in counts])
    left.legend(fontsize=7)
    right.plot(counts, [r["test"]["accuracy"] for r in results], "-o", label="router test accuracy")
    right.plot(counts, [r["test"]["abstained"] for r in results], ":o", label="test prompts sent to base")
    right.plot(counts, [r["tfidf_test_accuracy"] for r in results], "--x", label="TF-IDF + logreg")
    right.plot(counts, [r["ood_to_base"] for r in results], "-^", label="OOD prompts sent to base")
    right.set(xscale="log", ylim=(0, 1.05), xlabel="tasks (experts)", ylabel="share")
    right.set_xticks(counts, [str(c) for c in counts])
    right.legend(fontsize=7)
    for axes in (left, right):
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the task counts as ticks
    figure.suptitle("Router vs number of experts (synthetic paraphrased tasks, MiniLM encoder, CPU)")
    return save_plot(figure, name, results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = standard_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="task counts, ascending (max 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    size = mode(args)
    plan = dict(SIZES[size])
    plan["tasks"] = args.tasks or plan["tasks"]
    if plan["tasks"] != sorted(plan["tasks"]) or not 2 <= min(plan["tasks"]) <= max(plan["tasks"]) <= 64:
        parser.error("--tasks must be ascending, between 2 and 64")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = [
        measure(count, plan, args.seed, compile_cpu=plan["compile"] and count == plan["tasks"][-1])
        for count in plan["tasks"]
    ]
    largest = results[-1]
    served = largest["latency"].get("cpu-compiled", largest["latency"]["cpu"])
    how = "compiled as `moea serve` runs it" if "cpu-compiled" in largest["latency"] else "plain fp32 encoder"
    latency_row = summary(
        f"router p50 per request, batch 1, CPU, {largest['tasks']} experts ({how})",
        "p50 latency",
        served["1"]["p50_ms"],
        TARGET_P50_MS,
        unit="ms",
        higher_is_better=False,
        target=1.0,
        baseline_name="5 ms budget",
    )
    accuracy_row = summary(
        f"routing accuracy, {largest['tasks']} synthetic paraphrased tasks",
        "test accuracy",
        largest["test"]["accuracy"],
        largest["tfidf_test_accuracy"],
        unit="share",
        higher_is_better=True,
        baseline_name="TF-IDF+logreg",
    )
    ood_row = summary(
        f"generated out-of-distribution prompts sent to the base model, {largest['tasks']} experts",
        "base-abstain rate",
        largest["ood_to_base"],
        results[0]["ood_to_base"],
        unit="share",
        higher_is_better=True,
        baseline_name=f"same with {results[0]['tasks']} experts",
    )
    table = curve(
        "Router vs number of experts (synthetic paraphrased tasks, MiniLM, CPU, p50 per route() call)",
        ["tasks", "test accuracy", "test abstained", "TF-IDF accuracy", "OOD → base", "batch 1 p50 ms",
         "batch 32 p50 ms", "batch 1 p50 ms compiled"],
        [
            [r["tasks"], r["test"]["accuracy"], r["test"]["abstained"], r["tfidf_test_accuracy"], r["ood_to_base"],
             r["latency"]["cpu"]["1"]["p50_ms"], r["latency"]["cpu"]["32"]["p50_ms"],
             r["latency"].get("cpu-compiled", {}).get("1", {}).get("p50_ms")]
            for r in results
        ],
    )  # fmt: skip
    payload = {
        "mode": size,
        "summary": latency_row,
        "summaries": [latency_row, accuracy_row, ood_row],
        "curve": table,
        "plan": plan,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    path = write_result("router_scale", payload, results_dir=args.results_dir)
    print(
        f"p50 {served['1']['p50_ms']:.2f} ms at batch 1 with {largest['tasks']} experts ({how}; "
        f"{'meets' if latency_row['met'] else 'MISSES'} the ≤ {TARGET_P50_MS} ms target); wrote {path} and "
        f"{plot(results, 'router_scale', args.results_dir)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
