"""chat: a call to an OpenAI-compatible chat completions endpoint, with personal data and health
information redacted before it leaves the pod, through the model's circuit breaker and with retries
on transient errors.

Egress: the endpoint's host must be in ``egress.allowedHosts`` (an empty list allows no host, so
chat is refused at start-up), and redirects are never followed, so no hop leaves the list."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from agent_contract.config import ModelConfig, RetryConfig
from agent_contract.operations import CHAT
from agent_runtime.operations.base import InputError, Operation
from agent_runtime.operations.documents import find_phi, find_pii, redact
from agent_runtime.resilience import CircuitBreaker, retry


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1, max_length=100)
    max_tokens: int = Field(default=512, ge=1, le=8192)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)


class ModelError(Exception):
    """The model endpoint failed; ``transient`` errors are retried and count against the circuit."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class EgressRefusedError(ModelError):
    """The endpoint tried to send the request elsewhere (a redirect): a dependency failure (502),
    never retried, never the caller's input."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


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


def chat_operation(
    model: ModelConfig,
    allowed_hosts: list[str],
    retry_config: RetryConfig,
    session: Callable[[], aiohttp.ClientSession],
    breaker: Callable[[], CircuitBreaker],
) -> Operation:
    if not allowed_hosts:
        raise ValueError(
            "egress.allowedHosts is empty, so no host may be called: list the model endpoint's host to enable chat"
        )
    if not host_allowed(model.endpoint, allowed_hosts):
        raise ValueError(f"model.endpoint {model.endpoint!r} is not in egress.allowedHosts")
    url = f"{model.endpoint.rstrip('/')}/v1/chat/completions"

    async def call(body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(model.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            # No redirects: the allow-list was checked for this URL only, and a 307 would resend the
            # conversation to wherever the endpoint (or someone controlling it) points.
            async with session().post(
                url,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=model.timeout_seconds),
                allow_redirects=False,
            ) as response:
                if 300 <= response.status < 400:
                    raise EgressRefusedError(
                        f"model endpoint answered a redirect ({response.status}); redirects are not followed"
                    )
                if response.status >= 500 or response.status == 429:
                    raise ModelError(f"model endpoint answered {response.status}", transient=True)
                if response.status >= 400:
                    raise ModelError(f"model endpoint refused the request ({response.status})", transient=False)
                answer: dict[str, Any] = await response.json(content_type=None)
                return answer
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ModelError(f"model endpoint unreachable: {type(error).__name__}", transient=True) from None

    async def handler(request: ChatInput) -> dict[str, Any]:
        redactions = 0
        messages = []
        for message in request.messages:
            found = find_identifiers(message.content)
            redactions += len(found)
            messages.append({"role": message.role, "content": redact(message.content, found)})
        body = {
            "model": model.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }

        async def attempt() -> dict[str, Any]:
            return await breaker().call(lambda: call(body))

        try:
            answer = await retry(attempt, retry_config, lambda error: isinstance(error, ModelError) and error.transient)
        except ModelError as error:
            if not error.transient and not isinstance(error, EgressRefusedError):
                raise InputError(str(error)) from None
            raise
        try:
            reply = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(
                "the model endpoint answered without choices[0].message.content", transient=False
            ) from None
        return {
            "reply": reply,
            "model": answer.get("model", model.model),
            "redactions": redactions,
            "usage": answer.get("usage", {}),
        }

    return Operation.builtin(CHAT, handler, ChatInput)
