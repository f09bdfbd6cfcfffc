"""Crash a training process for real: start it, SIGKILL it once it has written a checkpoint (the resume tests
of SFT and DPO)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def sigkill_when(command: list[str], ready: Callable[[], bool], what: str, timeout_s: float = 300.0) -> int:
    """Run ``command`` (offline, output discarded) and SIGKILL it as soon as ``ready()`` holds; return its
    exit code. Fails the test when ``what`` exits first or is not ready within ``timeout_s``."""
    proc = subprocess.Popen(
        command,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, f"{what} exited before writing a checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint written by {what} within {timeout_s:.0f} s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode
