"""Who may rate which response (POST /v1/feedback): only ids the gateways issued, only by the key that
made the request (or an admin key), and the first rating of a response stands unless the same key
updates it (an admin key may replace it).

A gateway remembers the ids it issued (and to which key) and the ratings it took, for the last
`feedback_window` responses, and asks the registry's request log (:meth:`Registry.rating_state`, one
indexed read per feedback) for the rest: the owner of a response from another gateway on the same
registry or from before a restart, and ratings other gateways took. The request-log writer stores a
request within about a second of the response, so feedback sent at once to *another* gateway may see
404 for that second. The registry checks the first-rating rule again when it writes the outcome (two
gateways racing on one response: the first write wins, the other outcome is refused there).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from registry.views import rating_accepted

from .auth import ApiKey
from .errors import APIError

log = logging.getLogger("moea.serving.gateway")

_UNKNOWN = object()


def _bounded_put(table: OrderedDict[str, str | None], key: str, value: str | None, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)


class FeedbackBook:
    """The gateway's memory of issued response ids and ratings, backed by the registry's request log."""

    def __init__(self, registry: Any, window: int) -> None:
        self.registry = registry
        self.window = window
        self._owners: OrderedDict[str, str | None] = OrderedDict()
        self._raters: OrderedDict[str, str | None] = OrderedDict()

    def issued(self, response_id: str, key_name: str | None) -> None:
        """Remember that `response_id` was answered to the key named `key_name` (None: no auth)."""
        _bounded_put(self._owners, response_id, key_name, self.window)

    def rated(self, response_id: str, key_name: str | None) -> None:
        """Remember that the key named `key_name` rated `response_id` (its rating now stands)."""
        _bounded_put(self._raters, response_id, key_name, self.window)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._owners

    async def check(self, response_id: str, key: ApiKey | None) -> None:
        """Raise the APIError that refuses `key`'s rating of `response_id` (404, 403, 409), if any.
        `key` is None on a gateway without API keys: anyone may rate any issued response then."""
        owner: Any = self._owners.get(response_id, _UNKNOWN)
        try:  # always: another gateway may have rated it since (its rating is in the log, not here)
            state = await asyncio.to_thread(self.registry.rating_state, response_id)
        except Exception as error:
            if owner is _UNKNOWN:
                raise
            log.warning(
                "feedback on %s: request log unreadable (%s); deciding from memory", response_id, error
            )
            state = None
        if owner is _UNKNOWN and state is not None:
            owner = state.owner
        if owner is _UNKNOWN:
            raise APIError(
                404,
                f"Unknown response id `{response_id}`: neither this gateway nor the registry's request log has "
                "it; send the `id` of a chat/completion response (gateways log it within about a second)",
                param="id",
                code="response_not_found",
            )
        name = key.name if key is not None else None
        admin = key is not None and key.admin
        if key is not None and not admin and owner != name:
            raise APIError(
                403,
                f"Response `{response_id}` was not made with this API key: only the key that made a request "
                "(or an admin key) may rate it",
                param="id",
                code="not_your_response",
            )
        # Memory holds ratings not yet written, the log those taken by other gateways: both must allow it.
        standing = [(self._raters[response_id],)] if response_id in self._raters else []
        if state is not None and state.rated:
            standing.append((state.rater,))
        if not all(rating_accepted(current, name, admin) for current in standing):
            raise APIError(
                409,
                f"Response `{response_id}` was already rated by another key; the first rating stands "
                "(the key that gave it may update it, an admin key may replace it)",
                param="id",
                code="already_rated",
            )
