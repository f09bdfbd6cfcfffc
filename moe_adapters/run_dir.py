"""A run dir on disk: what state it is in, writing its completion marker safely, swapping a retrained
run into place.

:func:`run_dir_state` is the one rule by which `moea train` (refuse, resume or start) and `moea demo`
(reuse, resume or train) decide, so the two cannot drift apart. This module imports no torch: the CLI
and the demo read run dirs without paying for it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

CHECKPOINT_NAME = "checkpoint.pt"
"""Resumable training state; deleted once the run is finished."""
RUN_MARKER = "run.json"
"""Written last and atomically by training: a run dir holding it is complete."""

RunDirState = Literal["empty", "partial", "resumable", "finished"]
"""``empty``: missing or empty. ``partial``: files but no checkpoint and no run.json (stopped before its
first checkpoint, or not a run dir): nothing to resume. ``resumable``: a checkpoint and no run.json.
``finished``: run.json (a leftover checkpoint beside it does not matter: the marker is written last)."""


def run_dir_state(path: Path) -> RunDirState:
    """The state of run dir `path` (see :data:`RunDirState`)."""
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return "finished"
    if (path / CHECKPOINT_NAME).is_file():
        return "resumable"
    if path.is_dir() and any(path.iterdir()):
        return "partial"
    return "empty"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so that readers see the old file or the whole new one, even after
    a crash or power loss: temp file in the same dir, fsync, rename, fsync of the dir (the rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run dirs are shared like any output
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so that a marker written afterwards never
    survives a power loss that the files it vouches for do not."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    OS or file system cannot."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_run_dir(new: Path, target: Path, previous: Path) -> None:
    """Put finished run `new` at `target`; the run that was there moves to `previous` (replacing it).

    The swap is one atomic exchange (Linux renameat2), so `target` always holds a complete run. A stop
    right after it leaves the replaced run at `new`, older than the one at `target`; where the OS has no
    exchange, two renames leave a moment with `target` missing. The demo's plan repairs both (it swaps a
    finished staging dir in only when it is newer or the run dir is empty).
    """
    if run_dir_state(new) != "finished":
        raise FileNotFoundError(f"{new} is not a finished run ({RUN_MARKER} missing): nothing to swap in")
    shutil.rmtree(previous, ignore_errors=True)
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        os.rename(new, previous)  # `new` now holds the replaced run
    else:
        os.rename(target, previous)
        os.rename(new, target)
    fsync_dir(target.parent)
