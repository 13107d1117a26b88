"""chat: a call to an OpenAI-compatible chat completions endpoint, with personal data redacted
before it leaves the pod, through the model's circuit breaker and with retries on transient errors."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from agent_contract.config import ModelConfig, RetryConfig
from agent_contract.operations import CHAT
from agent_runtime.operations.base import InputError, Operation
from agent_runtime.operations.documents import find_pii, redact
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


def host_allowed(url: str, allowed_hosts: list[str]) -> bool:
    """With an allow-list configured, the endpoint's host must match one entry (``*.`` wildcards)."""
    host = urlsplit(url).hostname or ""
    return not allowed_hosts or any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed_hosts)


def chat_operation(
    model: ModelConfig,
    allowed_hosts: list[str],
    retry_config: RetryConfig,
    session: Callable[[], aiohttp.ClientSession],
    breaker: Callable[[], CircuitBreaker],
) -> Operation:
    if not host_allowed(model.endpoint, allowed_hosts):
        raise ValueError(f"model.endpoint {model.endpoint!r} is not in egress.allowedHosts")
    url = f"{model.endpoint.rstrip('/')}/v1/chat/completions"

    async def call(body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(model.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with session().post(
                url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=model.timeout_seconds)
            ) as response:
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
            found = find_pii(message.content)
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
            if not error.transient:
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
