"""Training the router: encoders and heads compared on validation prompts, abstain threshold calibrated.

Two encoders are compared on the validation prompts and the better one is kept (``minilm`` and
``base-mean-pool``, see :mod:`moe_adapters.router_encoder`). Heads: logistic regression (``linear``), a
one-hidden-layer MLP (``mlp``) and the training-free nearest centroid (``centroid``, cosine similarity to
each task's mean embedding). A TF-IDF + logistic regression classifier (scikit-learn) is reported as a
second training-free baseline.

The abstain threshold is chosen on validation data that also holds generic out-of-scope prompts
(:mod:`moe_adapters.ood_prompts`): the smallest threshold at which the share of wrong routes among
accepted prompts stays at or below ``target_error`` for it and every higher threshold.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RouterSettings
from .router import Router, benchmark_router, choose_threshold, decide
from .router_encoder import ENCODER_KINDS, RouterError, RouterHead, SentenceEncoder

HEAD_KINDS = ("linear", "mlp", "centroid")
# Accuracies closer than this count as a tie; ties go to the cheaper encoder / more coverage.
_TIE_EPS = 0.005


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
    embedded default. `negatives` are extra out-of-scope prompts (e.g. a replay/general task's prompts);
    they join the generic ones from :mod:`moe_adapters.ood_prompts`. Returns the metrics written into `router.json`, including
    `val_accuracy`, `threshold`, every candidate's scores and the baselines.
    """
    settings = _coerce_settings(settings)
    labels = _labels_with_prompts(train)
    from .ood_prompts import OOD_PROMPTS

    all_negatives = list(OOD_PROMPTS) + [p for p in (negatives or []) if p.strip()]
    data = _split_data(train, val, all_negatives, settings)
    candidates, skipped = _all_candidates(labels, data, settings, base_model)
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


def _labels_with_prompts(train: dict[str, list[str]]) -> list[str]:
    """The sorted task labels; raises when any task (or every task) has no non-blank training prompt."""
    labels = sorted(label for label, prompts in train.items() if any(p.strip() for p in prompts))
    if not labels:
        raise RouterError("no task has training prompts: check the mixture's task files")
    missing = sorted(set(train) - set(labels))
    if missing:
        raise RouterError(
            f"tasks {missing} have no training prompts: fix their files or drop them from the mixture"
        )
    return labels


def _all_candidates(
    labels: list[str], data: dict[str, Any], settings: RouterSettings, base_model: str | None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every (encoder, head) candidate scored on val, and the encoders that could not be loaded (why)."""
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
    return candidates, skipped


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
