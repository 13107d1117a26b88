"""Baseline: the seed's stack, FastAPI on uvicorn[standard] (uvloop + httptools), a bare hello."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

app = FastAPI()


@app.post("/v1/operations/ping")
async def ping() -> dict[str, Any]:
    return {"operation": "ping", "result": {"pong": True}}
