"""The registry's public face: `Registry`, one method per operation. Each write is one database transaction.

Typical use::

    reg = Registry()                         # MOEA_REGISTRY_URL or sqlite:///$MOEA_HOME/registry.db
    result = reg.register_run("runs/demo")   # every expert → a new immutable version, plus the router
    view = reg.resolve("summarize@prod")     # "name", "name@latest", "name@<alias>", "name@3"
    folder = reg.artifact_path(view)         # verified PEFT adapter folder for vLLM

`Registry` holds the connection (engine, artifact store, file-list cache) and delegates every method to
the module that owns that job (`register`, `catalog`, `routers`, `aliases`, `archive`, `diff`,
`maintenance`, `transfer`, `experiments`, `request_log`), which take the engine/store explicitly. So
the modules depend only on the modules below them, never on this class, and this file has no logic.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from . import (
    aliases,
    catalog,
    db,
    experiments,
    golden,
    maintenance,
    request_content,
    request_log,
    routers,
    transfer,
)
from . import archive as archiving
from . import diff as diffing
from . import register as registering
from .artifacts import ArtifactTrees, materialize_artifact
from .diff import VersionDiff
from .maintenance import VerifyReport
from .state import state_token
from .store import ArtifactStore, GcReport
from .transfer import ImportResult
from .versions import DEFAULT_ALIAS
from .views import (
    AliasEventView,
    EvalScoreView,
    ExperimentView,
    ExpertVersionView,
    ExpertView,
    GoldenSetView,
    LoggedAnswer,
    OutcomeRecord,
    RatingState,
    RegisterResult,
    RequestRecord,
    RouterVersionView,
    ServedExpertView,
)


class Registry:
    """The system of record for experts, routers, aliases and experiments."""

    def __init__(
        self, url: str | None = None, store_dir: Path | str | None = None, *, upgrade: bool = True
    ) -> None:
        """Open (and migrate to head, unless `upgrade=False`) the registry at `url`; artifacts go to `store_dir`."""
        self.url = url or db.default_url()
        self.engine = db.open_engine(self.url, upgrade=upgrade)
        self.store = ArtifactStore(store_dir or db.default_store_dir())
        self._trees = ArtifactTrees()

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ register / reads

    def register_run(self, run_dir: Path | str, actor: str | None = None) -> RegisterResult:
        """Record every expert of `run_dir` as a new version (and its router) in one transaction."""
        return registering.register_run(self.engine, self.store, run_dir, actor)

    def resolve(self, ref: str, include_archived: bool = False) -> ExpertVersionView:
        """`name` (→ alias prod if set, else latest), `name@latest`, `name@<alias>`, `name@3` → a version."""
        return catalog.resolve(self.engine, ref, include_archived)

    def get_version(self, name: str, version: int) -> ExpertVersionView:
        """One version (archived or not) with its file list."""
        return catalog.get_version(self.engine, self._trees, name, version)

    def list_experts(self) -> list[ExpertView]:
        """Every expert with its latest live version and aliases."""
        return catalog.list_experts(self.engine)

    def list_versions(self, name: str, include_archived: bool = True) -> list[ExpertVersionView]:
        """Every version of `name`, oldest first."""
        return catalog.list_versions(self.engine, name, include_archived)

    def versions_by_expert(self) -> dict[str, list[ExpertVersionView]]:
        """Expert name → every version (archived included), oldest first, in one read."""
        return catalog.versions_by_expert(self.engine)

    def served_experts(self, extra: Mapping[str, Collection[int]] | None = None) -> list[ServedExpertView]:
        """Every expert with its aliases and the versions its name resolves to (alias holders, newest live),
        plus the `extra` versions (name → numbers) that exist; one read whose cost does not grow with
        the versions registered (the gateway's state)."""
        return catalog.served_experts(self.engine, extra)

    def artifact_path(self, view: ExpertVersionView) -> Path:
        """A complete, verified folder holding the version's PEFT adapter (raises IntegrityError if tampered)."""
        return materialize_artifact(self.engine, self.store, self._trees, view.sha256, view.ref)

    def state_token(self) -> str:
        """Changes whenever anything that affects serving changes (one indexed row read)."""
        return state_token(self.engine)

    # ------------------------------------------------------------------------------ routers

    def latest_router(self) -> RouterVersionView | None:
        """The newest live router version, or None when no run with a router was registered."""
        return routers.latest_router(self.engine)

    def get_router(self, version: int) -> RouterVersionView:
        """One router version."""
        return routers.get_router(self.engine, self._trees, version)

    def list_routers(self) -> list[RouterVersionView]:
        """Every router version, oldest first."""
        return routers.list_routers(self.engine)

    def router_artifact_path(self, view: RouterVersionView) -> Path:
        """A complete, verified folder with router.json + head.safetensors."""
        return materialize_artifact(self.engine, self.store, self._trees, view.sha256, view.ref)

    # ------------------------------------------------------------------------------ golden sets / eval scores

    def attach_golden(
        self, name: str, path: Path | str, actor: str | None = None
    ) -> tuple[GoldenSetView, bool]:
        """Attach a JSONL golden set to `name` (the next golden set version; same content as the newest:
        nothing new, created False)."""
        return golden.attach_golden(self.engine, self.store, name, path, actor)

    def golden_sets(self, name: str) -> list[GoldenSetView]:
        """Every golden set of `name`, oldest first; the last one is the expert's eval."""
        return golden.golden_sets(self.engine, name)

    def current_golden(self, name: str) -> GoldenSetView | None:
        """The newest golden set of `name`, None when none is attached."""
        sets = golden.golden_sets(self.engine, name)
        return sets[-1] if sets else None

    def golden_rows(self, golden_set: GoldenSetView) -> list[dict[str, Any]]:
        """The rows of a golden set (``messages``, ``reference``, ``extra``), hash-checked."""
        return golden.golden_rows(self.store, golden_set)

    def eval_score(self, name: str, version: int, golden_sha256: str) -> EvalScoreView | None:
        """The cached score of `name@version` on the golden set with this hash, if any."""
        return golden.eval_score(self.engine, name, version, golden_sha256)

    def record_eval_score(
        self, name: str, version: int, golden_sha256: str, result: dict[str, Any], actor: str | None = None
    ) -> EvalScoreView:
        """Cache a golden-set score (metric, score, n, probes, settings); an existing one is kept."""
        return golden.record_eval_score(self.engine, name, version, golden_sha256, result, actor)

    def eval_scores(self, name: str) -> list[EvalScoreView]:
        """Every cached golden-set score of `name`'s versions, oldest first."""
        return golden.eval_scores(self.engine, name)

    def golden_probes(self, name: str, version: int) -> EvalScoreView | None:
        """The recorded greedy answers the gateway checks when loading `name@version` (None: none)."""
        return golden.golden_probes(self.engine, name, version)

    # ------------------------------------------------------------------------------ aliases / archive

    def promote(
        self, ref: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Point `alias` of the expert at the version `ref` names (recorded in the alias history).

        Not gated: the eval gate is `moea registry promote` (moe_adapters/eval_gate.py), which calls this."""
        return aliases.promote(self.engine, ref, alias, actor, reason)

    def rollback(
        self, name: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Move `alias` back to the version that held it before the current holder."""
        return aliases.rollback(self.engine, name, alias, actor, reason)

    def remove_alias(self, name: str, alias: str, actor: str | None = None, reason: str = "") -> None:
        """Delete an alias (kept in history); `name` then resolves to its latest version."""
        aliases.remove_alias(self.engine, name, alias, actor, reason)

    def history(self, name: str, alias: str | None = None) -> list[AliasEventView]:
        """The append-only alias history of `name`, oldest first."""
        return aliases.history(self.engine, name, alias)

    def archive(
        self, ref: str, force: bool = False, actor: str | None = None, reason: str = ""
    ) -> ExpertVersionView:
        """Soft-delete `name@version`. A version holding an alias needs `force` (which removes the aliases)."""
        return archiving.archive(self.engine, ref, force, actor, reason)

    def restore(self, ref: str, actor: str | None = None) -> ExpertVersionView:
        """Undo `archive` for `name@version`."""
        return archiving.restore(self.engine, ref, actor)

    # ------------------------------------------------------------------ diff / verify / gc / transfer

    def diff(self, ref_a: str, ref_b: str) -> VersionDiff:
        """Metrics, config and file-hash differences between two versions (any experts)."""
        return diffing.diff(self.engine, self._trees, ref_a, ref_b)

    def verify(self, repair: bool = False) -> VerifyReport:
        """Strict check: every blob re-hashed, every tree hash recomputed, every materialised view re-hashed.

        `repair` drops damaged views (rebuilt from blobs on next use) and rewrites damaged blobs from an
        intact view file when one exists.
        """
        return maintenance.verify(self.engine, self.store, self._trees, repair)

    def gc(self, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove temp files, unreferenced blobs and views older than `grace_s`, holding the write lock."""
        return maintenance.gc(self.engine, self.store, grace_s, dry_run)

    def export(self, refs: list[str], out_path: Path | str) -> dict[str, Any]:
        """Write the versions named by `refs` into a tar.gz (manifest + blobs); returns the manifest."""
        return transfer.export_versions(self.engine, self.store, self._trees, refs, Path(out_path))

    def import_archive(self, path: Path | str, actor: str | None = None) -> ImportResult:
        """Import an export tar.gz in one transaction; versions get new numbers in this registry."""
        return transfer.import_archive(self.engine, self.store, Path(path), actor)

    # ------------------------------------------------------------------------------ experiments

    def start_experiment(
        self,
        expert: str,
        arms: Sequence[tuple[int, float]],
        metric: str = "reward",
        salt: str | None = None,
        shadow_version: int | None = None,
        actor: str | None = None,
        guardrails: Sequence[str] = (),
        ramp: Sequence[float] = (),
        guard_settings: dict[str, float] | None = None,
    ) -> ExperimentView:
        """Start an A/B experiment over versions of `expert`; at most one runs per expert."""
        return experiments.start_experiment(
            self.engine, expert, arms, metric, salt, shadow_version, actor, guardrails, ramp, guard_settings
        )

    def active_experiment(self, expert: str) -> ExperimentView | None:
        """The running experiment of `expert`, if any."""
        return experiments.active_experiment(self.engine, expert)

    def active_experiments(self) -> list[ExperimentView]:
        """Every running experiment."""
        return experiments.active_experiments(self.engine)

    def list_experiments(self, expert: str | None = None) -> list[ExperimentView]:
        """All experiments (of one expert when given), oldest first."""
        return experiments.list_experiments(self.engine, expert)

    def get_experiment(self, expert_or_id: str | int) -> ExperimentView:
        """An experiment by id (int, or digits that are not an expert name) or the latest one of an expert."""
        return experiments.get_experiment(self.engine, expert_or_id)

    def stop_experiment(
        self, expert: str, winner: int | None = None, actor: str | None = None
    ) -> ExperimentView:
        """Stop the running experiment of `expert`; a `winner` version takes alias prod."""
        return experiments.stop_experiment(self.engine, expert, winner, actor)

    def guardrail_stop(
        self, experiment_id: int, reason: str, actor: str | None = None
    ) -> ExperimentView | None:
        """Stop a running experiment for a breached guardrail; prod to the control arm (None: not running)."""
        return experiments.guardrail_stop(self.engine, experiment_id, reason, actor)

    def advance_ramp(self, experiment_id: int, from_step: int) -> ExperimentView | None:
        """Advance a running experiment's ramp from `from_step` (None: not running or not at that step)."""
        return experiments.advance_ramp(self.engine, experiment_id, from_step)

    # ------------------------------------------------------------------------------ request log / outcomes

    def log_requests(self, records: list[RequestRecord]) -> None:
        """Insert a batch of request records in one transaction (does not change the state token)."""
        request_log.log_requests(self.engine, records)

    def record_outcomes(self, records: list[OutcomeRecord]) -> list[OutcomeRecord]:
        """Insert a batch of outcomes in one transaction; the first rating of a response stands (another
        key's later rating is refused unless it may override). Returns the refused outcomes."""
        return request_log.record_outcomes(self.engine, records)

    def rating_state(self, request_id: str) -> RatingState | None:
        """Whose request `request_id` was and whose rating stands; None when it was never logged."""
        return request_log.rating_state(self.engine, request_id)

    def experiment_requests(self, experiment_id: int) -> list[RequestRecord]:
        """Every request logged under the experiment, in insertion order."""
        return request_log.experiment_requests(self.engine, experiment_id)

    def experiment_outcomes(self, experiment_id: int) -> list[OutcomeRecord]:
        """Outcomes whose request was logged under the experiment, in insertion order."""
        return request_log.experiment_outcomes(self.engine, experiment_id)

    # ------------------------------------------------------------------------------ request content

    def logged_answers(self, expert: str, experiment_id: int | None = None) -> list[LoggedAnswer]:
        """Rated, answered requests of `expert` (or of one experiment's arms) with their standing rating
        and their content where `moea serve --log-content` stored it."""
        return request_content.logged_answers(self.engine, expert, experiment_id)

    def purge_content(self, before: datetime) -> int:
        """Delete stored request content logged before `before` (request rows stay); returns the count."""
        return request_content.purge_content(self.engine, before)

    def count_content(self) -> int:
        """How many requests have content stored."""
        return request_content.count_content(self.engine)
