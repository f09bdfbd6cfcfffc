"""One vLLM OpenAI server as a child process of `moea serve`: its settings (:class:`EngineSettings`, the
command line and environment) and :class:`VLLMProcess`, which starts
``python -m vllm.entrypoints.openai.api_server`` in its own process group (so its engine-core children die
with it), with parent-death signal and an atexit hook, so that ``moea serve`` never leaves orphans behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from registry.local import free_port

from .cpu_lora import ENV_SWITCH as CPU_LORA_SWITCH
from .settings import ServeSettings

log = logging.getLogger("moea.serving.engine")  # same logger as the pool: one stream of engine events

_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """An engine could not be started, reached or told to load an adapter; the message says how to fix."""


@dataclass
class EngineSettings:
    """How `moea serve` starts its own vLLM OpenAI server (ignored for engines given by URL)."""

    model: str
    """Base model folder or hub id, exactly as vLLM's `--model` takes it."""
    served_name: str
    """Name of the base model in the OpenAI API (`--served-model-name`)."""
    enable_lora: bool = True
    """`--enable-lora`; off only for a base-model-only engine (benchmarks' baseline), which serves no expert."""
    max_lora_rank: int = 8
    """`--max-lora-rank`: the largest LoRA rank any registered adapter uses."""
    max_loras: int = 4
    """`--max-loras`: distinct adapters in one batch."""
    max_cpu_loras: int | None = None
    """`--max-cpu-loras`: adapters cached in host memory (None → vLLM's default, = max_loras)."""
    dtype: str = ServeSettings.dtype
    """`--dtype` of the base model."""
    enforce_eager: bool = True
    """`--enforce-eager`: skip CUDA-graph capture (faster start; required on CPU)."""
    kv_cache_gib: int | None = ServeSettings.kv_cache_gib
    """VLLM_CPU_KVCACHE_SPACE (GiB) for the CPU backend; None leaves the environment as is."""
    cpu_threads_bind: str | None = None
    """VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1"; None leaves vLLM's default ("auto")."""
    cpu_lora_kernel: bool = ServeSettings.cpu_lora_kernel
    """Use moea's CPU multi-LoRA kernel in the engine (serving/cpu_lora.py; no effect on GPU engines)."""
    host: str = "127.0.0.1"
    """Interface the engine listens on (loopback: only the gateway talks to it)."""
    port: int | None = None
    """Engine port; None → a free port chosen at start."""
    api_key: str | None = None
    """Key of the engine (sent by the gateway as a bearer token); it reaches vLLM as VLLM_API_KEY in the
    child's environment, never on its command line (visible to every local user in `ps`)."""
    extra_args: tuple[str, ...] = ()
    """More vLLM CLI arguments, e.g. ("--tensor-parallel-size", "2")."""
    startup_timeout_s: float = ServeSettings.startup_timeout
    """How long to wait for the engine's /health before giving up."""
    log_path: Path | None = None
    """File receiving the engine's stdout/stderr; None → a file in the temp dir."""

    @classmethod
    def from_serve(
        cls, serve: ServeSettings, *, model: str, served_name: str, max_loras: int, max_cpu_loras: int,
        max_lora_rank: int,
    ) -> EngineSettings:  # fmt: skip
        """The engine part of `serve`, with the resolved base model and the sized LoRA flags."""
        return cls(
            model=model,
            served_name=served_name,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            dtype=serve.dtype,
            kv_cache_gib=serve.kv_cache_gib,
            cpu_threads_bind=serve.cpu_threads_bind,
            api_key=serve.engine_api_key,
            extra_args=serve.engine_args,
            startup_timeout_s=serve.startup_timeout,
            log_path=serve.engine_log,
            cpu_lora_kernel=serve.cpu_lora_kernel,
        )

    def command(self, port: int) -> list[str]:
        """The engine's command line."""
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_name,
            "--host", self.host, "--port", str(port),
            "--dtype", self.dtype,
        ]  # fmt: skip
        if self.enable_lora:
            cmd += [
                "--enable-lora",
                "--max-lora-rank",
                str(self.max_lora_rank),
                "--max-loras",
                str(self.max_loras),
            ]
        if self.enable_lora and self.max_cpu_loras is not None:
            cmd += ["--max-cpu-loras", str(self.max_cpu_loras)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The engine's environment: ours plus the vLLM switches it needs."""
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.kv_cache_gib is not None:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        if self.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
        env[CPU_LORA_SWITCH] = "1" if self.cpu_lora_kernel else "0"
        if self.api_key:  # vLLM 0.32 reads it when --api-key is absent (entrypoints/serve/middleware)
            env["VLLM_API_KEY"] = self.api_key
        return env

    @property
    def adapter_capacity(self) -> int:
        """Adapters the engine keeps in host memory without reloading from disk."""
        return self.max_cpu_loras or self.max_loras


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when the thread that started it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_live_processes: set[VLLMProcess] = set()


@atexit.register
def _stop_all_processes() -> None:
    for process in list(_live_processes):
        process.stop(timeout_s=10.0)


class VLLMProcess:
    """One vLLM OpenAI server started as a child process (own process group).

    Start it from a thread that lives as long as the server (the event-loop thread): the child gets
    SIGTERM when that thread dies, so a killed `moea serve` takes its engine with it.
    """

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.port = settings.port or free_port(settings.host)
        self.url = f"http://{settings.host}:{self.port}"
        self.log_path = (
            settings.log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"moea-vllm-{self.port}.log"
        )
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the vLLM API server process (None before start)."""
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        """Spawn the server (returns at once; wait with :meth:`wait_healthy`)."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.settings.command(self.port),
                env=self.settings.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only sets a prctl flag
            )
        _live_processes.add(self)
        log.info("started vLLM (pid %s) on %s, log %s", self._popen.pid, self.url, self.log_path)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended."""
        return None if self._popen is None else self._popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the engine's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_healthy(self, client: httpx.AsyncClient) -> None:
        """Poll /health until it answers 200; fail fast if the process exits."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise EngineError(
                    f"vLLM exited with status {self.returncode} while starting; see {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{self.url}/health", timeout=2.0)).status_code == 200:
                    return
            await asyncio.sleep(0.5)
        raise EngineError(
            f"vLLM did not become healthy within {self.settings.startup_timeout_s:.0f}s; see {self.log_path} "
            "(raise --startup-timeout on slow machines)"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `timeout_s`."""
        _live_processes.discard(self)
        if self._popen is None:
            return
        pgid = self._popen.pid  # start_new_session → the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=timeout_s)
        # The leader may be gone while its engine-core children linger: always sweep the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5.0)
