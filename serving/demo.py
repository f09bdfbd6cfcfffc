"""`moea demo`: the whole product on the embedded defaults — train → register → serve → query.

Each step calls the same typed functions and commands a user would; the demo only wires them
together in a self-contained work dir (its own registry and artifact store) so it never touches the
user's registry. Step 1 decides by :func:`moe_adapters.run_dir.run_dir_state`, the rule `moea train`
enforces: a finished run is reused, an interrupted one resumed, and `--retrain` trains next to the
current run and swaps the new one in only once it is finished.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import httpx

from moe_adapters.run_dir import RUN_MARKER, replace_run_dir, run_dir_state
from registry.local import free_port

REPO_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def wait_until_ready(
    base_url: str, process: subprocess.Popen[bytes], timeout_s: float, api_key: str | None = None
) -> None:
    """Poll the gateway's /health until it reports ready; fail fast if the server process died."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise click.ClickException(
                f"moea serve exited with code {process.returncode} before it was ready"
            )
        try:
            response = httpx.get(f"{base_url}/health", timeout=2.0, headers=headers)
            if response.status_code == 200 and response.json().get("status") == "ok":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1.0)
    raise click.ClickException(f"moea serve was not ready after {timeout_s:.0f}s")


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM the server's process group (gateway + vLLM), SIGKILL whatever is left after grace_s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _moea(*args: str) -> list[str]:
    return [sys.executable, "-m", "serving.cli_root", *args]


def staging_dir(run_dir: Path) -> Path:
    """Where `--retrain` trains while the current run stays in place."""
    return run_dir.with_name(run_dir.name + ".retrain")


def previous_dir(run_dir: Path) -> Path:
    """Where the run replaced by a finished retrain is kept."""
    return run_dir.with_name(run_dir.name + ".previous")


@dataclass(frozen=True)
class TrainingPlan:
    """Step 1 of the demo."""

    out: Path
    """The dir `moea train` writes, or the finished run to use."""
    train: bool
    """Run `moea train` (False: `out` already holds a finished run)."""
    resume: bool = False
    """Pass `--resume` (`out` holds a checkpoint)."""
    swap: bool = False
    """`out` is the staging dir: swap it in as the run dir once it is finished."""
    reason: str = ""


def plan_training(run_dir: Path, retrain: bool) -> TrainingPlan:
    """Decide step 1 from the states of the run dir and its staging dir (`run_dir_state`, the rule
    `moea train` itself enforces)."""
    staging = staging_dir(run_dir)
    current, staged = run_dir_state(run_dir), run_dir_state(staging)
    if staged == "finished" and (current == "empty" or _created_at(staging) > _created_at(run_dir)):
        # A retrain finished but was stopped before its swap: only the swap is left to do.
        return TrainingPlan(
            staging, train=False, swap=True, reason=f"using the finished retrain in {staging}"
        )
    if staged == "resumable" and (retrain or current == "empty"):
        return TrainingPlan(
            staging,
            train=True,
            resume=True,
            swap=True,
            reason=f"continuing the interrupted retrain in {staging}",
        )
    if current == "finished" and not retrain:
        again = "continue the interrupted retrain" if staged == "resumable" else "train again"
        return TrainingPlan(
            run_dir, train=False, reason=f"reusing the finished run in {run_dir} (--retrain to {again})"
        )
    if retrain and current in ("finished", "resumable"):
        # The current run stays until the new one is finished: an interrupted retrain loses nothing.
        return TrainingPlan(staging, train=True, swap=True, reason=f"training a new run in {staging}")
    if current == "resumable":
        return TrainingPlan(
            run_dir, train=True, resume=True, reason=f"resuming the interrupted run in {run_dir}"
        )
    return TrainingPlan(run_dir, train=True, reason=f"training experts into {run_dir}")


def _created_at(run_dir: Path) -> str:
    """run.json's UTC ISO timestamp (compares in time order), "" when unreadable."""
    try:
        return str(json.loads((run_dir / RUN_MARKER).read_text()).get("created_at") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def _run_step(args: list[str], env: dict[str, str], what: str) -> None:
    """Run one `moea` command; a failure ends the demo with one line instead of a traceback."""
    done = subprocess.run(_moea(*args), env=env, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"{what} failed (exit {done.returncode}); see its output above")


def prepare_run(
    mixture: Path, run_dir: Path, retrain: bool, overrides: tuple[str, ...], env: dict[str, str]
) -> None:
    """Steps 1 and 2: a finished run in `run_dir` (trained, resumed or reused), registered as the next
    version of every expert in the registry of `env`; a retrained run is also promoted to prod."""
    plan = plan_training(run_dir, retrain)
    click.secho(f"[1/4] {plan.reason}", bold=True)
    if plan.train and plan.swap and run_dir_state(plan.out) == "finished":
        # An older finished run in the staging dir is the one a swap replaced before it was stopped.
        shutil.rmtree(previous_dir(run_dir), ignore_errors=True)
        plan.out.rename(previous_dir(run_dir))
    if plan.train:
        sets = [arg for pair in overrides for arg in ("--set", pair)]
        resume = ["--resume"] if plan.resume else []
        _run_step(["train", str(mixture), "--out", str(plan.out), *resume, *sets], env, "moea train")
    if plan.swap:
        replace_run_dir(plan.out, run_dir, previous_dir(run_dir))
        click.echo(f"new run in {run_dir}; the one it replaced is in {previous_dir(run_dir)}")
    click.secho("[2/4] registering the run", bold=True)
    _run_step(["register", str(run_dir)], env, "moea register")
    if plan.swap:  # registering moves no traffic (only a first registration sets prod): serve the retrain
        for name in sorted(folder.name for folder in (run_dir / "experts").iterdir() if folder.is_dir()):
            promote = ["registry", "promote", f"{name}@latest", "--reason", "moea demo --retrain"]
            _run_step(promote, env, "moea registry promote")


def serve_and_query(env: dict[str, str], port: int | None, per_task: int) -> None:
    """Steps 3 and 4: start `moea serve`, run examples/client.py against it, stop the server."""
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    click.secho(f"[3/4] starting moea serve on {base_url} (vLLM starts in ~30 s)", bold=True)
    server = subprocess.Popen(
        _moea("serve", "--host", "127.0.0.1", "--port", str(port)), env=env, start_new_session=True
    )
    try:
        wait_until_ready(base_url, server, timeout_s=600)
        models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
        click.echo("models: " + json.dumps([m["id"] for m in models["data"]]))
        click.secho("[4/4] querying every task through model='moe'", bold=True)
        client = [sys.executable, str(REPO_EXAMPLES / "client.py"), "--base-url", f"{base_url}/v1"]
        done = subprocess.run([*client, "--per-task", str(per_task)], env=env, check=False)
        if done.returncode != 0:
            raise click.ClickException(f"examples/client.py failed (exit {done.returncode})")
    finally:
        stop_process_group(server)


@click.command("demo")
@click.option(
    "--mixture",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=REPO_EXAMPLES / "mixture.yaml",
    show_default=True,
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Run dir, registry and store of the demo.",
)
@click.option(
    "--retrain",
    is_flag=True,
    help="Train a new run even when the work dir holds a finished one; it replaces the old run (kept in "
    "run.previous) only once finished, and an interrupted retrain continues on the next --retrain.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Passed to `moea train --set`, e.g. --set train.max_steps=50 (repeatable).",
)
@click.option("--per-task", type=click.IntRange(min=1), default=3, show_default=True,
              help="Prompts per task (and per out-of-distribution category) the client sends.")  # fmt: skip
@click.option("--port", type=int, default=None, help="Gateway port (default: a free one).")
def demo_command(
    mixture: Path, workdir: Path, retrain: bool, overrides: tuple[str, ...], per_task: int, port: int | None
) -> None:
    """Train the example experts, register them, serve them and query every task through `moe`."""
    workdir = workdir.resolve()
    env = {
        **os.environ,
        "MOEA_REGISTRY_URL": f"sqlite:///{workdir / 'registry.db'}",
        "MOEA_STORE_DIR": str(workdir / "store"),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_run(mixture, workdir / "run", retrain, overrides, env)
    serve_and_query(env, port, per_task)
    click.secho("demo finished", fg="green", bold=True)
