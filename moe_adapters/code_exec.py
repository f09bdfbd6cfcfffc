"""Run generated Python against a test row's asserts (the ``code`` task kind's pass@1).

Each program (the row's ``test_setup_code``, the generated code, then the ``test_list`` asserts) runs in
its own ``python -I`` child process: a fresh empty temp dir as cwd, a stripped environment, stdin closed,
a wall-clock timeout, and, set by a small harness before the program runs, resource limits (CPU
seconds, address space, file size, processes) and an audit hook that refuses sockets and process
creation. The limits are set in the child itself rather than in ``preexec_fn``, which Python documents
as unsafe when threads exist (eval runs several programs at once from a thread pool).

This bounds accidents of a model's code (endless loops, memory blow-ups, runaway output, forks, network
calls); it is not a security boundary against code written to escape. Score untrusted models in a
container or VM.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_S = 5.0
"""Wall-clock seconds per program (CPU seconds are capped at the same value)."""
MEMORY_BYTES = 1 << 30
"""Address-space limit of the child (1 GiB)."""
FILE_BYTES = 1 << 20
"""Largest file the child may write (1 MiB), which also caps its captured stderr."""
MAX_WORKERS = 4
"""Programs run at once by :func:`run_many`."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}

# Runs in the child before the program: limits first, then the guard, then the program as __main__.
_HARNESS = """\
import resource, sys
for _name, _value in {limits!r}:
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_BLOCKED = ("socket.", "subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec",
            "os.posix_spawn", "os.spawn", "pty.spawn")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"{{event}} is not allowed while scoring generated code")
sys.addaudithook(_guard)
del resource, _name, _value, _guard
with open({solution!r}, encoding="utf-8") as _file:
    _code = compile(_file.read(), "solution.py", "exec")
exec(_code, {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


@dataclass(frozen=True)
class TestOutcome:
    """Result of one program: passed, and why not (``timeout``, or the last line of the traceback)."""

    passed: bool
    reason: str = ""


def extract_code(text: str) -> str:
    """The code of a model answer: the first ```python fenced block, else the first fenced block of any
    language, else the whole text (an unclosed fence, cut off by the token limit, runs to the end)."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    for tag, body in blocks:
        if tag in _PYTHON_TAGS:
            return body.strip("\n")
    if blocks:
        return blocks[0][1].strip("\n")
    return text.strip("\n")


def build_program(code: str, tests: Sequence[str], setup: str = "") -> str:
    """Setup code, the solution, then every assert, each on its own lines."""
    return "\n\n".join(part for part in (setup.strip("\n"), code, "\n".join(tests)) if part) + "\n"


def as_tests(value: Any) -> tuple[str, ...]:
    """A ``test_list`` column as a tuple of assert strings (one string counts as one test)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    return tuple(str(v) for v in value if str(v).strip())


@functools.lru_cache(maxsize=8192)
def run_tests(
    code: str, tests: tuple[str, ...], setup: str = "", timeout_s: float = TIMEOUT_S
) -> TestOutcome:
    """Run ``setup + code + tests`` in a limited child process; passed = it exits 0 within ``timeout_s``.

    Cached on its arguments: systems that give the same answer (e.g. ``moe`` routed like ``oracle``)
    run once.
    """
    limits = (
        ("RLIMIT_CPU", max(1, int(timeout_s + 0.999))),
        ("RLIMIT_AS", MEMORY_BYTES),
        ("RLIMIT_FSIZE", FILE_BYTES),
        ("RLIMIT_NPROC", 1),
        ("RLIMIT_CORE", 0),
    )
    with tempfile.TemporaryDirectory(prefix="moea-code-") as tmp:
        folder, workdir = Path(tmp), Path(tmp) / "cwd"
        workdir.mkdir()  # the program's cwd: empty (solution and stderr live beside it)
        solution = folder / "solution.py"
        solution.write_text(build_program(code, tests, setup), encoding="utf-8")
        with open(folder / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _HARNESS.format(limits=limits, solution=str(solution))],
                cwd=workdir,
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # one process group to kill on timeout
            )
            try:
                code_ = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return TestOutcome(False, "timeout")
        if code_ == 0:
            return TestOutcome(True)
        lines = (folder / "stderr.txt").read_text(errors="replace").strip().splitlines()
        return TestOutcome(False, lines[-1][:200] if lines else f"exit {code_}")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


def run_many(
    jobs: Sequence[tuple[str, tuple[str, ...], str]], timeout_s: float = TIMEOUT_S
) -> list[TestOutcome]:
    """:func:`run_tests` for each ``(code, tests, setup)``, a few at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    if not jobs:
        return []
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_tests(*job, timeout_s=timeout_s), jobs))
