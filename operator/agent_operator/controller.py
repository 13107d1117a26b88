"""The controller: watch caches, a coalescing work queue, and the reconcile loop around the pure core.

kopf delivers watch events (handlers.py); they land in in-memory caches and put the owning agent
on a queue. Workers take one agent at a time, so two reconciles of the same agent never overlap,
and a burst of events for one agent becomes a single reconcile (as client-go's workqueue does).
Only the replica holding the leader Lease runs workers; the standby keeps its caches warm.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import logging
import random
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from agent_contract.keyfiles import new_key_files
from agent_operator import defaults, metrics, rollout, timefmt
from agent_operator import reconcile as core
from agent_operator.analysis import HttpAnalysis
from agent_operator.conditions import Reason
from agent_operator.kinds import AGENT, ENDPOINT_SLICE, WATCHED_BY_LABEL
from agent_operator.kube import Kube, KubeError
from agent_operator.manifest import FieldError
from agent_operator.render.common import (
    ANNOTATION_ROTATE_KEYS,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGER,
    key_secret_name,
)
from agent_operator.render.keys import ANNOTATION_ROTATED_FOR, build_key_secret
from agent_operator.spec import EnterpriseAgent, Phase, read_status

log = logging.getLogger("agent_operator")

AgentKey = tuple[str, str]  # (namespace, name)
COMPONENT = "enterprise-agent-operator"


class WorkQueue:
    """A deduplicating queue: a key is queued at most once and processed by one worker at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()

    def add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)
        metrics.QUEUE_DEPTH.set(len(self._dirty))

    def add_after(self, key: Hashable, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.add, key)

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._processing.add(key)
        self._dirty.discard(key)
        metrics.QUEUE_DEPTH.set(len(self._dirty))
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:  # it changed while we worked on it: go again
            self._queue.put_nowait(key)

    def __len__(self) -> int:
        return len(self._dirty)


@dataclass(frozen=True)
class ControllerSettings:
    operator_namespace: str = defaults.OPERATOR_NAMESPACE
    workers: int = defaults.WORKERS
    resync_seconds: float = defaults.RESYNC_SECONDS
    # Backoff for failed reconciles and for references we do not watch (a missing users Secret).
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    child_event_delay_seconds: float = 1.0
    # Where the rollout analysis sends its HTTP checks (None: Service DNS and pod IPs in-cluster).
    analysis_base_url: str | None = None


@dataclass
class AgentRecord:
    """Everything the controller keeps for one agent: the watch caches and the reconcile's memo."""

    body: dict[str, Any] | None = None  # None: children seen before their agent
    children: dict[core.ChildKey, dict[str, Any]] = field(default_factory=dict)
    endpoint_slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    memo: core.Memo = field(default_factory=core.Memo)
    failures: int = 0  # consecutive failed (or Stalled) reconciles: the backoff exponent
    generation_seen_at: dict[int, float] = field(default_factory=dict)  # for apply-to-Ready latency


class Controller:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.queue = WorkQueue()
        self.records: dict[AgentKey, AgentRecord] = {}
        self.analysis = HttpAnalysis(settings.analysis_base_url)
        self.leading = asyncio.Event()
        self.last_heartbeat = time.monotonic()
        self._last_resync = 0.0

    def _record(self, key: AgentKey) -> AgentRecord:
        return self.records.setdefault(key, AgentRecord())

    def agent_count(self) -> int:
        return sum(1 for record in self.records.values() if record.body is not None)

    # --- watch events -----------------------------------------------------------------------------

    def observe_agent(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        body = _slim(body)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.records.pop(key, None)
            metrics.forget_phase(*key)
        else:
            record = self._record(key)
            record.body = body
            generation = body["metadata"].get("generation", 0)
            record.generation_seen_at.setdefault(generation, time.monotonic())
            self.queue.add(key)
        metrics.AGENTS_MANAGED.set(self.agent_count())

    def observe_child(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        body = _slim(body)
        metadata = body["metadata"]
        owner = metadata.get("labels", {}).get(LABEL_INSTANCE)
        if not owner:
            return
        key = (metadata["namespace"], owner)
        if event_type == "DELETED" and key not in self.records:
            return  # a child of a deleted agent, going with it: nothing to forget
        record = self._record(key)
        child = (body["apiVersion"], body["kind"], metadata["name"])
        if body["kind"] == ENDPOINT_SLICE.kind:  # not a child: never compared, never deleted
            if event_type == "DELETED":
                record.endpoint_slices.pop(metadata["name"], None)
            else:
                record.endpoint_slices[metadata["name"]] = body
        elif event_type == "DELETED":
            record.children.pop(child, None)
        else:
            record.children[child] = body
        if record.body is None and not record.children and not record.endpoint_slices:
            del self.records[key]  # children seen before (or after) their agent, all gone now
            return
        if record.body is not None:
            # A rollout brings bursts of child status events; waiting a moment folds each burst
            # into one reconcile (and one status write) instead of one per event.
            self.queue.add_after(key, self.settings.child_event_delay_seconds)

    async def prime(self, namespaces: tuple[str, ...]) -> None:
        """Lists agents and children once before any reconcile (as an informer syncs its cache),
        so the first reconcile after a start sees existing children and writes nothing needless.
        ``namespaces`` may hold globs, as kopf's do; empty means all namespaces."""
        selector = f"{LABEL_MANAGED_BY}={MANAGER}"
        exact = [n for n in namespaces if not any(c in n for c in "*?[")]
        scopes: list[str | None] = list(exact) if namespaces and len(exact) == len(namespaces) else [None]

        def wanted(obj: Mapping[str, Any]) -> bool:
            namespace = obj["metadata"].get("namespace", "")
            return not namespaces or any(fnmatch.fnmatchcase(namespace, pattern) for pattern in namespaces)

        for scope in scopes:
            for agent in await self.kube.list(AGENT.api_version, AGENT.kind, scope):
                if wanted(agent):
                    self.observe_agent(None, agent)
            for kind in WATCHED_BY_LABEL:
                for child in await self.kube.list(kind.api_version, kind.kind, scope, selector):
                    if wanted(child):
                        self.observe_child(None, child)

    # --- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.settings.workers)]
        resync = asyncio.create_task(self._resync(), name="resync")
        try:
            await stop.wait()
        finally:
            for task in [*workers, resync]:
                task.cancel()
            await asyncio.gather(*workers, resync, return_exceptions=True)

    def enqueue_all(self) -> None:
        for key, record in list(self.records.items()):
            if record.body is not None:
                self.queue.add(key)

    async def _resync(self) -> None:
        """Level-based safety net: every agent is reconciled periodically even with no events."""
        while True:
            self.last_heartbeat = time.monotonic()
            await asyncio.sleep(min(self.settings.resync_seconds, 5.0))
            self.last_heartbeat = time.monotonic()
            if time.monotonic() - self._last_resync >= self.settings.resync_seconds:
                self._last_resync = time.monotonic()
                if self.leading.is_set():
                    self.enqueue_all()
                    metrics.RESYNCS.inc()

    async def _worker(self) -> None:
        while True:
            await self.leading.wait()
            key = await self.queue.get()
            assert isinstance(key, tuple)
            started = time.perf_counter()
            result = "error"
            try:
                result = await self.reconcile(key)
                if result != "stalled" and key in self.records:
                    # A Stalled agent waiting on a reference keeps its backoff growing.
                    self.records[key].failures = 0
            except KubeError as error:
                metrics.RECONCILE_ERRORS.labels(reason=f"api_{error.status}").inc()
                log.warning("reconcile of %s/%s failed: %s", *key, error)
                self._retry_later(key)
            except Exception:
                metrics.RECONCILE_ERRORS.labels(reason="exception").inc()
                log.exception("reconcile of %s/%s crashed", *key)
                self._retry_later(key)
            finally:
                metrics.RECONCILE_DURATION.labels(result=result).observe(time.perf_counter() - started)
                self.queue.done(key)

    def _retry_later(self, key: AgentKey) -> None:
        """Capped exponential backoff with full jitter: no hot loop on one bad agent."""
        record = self.records.get(key)
        if record is None:
            return
        record.failures += 1
        ceiling = min(self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2**record.failures)
        self.queue.add_after(key, random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter, not crypto

    # --- one reconcile ----------------------------------------------------------------------------

    async def reconcile(self, key: AgentKey) -> str:
        """Observe, plan (pure), write the plan. The clock is read once, here."""
        record = self.records.get(key)
        body = record.body if record is not None else None
        if record is None or body is None or body["metadata"].get("deletionTimestamp"):
            return "deleted"  # children go with the agent through their ownerReferences
        now = timefmt.now()
        observed = core.Observed(
            body=body,
            admission=core.admit(body),
            children=record.children,
            endpoint_slices=list(record.endpoint_slices.values()),
        )
        agent = observed.admission.agent
        if agent is not None:
            missing = await self._missing_references(agent)
            if missing:
                self._retry_later(key)  # we do not watch Secrets we do not own: look again later
                observed = replace(observed, missing=missing)
            else:
                observed = replace(observed, key_secret=await self._ensure_keys(agent, body, record.children))
        checks: list[rollout.Check] | None = None
        plan = self._plan(observed, now, checks, record)
        if plan.measure is not None:
            assert agent is not None  # a stalled plan measures nothing
            checks = await self.analysis.measure(agent, plan.measure.service, plan.measure.pod_ips, observed.key_data)
            plan = self._plan(observed, now, checks, record)
        try:
            await asyncio.gather(*(self._apply(record.children, manifest) for manifest in plan.apply))
        except KubeError as error:
            if error.status in (400, 404, 422):  # the API server refused what the spec produced
                refused = core.stalled_plan(observed, [FieldError("spec", str(error))], Reason.APPLY_FAILED, now)
                return await self._finish(body, refused, key)
            raise
        for api_version, kind, name in plan.delete:
            await self.kube.delete(api_version, kind, body["metadata"]["namespace"], name)
            record.children.pop((api_version, kind, name), None)
        if plan.apply or plan.delete:
            after = self._plan(replace(observed, children=record.children), now, checks, record)
            plan = core.settle(plan, after)
        result = await self._finish(body, plan, key)
        self._after_plan(key, plan)
        return result

    def _plan(
        self, observed: core.Observed, now: datetime, checks: list[rollout.Check] | None, record: AgentRecord
    ) -> core.Plan:
        return core.reconcile(
            observed, now, checks, operator_namespace=self.settings.operator_namespace, memo=record.memo
        )

    def _after_plan(self, key: AgentKey, plan: core.Plan) -> None:
        """Counts what the written status made final, and comes back when a timer runs out."""
        if plan.outcome is not None:
            metrics.ROLLOUTS.labels(result=plan.outcome).inc()
        if plan.promotion_seconds is not None:
            metrics.PROMOTION_DURATION.observe(plan.promotion_seconds)
        if plan.requeue_after is not None:
            # A moment past the deadline, so the next reconcile sees it has passed.
            self.queue.add_after(key, plan.requeue_after + 0.5)

    async def _missing_references(self, agent: EnterpriseAgent) -> list[FieldError]:
        """Reads each Secret the spec names, by name (one GET each, nothing watched or kept), and
        judges them with the pure check: a Secret that is not there, or a key without a value."""
        names = sorted({ref.name for ref in core.referenced_secrets(agent)})
        found = {name: await self.kube.find("v1", "Secret", agent.namespace, name) for name in names}
        return core.missing_references(agent, found)

    async def _apply(self, children: dict[core.ChildKey, dict[str, Any]], manifest: dict[str, Any]) -> None:
        applied = await self.kube.apply(manifest)
        children[core.child_key(manifest)] = _slim(applied)  # fresher than the watch; the event follows

    async def _ensure_keys(
        self, agent: EnterpriseAgent, body: Mapping[str, Any], children: dict[core.ChildKey, dict[str, Any]]
    ) -> dict[str, Any]:
        """The key Secret: created once with fresh keys (never overwritten), extended on rotation."""
        secret_key = ("v1", "Secret", key_secret_name(agent))
        secret = children.get(secret_key)
        if secret is None:
            manifest = core.owned(
                build_key_secret(agent, _encode(new_key_files(agent.spec.security.signing_algorithm))),
                agent.name,
                body["metadata"]["uid"],
            )
            try:
                secret = await self.kube.create(manifest)
            except KubeError as error:
                if not error.conflict:
                    raise
                # It exists and our cache has not seen it yet: use it, never replace it.
                secret = await self.kube.get("v1", "Secret", agent.namespace, key_secret_name(agent))
            children[secret_key] = secret
        requested = (body["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATE_KEYS)
        served = (secret["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATED_FOR)
        if requested and requested != served:
            previous = {name: base64.b64decode(value) for name, value in (secret.get("data") or {}).items()}
            files = new_key_files(agent.spec.security.signing_algorithm, previous)
            manifest = core.owned(
                build_key_secret(agent, _encode(files), rotated_for=requested), agent.name, body["metadata"]["uid"]
            )
            secret = await self.kube.apply(manifest)
            children[secret_key] = secret
            await self._event(
                body,
                "Normal",
                "KeysRotated",
                f"added new signing, encryption and audit keys for rotation request {requested!r}",
            )
        return secret

    async def _finish(self, body: Mapping[str, Any], plan: core.Plan, key: AgentKey) -> str:
        """Writes the status only when it changed, and posts an Event per transition."""
        if read_status(body.get("status")) != plan.status:
            updated = await self.kube.apply_status(key[0], key[1], plan.status_body())
            record = self.records.get(key)
            if record is not None and record.body is not None:
                record.body = {**record.body, "status": updated.get("status", plan.status_body())}
        for type_, reason, message in plan.events:
            await self._event(body, type_, reason, message)
        phase = plan.status.phase
        if phase is not None:
            metrics.set_phase(key[0], key[1], phase.value)
        if phase == Phase.READY and key in self.records:
            seen = self.records[key].generation_seen_at.pop(plan.status.observed_generation or 0, None)
            if seen is not None:
                metrics.APPLY_TO_READY.observe(time.monotonic() - seen)
        return phase.value.lower() if phase is not None else "unknown"

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.post_event(body, type_, reason, message, COMPONENT)
        except KubeError as error:  # an Event is best effort: never fail a reconcile over it
            log.warning("could not post event %s on %s: %s", reason, body["metadata"]["name"], error)


def _slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A cached copy without managedFields, which the reconcile never reads and which is often
    the largest part of an object."""
    metadata = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return {**obj, "metadata": metadata}


def _encode(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in files.items()}
