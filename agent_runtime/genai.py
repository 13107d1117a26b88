"""Token accounting of model calls, after the OpenTelemetry GenAI semantic conventions.

Each call to the model (retries included, as a client library's ``create()`` counts them) is
one ``ModelCall``: when it ends it observes the two client histograms (tokens by type, and the
duration with ``error_type`` when it failed), gives its span the ``gen_ai.*`` attributes, adds
its token counts to the audit record of the operation that made it, and hands the tokens used
to the budget (``spend``).

Labels are bounded: the operation, the configured provider and the configured model, never
anything a caller sent nor what the endpoint answered (``gen_ai.response.model`` is a span
attribute only).

Tokens are what the endpoint reports in ``usage``. When it reports none (a stream cut off before
its usage chunk, an endpoint that does not count), they are estimated and marked so: input at
four characters a token (OpenAI's rule of thumb for English), output likewise, or as the content
chunks received when they are more (a streaming endpoint sends at least a token per chunk)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as attributes
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from prometheus_client import CollectorRegistry, Histogram

from agent_contract.config import ModelConfig
from agent_contract.genai import (
    ERROR_TYPE_LABEL,
    INPUT_TOKENS,
    OPERATION_DURATION_METRIC,
    OPERATION_NAME_LABEL,
    OUTPUT_TOKENS,
    PROVIDER_LABEL,
    REQUEST_MODEL_LABEL,
    TOKEN_TYPE_LABEL,
    TOKEN_USAGE_METRIC,
)
from agent_runtime.operations.base import add_call_details

log = logging.getLogger("agent_runtime")

# The buckets the conventions advise for gen_ai.client.token.usage and
# gen_ai.client.operation.duration (powers of 4 tokens; seconds doubling from 10 ms).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

CHAT = "chat"  # gen_ai.operation.name of a chat completion
CANCELLED = "cancelled"  # error_type of a call its caller stopped (a streaming client that left)
_CHARACTERS_PER_TOKEN = 4


class GenAIMetrics:
    """The GenAI client histograms, on the runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.token_usage = Histogram(
            TOKEN_USAGE_METRIC,
            "Tokens used per model call, by token type (input or output).",
            [OPERATION_NAME_LABEL, PROVIDER_LABEL, REQUEST_MODEL_LABEL, TOKEN_TYPE_LABEL],
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            OPERATION_DURATION_METRIC,
            "Duration of model calls (retries included); error_type names why one failed, empty when it did not.",
            [OPERATION_NAME_LABEL, PROVIDER_LABEL, REQUEST_MODEL_LABEL, ERROR_TYPE_LABEL],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )


def estimate_tokens(text: str) -> int:
    return tokens_in(len(text))


def tokens_in(characters: int) -> int:
    """The tokens estimated for this many characters of text."""
    return -(-characters // _CHARACTERS_PER_TOKEN)


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    estimated: bool  # the endpoint did not report it: the runtime's estimate

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_json(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "estimated": self.estimated}


def reported_usage(usage: Any) -> Usage | None:
    """The ``usage`` object of an OpenAI chat completion (or its last stream chunk), when it holds
    two non-negative token counts."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(prompt) and _count(completion)):
        return None
    return Usage(prompt, completion, estimated=False)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


class TypedError(Exception):
    """An exception that names its own ``error_type`` (low cardinality, as the conventions ask)."""

    error_type: str


def error_type_of(error: BaseException) -> str:
    if isinstance(error, TypedError):
        return error.error_type
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return CANCELLED
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__qualname__


@dataclass
class ModelCall:
    """What one call learns as it goes; ``Accounting.call`` reports it when the call ends."""

    max_tokens: int
    input_estimate: int  # of the messages as sent
    answered: bool = False  # the endpoint started answering: tokens were (at least partly) used
    response_model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    usage: Usage | None = None  # as reported
    output_estimate: int = 0  # of the answer so far, for when the endpoint reports no usage

    def observe_chunk(self, chunk: dict[str, Any]) -> None:
        """Takes what a response (or stream chunk) says about the call: model, finish reasons, usage."""
        self.answered = True
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self.response_model = model[:256]
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                reason = choice.get("finish_reason") if isinstance(choice, dict) else None
                if isinstance(reason, str) and reason and len(self.finish_reasons) < 16:
                    self.finish_reasons.append(reason[:64])
        usage = reported_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage

    def final_usage(self) -> Usage | None:
        """Reported usage, else an estimate once the endpoint answered, else None (nothing used)."""
        if self.usage is not None:
            return self.usage
        if not self.answered:
            return None
        return Usage(self.input_estimate, self.output_estimate, estimated=True)


class Accounting:
    """The accounting of one agent's model: its metrics, spans and budget hook."""

    def __init__(
        self,
        metrics: GenAIMetrics,
        model: ModelConfig,
        tracer: Callable[[], trace.Tracer],
        spend: Callable[[int], Awaitable[None]],
        server_address: str,
        server_port: int,
    ) -> None:
        self.metrics = metrics
        self.model = model
        self.tracer = tracer
        self.spend = spend
        self.server = (server_address, server_port)
        labels = (CHAT, model.provider.value, model.model)
        self._input = metrics.token_usage.labels(*labels, INPUT_TOKENS)
        self._output = metrics.token_usage.labels(*labels, OUTPUT_TOKENS)
        self._labels = labels

    @asynccontextmanager
    async def call(self, max_tokens: int, temperature: float, input_estimate: int) -> AsyncIterator[ModelCall]:
        """One model call: a client span (when the request is traced) and, when it ends however it
        ends, metrics, span attributes, the audit details and the budget."""
        call = ModelCall(max_tokens, input_estimate)
        span = self._start_span(max_tokens, temperature)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            yield call
        except BaseException as failure:  # CancelledError too: a cut-off stream still used tokens
            error = failure
            raise
        finally:
            await self._finish(call, span, time.perf_counter() - started, error)

    def _start_span(self, max_tokens: int, temperature: float) -> trace.Span | None:
        if not trace.get_current_span().is_recording():
            return None  # the request is not sampled: no spans at all
        # Not made current: a stream's generator runs across the relay's awaits, where an
        # attached context could not be detached cleanly.
        span = self.tracer().start_span(f"{CHAT} {self.model.model}", kind=trace.SpanKind.CLIENT)
        span.set_attribute(attributes.GEN_AI_OPERATION_NAME, CHAT)
        span.set_attribute(attributes.GEN_AI_PROVIDER_NAME, self.model.provider.value)
        span.set_attribute(attributes.GEN_AI_REQUEST_MODEL, self.model.model)
        span.set_attribute(attributes.GEN_AI_REQUEST_MAX_TOKENS, max_tokens)
        span.set_attribute(attributes.GEN_AI_REQUEST_TEMPERATURE, temperature)
        span.set_attribute(server_attributes.SERVER_ADDRESS, self.server[0])
        span.set_attribute(server_attributes.SERVER_PORT, self.server[1])
        return span

    async def _finish(
        self, call: ModelCall, span: trace.Span | None, seconds: float, error: BaseException | None
    ) -> None:
        error_type = error_type_of(error) if error is not None else ""
        self.metrics.duration.labels(*self._labels, error_type).observe(seconds)
        usage = call.final_usage()
        if usage is not None:
            self._input.observe(usage.input_tokens)
            self._output.observe(usage.output_tokens)
        details: dict[str, Any] = {"model": self.model.model, "max_tokens": call.max_tokens}
        if usage is not None:
            details.update(usage.as_json())
        if call.finish_reasons:
            details["finish_reason"] = call.finish_reasons[0]
        if span is not None:
            if call.response_model:
                span.set_attribute(attributes.GEN_AI_RESPONSE_MODEL, call.response_model)
            if call.finish_reasons:
                span.set_attribute(attributes.GEN_AI_RESPONSE_FINISH_REASONS, call.finish_reasons)
            if usage is not None:
                span.set_attribute(attributes.GEN_AI_USAGE_INPUT_TOKENS, usage.input_tokens)
                span.set_attribute(attributes.GEN_AI_USAGE_OUTPUT_TOKENS, usage.output_tokens)
            if error is not None:
                span.set_attribute(error_attributes.ERROR_TYPE, error_type)
                span.set_status(trace.StatusCode.ERROR, str(error)[:200] or error_type)
            span.end()
        if usage is not None and usage.total:
            try:
                await self.spend(usage.total)
            except Exception:
                # The tokens are used and the answer made: losing it would not give them back. The
                # next admission check still fails closed if the budget's store is down.
                log.warning("could not charge %d tokens to the budget", usage.total, exc_info=True)
                details["budget_charged"] = False
        add_call_details(**details)
