"""Request models of the gateway's endpoints (one pydantic model per endpoint, vLLM-style).

The gateway validates every body once, before any routing or forwarding, so that malformed requests
never reach vLLM: unknown top-level fields, wrong types and out-of-range sampling values are rejected
with a 400 in the OpenAI error shape. Fields that vLLM understands but the gateway has no opinion on
are declared loosely (``Any``) and checked by vLLM itself; fields that would let a client bypass the
gateway (``request_id``, custom chat templates, KV-transfer parameters) are not accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_TOKENS_LIMIT = 1_048_576
"""Upper bound accepted for `max_tokens`; the engine still refuses values beyond the model's context."""

PositiveTokens = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class _Strict(BaseModel):
    """Base of the request models: unknown fields are an error, as in the OpenAI API."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(BaseModel):
    """One chat message. Extra keys (tool calls, names, …) pass through to the engine unchanged."""

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text: the string content, or its text parts joined by newlines."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "\n".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class StreamOptions(_Strict):
    """OpenAI `stream_options`."""

    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class _SamplingFields(_Strict):
    """Fields shared by chat and text completions."""

    model: StrictStr = Field(min_length=1, max_length=256)
    max_tokens: PositiveTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: StrictStr | None = Field(default=None, max_length=512)
    response_format: dict[str, Any] | None = None
    # vLLM sampling extensions (sent by the openai client through `extra_body`).
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    length_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool | None = None
    ignore_eos: StrictBool | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    truncate_prompt_tokens: StrictInt | None = None
    prompt_logprobs: StrictInt | None = None
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[StrictStr] | None = None
    add_special_tokens: StrictBool | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: StrictInt | None = None
    return_token_ids: StrictBool | None = None
    echo: StrictBool | None = None

    @property
    def streaming(self) -> bool:
        """True when the client asked for server-sent events."""
        return bool(self.stream)

    @property
    def wants_usage_in_stream(self) -> bool:
        """True when the client itself asked for the final usage chunk of a stream."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveTokens | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: StrictStr | None = None
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None

    def routing_text(self) -> str:
        """The text the router reads: the last user message (the last message if none is a user's)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        return self.messages[-1].text()


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=16)] | None = None

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def routing_text(self) -> str:
        """The text the router reads: the prompt string (the first one of a batch; token ids → "")."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        first = prompt[0]
        return first if isinstance(first, str) else ""


class FeedbackRequest(_Strict):
    """POST /v1/feedback: the outcome of one earlier response, for A/B experiments.

    Exactly one of `reward` (any finite number, higher is better) or `thumbs` ("up"/"down").
    """

    id: StrictStr = Field(min_length=1, max_length=256)
    reward: Annotated[float, Field(allow_inf_nan=False)] | None = None
    thumbs: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _exactly_one_signal(self) -> FeedbackRequest:
        if (self.reward is None) == (self.thumbs is None):
            raise ValueError("give exactly one of 'reward' (a number) or 'thumbs' ('up' or 'down')")
        return self
