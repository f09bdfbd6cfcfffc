"""The learned router at run time: a frozen sentence encoder plus a small trained head that picks an expert.

A prompt is embedded (mean-pooled, L2-normalised hidden states of a frozen encoder,
:mod:`moe_adapters.router_encoder`), a head turns the embedding into probabilities over the task labels
plus one internal *out-of-scope* class, and the router either names the top task or abstains (label
``None`` → the base model answers). Abstaining is the safe default: a wrong expert is worse than the base
model. Training, comparing encoders/heads and calibrating the abstain threshold:
:mod:`moe_adapters.router_training`.

Saved as ``router/router.json`` (labels, encoder, threshold, metrics) + ``router/head.safetensors``.

Loading and routing never change process-wide state (torch's thread count, inductor settings): that is
the caller's choice. Latency (MiniLM + linear head, CPU, prompts of ~20 tokens, measured with
:func:`benchmark_router` on the 2-core dev box): p50 ≈ 4–5 ms at batch 1 and ≈ 40–46 ms at batch 32
(≈ 1.3 ms per prompt) when the cores are quiet. With oversubscribed cores (vLLM on the same cores) the
caller should set ``torch.set_num_threads(1)`` (as ``moea serve`` does): 2 intra-op threads degrade to
hundreds of ms there, 1 thread stays in the tens. The base-mean-pool encoder is ~6x slower.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .router_encoder import RouterError, RouterHead, SentenceEncoder

FORMAT_VERSION = 1
ROUTER_JSON = "router.json"
HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class RouteDecision:
    """Where one prompt goes. `label is None` means abstain: the base model answers.

    `confidence` is the top task probability; `probabilities` maps each task label to its probability
    (the out-of-scope class is left out, so they may sum to less than one).
    """

    label: str | None
    confidence: float
    probabilities: dict[str, float] = field(default_factory=dict)


class Router:
    """A trained router: encoder + head + labels + abstain threshold. Load with :meth:`load`."""

    def __init__(
        self,
        encoder: SentenceEncoder,
        head: RouterHead,
        labels: list[str],
        threshold: float,
        *,
        none_class: bool,
        meta: dict[str, Any] | None = None,
    ):
        self.encoder = encoder
        self.head = head.to(encoder.device).eval()
        self.labels = list(labels)
        self.threshold = float(threshold)
        self.none_class = none_class
        self.meta = dict(meta or {})

    @property
    def device(self) -> str:
        """Where the encoder and head run."""
        return self.encoder.device

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> Router:
        """Load `router.json` + `head.safetensors` from a run's `router/` folder.

        Process-wide settings stay the caller's: on cores shared with vLLM or other busy processes, call
        ``torch.set_num_threads(1)`` first (with oversubscribed cores, multi-threaded CPU matmuls wait on
        each other and a 5 ms route can take hundreds of ms).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / ROUTER_JSON
        if not meta_path.is_file():
            raise RouterError(
                f"{meta_path} not found: point at a run's router/ folder (train one with `moea train`)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise RouterError(
                f"{meta_path} has format_version {meta.get('format_version')!r}; "
                f"this moea reads {FORMAT_VERSION}: retrain the router or upgrade moea"
            )
        encoder = SentenceEncoder(
            meta["encoder_kind"], meta.get("encoder"), device, int(meta.get("max_length", 128))
        )
        n_classes = len(meta["labels"]) + int(bool(meta.get("none_class")))
        head = RouterHead(encoder.dim, n_classes, int(meta.get("hidden_size", 0)))
        head.load_state_dict(load_file(str(directory / HEAD_FILE)))
        return cls(
            encoder,
            head,
            meta["labels"],
            meta["threshold"],
            none_class=bool(meta.get("none_class")),
            meta=meta,
        )

    def save(self, directory: Path | str) -> Path:
        """Write `router.json` + `head.safetensors` into `directory` (created)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(directory / HEAD_FILE))
        meta = {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.name,
            "encoder_kind": self.encoder.kind,
            "labels": self.labels,
            "threshold": self.threshold,
            "none_class": self.none_class,
            "hidden_size": self.head.hidden_size,
            "max_length": self.encoder.max_length,
        }
        meta.setdefault("kind", "mlp-head" if self.head.hidden_size else "linear-head")
        (directory / ROUTER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @torch.inference_mode()
    def task_probabilities(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Softmax probabilities [len(prompts), n_labels (+1 out-of-scope column last)] on CPU."""
        embeddings = self.encoder.encode(prompts, batch_size=batch_size)
        return torch.softmax(self.head(embeddings).float(), dim=-1).cpu()

    def compile_for_cpu(self, *, freezing: bool = True) -> float:
        """Make batch-1 routing fast on CPU: the encoder in bfloat16 (only where the CPU has native bf16
        matmuls) and ``torch.compile(dynamic=True)``, warmed up on a few batch shapes here so requests
        never wait for a compile. Falls back to the plain encoder (and logs why) when compiling fails,
        e.g. without a C++ compiler. Returns the seconds spent; no-op off CPU.

        ``freezing`` compiles with inductor freezing: the (frozen) weights are folded into the graph and
        prepacked for oneDNN (5.5 → 3.8 ms per batch-1 route measured). It is an option of this one
        compile, never the process-wide ``torch._inductor.config.freezing``.

        Embeddings stay within cosine 0.9999 of float32 (measured on all-MiniLM-L6-v2), so the head and
        the threshold chosen in float32 apply unchanged."""
        if not self.device.startswith("cpu"):
            return 0.0
        started = time.perf_counter()
        plain = self.encoder.model
        try:
            model = plain.to(torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else plain
            self.encoder.model = torch.compile(model, dynamic=True, options={"freezing": freezing})
            warm = "Route this warm-up prompt, which is a little longer than the first one"
            for batch in (["warm up"], [warm], ["warm up", warm], ["a", warm, "warm up the batch"]):
                self.route(batch)
        except Exception as error:  # noqa: BLE001 - any compile failure leaves the plain model
            logging.getLogger("moea.router").warning(
                "router compile failed, serving the plain encoder: %s", str(error).splitlines()[0][:200]
            )
            self.encoder.model = plain.float()
        return time.perf_counter() - started

    def route(self, prompts: Sequence[str], batch_size: int = 64) -> list[RouteDecision]:
        """One decision per prompt, batched; abstains below the threshold or when out-of-scope wins."""
        if not prompts:
            return []
        probs = self.task_probabilities(prompts, batch_size)
        labels, confidence = decide(probs, self.threshold, len(self.labels))
        decisions = []
        for row, index, conf in zip(probs.tolist(), labels.tolist(), confidence.tolist(), strict=True):
            label = self.labels[index] if index >= 0 else None
            decisions.append(
                RouteDecision(label, conf, dict(zip(self.labels, row[: len(self.labels)], strict=True)))
            )
        return decisions


def decide(probs: torch.Tensor, threshold: float, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index or -1 for abstain, top task probability) per row of `probs`."""
    task_probs = probs[:, :n_labels]
    confidence, index = task_probs.max(dim=-1)
    abstain = confidence < threshold
    if probs.shape[1] > n_labels:  # the out-of-scope column wins → abstain whatever the threshold
        abstain |= probs[:, n_labels:].max(dim=-1).values >= confidence
    return torch.where(abstain, torch.full_like(index, -1), index), confidence


def choose_threshold(
    confidence: Sequence[float], correct: Sequence[bool], target_error: float, floor: float = 0.0
) -> float:
    """Smallest threshold t ≥ `floor` at which wrong/accepted among prompts with confidence ≥ t is ≤ target.

    `correct[i]` says whether routing prompt i at its top label is right (an out-of-scope prompt is
    never right). Any t between two observed confidences accepts the same val prompts, so the answer
    is just above the highest confidence that must be rejected (or `floor` when nothing must be).
    When even the most confident route is wrong, it is just above the largest confidence: abstain on
    everything.
    """
    pairs = sorted(zip(confidence, correct, strict=True), key=lambda p: -p[0])
    levels: list[tuple[float, int, int]] = []  # (confidence, accepted, wrong) cumulative from the top
    wrong = 0
    for i, (level, is_correct) in enumerate(pairs):
        accepted = i + 1
        wrong += not is_correct
        if i + 1 == len(pairs) or pairs[i + 1][0] != level:  # ties are accepted together
            levels.append((level, accepted, wrong))
    ok = [k for k, (_, n, w) in enumerate(levels) if w <= target_error * n]
    if not ok:
        return float(max(floor, math.nextafter(levels[0][0], math.inf))) if levels else float(max(floor, 1.0))
    last = max(ok)
    if last + 1 == len(levels):
        return float(floor)
    return float(max(floor, math.nextafter(levels[last + 1][0], math.inf)))


def benchmark_router(
    router: Router,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 50,
    prompts: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Wall-clock ms per `route()` call for each batch size: p50, p90 and per-prompt p50."""
    from .ood_prompts import OOD_PROMPTS

    pool = list(prompts or OOD_PROMPTS)
    router.route(pool[:2])  # warm-up (allocations, lazy init)
    results: dict[str, dict[str, float]] = {}
    for size in batch_sizes:
        batch = (pool * (size // len(pool) + 1))[:size]
        timings = []
        for _ in range(repeats if size == 1 else max(3, repeats // 4)):  # big batches are steadier
            start = time.perf_counter()
            router.route(batch)
            timings.append((time.perf_counter() - start) * 1000)
        timings.sort()
        p50 = statistics.median(timings)
        results[str(size)] = {
            "p50": round(p50, 3),
            "p90": round(timings[int(0.9 * (len(timings) - 1))], 3),
            "p50_per_prompt": round(p50 / size, 3),
        }
    return results
