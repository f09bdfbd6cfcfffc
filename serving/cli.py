"""`moea serve`: start (or connect to) vLLM, load every registered expert, run the OpenAI gateway."""

from __future__ import annotations

import logging
import os
from dataclasses import astuple
from pathlib import Path
from typing import Any

import click

from registry.errors import user_facing_errors

from .engine import EngineError, EngineSettings
from .lora_slots import lora_needs, size_lora_flags

log = logging.getLogger("moea.serving")


class ServeError(EngineError):
    """`moea serve` cannot start with the given settings; the message says how to fix it."""


def _registered_base(registry: Any) -> tuple[str | None, str | None]:
    """(base_model, base_model_name) shared by the registered experts' serving versions, or Nones."""
    bases: set[tuple[str, str | None]] = set()
    for expert in registry.list_experts():
        try:
            view = registry.resolve(expert.name)
        except LookupError:
            continue
        bases.add((view.base_model, view.base_model_name))
    if len({base for base, _ in bases}) > 1:
        listed = ", ".join(sorted(base for base, _ in bases))
        raise ServeError(f"registered experts use different base models ({listed}): serve them with separate "
                         "`moea serve --base-model ...` processes, or archive the odd ones")  # fmt: skip
    return next(iter(bases), (None, None))


def served_at_start(registry: Any, base_lora_guard: bool) -> dict[str, str]:
    """Adapters (vLLM name → folder) the gateway will load at start, as it computes them."""
    from .gateway import load_state, with_base_lora

    required = load_state(registry).required
    return with_base_lora(required) if base_lora_guard else required


def _served_name(base_spec: str | None, resolved: str, registered_name: str | None) -> str:
    from moe_adapters.base_model import DEFAULT_ALIASES, DEFAULT_BASE_NAME

    if registered_name:
        return registered_name
    if base_spec is None or base_spec.strip().lower() in DEFAULT_ALIASES:
        return DEFAULT_BASE_NAME
    return Path(resolved).name if Path(resolved).exists() else resolved


def _api_keys(flags: tuple[str, ...]) -> tuple[str, ...]:
    env = [key.strip() for key in os.environ.get("MOEA_API_KEYS", "").split(",") if key.strip()]
    return tuple(dict.fromkeys([*flags, *env]))


@click.command("serve")
@click.option(
    "--registry-url", envvar="MOEA_REGISTRY_URL", default=None, help="SQLAlchemy URL of the registry."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Gateway interface.")
@click.option("--port", default=8000, show_default=True, type=int, help="Gateway port (0 = any free port).")
@click.option(
    "--base-model",
    default=None,
    help="Base model folder/hub id for the engine (default: the one the registered experts were trained on).",
)
@click.option(
    "--served-model-name",
    default=None,
    help="Name of the base model in the API (default: from the registry).",
)
@click.option(
    "--engine-url",
    "engine_urls",
    multiple=True,
    help="Use a running vLLM server (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) "
    "instead of starting one; repeat for replicas.",
)
@click.option(
    "--engine-api-key", envvar="MOEA_ENGINE_API_KEY", default=None, help="Bearer key of the vLLM server(s)."
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Key clients must send as `Authorization: Bearer KEY` (repeatable; also MOEA_API_KEYS=k1,k2).",
)
@click.option(
    "--max-loras",
    default=None,
    type=click.IntRange(min=1),
    help="vLLM --max-loras (adapters per batch). Default: the adapters the registry serves at start (serving "
    "versions, experiment arms and shadows, and base@0 with the base-LoRA guard); a smaller value is refused.",
)
@click.option(
    "--max-cpu-loras",
    default=None,
    type=click.IntRange(min=1),
    help="vLLM --max-cpu-loras (adapters kept in host memory). Default: --max-loras + 2, room for pinned "
    "versions; a value below the adapters served at start is refused.",
)
@click.option(
    "--max-lora-rank",
    default=None,
    type=click.IntRange(min=1),
    help="vLLM --max-lora-rank. Default: the largest r in the served adapters' adapter_config.json, rounded "
    "up to a rank vLLM accepts (1, 8, 16, 32, 64, ...); a smaller value is refused.",
)
@click.option("--dtype", default="bfloat16", show_default=True, help="vLLM --dtype.")
@click.option(
    "--kv-cache-gib", default=2, show_default=True, type=int, help="VLLM_CPU_KVCACHE_SPACE (CPU engine)."
)
@click.option("--cpu-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0-7 (CPU engine).")
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    help="Extra vLLM argument, e.g. --engine-arg=--tensor-parallel-size --engine-arg=2 (repeatable).",
)
@click.option(
    "--engine-log", default=None, type=click.Path(dir_okay=False, path_type=Path), help="vLLM log file."
)
@click.option(
    "--startup-timeout", default=600.0, show_default=True, type=float, help="Seconds to wait for vLLM."
)
@click.option("--router-device", default=None, help="Router device (default: cuda if available, else cpu).")
@click.option(
    "--router-compile/--no-router-compile",
    default=True,
    show_default=True,
    help="On CPU, serve the router encoder in bf16 (where the CPU has native bf16) with torch.compile: "
    "~2x lower routing latency for ~15 s more at router load.",
)
@click.option("--poll-interval", default=1.0, show_default=True, type=float, help="Registry poll period (s).")
@click.option(
    "--max-body-bytes", default=1_048_576, show_default=True, type=int, help="Largest request body."
)
@click.option(
    "--cpu-lora-kernel/--no-cpu-lora-kernel",
    default=True,
    show_default=True,
    help="CPU engines started here use moea's multi-LoRA kernel (serving/cpu_lora.py): vLLM's own CPU ops "
    "apply a LoRA to base requests batched with LoRA requests, and are slower. No effect on GPU.",
)
@click.option(
    "--base-lora-guard/--no-base-lora-guard",
    default=True,
    show_default=True,
    help="While experts are loaded, serve the base model through an all-zero identity LoRA (base@0), which "
    "keeps base answers right on engines without moea's CPU kernel. Uses one LoRA slot (counted when "
    "the LoRA flags are sized).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Gateway log level.",
)
def serve_command(**options: Any) -> None:
    """Serve every registered expert behind one OpenAI-compatible endpoint (model="moe" routes)."""
    with user_facing_errors():
        run_server(**options)


def run_server(
    *,
    registry_url: str | None,
    host: str,
    port: int,
    base_model: str | None,
    served_model_name: str | None,
    engine_urls: tuple[str, ...],
    engine_api_key: str | None,
    api_keys: tuple[str, ...],
    max_loras: int | None,
    max_cpu_loras: int | None,
    max_lora_rank: int | None,
    dtype: str,
    kv_cache_gib: int,
    cpu_threads_bind: str | None,
    engine_args: tuple[str, ...],
    engine_log: Path | None,
    startup_timeout: float,
    router_device: str | None,
    poll_interval: float,
    max_body_bytes: int,
    log_level: str,
    base_lora_guard: bool = True,
    cpu_lora_kernel: bool = True,
    router_compile: bool = True,
) -> None:
    """Build the registry, engine pool and gateway from CLI settings and run uvicorn until stopped."""
    import httpx
    import uvicorn

    from registry.service import Registry

    from .engine import EnginePool
    from .gateway import Gateway, GatewayConfig, create_app
    from .metrics import GatewayMetrics
    from .request_log import RequestLogWriter

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One INFO line per forwarded request (httpx) or per migration plugin (alembic) is noise on a gateway.
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    registry = Registry(registry_url)
    registered_base, registered_name = _registered_base(registry)
    # Before vLLM starts: a refusal costs nothing, a too-small engine would only show under load.
    flags = size_lora_flags(lora_needs(served_at_start(registry, base_lora_guard)), max_loras=max_loras,
                            max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank)  # fmt: skip
    log.info("LoRA slots: --max-loras %d --max-cpu-loras %d --max-lora-rank %d", *astuple(flags))
    settings = None
    if not engine_urls:
        from moe_adapters.base_model import resolve_base_model

        spec = base_model or registered_base
        resolved = resolve_base_model(spec)
        settings = EngineSettings(
            model=resolved,
            served_name=served_model_name or _served_name(spec, resolved, registered_name),
            max_lora_rank=flags.max_lora_rank, max_loras=flags.max_loras, max_cpu_loras=flags.max_cpu_loras,
            dtype=dtype, kv_cache_gib=kv_cache_gib, cpu_threads_bind=cpu_threads_bind, api_key=engine_api_key,
            extra_args=engine_args, startup_timeout_s=startup_timeout, log_path=engine_log,
            cpu_lora_kernel=cpu_lora_kernel,
        )  # fmt: skip
        base_name = settings.served_name
    else:
        base_name = served_model_name or registered_name
        if not base_name:
            raise ServeError("with --engine-url, give --served-model-name (the engine's --served-model-name)")
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60.0),
        timeout=httpx.Timeout(600.0, connect=5.0),
    )
    metrics = GatewayMetrics()
    pool = EnginePool(
        client,
        settings=settings,
        urls=engine_urls,
        capacity=flags.max_cpu_loras,
        api_key=engine_api_key,
        metrics=metrics,
    )
    config = GatewayConfig(
        base_name=base_name, api_keys=_api_keys(api_keys), max_body_bytes=max_body_bytes,
        poll_interval_s=poll_interval, router_device=router_device, base_lora_guard=base_lora_guard,
        router_compile=router_compile,
    )  # fmt: skip
    writer = RequestLogWriter(registry, metrics_registry=metrics.registry)
    gateway = Gateway(config, registry, pool, request_log=writer)
    if not config.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who reaches it can use it", host)
    uvicorn.run(
        create_app(gateway), host=host, port=port, log_level=log_level,
        loop="auto", http="auto", access_log=False, timeout_graceful_shutdown=10,
    )  # fmt: skip


if __name__ == "__main__":
    serve_command()
