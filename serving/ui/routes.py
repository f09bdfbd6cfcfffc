"""The dashboard's routes under /ui: four read-only pages (`read` scope), a JSON endpoint the Experiments
page polls, a login form (browsers send no `Authorization` header: the key goes into an HttpOnly,
SameSite=Strict cookie), and admin actions behind a confirmation form.

Actions call what the command line calls, with the key's name as the actor of the alias history:
promote = the eval-gated promote of `moea registry promote` (:func:`moe_adapters.eval_gate.gated_promote`,
with cached scores only: a page does not run an eval for minutes), roll back = `moea registry rollback`,
stop with a winner = `moea ab stop --winner`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from moe_adapters.eval_gate import GateRefused, gated_promote
from registry.errors import RegistryError

from ..auth import ApiKey, require
from ..errors import APIError
from ..gateway import Gateway
from . import pages

HERE = Path(__file__).resolve().parent
COOKIE = "moea_ui_key"
DEFAULT_MINUTES = 15.0


class UncachedScore(RegistryError):
    """The gate needs a golden-set score that is not cached yet (the page does not run an eval)."""


def _cached_scores_only(views: list[Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    refs = ", ".join(view.ref for view in views)
    raise UncachedScore(
        f"{refs} has no cached score on the expert's golden set; run `moea registry promote` from the command "
        "line once (it scores and caches), then promote here"
    )


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else ""
    env.filters["size"] = _human_size
    env.filters["num"] = lambda value, digits=3: "–" if value is None else f"{value:.{digits}f}"
    env.filters["pct"] = lambda value: "–" if value is None else f"{100 * value:.1f}%"
    env.filters["last_user"] = _last_user_text
    return env


def _last_user_text(messages: Any) -> str:
    """The prompt of logged content: the last user message of a chat, or a completion's prompt."""
    if isinstance(messages, str):
        return messages
    users = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    last = users[-1] if users else ""
    return last if isinstance(last, str) else str(last)


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


class Dashboard:
    """The /ui routes of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.templates = _environment()
        self._csrf_secret = secrets.token_bytes(32)  # per process: a restart invalidates open forms

    # ---- auth ----------------------------------------------------------------------------------------
    def key(self, request: Request, scope: str) -> ApiKey | None:
        """The caller's key (header `Authorization: Bearer`, else the login cookie) if it has `scope`;
        else the 401/403 APIError (None on an open gateway)."""
        authorization = request.headers.get("authorization")
        if authorization is None and request.cookies.get(COOKIE):
            authorization = f"Bearer {request.cookies[COOKIE]}"
        return require(self.gateway.keys, authorization, scope)

    def csrf(self, key: ApiKey | None) -> str:
        """The token an action form carries: bound to the key's name and to this process."""
        name = key.name if key is not None else ""
        return hmac.new(self._csrf_secret, name.encode(), hashlib.sha256).hexdigest()

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A page with the layout's context (who is logged in, whether actions are offered)."""
        key = context.pop("key", None)
        admin = not self.gateway.keys.enabled or (key is not None and key.admin)
        html = self.templates.get_template(template).render(
            key=key, admin=admin, auth=self.gateway.keys.enabled, path=request.url.path,
            flash=request.query_params.get("flash"), error=request.query_params.get("error"), **context,
        )  # fmt: skip
        return HTMLResponse(html, status_code=status)

    def page(self, request: Request, template: str, build: Any, scope: str = "read") -> Response:
        """Authorize, build the view model, render; a missing key goes to the login form, a key without
        the scope gets a 403 page."""
        try:
            key = self.key(request, scope)
        except APIError as error:
            if error.status == 401:
                return RedirectResponse(f"/ui/login?next={quote(str(request.url.path))}", status_code=303)
            return self.render(request, "denied.html", status=error.status, message=error.message)
        return self.render(request, template, key=key, csrf=self.csrf(key), **build())

    def act(self, request: Request, token: str, action: Any, back: str) -> Response:
        """Run an admin action (403 page without admin, 400 page on a bad token); back to `back` with the
        outcome as a one-line message."""
        try:
            key = self.key(request, "admin")
        except APIError as error:
            return self.render(request, "denied.html", status=error.status, message=error.message)
        if not hmac.compare_digest(token, self.csrf(key)):
            return self.render(
                request, "denied.html", status=400, message="stale or forged form: reload the page"
            )
        try:
            message = action(key.name if key is not None else None)
        except (RegistryError, GateRefused, LookupError, ValueError) as error:
            return RedirectResponse(f"{back}?error={quote(str(error))}", status_code=303)
        return RedirectResponse(f"{back}?flash={quote(message)}", status_code=303)


def mount_ui(app: FastAPI, gateway: Gateway) -> None:
    """Serve the dashboard under /ui on `app` (same port, same API keys as the gateway)."""
    dashboard = Dashboard(gateway)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(_page_routes(dashboard))
    app.include_router(_action_routes(dashboard))


def _page_routes(ui: Dashboard) -> APIRouter:
    router = APIRouter(prefix="/ui")
    gateway = ui.gateway

    @router.get("", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/ui/experts", status_code=303)

    @router.get("/login")
    def login_form(request: Request, next: str = "/ui/experts") -> HTMLResponse:
        return ui.render(request, "login.html", next=next if next.startswith("/ui") else "/ui/experts")

    @router.post("/login")
    def login(request: Request, api_key: str = Form(...), next: str = Form("/ui/experts")) -> Response:
        key = gateway.keys.identify(f"Bearer {api_key}")
        if gateway.keys.enabled and key is None:
            return ui.render(request, "login.html", status=401, next=next, message="unknown API key")
        target = next if next.startswith("/ui") else "/ui/experts"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, api_key, httponly=True, samesite="strict", path="/ui")
        return response

    @router.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @router.get("/experts")
    def experts(request: Request) -> Response:
        return ui.page(request, "experts.html", lambda: pages.experts_page(gateway))

    @router.get("/routing")
    def routing(request: Request, minutes: float = DEFAULT_MINUTES) -> Response:
        minutes = min(max(minutes, 1.0), 24 * 60.0)
        return ui.page(request, "routing.html", lambda: pages.routing_page(gateway, minutes))

    @router.get("/experiments")
    def experiments(request: Request) -> Response:
        return ui.page(request, "experiments.html", lambda: pages.experiments_page(gateway))

    @router.get("/engines")
    def engines(request: Request) -> Response:
        return ui.page(request, "engines.html", lambda: pages.engines_page(gateway))

    @router.get("/api/experiments/{experiment_id}")
    def experiment_json(request: Request, experiment_id: int) -> JSONResponse:
        ui.key(request, "read")  # JSON: a 401/403 is the gateway's OpenAI error JSON
        series = pages.experiment_series(gateway, experiment_id)
        if series is None:
            raise APIError(404, f"no experiment {experiment_id}", code="not_found")
        return JSONResponse(series)

    return router


def _action_routes(ui: Dashboard) -> APIRouter:
    router = APIRouter(prefix="/ui")
    registry = ui.gateway.registry

    @router.get("/confirm/{action}")
    def confirm(request: Request, action: str) -> Response:
        if action not in ("promote", "rollback", "stop"):
            return ui.render(request, "denied.html", status=404, message=f"no action {action!r}")
        params = dict(request.query_params)
        return ui.page(request, "confirm.html", lambda: {"action": action, "params": params}, scope="admin")

    @router.post("/actions/promote")
    def promote(
        request: Request, expert: str = Form(...), version: int = Form(...), alias: str = Form("prod"),
        reason: str = Form(""), force: bool = Form(False), token: str = Form(""),
    ) -> Response:  # fmt: skip
        def run(actor: str | None) -> str:
            view, decision = gated_promote(registry, f"{expert}@{version}", alias, force=force,
                                           reason=reason or "moea ui", actor=actor, scorer=_cached_scores_only)  # fmt: skip
            return f"{view.ref} now holds {alias} ({decision.note})"

        return ui.act(request, token, run, "/ui/experts")

    @router.post("/actions/rollback")
    def rollback(
        request: Request, expert: str = Form(...), alias: str = Form("prod"), reason: str = Form(""),
        token: str = Form(""),
    ) -> Response:  # fmt: skip
        def run(actor: str | None) -> str:
            view = registry.rollback(expert, alias, actor=actor, reason=reason or "moea ui")
            return f"{expert}@{alias} rolled back to {view.ref}"

        return ui.act(request, token, run, "/ui/experts")

    @router.post("/actions/stop")
    def stop(
        request: Request, expert: str = Form(...), winner: str = Form(""), token: str = Form("")
    ) -> Response:
        def run(actor: str | None) -> str:
            chosen = int(winner) if winner.strip() else None
            experiment = registry.stop_experiment(expert, winner=chosen, actor=actor)
            won = f"; {expert}@{chosen} now holds prod" if chosen is not None else ""
            return f"experiment {experiment.id} of {expert} stopped{won}"

        return ui.act(request, token, run, "/ui/experiments")

    return router
