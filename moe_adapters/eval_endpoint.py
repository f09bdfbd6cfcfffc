"""The live endpoint as system ``served``: the same client messages sent to a running `moea serve`, and how
far its answers and routes agree with eval's own ``moe`` system."""

from __future__ import annotations

from typing import Any

from .eval_plan import GenerationPlan
from .eval_types import EvalCase, EvalError, EvalSettings


def query_endpoint(cases: list[EvalCase], settings: EvalSettings) -> tuple[list[str], list[str | None]]:
    """Each case's client messages sent to the live endpoint (greedy, same token budget): answers and the
    expert that answered (the response's `moea` field; None = base)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    headers = {"Authorization": f"Bearer {settings.endpoint_api_key}"} if settings.endpoint_api_key else {}
    url = f"{str(settings.endpoint).rstrip('/')}/chat/completions"

    with httpx.Client(timeout=settings.worker_timeout_s, headers=headers) as http:

        def ask(case: EvalCase) -> tuple[str, str | None]:
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


def served_report(
    cases: list[EvalCase],
    routes: list[str | None],
    served_routes: list[str | None],
    plan: GenerationPlan,
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
