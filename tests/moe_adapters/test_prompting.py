"""The one prompt rule: policies as a case table, and training, DPO, `moea eval` and the gateway building the
same model input for the same client messages (the test fails when any of them drifts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moe_adapters.base_model import resolve_base_model
from moe_adapters.prompting import PromptSpec, expert_messages, system_prompt_source, version_prompt_spec

SYS = {"role": "system", "content": "Client rules."}
USER = {"role": "user", "content": "Hello"}
EXPERT = "Answer in one word."


@pytest.mark.parametrize(
    ("messages", "policy", "expected", "source"),
    [
        ([USER], "if-absent", [{"role": "system", "content": EXPERT}, USER], "expert"),
        ([SYS, USER], "if-absent", [SYS, USER], "client"),
        ([USER], "prepend", [{"role": "system", "content": EXPERT}, USER], "expert"),
        ([SYS, USER], "prepend", [{"role": "system", "content": f"{EXPERT}\n\nClient rules."}, USER], "both"),
        ([USER], "never", [USER], None),
        ([SYS, USER], "never", [SYS, USER], "client"),
    ],
)
def test_policies(messages, policy, expected, source):
    spec = PromptSpec(EXPERT, policy)
    assert expert_messages(messages, spec) == expected
    assert system_prompt_source(messages, spec) == source
    assert messages[0] in (SYS, USER)  # the client's list is not modified


def test_no_spec_and_content_parts():
    assert expert_messages([USER], None) == [USER]
    assert system_prompt_source([USER], None) is None
    parts = {"role": "system", "content": [{"type": "text", "text": "Client rules."}]}
    (merged, _) = expert_messages([parts, USER], PromptSpec(EXPERT, "prepend"))
    assert merged["content"][0] == {"type": "text", "text": EXPERT}


def test_records_round_trip_and_old_versions_default_to_if_absent():
    spec = PromptSpec(EXPERT, "prepend")
    assert PromptSpec.from_record(spec.as_record()) == spec
    old_version = SimpleNamespace(system_prompt=EXPERT, config={"task": {"kind": "classification"}})
    assert version_prompt_spec(old_version) == PromptSpec(EXPERT, "if-absent")
    assert version_prompt_spec(SimpleNamespace(system_prompt=None, config={})) is None
    with pytest.raises(ValueError, match="prompt_policy"):
        PromptSpec.from_record({"system_prompt": "x", "prompt_policy": "sometimes"})


@pytest.mark.parametrize("policy", ["if-absent", "prepend"])
@pytest.mark.parametrize("client", [[USER], [SYS, USER]])
def test_training_eval_and_gateway_build_the_same_input(policy, client):
    """Training's tokens, eval's request tokens and the gateway's forwarded messages agree."""
    from transformers import AutoTokenizer

    from moe_adapters.data import Row, tokenize_rows
    from moe_adapters.dpo_data import answer_token_ids
    from moe_adapters.eval_plan import request_prompt_ids
    from moe_adapters.eval_types import EvalCase
    from serving.state import Target, upstream_body

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(None))
    view = SimpleNamespace(system_prompt=EXPERT, config={"task": {"prompt_policy": policy}})
    spec = version_prompt_spec(view)

    # Gateway: the body vLLM gets; vLLM renders it with the model's chat template.
    body = upstream_body({"model": "x", "messages": client}, Target("t@1", expert="t", prompt=spec), "t@1")
    served = tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
    served_ids = tokenizer(served, add_special_tokens=False)["input_ids"]

    # Eval: the request ids for adapter "t" on a case with the same client messages.
    case = EvalCase("t", "generation", "Hello", [dict(m) for m in client], "Hi", False)
    (eval_ids,) = request_prompt_ids(tokenizer, [case], [("t", 0)], {"t": spec})

    # Training: the masked prefix of the same row (history = the client's system message, if any).
    history = tuple((m["role"], m["content"]) for m in client[:-1])
    _, (example,) = tokenize_rows([Row("Hello", "Hi", "x", history)], tokenizer, 256, [], spec=spec)
    trained_prompt = example.input_ids[: example.labels.index(next(x for x in example.labels if x != -100))]

    # DPO (moea train --dpo): the prompt of a preference pair with the same client messages.
    dpo_ids, _ = answer_token_ids(tokenizer, [dict(m) for m in client], "Hi", spec, [])

    assert eval_ids == served_ids == trained_prompt == dpo_ids
    assert (EXPERT in served) == (policy == "prepend" or client == [USER])
