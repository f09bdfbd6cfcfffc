"""`moea export --merge` on a real LoRA over the embedded base: the merged model answers as base+adapter does,
under transformers and under vLLM (which loads the folder as a plain model).

Nothing is trained: the adapter is PEFT's LoRA with a fixed seed and non-zero B (``init_lora_weights=False``),
so it changes the base's answers. Greedy answers of the merged model (plain transformers, no PEFT) are
compared with base + adapter through PEFT, token id for token id, on CPU in bf16.

Why a flip allowance: the merged weight ``W + s·BA`` is rounded to bf16 once, while PEFT computes
``W·x + s·B(A·x)`` in bf16; the logits differ by rounding noise, which can swap the argmax where two
tokens are within that noise (after which the continuations diverge). We allow ``MAX_NEAR_TIE_FLIPS`` of
the prompts to diverge, and only where PEFT's own logits show a near tie at the first differing token; and
teacher-forced on PEFT's answers, the two argmaxes must agree at every position that is not a near tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow

SYSTEM_PROMPT = "Answer in one short sentence."
MAX_NEAR_TIE_FLIPS = 4  # of len(PROMPTS); seen: 3 (gaps -0.25, 0.0, 0.125 logits), printed with -s
NEAR_TIE_LOGIT_GAP = 1.0  # bf16 logits of this model carry ~0.1-0.5 of rounding noise
MAX_NEW_TOKENS = 24
LORA_B_SCALE = 0.25
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 30?",
    "Give a synonym for 'happy'.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
]


def _write_run_dir(root: Path, base: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moe_adapters.base_model import DEFAULT_BASE_NAME

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    with (
        torch.no_grad()
    ):  # kaiming-sized B garbles the model into flat, tie-ridden logits; a trained LoRA is smaller
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(LORA_B_SCALE)
    peft_model.save_pretrained(root / "experts" / "brief")
    run = {"format_version": 1, "base_model": base, "base_model_name": DEFAULT_BASE_NAME, "base_model_sha256": None,
           "created_at": "2026-01-01T00:00:00+00:00", "mixture_sha256": "e" * 64, "git_commit": None,
           "tasks": {"brief": {"kind": "generation", "system_prompt": SYSTEM_PROMPT}}}  # fmt: skip
    (root / "run.json").write_text(json.dumps(run))
    (root / "metrics.json").write_text(json.dumps({"experts": {}, "router": {}, "train": {}}))
    (root / "mixture.yaml").write_text("tasks: []\n")
    return root


def _greedy(model, input_ids):  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, input_ids.shape[1] :].tolist()


def _confident_disagreements(reference, merged, sequence):  # type: ignore[no-untyped-def]
    """Positions (teacher-forced on PEFT's own answer) where the two argmaxes differ and PEFT's top-2 gap is
    at least NEAR_TIE_LOGIT_GAP: every one is a real difference, not bf16 rounding."""
    import torch

    with torch.no_grad():
        want = reference(sequence).logits[0].float()
        got = merged(sequence).logits[0].float()
    top2 = want.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= NEAR_TIE_LOGIT_GAP
    differ = want.argmax(-1) != got.argmax(-1)
    return torch.nonzero(confident & differ).flatten().tolist()


def test_merged_export_answers_like_base_plus_adapter(tmp_path: Path, registry_url: str) -> None:
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_adapters.base_model import resolve_base_model
    from registry.service import Registry
    from serving.cli_root import moea

    base = resolve_base_model(None)
    store = tmp_path / "store"
    with Registry(registry_url, store) as registry:
        registry.register_run(_write_run_dir(tmp_path / "run", base))
        adapter_dir = registry.artifact_path(registry.resolve("brief@1"))
    out = tmp_path / "merged"
    result = CliRunner().invoke(moea, ["export", "brief@1", "--merge", "--out", str(out),
                                       "--registry-url", registry_url, "--store-dir", str(store)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output

    manifest = json.loads((out / "moea.json").read_text())
    assert manifest["system_prompt"] == SYSTEM_PROMPT and manifest["dtype"] == "bfloat16"
    assert SYSTEM_PROMPT in (out / "README.md").read_text()
    assert not (out / "adapter_config.json").exists()
    weights = sorted(out.glob("*.safetensors"))
    assert weights
    for path in weights:
        with safe_open(str(path), "pt") as handle:
            assert not [k for k in handle.keys() if "lora" in k]  # noqa: SIM118 - safe_open has no __iter__
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # noqa: SIM118

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert merged.dtype == torch.bfloat16
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    adapter_matters = []
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                          str(adapter_dir)).eval()  # fmt: skip
    flips: list[tuple[int, float]] = []
    merged_answers: list[str] = []
    prompt_ids: list[list[int]] = []
    for index, prompt in enumerate(PROMPTS):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        input_ids = ids["input_ids"]
        want, got = _greedy(reference, input_ids), _greedy(merged, input_ids)
        prompt_ids.append(input_ids[0].tolist())
        merged_answers.append(tokenizer.decode(got, skip_special_tokens=True).strip())
        adapter_matters.append(_greedy(plain, input_ids) != want)
        if want == got:
            continue
        at = next(i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b)
        prefix = torch.cat([input_ids, torch.tensor([want[:at]], dtype=input_ids.dtype)], dim=1)
        with torch.no_grad():
            logits = reference(prefix).logits[0, -1].float()
        flips.append((index, float(logits[want[at]] - logits[got[at]])))
        confident = _confident_disagreements(
            reference, merged, torch.cat([input_ids, torch.tensor([want])], dim=1)
        )
        assert confident == [], (
            f"prompt {index}: merged argmax differs where PEFT is not near a tie: {confident}"
        )
    print(f"merged vs base+adapter: {len(flips)} near-tie flips of {len(PROMPTS)} prompts: {flips}")
    assert any(adapter_matters), "the adapter changes no answer: the comparison would prove nothing"
    assert len(flips) <= MAX_NEAR_TIE_FLIPS, flips
    assert all(abs(gap) < NEAR_TIE_LOGIT_GAP for _, gap in flips), flips

    # vLLM serves the merged folder as a plain model (no PEFT, no LoRA). Its answers are compared with
    # transformers' for the record only: the two engines' bf16 kernels round differently, so near ties flip
    # across engines more often than within one (seen: 4 of 8 equal strings); equivalence to base+adapter is
    # the transformers check above.
    from moe_adapters.eval_generate import generate
    from moe_adapters.eval_types import EvalSettings

    served, stats = generate(str(out), {}, prompt_ids, [None] * len(PROMPTS),
                             EvalSettings(max_new_tokens=MAX_NEW_TOKENS, max_model_len=512))  # fmt: skip
    equal = sum(a.strip() == b for a, b in zip(served, merged_answers, strict=True))
    print(f"vLLM on the merged folder: {equal} of {len(PROMPTS)} answers equal transformers' "
          f"(startup {stats['startup_s']:.0f} s)")  # fmt: skip
    assert len(served) == len(PROMPTS) and all(answer.strip() for answer in served), served
