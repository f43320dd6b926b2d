"""Reading a job pod's status (``pod_status.view``): alive, restarting in place, or lost.

Statuses are written as the kubelet reports them (camelCase, as the API returns them)."""

from __future__ import annotations

from typing import Any

from jobmesh.controller.backends.kubernetes import objects as o
from jobmesh.controller.backends.kubernetes import pod_status as ps

SETTINGS = o.PodSettings(namespace="jm", image="jobmesh:1", store_url="s3://bucket/jobs")


def with_status(status: dict[str, Any], policy: str | None = None,
                **meta: Any) -> dict[str, Any]:
    pod = o.job_pod("alpha", {}, SETTINGS, restore=False, owner_uid="anchor-uid")
    pod["metadata"].update(meta)
    if policy is not None:
        pod["spec"]["restartPolicy"] = policy
    return {**pod, "status": status}


READY = {"phase": "Running", "podIP": "10.0.0.7",
         "conditions": [{"type": "Ready", "status": "True"}],
         "initContainerStatuses": [{"name": "init", "restartCount": 0, "state": {
             "terminated": {"exitCode": 0, "reason": "Completed"}}}],
         "containerStatuses": [{"name": "postgres", "restartCount": 0, "state": {"running": {}}},
                               {"name": "agent", "restartCount": 0, "state": {"running": {}}}]}
KILLED = {"exitCode": 137, "reason": "Error", "startedAt": "2026-01-01T00:00:00Z",
          "finishedAt": "2026-01-01T01:00:00Z"}


def postgres(state: dict[str, Any], restarts: int = 1,
             last: dict[str, Any] | None = None) -> dict[str, Any]:
    status = {"name": "postgres", "restartCount": restarts, "state": state}
    if last is not None:
        status["lastState"] = {"terminated": last}
    return {**READY, "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [status, READY["containerStatuses"][1]]}


def test_no_pod_is_not_alive() -> None:
    v = ps.view(None)
    assert not v.exists and not v.alive


def test_a_ready_pod_has_its_address() -> None:
    v = ps.view(with_status(READY))
    assert v.ready and v.alive and v.ip == "10.0.0.7" and v.restarting == ()
    assert v.postgres_running and v.postgres_restarts == 0


def test_a_starting_pod_is_alive_and_says_what_it_does() -> None:
    v = ps.view(with_status({"phase": "Pending", "initContainerStatuses": [
        {"name": "init", "state": {"running": {}}}]}))
    assert v.alive and not v.ready and v.doing == "running its init step"
    v = ps.view(with_status({"phase": "Pending", "containerStatuses": [
        {"name": "postgres", "state": {"waiting": {"reason": "ContainerCreating"}}}]}))
    assert v.doing == "container postgres: ContainerCreating"


# --- a container that dies: restarted in place, or the end of the pod -------------------------


def test_postgres_killed_and_waiting_for_its_restart_is_restarting_not_broken() -> None:
    v = ps.view(with_status(postgres({"waiting": {"reason": "CrashLoopBackOff"}},
                                     last=KILLED)))
    assert v.alive and not v.ready and v.restarting == ("postgres",)
    assert v.why == "container postgres exited with 137 (Error) (restarting)"
    assert v.postgres_restarts == 1 and not v.postgres_running


def test_postgres_terminated_before_its_first_immediate_restart_is_restarting() -> None:
    v = ps.view(with_status(postgres({"terminated": KILLED}, restarts=0)))
    assert v.alive and v.restarting == ("postgres",)


def test_postgres_running_again_after_a_restart_is_alive() -> None:
    v = ps.view(with_status({**postgres({"running": {}}, restarts=1, last=KILLED),
                             "conditions": [{"type": "Ready", "status": "True"}]}))
    assert v.alive and v.ready and v.restarting == () and v.postgres_restarts == 1


def test_a_restarting_agent_leaves_the_job_alive() -> None:
    status = {**READY, "containerStatuses": [
        READY["containerStatuses"][0],
        {"name": "agent", "restartCount": 1, "state": {"waiting": {
            "reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 1}}}]}
    v = ps.view(with_status(status))
    assert v.alive and v.restarting == ("agent",) and v.postgres_running


def test_a_clean_exit_is_not_restarted_under_on_failure_so_the_pod_is_done() -> None:
    """What a pause leaves: Postgres stopped by a fast shutdown (exit 0), the agent up."""
    paused = postgres({"terminated": {"exitCode": 0, "reason": "Completed"}}, restarts=0)
    v = ps.view(with_status(paused))
    assert not v.alive and v.why == "container postgres exited with 0 (Completed)"
    assert ps.agent_running(with_status(paused))


def test_under_restart_policy_never_a_dead_container_is_the_end() -> None:
    """A pod made by an earlier controller (restartPolicy Never)."""
    v = ps.view(with_status(postgres({"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                                     restarts=0), policy="Never"))
    assert not v.alive and v.why == "container postgres exited with 137 (OOMKilled)"


def test_postgres_in_a_crash_loop_is_broken() -> None:
    quick = {"exitCode": 1, "reason": "Error", "message": "FATAL: could not map memory",
             "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:02Z"}
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    assert ps.view(with_status(postgres(waiting, restarts=4, last=quick))).alive
    v = ps.view(with_status(postgres(waiting, restarts=ps.CRASH_LOOP_RESTARTS, last=quick)))
    assert v.broken and v.why.startswith(
        "container postgres is crash-looping (restarted 5 times, its last run 2 s): "
        "container postgres exited with 1 (Error): FATAL: could not map memory")
    # Many restarts over a long life, the last after an hour's run: not a loop.
    assert ps.view(with_status(postgres(waiting, restarts=9, last=KILLED))).alive


# --- init steps ------------------------------------------------------------------------------


def test_a_failed_init_step_says_why() -> None:
    v = ps.view(with_status({"phase": "Failed", "initContainerStatuses": [
        {"name": "init", "state": {"terminated": {
            "exitCode": 1, "reason": "Error",
            "message": "jobmesh agent restore: no snapshot of job 'alpha'"}}}]}))
    assert v.broken and not v.alive
    assert "container init exited with 1 (Error): jobmesh agent restore: no snapshot" in v.why


def test_an_init_step_the_kubelet_retries_after_a_failure_is_broken_at_once() -> None:
    """Under OnFailure the pod stays Pending while the kubelet runs the failed step again:
    the failure is read from lastState, before the retry ends."""
    retrying = {"phase": "Pending", "initContainerStatuses": [
        {"name": "init", "restartCount": 1, "state": {"running": {}},
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                                      "message": "bad dump"}}}]}
    v = ps.view(with_status(retrying))
    assert v.broken and v.why == "container init exited with 1 (Error): bad dump"
    backing_off = {"phase": "Pending", "initContainerStatuses": [
        {"name": "init", "restartCount": 1, "state": {"waiting": {
            "reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 2}}}]}
    assert ps.view(with_status(backing_off)).broken


def test_an_init_step_that_succeeded_on_a_retry_is_done() -> None:
    status = {**READY, "initContainerStatuses": [
        {"name": "init", "restartCount": 1, "state": {"terminated": {"exitCode": 0}},
         "lastState": {"terminated": {"exitCode": 1}}}]}
    assert ps.view(with_status(status)).alive


def test_an_evicted_pod_is_not_alive() -> None:
    v = ps.view(with_status({"phase": "Failed", "reason": "Evicted",
                             "message": "The node was low on resource: ephemeral-storage."}))
    assert not v.alive and "ephemeral-storage" in v.why


def test_a_pod_being_deleted_is_not_alive() -> None:
    v = ps.view(with_status(READY, deletionTimestamp="2026-01-01T00:00:00Z"))
    assert not v.alive and v.why == "the pod is being deleted"


def test_no_agent_answers_in_a_failed_gone_or_unscheduled_pod() -> None:
    assert not ps.agent_running(None)
    assert not ps.agent_running(with_status({"phase": "Pending"}))
    assert not ps.agent_running(with_status({**READY, "phase": "Failed"}))
    assert not ps.agent_running(with_status(READY, deletionTimestamp="2026-01-01T00:00:00Z"))
    dead = {**READY, "containerStatuses": [
        {"name": "agent", "state": {"terminated": {"exitCode": 1}}}]}
    assert not ps.agent_running(with_status(dead))
