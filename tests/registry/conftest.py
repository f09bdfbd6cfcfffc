"""Registry test fixtures: a database URL per backend (SQLite file; PostgreSQL with MOEA_TEST_POSTGRES=1).

With MOEA_TEST_POSTGRES=1 a throw-away PostgreSQL cluster is created for the session (initdb into a
temp dir, pg_ctl on a free loopback port; as the `postgres` OS user when running as root, since the
server refuses root) and every test gets its own fresh database in it. Needs the server binaries
(`apt-get install -y postgresql`) and psycopg (`pip install 'psycopg[binary]'`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_run_dir  # noqa: E402

from registry.local import free_port  # noqa: E402
from registry.service import Registry  # noqa: E402

POSTGRES = os.environ.get("MOEA_TEST_POSTGRES") == "1"


def _pg_bin(tool: str) -> str:
    found = shutil.which(tool) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)), None
    )
    if not found:
        raise RuntimeError(f"{tool} not found; install PostgreSQL (apt-get install -y postgresql)")
    return found


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Base URL (no database) of a PostgreSQL cluster owned by this test session."""
    if not POSTGRES:
        pytest.skip("set MOEA_TEST_POSTGRES=1 to run the registry suite against PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="moea-pg-"))
    os.chmod(root, 0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run(
        [*prefix, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        [*prefix, _pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def _fresh_postgres_database(server: str) -> str:
    import psycopg

    name = f"moea_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty registry database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return _fresh_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An empty artifact store folder."""
    return tmp_path / "store"


@pytest.fixture
def registry(db_url: str, store_dir: Path) -> Iterator[Registry]:
    """A migrated, empty registry on each backend."""
    reg = Registry(db_url, store_dir)
    yield reg
    reg.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir with experts `summarize` and `classify` and a router."""
    return make_run_dir(tmp_path / "run")
