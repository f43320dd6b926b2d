"""A test kubelet: runs the pods of one namespace of the Kubernetes emulator as local processes.

It watches pods with the official client, binds the unscheduled ones to its
node, and runs their containers the way a real kubelet would where our
controller can tell the difference: init containers in order, then every
container; restart policies; readiness, liveness and startup probes; status
(phase, conditions, container states, exit codes, restart counts) written
to the status subresource; graceful deletion with SIGTERM, a grace period,
then SIGKILL; eviction. What a container is made of is simulated:

- Network: each pod gets its own loopback address 127.N.x.y (all of 127/8
  reaches ``lo`` on Linux), so every pod can listen on the same ports (5432,
  8008) on its own pod IP. Bind to the pod IP, never to 0.0.0.0 or
  ``listen_addresses='*'``: those would collide across pods. ``hostNetwork``
  pods get 127.0.0.1. Service names do not resolve: reach pods by pod IP.
- Images are ignored. ``command`` (plus ``args``) is run on this host:
  ``jobmesh`` is ``python -m jobmesh`` of this venv, ``python``/``python3``
  this interpreter, and Postgres binaries (``postgres``, ``initdb``,
  ``pg_ctl``, ``pg_isready``...) come from agent.postgres.bin_dir(), bare or
  by an image path such as /usr/lib/postgresql/16/bin/postgres. A container
  with no command runs ``entrypoints[image]`` when given, else fails to start.
- Filesystem: no chroot and no mount namespace. Volumes are directories under
  ``root`` (emptyDir, Secret and ConfigMap; hostPath is the host path), and a
  container sees them because every occurrence of a ``volumeMounts.mountPath``
  in its command, args, literal env values, workingDir and exec probes is
  rewritten to the volume's directory. Paths that a program computes itself
  (compiled-in defaults) are NOT rewritten: pass every path explicitly,
  including Postgres's ``unix_socket_directories`` (its default,
  /var/run/postgresql, would be shared by every pod on this host).
- Users: ``securityContext.runAsUser`` (pod or container) other than 0 runs
  the container as the Postgres OS user (agent.postgres.os_user(), when we are
  root), and the pod's volumes are handed to that user (as fsGroup would).
  Exception: a Python command that user cannot execute (an interpreter under
  /root) runs as ourselves; ``warnings`` says so.
- Processes: each container runs under a small supervisor (the "shim", the
  container runtime's part): it forwards SIGTERM to the command, adopts every
  process the command leaves behind (it is a child subreaper), and when the
  command exits it kills them all, as the end of a container's cgroup does.
  All pods share the host's pid namespace, so ``shareProcessNamespace: true``
  needs nothing. stdout and stderr go to ``root/logs/<ns>_<pod>_<uid>/<container>.log``.
- Env: literal values, ``$(VAR)`` expansion (command, args and env values, as
  Kubernetes does), ``valueFrom`` fieldRef / secretKeyRef / configMapKeyRef /
  resourceFieldRef, and ``envFrom``. A Secret or ConfigMap that does not exist
  yet keeps the pod Pending (CreateContainerConfigError) until it does.
  Exec probes expand only literal env values, as the real prober does: a
  ``$(POD_IP)`` set by fieldRef becomes the empty string there; use
  ``sh -c '... "$POD_IP"'`` instead.
- Times are shortened for tests: probe periods and initial delays are capped
  at ``probe_period``, grace periods at ``max_grace``. Restarts are not: a
  dead container is restarted in the same pod (same volumes, same pod IP, its
  log appended to) when the pod's ``restartPolicy`` says so (init containers
  on failure unless ``Never``; sidecars always), with the real crash-loop
  back-off (the first restart at once, then 10 s, 20 s, 40 s ... up to 5 min,
  reset after 10 min of running; ``waiting.reason: CrashLoopBackOff`` meanwhile),
  ``restartCount`` and ``lastState.terminated``; ``restart_backoff=
  RestartBackoff.shortened()`` shrinks the back-off for tests that need it.

Not simulated (the pod fails with reason UnsupportedByTestKubelet, so nothing
passes by accident): volumes other than those above, postStart hooks, gRPC
probes, subPathExpr. Ignored: resources (recorded, never enforced: emptyDir
sizeLimit too), nodeSelector, affinity, tolerations, service account tokens.
"""

from .expansion import expand, expand_static, mount_rewriter
from .kubelet import Kubelet
from .settings import RestartBackoff

__all__ = ["Kubelet", "RestartBackoff", "expand", "expand_static", "mount_rewriter"]
