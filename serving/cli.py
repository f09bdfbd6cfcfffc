"""`moea serve`: start (or connect to) vLLM, load every registered expert, run the OpenAI gateway."""

from __future__ import annotations

import logging
import os
from dataclasses import astuple
from pathlib import Path
from typing import Any

import click

from registry.errors import user_facing_errors

from .lora_slots import LoraFlags, lora_needs, size_lora_flags
from .settings import GatewayConfig, ServeSettings, click_options
from .vllm_process import EngineError, EngineSettings

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
    from .base_lora import with_base_lora
    from .state import load_state

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
    """The key specs of --api-key plus MOEA_API_KEYS, checked (serving/auth.py: NAME:KEY:SCOPES)."""
    from .auth import ApiKeySpecError, KeyRing, split_env

    specs = tuple(dict.fromkeys([*flags, *split_env(os.environ.get("MOEA_API_KEYS", ""))]))
    try:
        ring = KeyRing(specs)
    except ApiKeySpecError as error:
        raise ServeError(str(error)) from None
    if ring.enabled:
        listed = ", ".join(f"{key.name} ({','.join(sorted(key.scopes))})" for key in ring.keys)
        log.info("API keys: %s", listed)
    return specs


@click.command("serve")
@click_options(ServeSettings)
def serve_command(**options: Any) -> None:
    """Serve every registered expert behind one OpenAI-compatible endpoint (model="moe" routes)."""
    with user_facing_errors():
        run_server(ServeSettings(**options))


def _engine_settings(
    serve: ServeSettings, registry: Any, flags: LoraFlags
) -> tuple[EngineSettings | None, str]:
    """(settings of the vLLM engine to start — None with --engine-url —, served name of the base model)."""
    registered_base, registered_name = _registered_base(registry)
    if serve.engine_urls:
        base_name = serve.served_model_name or registered_name
        if not base_name:
            raise ServeError("with --engine-url, give --served-model-name (the engine's --served-model-name)")
        return None, base_name
    from moe_adapters.base_model import resolve_base_model

    spec = serve.base_model or registered_base
    resolved = resolve_base_model(spec)
    engine = EngineSettings.from_serve(
        serve, model=resolved,
        served_name=serve.served_model_name or _served_name(spec, resolved, registered_name),
        max_lora_rank=flags.max_lora_rank, max_loras=flags.max_loras, max_cpu_loras=flags.max_cpu_loras,
    )  # fmt: skip
    return engine, engine.served_name


def run_server(serve: ServeSettings) -> None:
    """Build the registry, engine pool and gateway from CLI settings and run uvicorn until stopped."""
    import httpx
    import uvicorn

    from registry.service import Registry

    from .app import create_app
    from .engine import EnginePool
    from .gateway import Gateway
    from .metrics import GatewayMetrics
    from .request_log import RequestLogWriter

    logging.basicConfig(
        level=serve.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One INFO line per forwarded request (httpx) or per migration plugin (alembic) is noise on a gateway.
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    api_keys = _api_keys(serve.api_keys)  # a bad key spec is refused before anything starts
    registry = Registry(serve.registry_url, serve.store_dir)
    # Before vLLM starts: a refusal costs nothing, a too-small engine would only show under load.
    flags = size_lora_flags(lora_needs(served_at_start(registry, serve.base_lora_guard)), max_loras=serve.max_loras,
                            max_cpu_loras=serve.max_cpu_loras, max_lora_rank=serve.max_lora_rank)  # fmt: skip
    log.info("LoRA slots: --max-loras %d --max-cpu-loras %d --max-lora-rank %d", *astuple(flags))
    engine, base_name = _engine_settings(serve, registry, flags)
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60.0),
        timeout=httpx.Timeout(600.0, connect=5.0),
    )
    metrics = GatewayMetrics()
    pool = EnginePool(
        client,
        settings=engine,
        urls=serve.engine_urls,
        capacity=flags.max_cpu_loras,
        api_key=serve.engine_api_key,
        metrics=metrics,
    )
    config = GatewayConfig.from_serve(serve, base_name=base_name, api_keys=api_keys)
    writer = RequestLogWriter(registry, serve.spool_dir, metrics_registry=metrics.registry)
    gateway = Gateway(config, registry, pool, request_log=writer)
    if not config.api_keys and serve.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who reaches it can use it", serve.host)
    uvicorn.run(
        create_app(gateway), host=serve.host, port=serve.port, log_level=serve.log_level,
        loop="auto", http="auto", access_log=False, timeout_graceful_shutdown=10,
    )  # fmt: skip


if __name__ == "__main__":
    serve_command()
