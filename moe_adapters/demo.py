"""`moea demo`: the whole product on the embedded defaults — train → register → serve → query.

Each step calls the same typed functions and commands a user would; the demo only wires them
together in a self-contained work dir (its own registry and artifact store) so it never touches the
user's registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx

REPO_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    return [sys.executable, "-m", "moe_adapters.cli", *args]


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
@click.option("--retrain", is_flag=True, help="Train again even when the work dir holds a finished run.")
@click.option("--port", type=int, default=None, help="Gateway port (default: a free one).")
def demo_command(mixture: Path, workdir: Path, retrain: bool, port: int | None) -> None:
    """Train the example experts, register them, serve them and query every task through `moe`."""
    workdir = workdir.resolve()
    run_dir = workdir / "run"
    env = {
        **os.environ,
        "MOEA_REGISTRY_URL": f"sqlite:///{workdir / 'registry.db'}",
        "MOEA_STORE_DIR": str(workdir / "store"),
    }
    workdir.mkdir(parents=True, exist_ok=True)

    if retrain or not (run_dir / "metrics.json").exists():
        click.secho(f"[1/4] training experts from {mixture}", bold=True)
        resume = ["--resume"] if (run_dir / "checkpoints").exists() and not retrain else []
        subprocess.run(_moea("train", str(mixture), "--out", str(run_dir), *resume), env=env, check=True)
    else:
        click.secho(f"[1/4] reusing the finished run in {run_dir} (--retrain to train again)", bold=True)

    click.secho("[2/4] registering the run", bold=True)
    subprocess.run(_moea("register", str(run_dir)), env=env, check=True)

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
        subprocess.run(
            [sys.executable, str(REPO_EXAMPLES / "client.py"), "--base-url", f"{base_url}/v1"],
            env=env,
            check=True,
        )
    finally:
        stop_process_group(server)
    click.secho("demo finished", fg="green", bold=True)
