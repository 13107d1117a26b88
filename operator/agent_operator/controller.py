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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from agent_contract.keyfiles import new_key_files
from agent_operator import metrics, rollout
from agent_operator import reconcile as core
from agent_operator.analysis import HttpAnalysis
from agent_operator.conditions import Reason
from agent_operator.kube import Kube, KubeError, now_rfc3339
from agent_operator.manifest import FieldError, ManifestError, parse_agent
from agent_operator.render import KeyVersions, compute_revision
from agent_operator.render.common import (
    ANNOTATION_ROTATE_KEYS,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGER,
    active_service_name,
    key_secret_name,
    preview_service_name,
)
from agent_operator.render.keys import ANNOTATION_ROTATED_FOR, build_key_secret
from agent_operator.spec import API_VERSION, KIND, EnterpriseAgent

log = logging.getLogger("agent_operator")

AgentKey = tuple[str, str]  # (namespace, name)
COMPONENT = "enterprise-agent-operator"
# Every kind of child the operator makes (the ServiceMonitor only when its CRD is installed).
CHILD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("discovery.k8s.io/v1", "EndpointSlice"),  # made by Kubernetes from our Services; read only
)
ENDPOINT_SLICE = "EndpointSlice"


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
    operator_namespace: str = "enterprise-agent-system"
    workers: int = 8
    resync_seconds: float = 300.0
    # Backoff for failed reconciles and for references we do not watch (a missing users Secret).
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    child_event_delay_seconds: float = 1.0
    # Where the rollout analysis sends its HTTP checks (None: Service DNS and pod IPs in-cluster).
    analysis_base_url: str | None = None


class Controller:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.queue = WorkQueue()
        self.agents: dict[AgentKey, dict[str, Any]] = {}
        self.children: dict[AgentKey, dict[core.ChildKey, dict[str, Any]]] = {}
        self.endpoint_slices: dict[AgentKey, dict[str, dict[str, Any]]] = {}
        self.analysis = HttpAnalysis(settings.analysis_base_url)
        self.leading = asyncio.Event()
        self._failures: dict[AgentKey, int] = {}
        self._rendered: dict[AgentKey, tuple[tuple[Any, ...], core.Desired]] = {}
        self._revisions: dict[AgentKey, tuple[tuple[Any, ...], str]] = {}
        self._generation_seen_at: dict[tuple[AgentKey, int], float] = {}
        self.last_heartbeat = time.monotonic()

    # --- watch events -----------------------------------------------------------------------------

    def observe_agent(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        body = _slim(body)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.agents.pop(key, None)
            self.children.pop(key, None)
            self.endpoint_slices.pop(key, None)
            self._failures.pop(key, None)
            self._rendered.pop(key, None)
            self._revisions.pop(key, None)
            metrics.forget_phase(*key)
        else:
            self.agents[key] = body
            generation = body["metadata"].get("generation", 0)
            self._generation_seen_at.setdefault((key, generation), time.monotonic())
            self.queue.add(key)
        metrics.AGENTS_MANAGED.set(len(self.agents))

    def observe_child(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        body = _slim(body)
        metadata = body["metadata"]
        owner = metadata.get("labels", {}).get(LABEL_INSTANCE)
        if not owner:
            return
        key = (metadata["namespace"], owner)
        child = (body["apiVersion"], body["kind"], metadata["name"])
        if body["kind"] == ENDPOINT_SLICE:  # not a child: never compared, never deleted
            slices = self.endpoint_slices.setdefault(key, {})
            if event_type == "DELETED":
                slices.pop(metadata["name"], None)
            else:
                slices[metadata["name"]] = body
        elif event_type == "DELETED":
            self.children.get(key, {}).pop(child, None)
        else:
            self.children.setdefault(key, {})[child] = body
        if key in self.agents:
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
            for agent in await self.kube.list(API_VERSION, KIND, scope):
                if wanted(agent):
                    self.observe_agent(None, agent)
            for api_version, kind in CHILD_KINDS:
                for child in await self.kube.list(api_version, kind, scope, selector):
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
        for key in list(self.agents):
            self.queue.add(key)

    async def _resync(self) -> None:
        """Level-based safety net: every agent is reconciled periodically even with no events."""
        while True:
            self.last_heartbeat = time.monotonic()
            await asyncio.sleep(min(self.settings.resync_seconds, 5.0))
            self.last_heartbeat = time.monotonic()
            if time.monotonic() - getattr(self, "_last_resync", 0.0) >= self.settings.resync_seconds:
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
                if result != "stalled":  # a Stalled agent waiting on a reference keeps its backoff growing
                    self._failures.pop(key, None)
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
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        ceiling = min(self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2**failures)
        self.queue.add_after(key, random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter, not crypto

    # --- one reconcile ----------------------------------------------------------------------------

    async def reconcile(self, key: AgentKey) -> str:
        body = self.agents.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return "deleted"  # children go with the agent through their ownerReferences
        children = self.children.get(key, {})
        observed = core.Observed(
            status=body.get("status") or {},
            children=children,
            generation=body["metadata"].get("generation", 0),
            uid=body["metadata"]["uid"],
        )
        now = now_rfc3339()
        try:
            agent = parse_agent(body, f"{key[0]}/{key[1]}")
        except ManifestError as error:
            return await self._finish(body, core.stalled_plan(observed, error.errors, Reason.INVALID_SPEC, now), key)
        unknown = core.unknown_operations(agent)
        if unknown:
            return await self._finish(body, core.stalled_plan(observed, unknown, Reason.UNKNOWN_OPERATION, now), key)
        missing = [
            FieldError(path, f"Secret {name!r} not found in namespace {agent.namespace!r}")
            for path, name in core.referenced_secrets(agent)
            if not await self.kube.exists("v1", "Secret", agent.namespace, name)
        ]
        if missing:
            # We do not watch Secrets we do not own: look again later, with backoff.
            self._retry_later(key)
            return await self._finish(body, core.stalled_plan(observed, missing, Reason.MISSING_REFERENCE, now), key)

        key_secret = await self._ensure_keys(agent, body, children)
        observed = core.Observed(
            status=observed.status,
            children=children,
            generation=observed.generation,
            uid=observed.uid,
            key_data=key_secret.get("data") or {},
            key_rotated_for=(key_secret["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATED_FOR),
            annotations=body["metadata"].get("annotations") or {},
            endpoint_slices=list(self.endpoint_slices.get(key, {}).values()),
        )
        revision = self._revision(key, body, key_secret, agent)
        moment = datetime.now(UTC)
        decision = rollout.decide(core.rollout_input(agent, observed, revision, moment))
        checks = None
        if decision.measure is not None:
            checks = await self._measure(agent, observed, decision)
            decision = rollout.decide(core.rollout_input(agent, observed, revision, moment, checks))
        wanted = self._desired(key, body, key_secret, agent, observed, decision, revision)
        plan = core.plan(agent, observed, now, wanted)
        try:
            await asyncio.gather(*(self._apply(children, manifest) for manifest in plan.apply))
        except KubeError as error:
            if error.status in (400, 404, 422):  # the API server refused what the spec produced
                reason = Reason.APPLY_FAILED
                return await self._finish(
                    body, core.stalled_plan(observed, [FieldError("spec", str(error))], reason, now), key
                )
            raise
        for api_version, kind, name in plan.delete:
            await self.kube.delete(api_version, kind, agent.namespace, name)
            children.pop((api_version, kind, name), None)
        if plan.apply or plan.delete:
            # Judge the status on what now exists, not on what existed before these writes, as
            # long as that does not change the decision (a step is taken once its children exist).
            fresher = rollout.decide(
                core.rollout_input(agent, replace(observed, children=children), revision, moment, checks)
            )
            if rollout.same_course(decision, fresher):
                plan = core.plan(agent, replace(observed, children=children), now, replace(wanted, decision=fresher))
        result = await self._finish(body, plan, key)
        self._after_decision(key, decision)
        return result

    def _after_decision(self, key: AgentKey, decision: rollout.Decision) -> None:
        """Counts what the written status made final, and comes back when a timer runs out."""
        if decision.outcome is not None:
            metrics.ROLLOUTS.labels(result=decision.outcome).inc()
        if decision.promotion_seconds is not None:
            metrics.PROMOTION_DURATION.observe(decision.promotion_seconds)
        if decision.requeue_after is not None:
            # A moment past the deadline, so the next reconcile sees it has passed.
            self.queue.add_after(key, decision.requeue_after + 0.5)

    async def _measure(
        self, agent: EnterpriseAgent, observed: core.Observed, decision: rollout.Decision
    ) -> list[rollout.Check]:
        """The HTTP checks of the colour the decision names, through the Service that serves it."""
        if decision.measure == "preview":
            service, color = preview_service_name(agent), decision.active_color.other
        else:
            service, color = active_service_name(agent), decision.active_color
        pod_ips = core.ready_endpoint_addresses(agent, observed.endpoint_slices, service, color)
        return await self.analysis.measure(agent, service, pod_ips, observed.key_data)

    def _revision(
        self, key: AgentKey, body: Mapping[str, Any], key_secret: Mapping[str, Any], agent: EnterpriseAgent
    ) -> str:
        """The revision hash renders the pod template: reuse it while the spec and keys are unchanged."""
        inputs = (
            body["metadata"]["uid"],
            body["metadata"].get("generation"),
            key_secret["metadata"].get("resourceVersion"),
        )
        cached = self._revisions.get(key)
        if cached is not None and cached[0] == inputs:
            return cached[1]
        revision = compute_revision(agent, KeyVersions.from_secret_data(key_secret.get("data") or {}))
        self._revisions[key] = (inputs, revision)
        return revision

    def _desired(
        self,
        key: AgentKey,
        body: Mapping[str, Any],
        key_secret: Mapping[str, Any],
        agent: EnterpriseAgent,
        observed: core.Observed,
        decision: rollout.Decision,
        revision: str,
    ) -> core.Desired:
        """Rendering is the costly part of a reconcile; reuse it while its inputs are unchanged
        (the spec's generation, the key Secret, the rollout's layout)."""
        inputs = (
            body["metadata"]["uid"],
            body["metadata"].get("generation"),
            key_secret["metadata"].get("resourceVersion"),
            core.render_key(agent, observed, decision),
        )
        cached = self._rendered.get(key)
        if cached is not None and cached[0] == inputs:
            return replace(cached[1], decision=decision)
        rendered = core.desired_state(agent, observed, decision, revision, self.settings.operator_namespace)
        self._rendered[key] = (inputs, rendered)
        return rendered

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
                f"added new signing and encryption keys for rotation request {requested!r}",
            )
        return secret

    async def _finish(self, body: Mapping[str, Any], plan: core.Plan, key: AgentKey) -> str:
        """Writes the status only when it changed, and posts an Event per transition."""
        old = body.get("status") or {}
        if core.status_changed(old, plan.status):
            updated = await self.kube.apply_status(key[0], key[1], plan.status)
            if key in self.agents:
                self.agents[key] = {**self.agents[key], "status": updated.get("status", plan.status)}
        for type_, reason, message in plan.events:
            await self._event(body, type_, reason, message)
        phase = plan.status.get("phase", "")
        if phase:
            metrics.set_phase(key[0], key[1], str(phase))
        if phase == "Ready":
            seen = self._generation_seen_at.pop((key, plan.status.get("observedGeneration", 0)), None)
            if seen is not None:
                metrics.APPLY_TO_READY.observe(time.monotonic() - seen)
        return str(phase).lower() or "unknown"

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
