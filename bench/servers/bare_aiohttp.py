"""Baseline: a bare aiohttp handler answering the same JSON, with nothing around it."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web


async def ping(_: web.Request) -> web.Response:
    return web.json_response({"operation": "ping", "result": {"pong": True}})


def main() -> None:
    uvloop.install()  # the same event loop the runtime runs on, for a like-for-like baseline
    app = web.Application()
    app.router.add_post("/v1/operations/ping", ping)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
