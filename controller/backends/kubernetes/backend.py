"""The Kubernetes backend: a pod per job (``objects.py`` builds it), through the official client.

A start (create, resume, recover) makes sure of the job's anchor ConfigMap,
its Secret and its catalog user, adopts a healthy pod of the job or replaces
a failed one (deleting it with its grace period, so an agent still alive in
it ships the WAL left in its spool first), creates the pod, watches it until
it is Ready, and then waits over TCP until Postgres accepts writes: a restore
may still be replaying archived WAL while ``pg_isready`` already answers. A
pause asks the pod's agent for the pause snapshot and only then deletes the
pod, waiting until it is gone.

A container that crashes is restarted in its pod by the kubelet
(``restartPolicy: OnFailure``, see ``objects.py``): ``alive`` answers None
("cannot tell") while Postgres restarts on its own data, so the job is not
marked failed and nothing is restored; a recovery that finds the pod still
there adopts it (in place). Only a broken pod (``pod_status.py``: deleted,
evicted, an init step failed, a container ended for good, Postgres
crash-looping) makes the job failed; its recovery deletes that pod and waits
until the API no longer has it (``Api.delete_pod``: bounded, then a clear
error, never a second pod writing to the same store prefix) before restoring
from the store into a new one. A pod this backend created fails its start at
once when its init step fails or a container dies before it was first
Ready (it is deleted, so the kubelet does not retry it forever), as under
``restartPolicy: Never``. The watch thread (``client.PodWatcher``) tells the
reconciler at once when a job pod breaks or vanishes; its health check asks
the API as a backstop.

Every method is idempotent and holds a per-job lock (``job_lock.py``), as the
local backend's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import asyncpg
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from jobmesh.agent.apitoken import job_token
from jobmesh.agent.errors import AgentError
from jobmesh.agent.init import OWNER_ROLE
from jobmesh.agent.manifest import Manifest, ManifestError
from jobmesh.agent.store import StoreError, open_store

from ...catalog.db import Catalog
from ...catalog.models import CatalogError, Job
from ...catalog.models import Conflict as CatalogConflict
from ...catalog.models import NotFound as NoSuchUser
from ...catalog.passwords import scram_verifier
from ...core.backend import BackendError, PermanentError, Progress, Started, Stopped
from ...storage.access import AccessError, StoreAccess
from ..agent_client import AgentClient
from ..job_database import wait_until_writable
from ..job_lock import JobLocks
from ..job_store import (
    confirm_pause,
    delete_job_objects,
    snapshot_to_restore,
    stored_pause,
)
from ..step_report import mb
from . import objects as objects
from .client import GONE_TIMEOUT, Api, PodWatcher, one_line
from .objects import PodSettings
from .pod_status import PodView, agent_running, view

log = logging.getLogger("jobmesh.controller.kubernetes")

DELETE_GRACE = 10  # seconds a deleted job's pod gets (nothing of it is kept)

# What a step may fail with that is not a bug: "cannot <step>: <why>" (see job_lock).
EXPECTED_ERRORS = (ApiException, urllib3.exceptions.HTTPError, ValueError,  # (client checks)
                   AgentError, StoreError, ManifestError, CatalogError, OSError, TimeoutError,
                   aiohttp.ClientError, asyncpg.PostgresError, AccessError)


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, api: client.ApiClient, catalog: Catalog, settings: PodSettings, *,
                 router_service: str, agent_key: bytes, start_timeout: float = 600,
                 pause_timeout: float = 3600, gone_timeout: float = GONE_TIMEOUT,
                 store_access: StoreAccess | None = None) -> None:
        self.api = Api(api, settings.namespace, gone_timeout=gone_timeout)
        # Scoped: each job's sidecar gets an IAM user of its own, in the job's Secret.
        self.store_access = store_access
        if store_access is not None:
            settings = replace(settings, scoped_credentials=True)
        self.agent_key = agent_key  # the sidecars' API tokens derive from it
        self.catalog = catalog
        self.settings = settings
        self.ns = settings.namespace
        self.router_service = router_service
        self.start_timeout = start_timeout  # until Postgres accepts writes (restore included)
        self.pause_timeout = pause_timeout  # for the agent's stop, drain and snapshot upload
        try:
            self.store = open_store(settings.store_url, s3_endpoint=settings.s3_endpoint)
        except StoreError as exc:
            raise BackendError(str(exc)) from exc
        self.locks = JobLocks(EXPECTED_ERRORS, log, describe=one_line)
        self._watcher: PodWatcher | None = None
        self._closed = False
        self._restarts_told: dict[str, int] = {}  # job id -> the restartCount we logged

    # --- Backend ------------------------------------------------------------------------

    async def start(self, on_change: Callable[[str], None] | None = None) -> None:
        async with self.locks.errors("start the kubernetes backend"):
            await self._ensure_network_policy()
        if on_change is not None:
            self._watcher = PodWatcher(self.api.client, self.ns, asyncio.get_running_loop(),
                                       on_change)
            self._watcher.start()

    async def close(self) -> None:
        """Stop watching; the job pods keep running."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.stop()
        await self.store.close()

    async def create(self, job: Job, progress: Progress) -> Started:
        async with self.locks.step("create", job.id):
            return await self._up(job, progress, restore=False)

    async def resume(self, job: Job, progress: Progress) -> Started:
        async with self.locks.step("resume", job.id):
            return await self._up(job, progress, restore=True)

    async def recover(self, job: Job, progress: Progress) -> Started:
        async with self.locks.step("recover", job.id):
            started = await self._up(job, progress, restore=True)
            if started.detail.get("adopted"):  # its pod was still there, with its data
                started = replace(started, detail={**started.detail, "in_place": True})
            return started

    async def pause(self, job: Job) -> Stopped:
        async with self.locks.step("pause", job.id):
            pod = await self.api.pod(job.id)
            seen = view(pod)
            manifest = None
            if agent_running(pod):
                try:
                    manifest = await self._request_pause(job, seen.ip)
                except BackendError as exc:
                    if not seen.broken:
                        raise  # a healthy pod: the reconciler retries
                    log.warning("job %s: the pause failed in its failing pod (%s): %s; "
                                "recovering it from the store first", job.id, seen.why, exc)
            elif pod is None and (done := await stored_pause(self.store, job.id)) is not None:
                return done  # retried after the pod was deleted: the snapshot is the pause
            if manifest is not None:
                await self._check_not_restarted(job, seen)
            else:
                # The pod died before its snapshot was stored: restore the latest recovery
                # point and the archived WAL into a new pod, and take the snapshot there.
                up = await self._up(job, _no_progress, restore=True)
                manifest = await self._request_pause(job, up.host)
            stopped = await confirm_pause(self.store, job.id, manifest)
            await self.api.delete_pod(job.id, self.settings.grace_seconds)
            return stopped

    async def alive(self, job: Job) -> bool | None:
        """False for a lost pod only. None while the kubelet restarts a container in the
        pod (Postgres recovers on its own data there: no failure, no restore)."""
        try:
            pod = await self.api.pod(job.id)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("job %s: cannot read its pod: %s", job.id, one_line(exc))
            return None
        seen = view(pod)
        if not seen.alive:
            return False
        if seen.restarting:
            if self._restarts_told.get(job.id) != seen.postgres_restarts:
                self._restarts_told[job.id] = seen.postgres_restarts
                log.warning("job %s: %s; the kubelet restarts it in its pod", job.id, seen.why)
            return None
        if seen.ip and job.host and seen.ip != job.host:
            # A recreated sandbox got a new address: a recovery adopts the pod (in place)
            # and records where it is now.
            log.warning("job %s: its pod is at %s now, not %s", job.id, seen.ip, job.host)
            return False
        return True

    async def delete(self, job: Job) -> None:
        async with self.locks.step("delete", job.id):
            name = objects.object_name(job.id)
            # Gone before the store is emptied: a dying agent could still upload WAL.
            await self.api.delete_pod(job.id, DELETE_GRACE)
            await self.api.delete(self.api.core.delete_namespaced_secret, name)
            await self.api.delete(self.api.core.delete_namespaced_config_map, name)
            with contextlib.suppress(NoSuchUser):
                await self.catalog.delete_principal(objects.principal_name(job.id))
            if self.store_access is not None:
                await self.store_access.revoke(job.id)
            await delete_job_objects(self.store, job.id)

    async def orphans(self, known: set[str]) -> list[str]:
        async with self.locks.errors("list job pods"):
            found = {objects.job_id_of(p) for p in await self.api.job_pods()}
        return sorted(i for i in found if i is not None and i not in known)

    async def stop_orphan(self, job_id: str) -> None:
        """Delete its pod: Postgres gets SIGTERM and the agent ships the spool's WAL in the
        grace period. Its Secret, anchor and data in the store are kept."""
        async with self.locks.step("stop orphan", job_id):
            await self.api.delete_pod(job_id, self.settings.grace_seconds)

    # --- steps --------------------------------------------------------------------------

    async def _up(self, job: Job, progress: Progress, *, restore: bool) -> Started:
        if job.spec.get("source") is not None:
            raise PermanentError(f"job {job.id}: the kubernetes backend cannot create a job "
                                 "from a dump file yet; create it empty and load the dump "
                                 "through the router (pg_restore)")
        owner = await self._ensure_anchor(job.id)
        await self._ensure_credentials(job, owner)
        pod = await self.api.pod(job.id)
        seen = view(pod)
        if seen.broken:
            log.warning("job %s: replacing its pod (%s)", job.id, seen.why)
            await progress("replacing the failed pod")
            await self.api.delete_pod(job.id, self.settings.grace_seconds)
            pod = None
        size = 0
        if pod is None:
            try:
                body = objects.job_pod(job.id, job.spec, self.settings, restore=restore,
                                       owner_uid=owner, generation=job.generation)
            except ValueError as exc:  # a bad spec: no retry makes it good
                raise PermanentError(f"job {job.id}: {exc}") from exc
            if restore:
                m = await snapshot_to_restore(self.store, job.id)  # none: PermanentError
                size = m.uncompressed_size if m.chunked else m.stored_size  # bad: falls back
                await progress(f"restoring {mb(size)}")
            else:
                # Nothing of an interrupted earlier attempt is worth keeping: no client has
                # seen this job yet, and its WAL in the store would clash with the new one's.
                await delete_job_objects(self.store, job.id)
            try:
                await self.api.call(self.api.core.create_namespaced_pod, self.ns, body)
            except ApiException as exc:
                if exc.status != 409:  # made meanwhile (by a former leader): adopt it
                    raise
        ip = await self._wait_ready(job, progress, created=pod is None)
        await self._wait_writable(job, ip)
        return Started(ip, objects.POSTGRES_PORT, objects.agent_url(ip),
                       bytes_moved=size,
                       detail={"pod": objects.object_name(job.id), "adopted": pod is not None})

    async def _ensure_anchor(self, job_id: str) -> str:
        """The anchor ConfigMap's uid (it is created when missing)."""
        core, name = self.api.core, objects.object_name(job_id)
        found = await self.api.read(core.read_namespaced_config_map, name)
        if found is None:
            try:
                found = await self.api.call(core.create_namespaced_config_map, self.ns,
                                            objects.anchor(self.ns, job_id))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                found = await self.api.read(core.read_namespaced_config_map, name)
        uid = ((found or {}).get("metadata") or {}).get("uid")
        if not uid:
            raise BackendError(f"the API server gave ConfigMap {name} no uid")
        return str(uid)

    async def _ensure_credentials(self, job: Job, owner_uid: str) -> None:
        """The Secret (backend password, URL through the router) and the catalog user the
        URL names, with a write grant on the job. A Secret left by an earlier job of the
        same id is brought up to date, and then the user's password too."""
        core, name = self.api.core, objects.object_name(job.id)
        url = objects.connection_url(job.id, job.backend_password, self.router_service)
        current = await self.api.read(core.read_namespaced_secret, name)
        s3 = None
        if self.store_access is not None:  # the key the Secret has, else a new one
            try:
                s3 = (objects.secret_s3_credentials(current)
                      or await self.store_access.issue(job.id))
            except AccessError as exc:
                if exc.permanent:  # (the controller's own IAM rights: no retry fixes it)
                    raise PermanentError(str(exc)) from exc
                raise
        body = objects.job_secret(self.ns, job.id, job.backend_password, url, owner_uid,
                                  job_token(self.agent_key, job.id), s3,
                                  os.environ.get("AWS_DEFAULT_REGION"))
        changed = current is None or current.get("data") != body["data"]
        if current is None:
            await self.api.call(core.create_namespaced_secret, self.ns, body)
        elif changed:
            patch = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")},
                     "data": body["data"]}
            await self.api.call(core.patch_namespaced_secret, name, self.ns, patch)
        user = objects.principal_name(job.id)
        verifier = scram_verifier(job.backend_password)
        if not await self.catalog.principals(user):
            try:
                await self.catalog.create_principal(user, verifier)
                changed = False
            except CatalogConflict:  # made meanwhile: make sure of its password
                changed = True
        if changed:
            await self.catalog.set_verifier(user, verifier)
        await self.catalog.grant(user, job.id, "write")

    async def _wait_ready(self, job: Job, progress: Progress, *, created: bool) -> str:
        """The pod's IP once it is Ready; BackendError if it fails or takes too long.

        A pod that breaks is deleted before the error is raised, so the kubelet does not
        retry a failed init step forever. In a pod made for this start (``created``), a
        container that dies before the pod was Ready fails the start too; an adopted pod
        (a recovery in place) may restart Postgres, up to a crash loop."""
        name = objects.object_name(job.id)
        deadline = time.monotonic() + self.start_timeout
        told = ""
        while True:
            pod = await self.api.pod(job.id)
            seen = view(pod)
            if pod is None:
                raise BackendError(f"pod {name} vanished while starting")
            if seen.broken or (created and (seen.restarting or seen.postgres_restarts)):
                await self._give_up_pod(job, seen)
            if seen.ready and seen.ip:
                return seen.ip
            if seen.doing != told and not seen.doing.startswith("running its init"):
                told = seen.doing  # (the restore's progress was told before)
                await progress(seen.doing)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"pod {name} was not ready within {self.start_timeout:g} s "
                                   f"({seen.doing})")
            await self.api.pod_change(job.id, pod, min(left, 2.0))

    async def _wait_writable(self, job: Job, ip: str) -> None:
        """Over TCP as the job's owner (which proves its password works too): until archive
        recovery has ended."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                conn = await asyncpg.connect(
                    host=ip, port=objects.POSTGRES_PORT, user=OWNER_ROLE,
                    password=job.backend_password, database=f"job_{job.id}", timeout=10,
                    server_settings={"application_name": "jobmesh controller"})
                break
            except (OSError, TimeoutError, asyncpg.CannotConnectNowError) as exc:
                if time.monotonic() > deadline:
                    raise BackendError(f"cannot connect to job {job.id} at {ip}: "
                                       f"{one_line(exc)}") from exc
                await asyncio.sleep(0.2)
        try:
            await wait_until_writable(conn, max(deadline - time.monotonic(), 1))
        finally:
            await conn.close()

    async def _give_up_pod(self, job: Job, seen: PodView) -> None:
        """Delete a pod that failed to start (an init step that failed would otherwise be
        retried by the kubelet forever), then raise why."""
        name = objects.object_name(job.id)
        why = seen.why or "a container died while it started"
        log.warning("job %s: pod %s failed to start (%s): deleting it", job.id, name, why)
        try:
            await self.api.delete_pod(job.id, self.settings.grace_seconds)
        except (*EXPECTED_ERRORS, BackendError) as exc:
            raise BackendError(f"pod {name} failed to start: {why}; and deleting it "
                               f"failed: {one_line(exc)}") from exc
        raise BackendError(f"pod {name} failed to start: {why}")

    async def _check_not_restarted(self, job: Job, before: PodView) -> None:
        """After a pause snapshot: BackendError if the kubelet started Postgres again while
        the agent took it (it died with an error during the fast shutdown). The pause is
        then retried, and the agent stops the restarted server and snapshots it anew."""
        after = view(await self.api.pod(job.id))
        if after.exists and (after.postgres_running
                             or after.postgres_restarts != before.postgres_restarts):
            raise BackendError(f"job {job.id}: PostgreSQL was restarted in its pod during the "
                               f"pause (restarts {before.postgres_restarts} -> "
                               f"{after.postgres_restarts}); pausing again")

    async def _request_pause(self, job: Job, ip: str | None) -> Manifest:
        """The pod's agent stops Postgres, drains the spool and stores a pause snapshot;
        returns the snapshot's manifest, as stored (see ``agent_client``)."""
        try:
            return await AgentClient(objects.agent_url(ip), job.id,
                                     job_token(self.agent_key, job.id)).pause(
                self.pause_timeout)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BackendError(f"cannot ask the agent of job {job.id} to pause: "
                               f"{one_line(exc)}") from exc

    async def _ensure_network_policy(self) -> None:
        net, body = self.api.net, objects.network_policy(self.ns)
        current = await self.api.read(net.read_namespaced_network_policy, objects.NETWORK_POLICY)
        if current is None:
            try:
                await self.api.call(net.create_namespaced_network_policy, self.ns, body)
                log.info("created NetworkPolicy %s/%s", self.ns, objects.NETWORK_POLICY)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = await self.api.read(net.read_namespaced_network_policy,
                                              objects.NETWORK_POLICY)
        if current is not None and current.get("spec") != body["spec"]:
            # Our spec's lists have no merge keys: a patch replaces them whole.
            patch = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")},
                     "spec": body["spec"]}
            await self.api.call(net.patch_namespaced_network_policy, objects.NETWORK_POLICY,
                                self.ns, patch)
            log.info("updated NetworkPolicy %s/%s", self.ns, objects.NETWORK_POLICY)


async def _no_progress(_text: str) -> None:
    return None
