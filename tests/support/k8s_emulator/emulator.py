"""The test-facing wrapper: the API server on its own thread and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
from kubernetes import client as k8s_client

from .api_server import ApiServer
from .wire import (
    Obj,
    PodLogs,
    Rejection,
)

# --- the test-facing wrapper -------------------------------------------------------------


class K8sEmulator:
    """The API server on its own thread and event loop.

    The official client is synchronous and our code calls it through
    ``asyncio.to_thread``; a server on the test's own loop would deadlock the
    first blocking call made from that loop. Use it as a context manager, or
    ``start()`` / ``stop()``; the accessors below are safe from any thread.
    """

    def __init__(self, *, crd_groups: Iterable[str] = (),
                 graceful_pod_deletion: bool = True) -> None:
        self.crd_groups = frozenset(crd_groups)
        self.graceful_pod_deletion = graceful_pod_deletion
        self.url = ""
        self._api: ApiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._listeners: set[Callable[[], None]] = set()
        self._listeners_lock = threading.Lock()

    def __enter__(self) -> K8sEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> K8sEmulator:
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        self._thread = None

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._failure = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        api = ApiServer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # importlib.resources in kmock
            api.resources.load_bundled()
        api.crd_groups = self.crd_groups
        api.graceful_pod_deletion = self.graceful_pod_deletion
        api.on_change = self._notify
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        # Our own aiohttp runner, not kmock.Server: that one patches aiohttp's resolver
        # process-wide, and waits 60 s for open watches on shutdown.
        server = aiohttp.web.Server(api, access_log=logging.getLogger("tests.k8s_emulator"))
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        async with api:
            await runner.setup()
            await aiohttp.web.SockSite(runner, sock).start()
            self._api = api
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                api.close_watches()
                await runner.cleanup()

    def _call(self, fn: Callable[[ApiServer], Any]) -> Any:
        """Run ``fn`` on the server's loop (where the state lives) and return a copy of its
        result; once the server has stopped, on the state it left (``rejected`` after stop)."""
        api = self._api
        if api is None:
            raise RuntimeError("the Kubernetes emulator was never started")
        if self._thread is None or self._loop is None or self._loop.is_closed():
            return copy.deepcopy(fn(api))

        async def call() -> Any:
            return copy.deepcopy(fn(api))

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(15)

    def _notify(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    # --- what tests look at ---

    @staticmethod
    def _matches(res: kmock.resource, kind_plural: str) -> bool:
        """``pods``, ``v1/pods`` or ``networking.k8s.io/v1/networkpolicies``."""
        full = "/".join(p for p in (res.group, res.version, res.plural) if p)
        return kind_plural in (res.plural, full)

    def objects(self, kind_plural: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of a kind (every namespace when None), by name."""
        return self._call(lambda api: [
            obj for (res, ns, _), obj in sorted(api.store.items(),
                                                key=lambda kv: (kv[0][1] or "", kv[0][2]))
            if self._matches(res, kind_plural) and namespace in (None, ns)])

    def get(self, kind_plural: str, namespace: str | None, name: str) -> Obj | None:
        return next((o for o in self.objects(kind_plural, namespace)
                     if o["metadata"]["name"] == name), None)

    @property
    def rejected(self) -> list[Rejection]:
        """Every object refused as invalid so far; a test asserts ``== []``."""
        return self._call(lambda api: list(api.rejected))

    def serve_pod_logs(self, pod_logs: PodLogs | None) -> None:
        """Answer ``pods/log`` with ``pod_logs(namespace, pod, container)`` (the kubelet's)."""
        def install(api: ApiServer) -> None:
            api.pod_logs = pod_logs

        self._call(install)

    async def wait_for(self, kind_plural: str, namespace: str | None, name: str,
                       predicate: Callable[[Obj | None], bool], timeout: float = 30) -> Obj | None:
        """Wait (woken by every change, not polling) until ``predicate(object or None)``."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener() -> None:
            loop.call_soon_threadsafe(changed.set)

        obj: Obj | None = None
        with self._listening(listener):
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        changed.clear()
                        obj = self.get(kind_plural, namespace, name)
                        if predicate(obj):
                            return obj
                        await changed.wait()
            except TimeoutError:
                raise AssertionError(f"{kind_plural} {namespace}/{name} never matched; last "
                                     f"seen: {json.dumps(obj, indent=1)}") from None

    def wait_for_sync(self, kind_plural: str, namespace: str | None, name: str,
                      predicate: Callable[[Obj | None], bool],
                      timeout: float = 30) -> Obj | None:
        """``wait_for`` for synchronous code (blocks the calling thread)."""
        changed = threading.Event()
        with self._listening(changed.set):
            end = time.monotonic() + timeout
            while True:
                changed.clear()
                obj = self.get(kind_plural, namespace, name)
                if predicate(obj):
                    return obj
                if not changed.wait(max(0.0, end - time.monotonic())):
                    raise AssertionError(f"{kind_plural} {namespace}/{name} never matched; last "
                                         f"seen: {json.dumps(obj, indent=1)}")

    @contextlib.contextmanager
    def _listening(self, listener: Callable[[], None]) -> Any:
        with self._listeners_lock:
            self._listeners.add(listener)
        try:
            yield
        finally:
            with self._listeners_lock:
                self._listeners.discard(listener)

    # --- how clients reach it ---

    def api_client(self) -> k8s_client.ApiClient:
        """A new official-client ApiClient for this server (close it, or use ``with``)."""
        return k8s_client.ApiClient(k8s_client.Configuration(host=self.url))

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig naming this server, for code that loads one (JSON is valid YAML)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))
        return path
