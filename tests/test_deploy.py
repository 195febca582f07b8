"""deploy/: every manifest passes the Kubernetes and KServe schemas offline, the checks can fail, and the manifests
agree with the server they run (routes, ports, settings, the Secret's keys).

No cluster here: kubernetes-validate carries the Kubernetes schemas, and the KServe CRD schemas are kept in
deploy/kserve/schemas (extract.py, README.md).
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as k8s

from aeserve.service.api import health, v2
from aeserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "kserve" / "schemas"
# The oldest Kubernetes the manifests claim to work on (autoscaling/v2 and policy/v1 are GA well before it).
K8S_VERSION = "1.30"
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SCHEMAS / "servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): SCHEMAS / "inferenceservice-v1beta1.json",
}
SECRET = DEPLOY / "registry-secret.example.yaml"


def manifest_files() -> list[Path]:
    """The Kubernetes and KServe objects: every YAML file in deploy/ but Compose's (tests/test_images.py)."""
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.name != "compose.yaml")


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[dict]:
    return [doc for path in manifest_files() for doc in documents(path)]


def find(kind: str) -> dict:
    (doc,) = [doc for doc in all_documents() if doc["kind"] == kind]
    return doc


def k8s_error(doc: dict) -> str | None:
    """Why the Kubernetes schema rejects ``doc`` (strict: unknown fields too), or None when it passes."""
    try:
        k8s.validate(doc, K8S_VERSION, strict=True)
    except k8s.ValidationError as e:
        return f"{'.'.join(map(str, e.path))}: {e.message}"
    except k8s.SchemaNotFoundError as e:  # the command line only warns here; an unknown kind must not pass unseen
        return e.message
    return None


def kserve_check(path: Path, schema: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), str(path)],
                          capture_output=True, text=True, timeout=60)


def is_kserve(doc: dict) -> bool:
    return doc["apiVersion"].startswith("serving.kserve.io/")


# --- Every file passes ---------------------------------------------------------------------------------------------

def test_deploy_has_the_objects() -> None:
    kinds = sorted(doc["kind"] for doc in all_documents())
    assert kinds == sorted(["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret",
                            "ServingRuntime", "InferenceService"])


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_passes_its_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    if any(is_kserve(doc) for doc in docs):
        # check-jsonschema checks a file as one instance: one KServe object per file.
        (doc,) = docs
        schema = KSERVE_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        assert schema is not None, f"no stored schema for {doc['apiVersion']} {doc['kind']}"
        result = kserve_check(path, schema)
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        for doc in docs:
            assert k8s_error(doc) is None, f"{path}: {k8s_error(doc)}"


# --- The checks can fail -------------------------------------------------------------------------------------------

def test_kubernetes_check_rejects_a_misspelled_field() -> None:
    bad = copy.deepcopy(find("Deployment"))
    bad["spec"]["replica"] = 2
    assert "'replica' was unexpected" in k8s_error(bad)


def test_kubernetes_check_rejects_a_wrong_type() -> None:
    bad = copy.deepcopy(find("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    assert "containerPort" in k8s_error(bad)


def test_kubernetes_check_rejects_an_unknown_kind() -> None:
    bad = dict(find("Service"), kind="Servce")
    assert k8s_error(bad) is not None


@pytest.mark.parametrize("change, expected", [
    (("runtime: aeserve", "runtme: aeserve"), "'runtme' was unexpected"),
    (("minReplicas: 2", "minReplicas: two"), "'two' is not of type 'integer'"),
    (("kind: InferenceService", "kind: ServingRuntime"), "'InferenceService' was expected"),
], ids=["misspelled field", "wrong type", "wrong kind"])
def test_kserve_check_rejects_a_bad_inference_service(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    assert change[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(change[0], change[1]))
    result = kserve_check(bad, KSERVE_SCHEMAS["serving.kserve.io/v1beta1", "InferenceService"])
    assert result.returncode == 1 and expected in result.stdout, result.stdout + result.stderr


def test_kserve_check_rejects_a_bad_serving_runtime(tmp_path: Path) -> None:
    doc = find("ServingRuntime")
    doc["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = kserve_check(bad, KSERVE_SCHEMAS["serving.kserve.io/v1alpha1", "ServingRuntime"])
    assert result.returncode == 1 and "'paht' was unexpected" in result.stdout, result.stdout + result.stderr


# --- The manifests agree with the server ---------------------------------------------------------------------------

def containers() -> dict[str, dict]:
    """The server's container in each place that runs it."""
    return {"Deployment": find("Deployment")["spec"]["template"]["spec"]["containers"][0],
            "ServingRuntime": find("ServingRuntime")["spec"]["containers"][0]}


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_refs(container: dict) -> list[dict]:
    return [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]


def probes(container: dict) -> list[dict]:
    return [container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]


def test_probes_ask_health_routes_the_server_serves() -> None:
    # Health routes need no API key, so the kubelet's probes work when one is set.
    served = {route.path for router in (health.router, v2.health_router) for route in router.routes}
    for where, container in containers().items():
        paths = {probe["path"] for probe in probes(container)}
        assert paths <= served, f"{where}: {paths - served} not among {served}"
        assert container["readinessProbe"]["httpGet"]["path"].endswith("/health/ready")
        assert container["livenessProbe"]["httpGet"]["path"].endswith("/health/live")


def container_port(container: dict, port: int | str) -> int:
    """A port as a number: named ports are looked up among the container's."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def test_ports_line_up() -> None:
    for where, container in containers().items():
        (port,) = [p["containerPort"] for p in container["ports"]]
        assert int(env_values(container)["AESERVE_PORT"]) == port, where
        assert env_values(container)["AESERVE_HOST"] == "0.0.0.0", f"{where}: the server must listen beyond the pod"
        assert {container_port(container, probe["port"]) for probe in probes(container)} == {port}, where
    deployment = containers()["Deployment"]
    (service_port,) = find("Service")["spec"]["ports"]
    assert container_port(deployment, service_port["targetPort"]) == 8000


def test_settings_are_ones_the_server_reads() -> None:
    # Settings ignore unknown AESERVE_* variables, so a misspelled one would silently change nothing.
    source = "\n".join(p.read_text() for folder in ("aeserve", "models", "service") for p in (ROOT / folder).rglob("*.py"))
    for where, container in containers().items():
        for name in (e["name"] for e in container["env"] if e["name"].startswith("AESERVE_")):
            field = name.removeprefix("AESERVE_").lower()
            assert field in Settings.model_fields or f'"{name}"' in source, f"{where}: nothing reads {name}"
    # The server's own command, flags left to the variables: the image's CMD would pass --host and --port.
    assert {tuple(c["command"]) for c in containers().values()} == {("aeserve", "serve")}
    assert not any("args" in c for c in containers().values())


def test_kubelet_waits_out_the_drain() -> None:
    grace = {"Deployment": find("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
             "ServingRuntime": find("InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]}
    for where, container in containers().items():
        env = env_values(container)
        drain = sum(float(env.get(f"AESERVE_{field.upper()}", Settings.model_fields[field].default))
                    for field in ("drain_grace_seconds", "drain_seconds"))
        assert grace[where] > drain, f"{where}: SIGKILL after {grace[where]} s cuts the {drain} s drain"


def test_secret_keys_exist_in_the_example() -> None:
    secret = documents(SECRET)[0]
    keys = set(secret["stringData"])
    users = {"Deployment": containers()["Deployment"], "InferenceService": find("InferenceService")["spec"]["predictor"]["model"]}
    for where, container in users.items():
        refs = secret_refs(container)
        assert {ref["key"] for ref in refs} >= {"AESERVE_REGISTRY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, where
        for ref in refs:
            assert ref["name"] == secret["metadata"]["name"], where
            # An optional key may be left out of the example, but the example must show it (as a comment).
            assert ref["key"] in keys or (ref.get("optional") and ref["key"] in SECRET.read_text()), f"{where}: {ref['key']}"
        assert {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})} == {ref["key"] for ref in refs}
    assert all("PLACEHOLDER" in value for value in secret["stringData"].values())


def test_objects_point_at_each_other() -> None:
    deployment = find("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert find("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = find("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"

    runtime, service = find("ServingRuntime"), find("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["v2"]
    assert "storageUri" not in model, "the server reads the registry itself (inferenceservice.yaml)"


def test_cache_is_a_writable_volume() -> None:
    for where, container in containers().items():
        pod = find(where)["spec"]
        pod = pod["template"]["spec"] if where == "Deployment" else pod
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        # The root filesystem is read-only: the cache and the ONNX export's temporary folder need volumes.
        for path in (env_values(container)["AESERVE_CACHE"], "/tmp"):
            assert mounts.get(path) in empty_dirs, f"{where}: {path} is not an emptyDir"


HAPROXY = "/usr/sbin/haproxy"


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="needs HAProxy (Debian package haproxy; .ci/run installs it)")
def test_haproxy_config_shipped_and_rendered_pass_haproxy_check(tmp_path):
    from benchmarks.haproxy import SHIPPED, haproxy_config

    rendered = tmp_path / "rendered.cfg"
    rendered.write_text(haproxy_config({"one": (18000, [18001]), "two": (18010, {"a": 18011, "b": 18012})}, stats_port=18404))
    broken = tmp_path / "broken.cfg"
    broken.write_text(SHIPPED.read_text().replace("balance roundrobin", "balance nowhere"))
    for path, ok in ((SHIPPED, True), (rendered, True), (broken, False)):
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
        assert (check.returncode == 0) == ok, (path.name, check.stdout, check.stderr)
    text = rendered.read_text()
    assert "option http-buffer-request" in text and "option redispatch 1" in text
    assert "server b 127.0.0.1:18012 check inter 200ms fall 2 rise 2" in text
