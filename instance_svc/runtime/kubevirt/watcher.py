"""One watch of every CyberdeskInstance per instance_svc replica: a cache, waits and exit reports.

An informer in miniature: LIST, then WATCH from the list's resourceVersion, on a thread of its
own (the synchronous client's stream blocks); a stream that ends or fails is opened again from
the last resourceVersion seen, and a 410 (too old) lists again. Every object seen lands in the
cache and is handed to the event loop, where

* `wait_for` resolves a wait once the object satisfies a predicate (Running with its agent
  endpoint, Paused, the operator's finalizer gone, ...): 10,000 instances starting cost one watch
  stream, not 10,000 polls;
* `on_exit` callbacks fire when an instance's VM is gone by itself (Expired, Failed, deleted).

Writes of this replica are put into the cache at once (`remember`), so it reads its own writes; a
watch event older than what the cache holds (lower resourceVersion) is not applied over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from instance_svc.operator import contract
from instance_svc.runtime.kubevirt.kube import Kube

_log = logging.getLogger("instance_svc.runtime.kubevirt.watch")

Obj = dict[str, Any]
Predicate = Callable[[Obj | None], bool]


def _rv(obj: Obj | None) -> int:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


@dataclass
class _Wait:
    name: str
    predicate: Predicate
    future: asyncio.Future[Obj | None]


class Watcher:
    """The cache of one plural, kept by a watch thread, read and waited on from the event loop."""

    def __init__(self, kube: Kube, plural: str = contract.INSTANCE_PLURAL, stream_seconds: int = 300) -> None:
        self._kube = kube
        self._plural = plural
        self._stream_seconds = stream_seconds
        self._cache: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._waits: list[_Wait] = []
        self._listeners: list[Callable[[str, Obj | None], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: k8s_watch.Watch | None = None

    # --- running -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the watch thread; `synced()` says when the first list is in."""
        if self._thread is not None:
            return
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"watch-{self._plural}", daemon=True)
        self._thread.start()

    async def synced(self, timeout: float) -> None:  # noqa: ASYNC109 (the caller's bound, as wait_for)
        """Return once the cache holds the first list (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while not self._synced.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no list of {self._plural} from the Kubernetes API after {timeout:g}s")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Stop the thread (its stream is closed; the thread is a daemon and ends with it)."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        rv = ""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if not rv:
                    items, rv = self._kube.list(self._plural)
                    names = set()
                    for obj in items:
                        names.add(obj["metadata"]["name"])
                        self._apply(obj["metadata"]["name"], obj)
                    with self._lock:
                        vanished = [n for n in self._cache if n not in names]
                    for name in vanished:
                        self._apply(name, None)
                    self._synced.set()
                self._watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
                stream = self._watch.stream(  # type: ignore[no-untyped-call]
                    self._kube.custom.list_namespaced_custom_object,
                    contract.GROUP,
                    contract.VERSION,
                    self._kube.namespace,
                    self._plural,
                    resource_version=rv or None,
                    timeout_seconds=self._stream_seconds,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    obj = event.get("object") or {}
                    kind = event.get("type")
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            rv = ""  # too old: list again
                        break
                    new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if new_rv:
                        rv = str(new_rv)
                    if kind == "BOOKMARK":
                        continue
                    obj_name = str((obj.get("metadata") or {}).get("name") or "")
                    if obj_name:
                        self._apply(obj_name, None if kind == "DELETED" else obj)
                backoff = 0.1
            except ApiException as err:
                if err.status == 410:
                    rv = ""
                if self._stop.is_set():
                    return
                _log.warning("watch failed; retrying", extra={"plural": self._plural, "status": err.status})
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception as err:
                if self._stop.is_set():
                    return
                _log.warning("watch failed; retrying", extra={"plural": self._plural, "error": str(err)})
                time.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    # --- the cache ---------------------------------------------------------------------------

    def _apply(self, name: str, obj: Obj | None) -> None:
        with self._lock:
            old = self._cache.get(name)
            if obj is not None and old is not None and _rv(obj) and _rv(obj) < _rv(old):
                return  # an older event than a write of ours already in the cache
            if obj is None:
                self._cache.pop(name, None)
            else:
                self._cache[name] = obj
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._dispatch, name, obj)

    def remember(self, obj: Obj) -> None:
        """Put an object this replica just wrote into the cache (read-your-writes)."""
        self._apply(obj["metadata"]["name"], obj)

    def forget(self, name: str) -> None:
        """The object is gone (a 404 seen by a read)."""
        self._apply(name, None)

    def get(self, name: str) -> Obj | None:
        """The cached object, or None."""
        with self._lock:
            return self._cache.get(name)

    def items(self) -> list[Obj]:
        """Every cached object."""
        with self._lock:
            return list(self._cache.values())

    @property
    def is_synced(self) -> bool:
        """Whether the first list is in."""
        return self._synced.is_set()

    # --- waits and listeners (event loop only) -------------------------------------------------

    def listen(self, callback: Callable[[str, Obj | None], None]) -> None:
        """Call `callback(name, obj_or_None)` on the event loop for every change seen."""
        self._listeners.append(callback)

    def _dispatch(self, name: str, obj: Obj | None) -> None:
        current = self.get(name) if obj is not None else None
        for wait in [w for w in self._waits if w.name == name]:
            if wait.future.done():
                self._waits.remove(wait)
                continue
            try:
                hit = wait.predicate(current)
            except Exception as err:
                self._waits.remove(wait)
                wait.future.set_exception(err)
                continue
            if hit:
                self._waits.remove(wait)
                wait.future.set_result(current)
        for listener in list(self._listeners):
            try:
                listener(name, current)
            except Exception:
                _log.exception("watch listener failed", extra={"object": name})

    async def wait_for(self, name: str, predicate: Predicate, timeout: float) -> Obj | None:  # noqa: ASYNC109
        """The object once `predicate(obj_or_None)` holds; the predicate may raise to end the wait.

        TimeoutError after `timeout` seconds.
        """
        current = self.get(name)
        if predicate(current):
            return current
        future: asyncio.Future[Obj | None] = asyncio.get_running_loop().create_future()
        wait = _Wait(name, predicate, future)
        self._waits.append(wait)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if wait in self._waits:
                self._waits.remove(wait)
