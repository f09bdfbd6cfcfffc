"""moea: serving — vLLM engines, the OpenAI-compatible gateway, A/B experiments, the command line root."""

from __future__ import annotations

import moe_adapters  # noqa: F401 - its import checks that `registry` and `serving` are moea's own packages

MOEA_PACKAGE = "serving"
