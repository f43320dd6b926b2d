"""Reading a job pod's status: is the job alive, restarting in place, starting, or lost?

Pure, as ``objects.py``: the pod as the API returns it (camelCase dicts) in,
a :class:`PodView` out. The pod runs under ``restartPolicy: OnFailure``
(see ``objects.py``), so a container that dies is not always the end:

- **restarting**: a main container (Postgres, the agent) ended with a
  non-zero status and the kubelet starts it again in the same pod, on the
  same emptyDirs, after its crash-loop back-off (``state.waiting`` with
  ``lastState.terminated``, or ``state.terminated`` until the restart). The
  job is not dead: PostgreSQL's crash recovery replays its own WAL.
- **broken**: the pod is lost or will not serve again: being deleted,
  evicted, Failed or Succeeded; an init step that failed (the kubelet would
  retry it forever under OnFailure: the backend deletes the pod instead and
  reports the failure at once); a main container that ended and is not
  restarted (exit 0: a pause stopped Postgres, or someone did); or Postgres
  in a crash loop (:data:`CRASH_LOOP_RESTARTS` restarts, and its last run
  shorter than :data:`CRASH_LOOP_RUN` seconds), which its own data will not
  cure. Only a broken pod is replaced, and only then is the job restored
  from the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

POSTGRES = "postgres"
AGENT = "agent"
# Postgres restarted this often in one pod, and its last run this short (seconds): it is
# crash-looping on its own data, and the pod is given up (the job is restored from the
# store). Under the real back-off (0, 10, 20, 40, 80 s) that takes about 2.5 minutes.
CRASH_LOOP_RESTARTS = 5
CRASH_LOOP_RUN = 60.0


@dataclass(frozen=True)
class PodView:
    """What the backend needs to know of a pod, read from its status."""

    exists: bool
    ready: bool = False
    broken: bool = False  # lost or not serving again: replace it (see the module docstring)
    ip: str | None = None
    phase: str | None = None
    why: str = ""  # for a broken or restarting pod: what happened, for the events and log
    doing: str = ""  # for a starting pod: what it is doing now
    restarting: tuple[str, ...] = ()  # main containers the kubelet is restarting in place
    postgres_restarts: int = 0  # the postgres container's restartCount
    postgres_running: bool = False

    @property
    def alive(self) -> bool:
        return self.exists and not self.broken


def view(pod: Mapping[str, Any] | None) -> PodView:
    """Read a pod (None: there is none)."""
    if pod is None:
        return PodView(exists=False, why="the pod is gone")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    phase = status.get("phase")
    ip = status.get("podIP") or None
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("Ready") == "True"
    mains = list(status.get("containerStatuses") or [])
    pg: Mapping[str, Any] = next((cs for cs in mains if cs.get("name") == POSTGRES), {})
    base: dict[str, Any] = {
        "ip": ip, "phase": phase, "postgres_restarts": int(pg.get("restartCount") or 0),
        "postgres_running": "running" in (pg.get("state") or {})}

    def broken(why: str) -> PodView:
        return PodView(True, broken=True, why=why, **base)

    if meta.get("deletionTimestamp"):
        return broken("the pod is being deleted")
    if phase in ("Failed", "Succeeded") or status.get("reason") == "Evicted":
        why = status.get("message") or status.get("reason") or f"the pod {phase or 'failed'}"
        detail = init_failure(pod) or _first_ended(mains)
        return broken("; ".join(x for x in (why, detail) if x))
    if failed := init_failure(pod):
        return broken(failed)
    policy = spec.get("restartPolicy") or "Always"
    restarting, said = [], []
    for cs in mains:
        state, last = cs.get("state") or {}, (cs.get("lastState") or {}).get("terminated")
        ended = state.get("terminated")
        if ended is not None and not _restarts(policy, ended.get("exitCode")):
            return broken(_ended(cs.get("name"), ended))
        if ended is not None or ("waiting" in state and last is not None):
            restarting.append(str(cs.get("name")))
            said.append(_ended(cs.get("name"), ended or last or {}) + " (restarting)")
    if POSTGRES in restarting and (loop := _crash_loop(pg)):
        return broken(loop)
    return PodView(True, ready=ready and ip is not None, why="; ".join(said),
                   doing=_doing(status), restarting=tuple(restarting), **base)


def init_failure(pod: Mapping[str, Any]) -> str:
    """'container init exited with 1: <message>' when an init step failed and has not
    succeeded since (a kubelet under OnFailure runs it again: the failure stays ours)."""
    sidecars = {c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []
                if c.get("restartPolicy") == "Always"}
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if cs.get("name") in sidecars:
            continue
        state = cs.get("state") or {}
        now = state.get("terminated")
        if now is not None and now.get("exitCode") == 0:
            continue  # done (perhaps after a failure the kubelet retried)
        for ended in (now, (cs.get("lastState") or {}).get("terminated")):
            if ended is not None and ended.get("exitCode") != 0:
                return _ended(cs.get("name"), ended)
    return ""


def _restarts(policy: str, code: object) -> bool:
    """Does the kubelet start a main container that ended with ``code`` again?"""
    return policy == "Always" or (policy == "OnFailure" and code != 0)


def _crash_loop(cs: Mapping[str, Any]) -> str:
    count = int(cs.get("restartCount") or 0)
    last = (cs.get("lastState") or {}).get("terminated") or \
        (cs.get("state") or {}).get("terminated") or {}
    ran = _seconds(last.get("startedAt"), last.get("finishedAt"))
    if count < CRASH_LOOP_RESTARTS or ran is None or ran >= CRASH_LOOP_RUN:
        return ""
    return (f"container {POSTGRES} is crash-looping (restarted {count} times, its last run "
            f"{ran:.0f} s): {_ended(POSTGRES, last)}")


def _seconds(start: object, end: object) -> float | None:
    try:
        return (datetime.fromisoformat(str(end).replace("Z", "+00:00"))
                - datetime.fromisoformat(str(start).replace("Z", "+00:00"))).total_seconds()
    except ValueError:
        return None


def _first_ended(statuses: list[Mapping[str, Any]]) -> str:
    for cs in statuses:
        ended = ((cs.get("state") or {}).get("terminated")
                 or (cs.get("lastState") or {}).get("terminated"))
        if ended:
            return _ended(cs.get("name"), ended)
    return ""


def _ended(name: object, ended: Mapping[str, Any]) -> str:
    """'container postgres exited with 137 (OOMKilled): <message>'."""
    text = f"container {name} exited with {ended.get('exitCode')}"
    if ended.get("reason"):
        text += f" ({ended['reason']})"
    message = " ".join(str(ended.get("message") or "").split())
    return f"{text}: {message[-300:]}" if message else text


def _doing(status: Mapping[str, Any]) -> str:
    for cs in status.get("initContainerStatuses") or []:
        if "running" in (cs.get("state") or {}):
            return f"running its {cs.get('name')} step"
    waiting = [cs for cs in status.get("containerStatuses") or []
               if "waiting" in (cs.get("state") or {})]
    if waiting:
        reason = waiting[0]["state"]["waiting"].get("reason") or "waiting"
        return f"container {waiting[0].get('name')}: {reason}"
    return "starting PostgreSQL" if status.get("phase") == "Running" else \
        f"pod {status.get('phase') or 'pending'}"


def agent_running(pod: Mapping[str, Any] | None) -> bool:
    """Could the pod's agent answer (the pod stands, has an IP, its agent has not ended)?
    It may, even when Postgres beside it has stopped (after a pause snapshot)."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP") or status.get("phase") in ("Failed", "Succeeded"):
        return False
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == AGENT:
            return "running" in (cs.get("state") or {})
    return status.get("phase") == "Running"
