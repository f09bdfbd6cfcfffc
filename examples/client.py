"""Query a running ``moea serve`` gateway with the official ``openai`` client.

Shows everything a client sees of moea:

1. ``model="moe"``: the router picks the expert; the answering expert comes back in the
   ``x-moea-expert`` response header (read through ``with_raw_response``) and in the ``moea`` JSON
   field of the completion (``{"expert", "version", "routed", "confidence"}``);
2. ``model="<expert>"`` (its ``prod`` alias or latest version) and ``model="<expert>@1"`` (pinned);
3. streaming through ``model="moe"``;
4. out-of-distribution prompts, which a good router leaves to the base model.

The prompts are fresh ones drawn from the example generators with a seed the training data does
not use (any prompt that also occurs in ``examples/data`` is skipped), so they are in-distribution
but unseen. Run::

    moea serve --port 8000 &                     # in another shell
    python examples/client.py --base-url http://127.0.0.1:8000/v1

``--base-url`` defaults to ``$MOEA_BASE_URL`` then ``$OPENAI_BASE_URL``; ``--api-key`` to
``$MOEA_API_KEY`` then ``$OPENAI_API_KEY`` (any string when the gateway runs without auth).
Exits 1 when a request fails or a response lacks the moea metadata, so it doubles as a smoke
check; ``--min-routing-accuracy`` also turns misrouting into a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_dataset  # noqa: E402  (a sibling script, not a package)

EXPERT_HEADER = "x-moea-expert"
CLIENT_SEED = 20_251_125  # differs from make_dataset.DEFAULT_SEED: prompts unseen in training
TASK_GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "sentiment": make_dataset.make_sentiment,
    "math": make_dataset.make_math,
    "extraction": make_dataset.make_extraction,
    "dates": make_dataset.make_date,
}


class SmokeFailure(RuntimeError):
    """The gateway answered, but not the way the moea contract says it must."""


@dataclass(frozen=True)
class Answer:
    """One chat completion as the client saw it."""

    expert_header: str
    moea: dict[str, Any]
    text: str


def fresh_prompts(per_task: int, seed: int = CLIENT_SEED) -> dict[str, list[dict[str, str]]]:
    """``per_task`` unseen rows per example task (prompt + reference response)."""
    training_prompts = set()
    for rel, text in make_dataset.build_files().items():
        if rel.startswith("data/") and rel.endswith(".jsonl"):
            training_prompts.update(json.loads(line)["prompt"] for line in text.splitlines())
        elif rel.startswith("data/"):
            training_prompts.update(row["prompt"] for row in make_dataset.read_csv_rows(text))
    rng = random.Random(seed)
    return {
        task: make_dataset.collect_rows(rng, make, per_task, set(training_prompts))
        for task, make in TASK_GENERATORS.items()
    }


def ood_prompts(limit: int) -> list[str]:
    """The first ``limit`` held-out out-of-distribution prompts of each category."""
    path = Path(__file__).resolve().parent / "ood_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked: list[str] = []
    for category in sorted({row["category"] for row in rows}):
        picked += [row["prompt"] for row in rows if row["category"] == category][:limit]
    return picked


def ask(client: OpenAI, model: str, prompt: str, max_tokens: int) -> Answer:
    """One non-streaming chat completion; returns the expert header, moea field and text."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    completion = raw.parse()
    header = raw.headers.get(EXPERT_HEADER)
    moea = (completion.model_extra or {}).get("moea")
    if header is None or not isinstance(moea, dict):
        raise SmokeFailure(
            f"model={model!r}: response lacks the {EXPERT_HEADER} header or the 'moea' field; "
            "is --base-url pointing at `moea serve` rather than at vLLM directly?"
        )
    return Answer(expert_header=header, moea=moea, text=completion.choices[0].message.content or "")


def ask_streaming(client: OpenAI, model: str, prompt: str, max_tokens: int) -> Answer:
    """The same request with ``stream=True``; the header arrives before the first chunk."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    )
    header = raw.headers.get(EXPERT_HEADER)
    pieces: list[str] = []
    moea: dict[str, Any] = {}
    for chunk in raw.parse():
        moea = (chunk.model_extra or {}).get("moea") or moea
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    if header is None:
        raise SmokeFailure(f"streaming model={model!r}: response lacks the {EXPERT_HEADER} header")
    return Answer(expert_header=header, moea=moea, text="".join(pieces))


def _expert_name(header: str) -> str | None:
    """``"sentiment@3"`` → ``"sentiment"``; ``"base"`` → None."""
    return None if header == "base" else header.split("@", 1)[0]


def _short(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run(client: OpenAI, args: argparse.Namespace) -> dict[str, float]:
    """Send every demo request, print what came back, return routing statistics."""
    served = {model.id for model in client.models.list().data}
    print(f"models served: {', '.join(sorted(served))}")
    if "moe" not in served:
        raise SmokeFailure("/v1/models does not list 'moe'; is this a moea gateway?")

    print("\n== model='moe' (routed)")
    correct = total = 0
    rows = fresh_prompts(args.per_task)
    for task, task_rows in rows.items():
        for row in task_rows:
            answer = ask(client, "moe", row["prompt"], args.max_tokens)
            total += 1
            correct += _expert_name(answer.expert_header) == task
            confidence = answer.moea.get("confidence")
            confidence_text = f"{confidence:.2f}" if isinstance(confidence, int | float) else "-"
            print(
                f"[{task:>10} → {answer.expert_header:<14} conf={confidence_text}] "
                f"{_short(row['prompt'])}\n{'':>14}answer: {_short(answer.text)!r}  expected: {row['response']!r}"
            )

    print("\n== out-of-distribution prompts via 'moe' (expected: base)")
    ood = ood_prompts(args.per_task)
    to_base = 0
    for prompt in ood:
        answer = ask(client, "moe", prompt, args.max_tokens)
        to_base += answer.expert_header == "base"
        print(f"[{answer.expert_header:<14}] {_short(prompt)} → {_short(answer.text, 50)!r}")

    experts = [task for task in TASK_GENERATORS if task in served]
    print("\n== explicit experts: model='<expert>' and model='<expert>@1'")
    for task in experts:
        prompt = rows[task][0]["prompt"]
        for model in (task, f"{task}@1"):
            answer = ask(client, model, prompt, args.max_tokens)
            if _expert_name(answer.expert_header) != task:
                raise SmokeFailure(f"model={model!r} was answered by {answer.expert_header!r}, not {task!r}")
            print(f"[{model:<14} → {answer.expert_header:<14}] {_short(answer.text)!r}")

    print("\n== streaming via 'moe'")
    prompt = rows["dates"][0]["prompt"]
    answer = ask_streaming(client, "moe", prompt, args.max_tokens)
    print(f"[{answer.expert_header}] {_short(prompt)} → {answer.text!r}")

    stats = {
        "routing_accuracy": correct / total if total else 0.0,
        "ood_to_base": to_base / len(ood) if ood else 0.0,
    }
    print(
        f"\nrouting accuracy {correct}/{total} = {stats['routing_accuracy']:.0%}; "
        f"out-of-distribution to base {to_base}/{len(ood)} = {stats['ood_to_base']:.0%}"
    )
    return stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-url",
        default=os.environ.get("MOEA_BASE_URL") or os.environ.get("OPENAI_BASE_URL"),
        help="Gateway URL ending in /v1 (env MOEA_BASE_URL, OPENAI_BASE_URL).",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MOEA_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none",
        help="Bearer key (env MOEA_API_KEY, OPENAI_API_KEY; default 'none').",
    )
    parser.add_argument("--per-task", type=int, default=3, help="Prompts per task (default %(default)s).")
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="max_tokens per request (default %(default)s)."
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="Seconds per request (default %(default)s)."
    )
    parser.add_argument(
        "--min-routing-accuracy",
        type=float,
        default=0.0,
        help="Fail when fewer in-distribution prompts reach their own expert (0–1).",
    )
    args = parser.parse_args(argv)
    if not args.base_url:
        parser.error("no gateway URL: pass --base-url http://HOST:PORT/v1 or set MOEA_BASE_URL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    try:
        stats = run(client, args)
    except openai.APIConnectionError as error:
        print(f"error: cannot reach {args.base_url} ({error}); is `moea serve` running?", file=sys.stderr)
        return 1
    except openai.APIStatusError as error:
        print(f"error: HTTP {error.status_code} from the gateway: {error.message}", file=sys.stderr)
        return 1
    except SmokeFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if stats["routing_accuracy"] < args.min_routing_accuracy:
        print(
            f"error: routing accuracy {stats['routing_accuracy']:.0%} is below "
            f"--min-routing-accuracy {args.min_routing_accuracy:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
