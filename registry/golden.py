"""Golden sets and cached eval scores: what the eval gate on `moea registry promote` and the gateway's
load check read (README "Registry", "Eval gates").

A golden set is a JSONL file attached to an expert (`moea registry attach-eval NAME FILE`), stored as a
one-file artifact (kind ``golden``) in the content-addressed store, so `verify` and `gc` cover it.
Attaching a different file adds the next golden set version; the newest one is the expert's eval.

Rows are shaped like a task's data: ``{"prompt", "response" | "reference"}`` or ``{"messages": [...]}``
ending with the assistant answer (or followed by ``"reference"``); any other columns (``references``,
``test_list``, ``test_setup_code``) are kept as the row's eval extras. The registry only checks and
stores them; scoring is moe_adapters' job (moe_adapters/eval_gate.py), and its results come back here:
one :class:`EvalScore` per (expert version, golden set sha256), so a second promote does not regenerate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from . import db
from .artifacts import artifact_row
from .errors import IntegrityError, NotFoundError, ValidationError
from .models import EvalScore, Expert, ExpertVersion, GoldenSet, Ref, as_utc
from .state import default_actor
from .store import ArtifactStore, FileEntry, Tree, tree_hash
from .versions import find_expert, find_version
from .views import EvalScoreView, GoldenSetView

GOLDEN_FILE = "golden.jsonl"
MAX_GOLDEN_ROWS = 1000
MAX_GOLDEN_BYTES = 16 << 20
ROLES = ("system", "user", "assistant")
ROW_KEYS = ("prompt", "messages", "response", "reference")


def parse_golden(data: bytes, source: str = "golden set") -> list[dict[str, Any]]:
    """The rows of a golden JSONL file as ``{"messages", "reference", "extra"}`` (messages: what a client
    sends, ending with the user turn); ValidationError names the first bad lines."""
    if len(data) > MAX_GOLDEN_BYTES:
        raise ValidationError(
            f"{source} is over {MAX_GOLDEN_BYTES >> 20} MiB; a golden set holds a few hundred rows"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"{source} is not UTF-8 text; give a JSONL file") from None
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_row(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as error:
            problems.append(f"line {number}: {str(error).splitlines()[0]}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValidationError(f"{source}: {'; '.join(problems[:3])}{more}")
    if not rows:
        raise ValidationError(
            f"{source} has no rows; give JSONL rows with prompt/messages and response/reference"
        )
    if len(rows) > MAX_GOLDEN_ROWS:
        raise ValidationError(f"{source} has {len(rows)} rows; a golden set holds at most {MAX_GOLDEN_ROWS}")
    return rows


def _row(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError("a row must be a JSON object")
    reference = record.get("reference", record.get("response"))
    if "messages" in record and record.get("prompt") is None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"each message needs a role in {list(ROLES)}")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise ValueError("each message needs non-empty text content")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if reference is None and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("messages must end with a user turn (then the assistant answer, or a reference)")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise ValueError("a row needs a non-empty 'prompt' or a 'messages' list")
    if isinstance(reference, int | float) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError("a row needs the answer: 'response'/'reference', or a final assistant message")
    extra = {k: v for k, v in record.items() if k not in ROW_KEYS}
    return {"messages": messages, "reference": reference, "extra": extra}


def _golden_view(name: str, row: GoldenSet) -> GoldenSetView:
    return GoldenSetView(
        name, row.version, row.sha256, row.rows, row.filename, as_utc(row.created_at), row.created_by
    )  # type: ignore[arg-type]


def attach_golden(
    engine: Engine, store: ArtifactStore, name: str, path: Path | str, actor: str | None = None
) -> tuple[GoldenSetView, bool]:
    """Attach the JSONL file at `path` to expert `name`; returns (its golden set, created). A file with the
    content of the newest golden set adds nothing (created False); any other file is the next version."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"{path} is not a file; give a JSONL golden set")
    data = path.read_bytes()
    rows = parse_golden(data, str(path))
    sha, size = store.put_file(path)
    if sha != hashlib.sha256(data).hexdigest():
        raise ValidationError(f"{path} changed while it was being attached; attach it again")
    tree = Tree(tree_hash([FileEntry(GOLDEN_FILE, sha, size)]), (FileEntry(GOLDEN_FILE, sha, size),))

    def work(session: Session) -> tuple[GoldenSetView, bool]:
        expert = find_expert(session, name, lock=True)
        newest = _newest(session, expert.id)
        if newest is not None and newest.sha256 == sha:
            return _golden_view(expert.name, newest), False
        if store.missing_blobs(tree.files):  # gc may have raced us
            store.put_file(path)
        row = GoldenSet(
            expert_id=expert.id,  # type: ignore[arg-type]
            version=(newest.version if newest else 0) + 1,
            artifact_id=artifact_row(session, tree, "golden").id,  # type: ignore[arg-type]
            sha256=sha,
            rows=len(rows),
            filename=path.name[:512],
            created_by=actor or default_actor(),
        )
        session.add(row)
        session.flush()
        return _golden_view(expert.name, row), True

    return db.run_transaction(engine, work, retry_conflicts=True)


def _newest(session: Session, expert_id: int | None) -> GoldenSet | None:
    return session.exec(
        select(GoldenSet)
        .where(GoldenSet.expert_id == expert_id)
        .order_by(col(GoldenSet.version).desc())
        .limit(1)
    ).first()


def golden_sets(engine: Engine, name: str) -> list[GoldenSetView]:
    """Every golden set attached to `name`, oldest first (the last one is used)."""
    with Session(engine) as session:
        expert = find_expert(session, name)
        rows = session.exec(
            select(GoldenSet).where(GoldenSet.expert_id == expert.id).order_by(col(GoldenSet.version))
        ).all()
        return [_golden_view(expert.name, row) for row in rows]


def golden_rows(store: ArtifactStore, golden: GoldenSetView) -> list[dict[str, Any]]:
    """The parsed rows of a golden set, read from the store and hash-checked."""
    blob = store.blob_path(golden.sha256)
    try:
        data = blob.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{golden.ref}: its file is missing from the store; attach it again") from None
    if hashlib.sha256(data).hexdigest() != golden.sha256:
        raise IntegrityError(f"{golden.ref}: its stored file no longer matches its hash; attach it again")
    return parse_golden(data, golden.ref)


def _version_row(session: Session, name: str, version: int) -> ExpertVersion:
    return find_version(session, Ref(name, version=version), f"{name}@{version}")


def _score_view(name: str, version: int, row: EvalScore) -> EvalScoreView:
    return EvalScoreView(
        name, version, row.golden_sha256, row.metric, row.score, row.n, list(row.probes),
        dict(row.settings), as_utc(row.created_at),  # type: ignore[arg-type]
    )  # fmt: skip


def eval_score(engine: Engine, name: str, version: int, golden_sha256: str) -> EvalScoreView | None:
    """The cached score of `name@version` on the golden set with this hash, if computed before."""
    with Session(engine) as session:
        row = _version_row(session, name, version)
        score = session.exec(
            select(EvalScore).where(
                EvalScore.expert_version_id == row.id, EvalScore.golden_sha256 == golden_sha256
            )
        ).first()
        return _score_view(name, version, score) if score else None


def record_eval_score(
    engine: Engine,
    name: str,
    version: int,
    golden_sha256: str,
    result: dict[str, Any],
    actor: str | None = None,
) -> EvalScoreView:
    """Cache `result` (``metric``, ``score``, ``n``, ``probes``, ``settings``) for (version, golden hash);
    when a score is there already (another promote computed it meanwhile) that one is kept and returned."""
    try:
        metric, score, n = str(result["metric"]), float(result["score"]), int(result["n"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValidationError(f"an eval score needs metric, score and n ({error})") from None

    def work(session: Session) -> EvalScoreView:
        row = _version_row(session, name, version)
        existing = session.exec(
            select(EvalScore).where(
                EvalScore.expert_version_id == row.id, EvalScore.golden_sha256 == golden_sha256
            )
        ).first()
        if existing is None:
            existing = EvalScore(
                expert_version_id=row.id,  # type: ignore[arg-type]
                golden_sha256=golden_sha256,
                metric=metric,
                score=score,
                n=n,
                probes=list(result.get("probes") or []),
                settings=dict(result.get("settings") or {}),
                created_by=actor or default_actor(),
            )
            session.add(existing)
            session.flush()
        return _score_view(name, version, existing)

    return db.run_transaction(engine, work, retry_conflicts=True)


def golden_probes(engine: Engine, name: str, version: int) -> EvalScoreView | None:
    """What the gateway checks when it loads `name@version`: its score on the expert's newest golden set
    (else its newest score that has probes); None when the version was never scored on a golden set."""
    with Session(engine) as session:
        expert = session.exec(select(Expert).where(Expert.name == name)).first()
        if expert is None:
            raise NotFoundError(f"no expert named {name!r}")
        row = _version_row(session, name, version)
        scores = session.exec(
            select(EvalScore).where(EvalScore.expert_version_id == row.id).order_by(col(EvalScore.id).desc())
        ).all()
        newest = _newest(session, expert.id)
        preferred = [s for s in scores if newest is not None and s.golden_sha256 == newest.sha256]
        chosen = next((s for s in [*preferred, *scores] if s.probes), None)
        return _score_view(name, version, chosen) if chosen else None


def eval_scores(engine: Engine, name: str) -> list[EvalScoreView]:
    """Every cached golden-set score of `name`'s versions, oldest first."""
    with Session(engine) as session:
        expert = find_expert(session, name)
        rows = session.exec(
            select(EvalScore, ExpertVersion.version)
            .join(ExpertVersion, col(ExpertVersion.id) == col(EvalScore.expert_version_id))
            .where(ExpertVersion.expert_id == expert.id)
            .order_by(col(EvalScore.id))
        ).all()
        return [_score_view(expert.name, version, score) for score, version in rows]
