"""Lease-based leader election (coordination.k8s.io/v1), as client-go's leaderelection does it.

Expiry is judged by the local clock from the moment this replica last saw the Lease record
change, never by comparing another machine's timestamps with ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent_operator import metrics, timefmt
from agent_operator.kube import Kube, KubeError

log = logging.getLogger("agent_operator.leader")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        on_started_leading: Callable[[], Awaitable[None] | None],
        on_stopped_leading: Callable[[], Awaitable[None] | None],
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
        retry_seconds: float = 2.0,
        on_renewed: Callable[[float], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.retry_seconds = retry_seconds
        self._started = on_started_leading
        self._stopped = on_stopped_leading
        self.leading = False
        self._observed: tuple[str | None, str | None] = (None, None)
        self._observed_at = 0.0
        self._last_renewed = 0.0
        self._held_by_other = False
        self._on_renewed = on_renewed  # told, after each renewal, until when writing is safe

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                # The lease runs from when the renewal was sent, not from when its answer came: a
                # slow answer must not stretch our idea of how long we may still write.
                attempted = time.monotonic()
                self._held_by_other = False
                try:
                    # Bounded by when we must stop writing, as client-go's renew deadline: a renewal
                    # on a half-open connection would otherwise hang well past the lease.
                    acquired = await asyncio.wait_for(self._try_acquire_or_renew(), timeout=self._attempt_timeout())
                except KubeError as error:
                    log.warning("leader election: %s", error)
                    acquired = False
                except TimeoutError:
                    log.warning("leader election: no answer from the API server in time")
                    acquired = False
                if acquired:
                    self._last_renewed = attempted
                    if self._on_renewed is not None:
                        self._on_renewed(attempted + self.renew_deadline)
                    if not self.leading:
                        await self._set_leading(True)
                elif self.leading and (
                    self._held_by_other or time.monotonic() - self._last_renewed >= self.renew_deadline - 0.1
                ):
                    # Another replica holds the lease, or we could not renew in time and one may take
                    # over: stop writing first.
                    await self._set_leading(False)
                # A leader whose renewal failed tries again soon (client-go's retry period), not a
                # whole renew interval later: one transient error must not cost the lease.
                delay = self.renew_seconds if self.leading and acquired else self.retry_seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            if self.leading:
                await self._set_leading(False)  # stop writing before the lease is handed over
                await self._release()

    def _attempt_timeout(self) -> float:
        if not self.leading:
            return max(self.retry_seconds, 1.0)
        return max(self._last_renewed + self.renew_deadline - time.monotonic(), 0.1)

    @property
    def renew_deadline(self) -> float:
        """How long the leader keeps writing without a renewal: two thirds of the lease, so it
        has stopped well before another replica may take over (after the full lease)."""
        return self.lease_seconds * 2 / 3

    async def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)
        log.info(
            "%s leadership of lease %s/%s as %s",
            "acquired" if leading else "lost",
            self.namespace,
            self.name,
            self.identity,
        )
        result = (self._started if leading else self._stopped)()
        if result is not None:
            await result

    def _lease(self, spec: dict[str, Any], resource_version: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    async def _try_acquire_or_renew(self) -> bool:
        now = timefmt.rfc3339_micro(timefmt.now())
        try:
            lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        except KubeError as error:
            if not error.not_found:
                raise
            new_spec: dict[str, Any] = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            }
            try:
                await self.kube.create(self._lease(new_spec))
            except KubeError as create_error:
                if create_error.conflict:
                    return False
                raise
            return True
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        holder: str | None = spec.get("holderIdentity") or None
        record: tuple[str | None, str | None] = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()
        if holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
            if holder is not None and time.monotonic() - self._observed_at < duration:
                self._held_by_other = True
                return False  # held by someone else, and not expired by our clock
            spec.update(
                holderIdentity=self.identity,
                acquireTime=now,
                leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
                leaseDurationSeconds=self.lease_seconds,
            )
        spec["renewTime"] = now
        try:
            await self.kube.replace(self._lease(spec, lease["metadata"]["resourceVersion"]))
        except KubeError as error:
            if error.conflict:
                return False  # someone else wrote first
            raise
        return True

    async def _release(self) -> None:
        """On a clean shutdown, hand the lease over at once instead of making the standby wait."""
        try:
            lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            spec = dict(lease.get("spec") or {})
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=timefmt.rfc3339_micro(timefmt.now()))
            await self.kube.replace(self._lease(spec, lease["metadata"]["resourceVersion"]))
        except KubeError as error:
            log.warning("could not release the lease: %s", error)
