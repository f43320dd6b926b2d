"""A Kubernetes API server for tests: real HTTP on 127.0.0.1, in memory, strict.

kmock's ``KubernetesEmulator`` (pinned: kmock==0.8) gives us request parsing,
discovery for the built-in resources and Kubernetes-style error bodies. The
subclass below takes over every read and write, so that the server behaves
like a real one wherever our controller could tell the difference:

- every object created, replaced or patched is validated against the newest
  schemas kubernetes-validate ships (strict: unknown fields fail), plus the
  API server's own checks that no schema expresses (names, label keys and
  values, container and volume names, mounts of undeclared volumes, quantities,
  restart policies, probes). Failure: 422 ``Invalid``, and the object lands in
  ``rejected`` so a test can assert that nothing was rejected;
- uid, creationTimestamp, generation and one resourceVersion counter; a stale
  ``metadata.resourceVersion`` on PUT or PATCH is 409 ``Conflict``, and so is
  a ``metadata.uid`` in a patch or a DeleteOptions precondition that does not
  match;
- PUT (replace); the status subresource is split (``/status`` writes only
  status, the main resource ignores status); pod specs are immutable except
  images; ``pods/binding``;
- label selectors and field selectors on list, watch and deletecollection;
  watch ``timeoutSeconds``; a watch from a ``resourceVersion`` replays what
  happened since then (410 Gone when that is too old); an object that leaves
  a watch's selector arrives as DELETED;
- graceful pod deletion: deleting a pod bound to a node only sets its
  ``deletionTimestamp``; its kubelet stops it and deletes it with
  ``gracePeriodSeconds=0``. Finalizers hold any object the same way;
- server-side defaults a client may read back: pod status Pending and
  qosClass, restartPolicy, grace period, requests from limits; Service
  clusterIP; Secret ``stringData`` folded into ``data``; ``generateName``;
  ``pods/log`` served by whatever the kubelet registers.

Not emulated: Namespace objects (a namespaced object needs no namespace to
exist), garbage collection by ownerReferences, strategic-merge list semantics
(a strategic merge patch is applied as a JSON merge patch: lists are replaced
whole), server-side apply, exec/attach/port-forward, admission (quotas, limit
ranges, pod security), Endpoints, and Service routing.
"""

from .checks import parse_quantity, semantic_problems
from .emulator import K8sEmulator
from .wire import Rejection, now

__all__ = ["K8sEmulator", "Rejection", "now", "parse_quantity", "semantic_problems"]
