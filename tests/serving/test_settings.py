"""`moea serve` settings are defined once (serving/settings.py): every ServeSettings field is a CLI option
with help, every CLI option is a field, and the engine / gateway settings are built from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest

from serving.cli import serve_command
from serving.settings import GatewayConfig, ServeSettings, option_name
from serving.vllm_process import EngineSettings

FIELDS = {setting.name: setting for setting in dataclasses.fields(ServeSettings)}
OPTIONS = {param.name: param for param in serve_command.params if isinstance(param, click.Option)}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_setting_is_an_option_with_help(name: str) -> None:
    setting = FIELDS[name]
    assert setting.metadata.get("help", "").strip(), f"ServeSettings.{name} has no help text"
    assert name in OPTIONS, f"ServeSettings.{name} has no `moea serve` option"
    option = OPTIONS[name]
    assert option.help == setting.metadata["help"]
    assert option_name(setting) in option.opts


def test_every_option_is_a_setting() -> None:
    assert [param.name for param in serve_command.params] == list(FIELDS), (
        "options and fields differ (or order)"
    )


def test_option_defaults_are_the_setting_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing no arguments gives exactly `ServeSettings()` (environment variables unset)."""
    monkeypatch.delenv("MOEA_REGISTRY_URL", raising=False)
    monkeypatch.delenv("MOEA_ENGINE_API_KEY", raising=False)
    context = serve_command.make_context("serve", [], default_map={})
    assert ServeSettings(**context.params) == ServeSettings()


@pytest.mark.parametrize(
    ("flag", "args", "field", "value"),
    [
        (
            "--engine-url",
            ["--engine-url", "http://a", "--engine-url", "http://b"],
            "engine_urls",
            ("http://a", "http://b"),
        ),
        ("--api-key", ["--api-key", "k"], "api_keys", ("k",)),
        ("--engine-arg", ["--engine-arg=--x", "--engine-arg=2"], "engine_args", ("--x", "2")),
        ("--no-router-compile", ["--no-router-compile"], "router_compile", False),
        ("--no-base-lora-guard", ["--no-base-lora-guard"], "base_lora_guard", False),
        ("--engine-log", ["--engine-log", "/tmp/x.log"], "engine_log", Path("/tmp/x.log")),
        ("--max-loras", ["--max-loras", "3"], "max_loras", 3),
        ("--log-content", ["--log-content"], "log_content", True),
    ],
)
def test_options_parse_into_their_field(flag: str, args: list[str], field: str, value: object) -> None:
    context = serve_command.make_context("serve", args)
    assert getattr(ServeSettings(**context.params), field) == value, flag


def test_engine_and_gateway_settings_are_built_from_serve_settings() -> None:
    serve = ServeSettings(
        dtype="float32", kv_cache_gib=5, cpu_threads_bind="0-3", engine_api_key="ek", engine_args=("--a",),
        startup_timeout=7.0, engine_log=Path("/tmp/e.log"), cpu_lora_kernel=False, max_body_bytes=10,
        poll_interval=0.5, router_device="cpu", router_compile=False, base_lora_guard=False, log_content=True,
    )  # fmt: skip
    engine = EngineSettings.from_serve(
        serve, model="/m", served_name="B", max_loras=3, max_cpu_loras=5, max_lora_rank=16
    )
    assert engine == EngineSettings(
        model="/m", served_name="B", max_loras=3, max_cpu_loras=5, max_lora_rank=16, dtype="float32",
        kv_cache_gib=5, cpu_threads_bind="0-3", api_key="ek", extra_args=("--a",), startup_timeout_s=7.0,
        log_path=Path("/tmp/e.log"), cpu_lora_kernel=False,
    )  # fmt: skip
    config = GatewayConfig.from_serve(serve, base_name="B", api_keys=("k",))
    assert config == GatewayConfig(
        base_name="B", api_keys=("k",), max_body_bytes=10, poll_interval_s=0.5, router_device="cpu",
        router_compile=False, base_lora_guard=False, log_content=True,
    )  # fmt: skip


def test_library_defaults_follow_the_serve_defaults() -> None:
    serve, engine, config = ServeSettings(), EngineSettings(model="/m", served_name="B"), GatewayConfig("B")
    assert (engine.dtype, engine.kv_cache_gib, engine.startup_timeout_s, engine.cpu_lora_kernel) == (
        serve.dtype,
        serve.kv_cache_gib,
        serve.startup_timeout,
        serve.cpu_lora_kernel,
    )
    assert (config.max_body_bytes, config.poll_interval_s, config.base_lora_guard, config.log_content) == (
        serve.max_body_bytes,
        serve.poll_interval,
        serve.base_lora_guard,
        serve.log_content,
    )
    assert serve.log_content is False, "content logging is opt-in"
