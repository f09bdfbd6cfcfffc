"""`moea register` and the `moea registry …` commands: parse, call `registry.service`, print rich tables.

Every command takes `--registry-url` (env MOEA_REGISTRY_URL) and `--store-dir` (env MOEA_STORE_DIR).
The database is migrated to the newest schema automatically when a command opens it; `moea registry
upgrade` does the same explicitly and prints the revisions. Run standalone with `python -m registry.cli`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .errors import user_facing_errors
from .lineage import lineage_line, parent_label

F = TypeVar("F", bound=Callable[..., Any])
# Pipes and CI logs get wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)


REGISTRY_URL_HELP = (
    "SQLAlchemy URL of the registry [env MOEA_REGISTRY_URL; default sqlite:///$MOEA_HOME/registry.db]."
)
STORE_DIR_HELP = "Artifact store folder [env MOEA_STORE_DIR; default $MOEA_HOME/store]."


def registry_url_option(func: F) -> F:
    """`--registry-url` (env MOEA_REGISTRY_URL): the one definition every moea command uses."""
    return click.option(
        "--registry-url", envvar="MOEA_REGISTRY_URL", default=None, metavar="URL", help=REGISTRY_URL_HELP
    )(func)


def store_dir_option(func: F) -> F:
    """`--store-dir` (env MOEA_STORE_DIR): the one definition every moea command uses."""
    return click.option(
        "--store-dir",
        envvar="MOEA_STORE_DIR",
        default=None,
        type=click.Path(file_okay=False, path_type=Path),
        help=STORE_DIR_HELP,
    )(func)


def _common(func: F) -> F:
    """Add --registry-url/--store-dir; moea errors become a one-line `Error: …` and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_facing_errors():
            return func(*args, **kwargs)

    return registry_url_option(store_dir_option(wrapper))  # type: ignore[return-value]


def _open(registry_url: str | None, store_dir: Path | None):  # type: ignore[no-untyped-def]
    from .service import Registry

    return Registry(registry_url, store_dir)


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "-"


def _metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit]) or "-"


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@click.command("register")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--actor", default=None, help="Who registers (default user@host).")
@_common
def register_command(
    run_dir: Path, actor: str | None, registry_url: str | None, store_dir: Path | None
) -> None:
    """Record every expert of RUN_DIR as a new immutable version (and its router), in one transaction."""
    result = _open(registry_url, store_dir).register_run(run_dir, actor=actor)
    table = Table(title=f"registered {run_dir}")
    for column in ("version", "sha256", "aliases", "metrics"):
        table.add_column(column)
    for view in result.experts:
        table.add_row(view.ref, _short(view.sha256), ", ".join(view.aliases) or "-", _metrics(view.metrics))
    if result.router:
        table.add_row(result.router.ref, _short(result.router.sha256), "-", _metrics(result.router.metrics))
    console.print(table)
    waiting = [view.ref for view in result.experts if "prod" not in view.aliases]
    if waiting:  # only a first registration sets prod (registry/register.py)
        click.echo(
            f"not served by `model=NAME` until promoted (registering moves no traffic): {', '.join(waiting)}; "
            f"e.g. `moea registry promote {waiting[0]}`, or try it first with `moea ab start`"
        )


@click.group("registry")
def registry_group() -> None:
    """The expert registry: versions, aliases, routers, integrity."""


@registry_group.command("list")
@_common
def list_command(registry_url: str | None, store_dir: Path | None) -> None:
    """Every expert with its latest version and aliases."""
    experts = _open(registry_url, store_dir).list_experts()
    table = Table(title="experts")
    for column in ("name", "kind", "latest", "versions", "aliases", "base model", "created"):
        table.add_column(column)
    for e in experts:
        aliases = ", ".join(f"{a}→{v}" for a, v in e.aliases.items()) or "-"
        table.add_row(
            e.name,
            e.task_kind,
            str(e.latest_version or "-"),
            str(e.version_count),
            aliases,
            e.base_model,
            _when(e.created_at),
        )
    console.print(table if experts else "no experts registered yet; run `moea register RUN_DIR`")


@registry_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_common
def show_command(name: str, as_json: bool, registry_url: str | None, store_dir: Path | None) -> None:
    """Every version of NAME: hashes, metrics, aliases, lineage, creation time."""
    reg = _open(registry_url, store_dir)
    versions = reg.list_versions(name)
    if as_json:
        click.echo(json.dumps([_jsonable(v) for v in versions], indent=1, default=str))
        return
    table = Table(title=name)
    for column in (
        "version",
        "sha256",
        "aliases",
        "metrics",
        "eval",
        "parent",
        "git",
        "created",
        "by",
        "state",
    ):
        table.add_column(column)
    for v in versions:
        table.add_row(
            str(v.version),
            _short(v.sha256),
            ", ".join(v.aliases) or "-",
            _metrics(v.metrics),
            _eval_score(v.metrics.get("eval_score")),
            parent_label(v),
            (v.git_commit or "-")[:10],
            _when(v.created_at),
            v.created_by or "-",
            "archived" if v.archived else "live",
        )
    console.print(table)
    _print_lineage(versions)
    _print_golden(reg, name)


def _print_lineage(versions: list[Any]) -> None:
    """One line per version trained from another (`moea train --dpo`): parent and preference data."""
    for line in filter(None, map(lineage_line, versions)):
        console.print(f"lineage: {line}", highlight=False, soft_wrap=True)


def _eval_score(score: Any) -> str:
    """A version's recorded eval score (`moea register` from eval.json), e.g. `accuracy=0.95 (n=40, test)`."""
    if not isinstance(score, dict) or not isinstance(score.get("score"), int | float):
        return "-"
    return f"{score.get('metric')}={score['score']:.4g} (n={score.get('n')}, {score.get('split', 'test')})"


def _print_golden(reg: Any, name: str) -> None:
    """The expert's golden sets and every version's cached score on each (`moea registry promote`)."""
    sets, scores = reg.golden_sets(name), reg.eval_scores(name)
    for golden in sets:
        on_it = [s for s in scores if s.golden_sha256 == golden.sha256]
        scored = ", ".join(f"@{s.version} {s.metric}={s.score:.4g}" for s in on_it) or "no version scored yet"
        newest = " (used by promote)" if golden is sets[-1] else ""
        console.print(f"golden set v{golden.version}{newest}: {golden.filename}, {golden.rows} rows, "
                      f"sha256 {_short(golden.sha256)}: {scored}")  # fmt: skip


def _jsonable(view: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(view), "ref": view.ref}


@registry_group.command("attach-eval")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--actor", default=None, help="Who attaches (default user@host).")
@_common
def attach_eval_command(
    name: str, file: Path, actor: str | None, registry_url: str | None, store_dir: Path | None
) -> None:
    """Attach FILE (JSONL: prompt/messages + response/reference) to NAME as its golden set.

    Attaching a different file adds the next golden set version; `moea registry promote` scores
    versions on the newest one (registry/golden.py)."""
    golden, created = _open(registry_url, store_dir).attach_golden(name, file, actor=actor)
    state = "attached" if created else "unchanged (same content as the newest golden set)"
    click.echo(f"{name}: golden set v{golden.version} {state}: {golden.rows} rows, sha256 {golden.sha256}")


@registry_group.command("resolve")
@click.argument("ref")
@_common
def resolve_command(ref: str, registry_url: str | None, store_dir: Path | None) -> None:
    """Print the version REF resolves to (`name`, `name@prod`, `name@3`) and its verified folder."""
    reg = _open(registry_url, store_dir)
    view = reg.resolve(ref)
    click.echo(f"{view.ref}\t{view.sha256}\t{reg.artifact_path(view)}")


@registry_group.command("promote")
@click.argument("ref")
@click.option("--alias", default="prod", show_default=True, help="Alias to point at REF.")
@click.option("--reason", default="", help="Recorded in the alias history.")
@_common
def promote_command(
    ref: str, alias: str, reason: str, registry_url: str | None, store_dir: Path | None
) -> None:
    """Point NAME@ALIAS at the version REF (e.g. `summarize@3`)."""
    view = _open(registry_url, store_dir).promote(ref, alias, reason=reason)
    click.echo(f"{view.name}@{alias} → {view.ref}")


@registry_group.command("rollback")
@click.argument("name")
@click.option("--alias", default="prod", show_default=True)
@click.option("--reason", default="", help="Recorded in the alias history.")
@_common
def rollback_command(
    name: str, alias: str, reason: str, registry_url: str | None, store_dir: Path | None
) -> None:
    """Move NAME@ALIAS back to the version that held it before."""
    view = _open(registry_url, store_dir).rollback(name, alias, reason=reason)
    click.echo(f"{name}@{alias} → {view.ref}")


@registry_group.command("history")
@click.argument("name")
@click.option("--alias", default=None, help="Only this alias.")
@_common
def history_command(name: str, alias: str | None, registry_url: str | None, store_dir: Path | None) -> None:
    """The append-only alias history of NAME, then the lineage of its versions trained from another."""
    reg = _open(registry_url, store_dir)
    events = reg.history(name, alias)
    table = Table(title=f"{name} alias history")
    for column in ("when", "alias", "action", "from", "to", "actor", "reason"):
        table.add_column(column)
    for e in events:
        table.add_row(
            _when(e.created_at),
            e.alias,
            e.action,
            str(e.from_version or "-"),
            str(e.to_version or "-"),
            e.actor or "-",
            e.reason or "",
        )
    console.print(table if events else f"{name}: no alias was ever set")
    _print_lineage(reg.list_versions(name) if events else [])


@registry_group.command("archive")
@click.argument("ref")
@click.option(
    "--force", is_flag=True, help="Also archive a version that holds aliases (the aliases are removed)."
)
@click.option("--reason", default="", help="Recorded in the alias history when aliases are removed.")
@_common
def archive_command(
    ref: str, force: bool, reason: str, registry_url: str | None, store_dir: Path | None
) -> None:
    """Soft-delete NAME@VERSION: it stays in the registry but no longer resolves."""
    view = _open(registry_url, store_dir).archive(ref, force=force, reason=reason)
    click.echo(f"archived {view.ref}")


@registry_group.command("restore")
@click.argument("ref")
@_common
def restore_command(ref: str, registry_url: str | None, store_dir: Path | None) -> None:
    """Undo `archive` for NAME@VERSION."""
    view = _open(registry_url, store_dir).restore(ref)
    click.echo(f"restored {view.ref}")


@registry_group.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@_common
def diff_command(ref_a: str, ref_b: str, registry_url: str | None, store_dir: Path | None) -> None:
    """Metrics, config and file hashes that differ between REF_A and REF_B."""
    diff = _open(registry_url, store_dir).diff(ref_a, ref_b)
    table = Table(title=f"{diff.a.ref} vs {diff.b.ref}")
    for column in ("section", "key", diff.a.ref, diff.b.ref, "delta"):
        table.add_column(column)
    table.add_row("artifact", "sha256", _short(diff.a.sha256), _short(diff.b.sha256), "")
    for key, a, b in diff.metrics:
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
        table.add_row("metrics", key, str(a), str(b), f"{b - a:+.4g}" if numeric else "")
    for key, a, b in diff.config:
        table.add_row("config", key, str(a), str(b), "")
    for key, a, b in diff.files:
        table.add_row("files", key, _short(a), _short(b), "")
    console.print(table)


@registry_group.command("routers")
@_common
def routers_command(registry_url: str | None, store_dir: Path | None) -> None:
    """Every router version and the expert versions it was trained against."""
    routers = _open(registry_url, store_dir).list_routers()
    table = Table(title="routers")
    for column in ("version", "sha256", "encoder", "experts", "metrics", "created"):
        table.add_column(column)
    for r in routers:
        table.add_row(
            r.ref,
            _short(r.sha256),
            r.encoder or "-",
            ", ".join(r.experts.values()) or "-",
            _metrics(r.metrics),
            _when(r.created_at),
        )
    console.print(table if routers else "no routers registered yet")


@registry_group.command("export")
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="tar.gz to write."
)
@_common
def export_command(
    refs: tuple[str, ...], output: Path, registry_url: str | None, store_dir: Path | None
) -> None:
    """Export REFS (`name` = all live versions, `name@3`, `name@prod`) with their artifacts to a tar.gz."""
    manifest = _open(registry_url, store_dir).export(list(refs), output)
    count = sum(len(e["versions"]) for e in manifest["experts"])
    click.echo(f"exported {count} version(s) to {output}")


@registry_group.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def import_command(archive: Path, registry_url: str | None, store_dir: Path | None) -> None:
    """Import an export tar.gz; every version is hash-checked and gets a new number here.

    Aliases from the archive are set only where this registry has no alias of that name yet.
    """
    result = _open(registry_url, store_dir).import_archive(archive)
    for view in result.created:
        click.echo(f"imported {view.tags['imported_from']['ref']} as {view.ref}")
    for ref in result.skipped:
        click.echo(f"skipped {ref} (same content already registered)")
    for name, alias, version in result.aliases:
        click.echo(f"set alias {name}@{alias} -> {name}@{version} (from the archive)")


@registry_group.command("verify")
@click.option(
    "--repair", is_flag=True, help="Drop damaged views and restore damaged blobs from intact copies."
)
@_common
def verify_command(repair: bool, registry_url: str | None, store_dir: Path | None) -> None:
    """Re-hash every blob and materialised folder; exit 1 when anything is damaged."""
    report = _open(registry_url, store_dir).verify(repair=repair)
    for line in report.repaired:
        click.echo(f"repaired: {line}")
    click.echo(f"checked {report.artifacts} artifact(s), {report.blobs} blob(s), {report.bytes} bytes")
    if report.problems:
        for problem in report.problems:
            click.echo(f"DAMAGED: {problem}", err=True)
        raise click.ClickException(
            f"{len(report.problems)} problem(s) found" + ("" if repair else "; try --repair")
        )
    click.echo("ok")


@registry_group.command("gc")
@click.option("--grace-seconds", default=3600.0, show_default=True, help="Keep files younger than this.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@_common
def gc_command(grace_seconds: float, dry_run: bool, registry_url: str | None, store_dir: Path | None) -> None:
    """Remove partial copies, unreferenced blobs and stale folders from the artifact store."""
    report = _open(registry_url, store_dir).gc(grace_s=grace_seconds, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {len(report.temp_files)} partial file(s), {len(report.blobs)} unreferenced blob(s), "
        f"{len(report.views)} stale folder(s), {report.bytes_freed} bytes"
    )


@registry_group.command("purge-content")
@click.option(
    "--before",
    required=True,
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="Purge content of requests logged before this UTC date or time (YYYY-MM-DD[THH:MM:SS]).",
)
@_common
def purge_content_command(before: Any, registry_url: str | None, store_dir: Path | None) -> None:
    """Delete the stored messages and answers (`moea serve --log-content`) of requests logged before
    --before; the request-log rows and their ratings stay."""
    purged = _open(registry_url, store_dir).purge_content(before)
    click.echo(f"purged the content of {purged} request(s) logged before {before:%Y-%m-%d %H:%M:%S} UTC")


@registry_group.command("upgrade")
@_common
def upgrade_command(registry_url: str | None, store_dir: Path | None) -> None:
    """Migrate the registry database to the newest schema (also done automatically on open)."""
    from . import db

    engine = db.open_engine(registry_url, upgrade=False)
    before = db.current_revision(engine)
    db.ensure_schema(engine)
    click.echo(f"schema {before or 'empty'} → {db.current_revision(engine)}")


@click.group()
def main() -> None:
    """Standalone entry point: `python -m registry.cli register RUN_DIR`, `… registry list`."""


main.add_command(register_command)
main.add_command(registry_group)

if __name__ == "__main__":
    main()
