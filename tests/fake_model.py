"""A fake OpenAI-compatible model endpoint for tests: ``POST /v1/chat/completions``, whole or
streamed (``stream: true``, with a last usage chunk when ``stream_options.include_usage``).

It counts tokens deterministically (whitespace-separated words: input over every message's
content, output over the reply), honours ``max_tokens`` (the reply is cut there, finish reason
``length``), records every request it got (body and headers, ``Authorization`` included), and
can be told to misbehave: answer an error status, redirect, stall a stream (until ``release``),
or drop the connection mid-stream. ``client_left`` is set when a client closes a stream early.

    async with FakeModel() as fake:            # or the ``fake_model`` fixture (tests/conftest.py)
        config = {"baseUrl": fake.base_url, "model": "test-model", "apiKeyEnv": None}
        ...
        assert fake.received[0].body["max_tokens"] == 64

TLS: ``make_tls(directory)`` writes a private CA and a server certificate for 127.0.0.1 and
localhost; ``FakeModel(tls=...)`` then serves HTTPS with it.

Run alone (for a pod to reach): ``python -m tests.fake_model --host 0.0.0.0 --port 8000``."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PATH = "/v1/chat/completions"


def count_tokens(text: str) -> int:
    """The fake's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


@dataclass(frozen=True)
class Received:
    body: dict[str, Any]
    headers: dict[str, str]  # names in lower case

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path  # the private CA (what model.caBundleFile names)
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_tls(directory: Path) -> TlsFiles:
    """A private CA and a server certificate it signed, for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake model test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def _echo(messages: list[dict[str, Any]]) -> str:
    return f"you said: {messages[-1]['content']}"


@dataclass
class FakeModel:
    """The endpoint. Set the knobs before (or between) requests; read what it received."""

    reply: Callable[[list[dict[str, Any]]], str] = _echo  # the answer to the messages
    tls: TlsFiles | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    response_model: str | None = None  # the model the answers name (default: the one asked for)
    report_usage: bool = True  # False: answers carry no usage (streams: no usage chunk)
    fail_with: int | None = None  # answer every request with this status
    redirect_to: str | None = None  # answer every request with a 307 to this URL
    stall_after: int | None = None  # stream: this many content chunks, then silence until released;
    #                                 whole answers: wait for release before answering
    break_after: int | None = None  # stream: this many content chunks, then the connection is dropped
    error_after: int | None = None  # stream: this many content chunks, then an error chunk, and the end
    error_message: str | None = None  # what error answers (and error chunks) say
    endless_after: int | None = None  # stream: this many content chunks, then one event that never ends
    received: list[Received] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # a request reached stall_after
    client_left: asyncio.Event = field(default_factory=asyncio.Event)  # a stream's client closed early
    _failures: list[int] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def fail_next(self, *statuses: int) -> None:
        """The next requests get these statuses, one each, in order; then answers again."""
        self._failures.extend(statuses)

    @property
    def base_url(self) -> str:
        """The OpenAI SDK-style base URL (what model.baseUrl takes)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(PATH, self._handle)
        # Cancelled on disconnect: a stalled stream learns at once that its client left.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.tls.server_context() if self.tls else None
        )
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self.released.set()  # nothing left waiting
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeModel:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        self.received.append(Received(body, {name.lower(): value for name, value in request.headers.items()}))
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        status = self._failures.pop(0) if self._failures else self.fail_with
        if status is not None:
            return _error(status, self.error_message or f"fake failure {status}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages: a non-empty list is required")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        words = self.reply(messages).split()
        finish = "stop"
        if isinstance(limit, int) and len(words) > limit:
            words, finish = words[:limit], "length"
        usage = {
            "prompt_tokens": sum(count_tokens(str(m.get("content", ""))) for m in messages),
            "completion_tokens": len(words),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = self.response_model or str(body.get("model"))
        if body.get("stream") is True:
            return await self._stream(request, body, model, words, finish, usage)
        if self.stall_after is not None:
            self.stalled.set()
            await self.released.wait()
        answer: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish}
            ],
        }
        if self.report_usage:
            answer["usage"] = usage
        return web.json_response(answer)

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps({**base, **payload})
            await response.write(f"data: {data}\n\n".encode())

        try:
            await send(
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            )
            for number, word in enumerate(words):
                if number == self.stall_after:
                    self.stalled.set()
                    await self.released.wait()
                if number == self.endless_after:
                    line = b"data: " + b"x" * 4000 + b"\n"
                    while True:  # data lines, never the blank line that would end the event
                        await response.write(line)
                if number == self.error_after:
                    await send({"error": {"message": self.error_message or "fake failure", "type": "fake_error"}})
                    await response.write_eof()
                    return response
                if number == self.break_after:
                    assert request.transport is not None
                    request.transport.close()  # mid-body: the client sees the payload cut short
                    return response
                content = word if number == 0 else f" {word}"
                await send({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})
            if self.stall_after is not None and self.stall_after >= len(words):
                self.stalled.set()
                await self.released.wait()
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            options = body.get("stream_options")
            if self.report_usage and isinstance(options, dict) and options.get("include_usage"):
                await send({"choices": [], "usage": usage})
            await send("[DONE]")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.client_left.set()
            raise
        return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "fake_error", "code": status}}, status=status)


async def _serve(host: str, port: int) -> None:
    async with FakeModel(host=host, port=port) as fake:
        print(fake.base_url, flush=True)  # the one line a caller reads
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible chat completions endpoint.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    arguments = parser.parse_args()
    asyncio.run(_serve(arguments.host, arguments.port))


if __name__ == "__main__":
    main()
