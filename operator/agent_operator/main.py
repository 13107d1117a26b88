"""`agent-operator run`: the operator process. kopf's watches, our controller, leader election,
and /metrics plus /healthz on one port."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from aiohttp import web
from kopf._cogs.structs.references import Insights, NamespaceName
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent_contract.layout import OPERATOR_METRICS_PORT
from agent_operator import defaults
from agent_operator.controller import Controller, ControllerSettings
from agent_operator.handlers import build_registry, configure
from agent_operator.kube import Kube
from agent_operator.leader import LeaderElector
from agent_operator.namespaces import WatchedNamespaces

log = logging.getLogger("agent_operator")


@dataclass(frozen=True)
class RunOptions:
    namespaces: WatchedNamespaces = field(default_factory=WatchedNamespaces)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - in a pod the kubelet and Prometheus must reach it
    metrics_port: int = OPERATOR_METRICS_PORT
    log_format: str = "text"
    log_level: str = "INFO"
    lease_namespace: str = "default"
    lease_name: str = defaults.LEASE_NAME
    lease_seconds: int = defaults.LEASE_SECONDS
    workers: int = defaults.WORKERS
    resync_seconds: float = defaults.RESYNC_SECONDS
    operator_namespace: str = defaults.OPERATOR_NAMESPACE
    analysis_base_url: str | None = None


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("kopf").setLevel(logging.WARNING)  # per-event chatter is ours to log, not kopf's


async def _serve_http(controller: Controller, elector: LeaderElector, options: RunOptions) -> web.AppRunner:
    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Alive while the controller's loop ticks; a wedged event loop stops answering at all.
        age = time.monotonic() - controller.last_heartbeat
        healthy = age < 60
        body = {
            "status": "ok" if healthy else "stalled",
            "leader": elector.leading,
            "heartbeatAgeSeconds": round(age, 1),
        }
        return web.json_response(body, status=200 if healthy else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, options.metrics_host, options.metrics_port).start()
    return runner


async def run_operator(options: RunOptions) -> None:
    kube = await Kube.connect()
    controller = Controller(
        kube,
        ControllerSettings(
            operator_namespace=options.operator_namespace,
            workers=options.workers,
            resync_seconds=options.resync_seconds,
            analysis_base_url=options.analysis_base_url,
        ),
    )
    identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    kube.identify(identity)  # in the API server's audit log, each replica's writes are told apart
    elector = LeaderElector(
        kube, options.lease_namespace, options.lease_name, identity,
        controller.start_leading, controller.stop_leading, lease_seconds=options.lease_seconds,
        on_renewed=controller.lease_renewed,
        renew_seconds=max(1.0, options.lease_seconds / 3), retry_seconds=max(0.5, options.lease_seconds / 7),
    )  # fmt: skip
    stop = asyncio.Event()
    kopf_ready = asyncio.Event()
    await controller.prime(options.namespaces)
    runner = await _serve_http(controller, elector, options)
    settings = kopf.OperatorSettings()
    configure(settings)
    log.info("operator %s starting (namespaces: %s)", identity, ", ".join(options.namespaces.patterns) or "all")

    async def take_signals() -> None:
        # kopf installs SIGTERM/SIGINT handlers once it has started; ours replace them, so the
        # shared stop flag stops kopf, the controller and the elector at the same moment.
        await kopf_ready.wait()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

    async def watch() -> None:
        try:
            await kopf.operator(
                registry=build_registry(controller),
                settings=settings,
                standalone=True,
                clusterwide=options.namespaces.watch_clusterwide,
                namespaces=list(options.namespaces.names or ()),
                insights=_named_namespaces_watched_from_the_start(options.namespaces),
                stop_flag=stop,
                ready_flag=kopf_ready,
                # Ours, not kopf's default from getpass: a pod's uid (10001, or an arbitrary one on
                # OpenShift) has no /etc/passwd entry, and getpass would crash the operator. (kopf's
                # Identity is a NewType of str that kopf does not export.)
                identity=cast(Any, identity),
            )
        finally:
            stop.set()

    try:
        await asyncio.gather(watch(), take_signals(), controller.run(stop), elector.run(stop))
    finally:
        await runner.cleanup()
        await kube.close()


def _named_namespaces_watched_from_the_start(namespaces: WatchedNamespaces) -> Insights:
    """kopf's record of what it watches, holding the named namespaces before it starts. kopf
    learns namespaces from its watch of Namespaces, and that watch ignores what its initial list,
    and every relist after a 410, returns: a named namespace made just as the operator started, or
    while its watches were down, was never watched (tested with the API server restarted and
    compacted). Watching a namespace that does not exist yet costs an empty list; kopf still drops
    a namespace when it is deleted and takes it again when it is made. (``Insights`` is kopf's own
    type, not exported, behind ``kopf.operator``'s ``insights`` argument; kopf is pinned.)"""
    insights = Insights()
    insights.namespaces.update(NamespaceName(name) for name in namespaces.names or ())
    return insights


def run(options: RunOptions) -> int:
    setup_logging(options.log_format, options.log_level)
    asyncio.run(run_operator(options))
    return 0
