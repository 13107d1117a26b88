"""chat: a call to an OpenAI-compatible chat completions endpoint (``model.baseUrl`` +
``/chat/completions``), with personal data and health information redacted before it leaves the
pod, through the model's circuit breaker and with retries on transient errors; its answer whole,
or streamed (``stream``) as the model makes it.

Egress: the endpoint's host must be in ``egress.allowedHosts`` (an empty list allows no host, so
chat is refused at start-up), and redirects are never followed, so no hop leaves the list. A
private endpoint's CAs (``model.caBundleFile``) are trusted for this endpoint only.

The caller's ``max_tokens`` is capped at ``model.maxOutputTokens`` (the answer says which value
was used). Every call's tokens are counted (genai.py) and charged to the caller's budget; while it
runs it holds its most (``input_bound`` and its max_tokens) against the budgets (limits.py)."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import re
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from agent_contract.config import ModelConfig, RetryConfig
from agent_contract.operations import CHAT
from agent_runtime.genai import Accounting, GenAIMetrics, ModelCall, TypedError, estimate_tokens, tokens_in
from agent_runtime.limits import CALLER, Limiter
from agent_runtime.operations.base import InputError, Operation, StreamEvent
from agent_runtime.operations.documents import find_phi, find_pii, redact
from agent_runtime.resilience import CircuitBreaker, retry

log = logging.getLogger("agent_runtime")

MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a whole (non-streamed) answer; more is not a chat completion
MAX_EVENT_BYTES = 1024 * 1024  # one streamed event (a chunk of a few tokens); more is not a stream
_ERROR_BODY_BYTES = 4096  # read of a refusal, for its message


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1, max_length=100)
    # Capped at model.maxOutputTokens, which is also the default.
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)


class ModelError(TypedError):
    """The model endpoint failed; ``transient`` errors are retried and count against the circuit."""

    def __init__(self, message: str, transient: bool, error_type: str) -> None:
        super().__init__(message)
        self.transient = transient
        self.error_type = error_type


class EgressRefusedError(ModelError):
    """The endpoint tried to send the request elsewhere (a redirect): a dependency failure (502),
    never retried, never the caller's input."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, transient=False, error_type=str(status))


class ModelRefusedError(InputError, TypedError):
    """The endpoint refused what the caller asked (400, 413, 422: too long a conversation, say):
    the caller's input (422), not the endpoint's failure, so neither retried nor held against the
    circuit."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.error_type = str(status)


_CALLER_REFUSALS = frozenset({400, 413, 422})
_TEMPLATE_TOKENS = 8  # what a chat template adds to a message (role markers), generously


def input_bound(messages: list[dict[str, Any]]) -> int:
    """The most tokens the messages can take: a byte-level BPE token covers at least one byte of
    UTF-8, so no such tokenizer counts more tokens than bytes (plus the chat template's)."""
    return sum(len(m["content"].encode("utf-8", "surrogatepass")) + _TEMPLATE_TOKENS for m in messages)


def host_allowed(url: str, allowed_hosts: list[str]) -> bool:
    """The URL's host matches an entry of the allow-list (``*.`` wildcards); an empty list allows none."""
    host = urlsplit(url).hostname or ""
    return bool(host) and any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowed_hosts)


# Names the document detectors do not cover: after a title, or after "patient"/"name" (a label in
# any case, then one to three capitalised words). Bounded repetition: linear time.
_PERSON_NAME = re.compile(
    r"\b(?:(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof)\.?|(?i:patient|name)[ \t]*:?)[ \t]+"
    r"([A-Z][a-z'-]+(?:[ \t]+[A-Z][a-z'-]+){0,2})"
)


def find_identifiers(text: str) -> list[dict[str, Any]]:
    """Everything chat keeps from the model: PII, PHI (record and plan numbers, diagnosis codes,
    identifiers in a health context, as process_document finds them) and person names, merged so
    overlapping findings count once."""
    pii = find_pii(text)
    found = pii + find_phi(text, pii)
    found += [
        {"type": "person_name", "text": m.group(1), "start": m.start(1), "end": m.end(1)}
        for m in _PERSON_NAME.finditer(text)
    ]
    merged: list[dict[str, Any]] = []
    for item in sorted(found, key=lambda f: (f["start"], -f["end"])):
        if merged and item["start"] < merged[-1]["end"]:
            continue  # inside (or overlapping) the previous one, which is replaced whole
        merged.append(item)
    return merged


def trust_for(model: ModelConfig) -> ssl.SSLContext | bool:
    """The CAs trusted for the endpoint: the bundle's alone when one is given, else the system's."""
    if model.ca_bundle_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=model.ca_bundle_file)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"model.caBundleFile {model.ca_bundle_file!r} cannot be read as PEM CAs: {error}") from None


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes (one read returns only what has arrived)."""
    raw = bytearray()
    while len(raw) < limit and (chunk := await response.content.read(limit - len(raw))):
        raw += chunk
    return bytes(raw)


def _said(text: str, key: str | None) -> str:
    """What the endpoint said, in short, without the agent's key should it echo it (some gateways
    do, whole or in part): it goes to the caller and the audit trail."""
    if key and len(key) >= 8:
        text = text.replace(key, "[redacted]")
    return text[:300]


async def _refusal_message(response: aiohttp.ClientResponse, key: str | None) -> str:
    """What an endpoint says when it refuses (OpenAI's ``{"error": {"message": ...}}``), in short."""
    try:
        raw = await _read_at_most(response, _ERROR_BODY_BYTES)
        error = json.loads(raw).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError, aiohttp.ClientError, TimeoutError):
        return ""
    return f": {_said(message, key)}" if isinstance(message, str) and message else ""


async def _check_status(response: aiohttp.ClientResponse, key: str | None) -> None:
    status = response.status
    if 300 <= status < 400:
        raise EgressRefusedError(f"model endpoint answered a redirect ({status}); redirects are not followed", status)
    if status >= 500 or status in (408, 429):
        raise ModelError(f"model endpoint answered {status}", transient=True, error_type=str(status))
    if status in _CALLER_REFUSALS:
        raise ModelRefusedError(
            f"the model endpoint refused the request ({status}){await _refusal_message(response, key)}", status
        )
    if status >= 400:  # 401, 403, 404: the agent's key or model name, not the caller's input
        # What the endpoint says about the agent's key (OpenAI's 401 shows part of it) is for the
        # agent's operators, in the log: the caller cannot act on it and must not read it.
        log.warning("model endpoint refused the agent's request (%d)%s", status, await _refusal_message(response, key))
        raise ModelError(
            f"model endpoint refused the agent's request ({status}); its answer is in the agent's log",
            transient=False,
            error_type=str(status),
        )


def _unreachable(error: Exception) -> ModelError:
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return ModelError(
            f"model endpoint's TLS certificate is not trusted ({type(error).__name__}); a private CA goes in "
            "model.caBundleFile",
            transient=False,
            error_type=type(error).__name__,
        )
    error_type = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
    return ModelError(f"model endpoint unreachable: {type(error).__name__}", transient=True, error_type=error_type)


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The data of each Server-Sent Event the endpoint sends (OpenAI's: one ``data:`` line each).
    An event is held until its blank line: one that never ends must not fill the pod's memory."""
    data: list[str] = []
    size = 0
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data, size = [], 0
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
            size += len(raw)
            if size > MAX_EVENT_BYTES:
                raise ModelError(
                    f"model endpoint streamed an event of more than {MAX_EVENT_BYTES} bytes", False, "invalid_response"
                )
    if data:
        yield "\n".join(data)


def _chunk(data: str, key: str | None) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise ModelError("model endpoint streamed something other than a JSON object", False, "invalid_response")
    if "error" in chunk:  # some servers report a failure inside a stream already under way
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise ModelError(f"model endpoint failed mid-stream: {_said(str(message), key)}", False, "stream_error")
    return chunk


def _delta(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


_Opened = tuple[aiohttp.ClientResponse, AsyncGenerator[str, None], str | None, CircuitBreaker]


def chat_operation(
    model: ModelConfig,
    allowed_hosts: list[str],
    retry_config: RetryConfig,
    session: Callable[[], aiohttp.ClientSession],
    breaker: Callable[[], CircuitBreaker],
    *,
    metrics: GenAIMetrics,
    tracer: Callable[[], trace.Tracer],
    limiter: Callable[[], Limiter | None],
) -> Operation:
    if not allowed_hosts:
        raise ValueError(
            "egress.allowedHosts is empty, so no host may be called: list the model endpoint's host to enable chat"
        )
    if not host_allowed(model.base_url, allowed_hosts):
        raise ValueError(f"model.baseUrl {model.base_url!r} is not in egress.allowedHosts")
    url = f"{model.base_url.rstrip('/')}/chat/completions"
    trust = trust_for(model)
    timeout = aiohttp.ClientTimeout(total=model.timeout_seconds, connect=model.connect_timeout_seconds)
    parts = urlsplit(url)

    async def spend(tokens: int) -> None:
        budget, caller = limiter(), CALLER.get(None)
        if budget is not None and caller is not None:
            await budget.spend_tokens(caller, tokens)

    def holding(body: dict[str, Any], max_tokens: int) -> contextlib.AbstractAsyncContextManager[None]:
        """The call admitted on the budgets with its most held until it ends (and has spent): calls
        in parallel then cannot all be admitted on tokens none of them has been charged yet."""
        budget, caller = limiter(), CALLER.get(None)
        if budget is None or caller is None:
            return contextlib.nullcontext()
        return budget.holding_tokens(caller, input_bound(body["messages"]) + max_tokens)

    accounting = Accounting(
        metrics, model, tracer, spend, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    )

    def api_key() -> str | None:
        return os.environ.get(model.api_key_env) if model.api_key_env else None

    def headers(accept: str) -> dict[str, str]:
        sent = {"Content-Type": "application/json", "Accept": accept}
        if key := api_key():  # a keyless endpoint (or an empty Secret key) gets no Authorization at all
            sent["Authorization"] = f"Bearer {key}"
        return sent

    def prepared(request: ChatInput, stream: bool) -> tuple[dict[str, Any], int, int]:
        """The body sent (redacted), the redactions made and the max_tokens used."""
        redactions = 0
        messages = []
        for message in request.messages:
            found = find_identifiers(message.content)
            redactions += len(found)
            messages.append({"role": message.role, "content": redact(message.content, found)})
        max_tokens = min(request.max_tokens or model.max_output_tokens, model.max_output_tokens)
        body: dict[str, Any] = {
            "model": model.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": request.temperature,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body, redactions, max_tokens

    def input_estimate(body: dict[str, Any]) -> int:
        return sum(estimate_tokens(message["content"]) for message in body["messages"])

    async def guarded(attempt: Callable[[CircuitBreaker], Awaitable[Any]]) -> Any:
        """Retries transient failures, each attempt through the circuit breaker. An attempt settles
        its own outcome with the breaker unless it hands the breaker on (a stream, settled at its end)."""

        async def once() -> Any:
            circuit = breaker()
            circuit.allow()
            try:
                return await attempt(circuit)
            except ModelRefusedError:
                circuit.record(True)  # the endpoint works; the caller's input was refused
                raise
            except BaseException:
                circuit.record(False)
                raise

        return await retry(once, retry_config, lambda error: isinstance(error, ModelError) and error.transient)

    async def post(body: dict[str, Any], accept: str) -> aiohttp.ClientResponse:
        # No redirects: the allow-list was checked for this URL only, and a 307 would resend the
        # conversation to wherever the endpoint (or someone controlling it) points.
        response = await session().post(
            url, json=body, headers=headers(accept), timeout=timeout, allow_redirects=False, ssl=trust
        )
        try:
            await _check_status(response, api_key())
        except BaseException:
            response.close()
            raise
        return response

    async def complete(body: dict[str, Any], call: ModelCall, circuit: CircuitBreaker) -> dict[str, Any]:
        try:
            response = await post(body, "application/json")
            try:
                raw = await _read_at_most(response, MAX_ANSWER_BYTES + 1)
            finally:
                response.release()  # back to the pool if read to its end, else closed
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _unreachable(error) from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise ModelError(f"model endpoint answered more than {MAX_ANSWER_BYTES} bytes", False, "invalid_response")
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ModelError("model endpoint answered something other than a JSON object", False, "invalid_response")
        call.observe_chunk(answer)
        circuit.record(True)
        return answer

    async def handler(request: ChatInput) -> dict[str, Any]:
        body, redactions, max_tokens = prepared(request, stream=False)
        async with (
            holding(body, max_tokens),
            accounting.call(max_tokens, request.temperature, input_estimate(body)) as call,
        ):
            answer: dict[str, Any] = await guarded(lambda circuit: complete(body, call, circuit))
            try:
                reply = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                reply = None
            if not isinstance(reply, str):
                raise ModelError(
                    "the model endpoint answered without choices[0].message.content", False, "invalid_response"
                )
            call.output_estimate = estimate_tokens(reply)  # used only when the endpoint reports no usage
        usage = call.final_usage()
        return {
            "reply": reply,
            "model": call.response_model or model.model,
            "redactions": redactions,
            "finish_reason": call.finish_reasons[0] if call.finish_reasons else None,
            "max_tokens": max_tokens,
            "usage": usage.as_json() if usage is not None else None,
        }

    async def stream(request: ChatInput) -> AsyncGenerator[StreamEvent, None]:
        body, redactions, max_tokens = prepared(request, stream=True)
        async with (
            holding(body, max_tokens),
            accounting.call(max_tokens, request.temperature, input_estimate(body)) as call,
        ):

            async def start(circuit: CircuitBreaker) -> _Opened:
                """Opens the stream and reads its first event: a failure up to here is retried."""
                try:
                    response = await post(body, "text/event-stream")
                except (aiohttp.ClientError, TimeoutError) as error:
                    raise _unreachable(error) from None
                try:
                    events = _sse_data(response)
                    first = await anext(events, None)
                except BaseException as error:
                    response.close()
                    if isinstance(error, aiohttp.ClientError | TimeoutError):
                        raise _unreachable(error) from None
                    raise
                return response, events, first, circuit

            response, events, data, circuit = await guarded(start)
            completed = healthy = False
            chunks = characters = 0
            try:
                while data is not None and data.strip() != "[DONE]":
                    chunk = _chunk(data, api_key())
                    call.observe_chunk(chunk)
                    if text := _delta(chunk):
                        # If the endpoint reports none: a token a chunk (OpenAI's), unless the text
                        # says more (some send many a chunk), so a stream cut off is not undercharged.
                        chunks, characters = chunks + 1, characters + len(text)
                        call.output_estimate = max(chunks, tokens_in(characters))
                        yield StreamEvent({"delta": text})
                    data = await anext(events, None)
                completed = healthy = True
            except (aiohttp.ClientError, TimeoutError) as error:
                kind = _unreachable(error).error_type  # "timeout" past model.timeoutSeconds
                raise ModelError(f"model stream broke off ({type(error).__name__})", False, kind) from None
            except ValueError:  # a line longer than the reader takes
                raise ModelError("model endpoint streamed a line too long", False, "invalid_response") from None
            except (GeneratorExit, asyncio.CancelledError):
                healthy = True  # the caller stopped reading (the client left): not the endpoint's fault
                raise
            finally:
                circuit.record(healthy)
                await events.aclose()
                if completed:
                    response.release()
                else:
                    response.close()  # stops the model: nothing more is read, or paid for
        # The model call is over and accounted for: what is left is telling the caller.
        usage = call.final_usage()
        yield StreamEvent(
            {
                "finish_reason": call.finish_reasons[0] if call.finish_reasons else None,
                "model": call.response_model or model.model,
                "redactions": redactions,
                "max_tokens": max_tokens,
                "usage": usage.as_json() if usage is not None else None,
            },
            "done",
        )

    return Operation.builtin(CHAT, handler, ChatInput, stream=stream)
