"""The Helm chart k8s/medvlm, checked offline: lint, render, schemas, and the rules schemas miss.

Rendered objects are validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
strict) and the RayService against the KubeRay v1.7.0 CRD schema (``jsonschema``, with unknown
fields rejected as the API server's pruning would silently drop them). The remaining tests pin
what neither schema can say: GPU requests equal limits, a head node with zero GPUs, image tags
matching ``rayVersion``, secrets only through ``secretKeyRef``, hardened containers, a default-deny
NetworkPolicy and nothing exposed outside the cluster, PodDisruptionBudgets that select exactly
their pods, a Prefect worker whose rendered environment loads into ``MedvlmSettings``, and a
``values.schema.json`` that matches ``values.yaml`` key for key and refuses a misspelled key.

helm comes from scripts/install-k8s-tools.sh (run here if missing); the tests skip only when it
cannot be installed.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm_chart import CHART, CI_VALUES, GPU_VALUES, ROOT, render, run_helm, template

pytestmark = pytest.mark.unit

# Vendored with its license and version (tests/k8s-crds/README.md).
KUBERAY_CRD = ROOT / "tests" / "k8s-crds" / "kuberay-v1.7.0" / "ray.io_rayservices.yaml"
VALUES_SCHEMA = CHART / "values.schema.json"
KUBERNETES_VERSION = "1.30.0"
# The values without a default (values.yaml leaves model.version empty on purpose).
MODEL_VERSION = "med-r1-2025.06"
REQUIRED = ["--set", f"model.version={MODEL_VERSION}"]
PROFILES = {
    "default": REQUIRED,
    "ci-cpu": ["-f", str(CI_VALUES)],
    "gpu-multinode": ["-f", str(GPU_VALUES)],
}
# Every optional Secret reference set, so that each secret branch of the templates renders.
ALL_SECRETS = [
    *REQUIRED,
    "--set", "serve.apiKeySecret.name=serve-api",
    "--set", "prefectWorker.apiAuthSecret.name=prefect-auth",
    "--set", "pacs.auth=basic", "--set", "pacs.username=medvlm",
    "--set", "pacs.passwordSecret.name=pacs-basic",
    "--set", "pacs.tokenSecret.name=pacs-token",
    "--set", "ehr.tokenSecret.name=ehr-token",
    "--set", "ehr.auth=smart", "--set", "ehr.smartPrivateKeySecret.name=smart-key",
    "--set", "model.weights.source=hub", "--set", "model.weights.hubId=org/model",
    "--set", "model.weights.hubTokenSecret.name=hub-token",
    "--set", "pseudonymKey.existingSecret=pseudonym",
]  # fmt: skip
SECRET_ENV = re.compile(r"PASSWORD|TOKEN|API_KEY|AUTH_STRING|SECRET|LEDGER_URL")
# Every optional feature at once: hooks, classes, GCS fault tolerance, metrics, C-MOVE.
ALL_OPTIONS = [
    *REQUIRED,
    "--set", "ray.head.runtimeClassName=kata",
    "--set", "ray.head.priorityClassName=medvlm-critical",
    "--set", "ray.gpuWorkers.runtimeClassName=nvidia",
    "--set", "ray.gpuWorkers.priorityClassName=medvlm-gpu",
    "--set", "prefectWorker.runtimeClassName=gvisor",
    "--set", "prefectWorker.priorityClassName=medvlm-worker",
    "--set", "ray.gcsFaultTolerance.enabled=true",
    "--set", "ray.gcsFaultTolerance.redisAddress=redis.redis.svc.cluster.local:6379",
    "--set", "ray.gcsFaultTolerance.redisPasswordSecret.name=ray-redis",
    "--set", "networkPolicy.redisEgress[0].namespaceSelector.kubernetes\\.io/metadata\\.name=redis",
    "--set", "networkPolicy.redisEgress[0].ports={6379}",
    "--set", "metrics.prometheusNamespaceSelector.kubernetes\\.io/metadata\\.name=monitoring",
    "--set", "metrics.prometheusPodSelector.app\\.kubernetes\\.io/name=prometheus",
    "--set", "pacs.kind=dimse", "--set", "pacs.dimseHost=pacs.hospital.internal",
    "--set", "pacs.dimseRetrieve=move",
    "--set", "pacs.storageScpService.type=NodePort",
    "--set", "pacs.storageScpService.nodePort=30104",
    "--set", "networkPolicy.pacsScpIngress={10.20.0.10/32}",
    "--set", "model.weights.provision.enabled=true",
    "--set", "model.weights.provision.volume.persistentVolumeClaim.claimName=staging",
    "--set", "model.weights.provision.sourcePath=exports/med-r1",
    "--set", "model.weights.provision.manifestFile=SHA256SUMS",
]  # fmt: skip


@pytest.fixture(scope="session", params=sorted(PROFILES))
def rendered(request: pytest.FixtureRequest, helm: str) -> list[dict[str, Any]]:
    return render(helm, *PROFILES[request.param])


@pytest.fixture(scope="session")
def rendered_with_secrets(helm: str) -> list[dict[str, Any]]:
    return render(helm, *ALL_SECRETS)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rs,) = of_kind(docs, "RayService")
    return rs


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec: Deployments, StatefulSets, (hook) Jobs, (test) Pods, and the RayService's
    head and workers."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield name, doc["spec"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{name}/{container['name']}", container, spec


# -- helm itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_chart_passes_strict_lint(helm: str, profile: str) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), *PROFILES[profile])
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_tag_not_matching_ray_version_fails_to_render(helm: str) -> None:
    done = template(helm, *REQUIRED, "--set", "ray.image.tag=2.59.0-py311-gpu")
    assert done.returncode != 0
    assert "must be ray.version" in done.stderr


def test_replica_asking_more_gpus_than_a_worker_has_fails_to_render(helm: str) -> None:
    done = template(helm, *REQUIRED, "--set", "model.tensorParallelSize=2")
    assert done.returncode != 0
    assert (
        "model.tensorParallelSize (2) GPUs per replica exceeds the GPUs of one worker pod, "
        "ray.gpuWorkers.gpus (1)"
    ) in done.stderr


# -- schemas -------------------------------------------------------------------------------------


def test_rendered_objects_validate_against_kubernetes_schemas(
    rendered: list[dict[str, Any]], rendered_with_secrets: list[dict[str, Any]]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = [d for d in rendered + rendered_with_secrets if d["kind"] != "RayService"]
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "NetworkPolicy",
        "ServiceAccount",
        "PodDisruptionBudget",
        "Job",
        "Pod",
    } <= {d["kind"] for d in objects}
    for doc in objects:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (the API server would prune them silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="session")
def rayservice_crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the KubeRay v1.7.0 RayService CRD, version v1."""
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = v1["schema"]["openAPIV3Schema"]
    return schema


@pytest.fixture(scope="session")
def rayservice_validator(rayservice_crd_schema: dict[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft7Validator(_strict(rayservice_crd_schema))


def test_rayservice_validates_against_kuberay_crd_schema(
    rendered: list[dict[str, Any]],
    rendered_with_secrets: list[dict[str, Any]],
    rayservice_validator: Any,
) -> None:
    for docs in (rendered, rendered_with_secrets):
        rs = rayservice(docs)
        assert rs["apiVersion"] == "ray.io/v1"
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in rayservice_validator.iter_errors(rs)
        ]
        assert errors == []


def test_kuberay_schema_check_rejects_a_misspelled_field(
    rendered: list[dict[str, Any]], rayservice_validator: Any
) -> None:
    rs = rayservice(rendered)
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-gpus": "0"}
    assert any("rayStartParam" in e.message for e in rayservice_validator.iter_errors(rs))


# -- what the schemas cannot say -----------------------------------------------------------------


def test_gpu_workers_request_exactly_their_gpu_limit(rendered: list[dict[str, Any]]) -> None:
    rs = rayservice(rendered)
    serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    replica_gpus = serve_config["applications"][0]["deployments"][0]["ray_actor_options"][
        "num_gpus"
    ]
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        requests = container["resources"]["requests"]
        limits = container["resources"]["limits"]
        assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
        pod_gpus = int(limits.get("nvidia.com/gpu", 0))
        assert group["rayStartParams"]["num-gpus"] == str(pod_gpus)
        assert replica_gpus <= pod_gpus
        if replica_gpus > 0:
            assert group["template"]["spec"].get("tolerations"), "GPU pods need GPU tolerations"


def test_ci_values_use_no_gpus(helm: str) -> None:
    docs = render(helm, *PROFILES["ci-cpu"])
    assert "nvidia.com/gpu" not in yaml.safe_dump(docs)
    env = {
        e["name"]: e.get("value")
        for _, c, _ in containers([rayservice(docs)])
        for e in c.get("env", [])
    }
    assert env["MEDVLM_SERVING__NUM_GPUS"] == "0"
    # A CPU worker's KV cache is a size, never a share of a NUMA node's RAM.
    assert env["MEDVLM_MODEL__KV_CACHE_BYTES"] == "256MiB"
    assert "MEDVLM_MODEL__KV_CACHE_MEMORY_FRACTION" not in env


def test_head_node_has_zero_gpus(rendered: list[dict[str, Any]]) -> None:
    head = rayservice(rendered)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replicas scheduled on the head
    for container in head["template"]["spec"]["containers"]:
        for section in ("requests", "limits"):
            assert int(container["resources"][section].get("nvidia.com/gpu", 0)) == 0


def test_ray_image_tags_match_ray_version(rendered: list[dict[str, Any]]) -> None:
    rs = rayservice(rendered)
    version = rs["spec"]["rayClusterConfig"]["rayVersion"]
    assert version == "2.60.0"
    images = [c["image"] for _, c, _ in containers([rs])]
    assert images
    for image in images:
        tag = image.rsplit(":", 1)[1]
        assert tag == version or tag.startswith(f"{version}-"), image


IMAGES_TXT = ROOT / "k8s" / "images.txt"


def _listed_images() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in IMAGES_TXT.read_text().splitlines())
    return {line for line in lines if line}


def test_images_txt_lists_exactly_the_images_the_chart_renders(helm: str) -> None:
    """k8s/images.txt is what an air-gapped site mirrors: every image of every pod the chart
    renders (defaults, the CPU-test values, every option and secret branch) is in it, and
    nothing in it is stale (each line is rendered by one of those)."""
    rendered_images: set[str] = set()
    for args in (*PROFILES.values(), ALL_OPTIONS, ALL_SECRETS):
        rendered_images |= {c["image"] for _, c, _ in containers(render(helm, *args))}
    listed = _listed_images()
    assert rendered_images - listed == set(), "rendered but not in k8s/images.txt"
    assert listed - rendered_images == set(), "in k8s/images.txt but rendered by no values"


def test_images_txt_names_the_flows_and_serving_images_of_the_containerfiles() -> None:
    """Each image the project builds (images/*/Containerfile) is listed, at the project's
    version, and the GPU serving image's tag is the chart's default."""
    project = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project is not None
    version = project.group(1)
    listed = _listed_images()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    ray = values["ray"]["image"]
    assert f"{ray['repository']}:{ray['tag']}" in listed
    assert ray["tag"].endswith(f"-medvlm{version}")
    flows = values["prefectWorker"]["image"]
    assert f"{flows['repository']}:{flows['tag']}" in listed
    assert flows["tag"] == version
    built = sorted(p.parent.name for p in (ROOT / "images").glob("*/Containerfile"))
    assert built == ["flows", "serving-cpu", "serving-gpu"]


def _module_names(path: Path) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = (
                        node.value.value if isinstance(node.value, ast.Constant) else None
                    )
    return names


def test_serve_config_names_the_cluster_app_and_its_deployment(
    rendered: list[dict[str, Any]],
) -> None:
    rs = rayservice(rendered)
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config["http_options"]["port"] == 8000
    (app,) = config["applications"]
    module, attribute = app["import_path"].split(":")
    module_file = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    assert attribute in _module_names(module_file)
    (deployment,) = app["deployments"]
    assert deployment["name"] == _module_names(ROOT / "serving" / "app.py")["DEPLOYMENT_NAME"]
    for _, container, _ in containers([rs]):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert float(env["MEDVLM_SERVING__NUM_GPUS"]) == deployment["ray_actor_options"]["num_gpus"]
        if "autoscaling_config" in deployment:  # e.g. the multi-node GPU values
            bounds = deployment["autoscaling_config"]
            assert "num_replicas" not in deployment and "MEDVLM_SERVING__NUM_REPLICAS" not in env
            assert int(env["MEDVLM_SERVING__MIN_REPLICAS"]) == bounds["min_replicas"]
            assert int(env["MEDVLM_SERVING__MAX_REPLICAS"]) == bounds["max_replicas"]
        else:
            assert int(env["MEDVLM_SERVING__NUM_REPLICAS"]) == deployment["num_replicas"]
        assert env["MEDVLM_MODEL__SOURCE"]


def test_weights_from_a_volume_are_read_only_and_never_downloaded(
    rendered: list[dict[str, Any]],
) -> None:
    rs = rayservice(rendered)
    for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-weights"]
        assert mount["readOnly"] is True
        assert env["MEDVLM_MODEL__SOURCE"].startswith(mount["mountPath"] + "/")
        assert env["HF_HUB_OFFLINE"] == "1"


def test_no_secret_values_and_secret_env_only_through_secret_key_ref(
    rendered: list[dict[str, Any]], rendered_with_secrets: list[dict[str, Any]]
) -> None:
    secret_env_seen = set()
    for docs in (rendered, rendered_with_secrets):
        assert of_kind(docs, "Secret") == [] and of_kind(docs, "ConfigMap") == []
        for name, container, _ in containers(docs):
            for env in container.get("env", []):
                if SECRET_ENV.search(env["name"]) and env["name"] != "MEDVLM_JOB__LEDGER_URL":
                    assert "value" not in env, f"{name}: {env['name']} has a literal value"
                    assert set(env["valueFrom"]) == {"secretKeyRef"}, f"{name}: {env['name']}"
                    secret_env_seen.add(env["name"])
                if env["name"] == "MEDVLM_JOB__LEDGER_URL" and "value" in env:
                    # Internal database: no password in the URL (MEDVLM_JOB__LEDGER_PASSWORD
                    # carries it, and the app sets it in escaped).
                    assert re.fullmatch(r"[^:]+://[^:@]+@[^:]+:5432/.+", env["value"]), env
                    assert "$(" not in env["value"]
            for source in container.get("envFrom", []):
                pytest.fail(f"{name}: envFrom {source} bypasses secretKeyRef")
    assert {
        "MEDVLM_SERVING__API_KEY",
        "PREFECT_API_AUTH_STRING",
        "MEDVLM_PACS__PASSWORD",
        "MEDVLM_PACS__TOKEN",
        "MEDVLM_EHR__TOKEN",
        "HF_TOKEN",
        "POSTGRES_PASSWORD",
        "MEDVLM_JOB__LEDGER_PASSWORD",
    } <= secret_env_seen


def test_external_database_url_comes_from_a_secret(helm: str) -> None:
    docs = render(
        helm,
        *REQUIRED,
        "--set", "database.internal.enabled=false",
        "--set", "database.external.urlSecret.name=ledger-db",
        "--set", "database.external.cidrs={10.30.0.5/32}",
    )  # fmt: skip
    assert of_kind(docs, "StatefulSet") == []
    ((_, worker, _),) = [c for c in containers(docs) if "prefect-worker" in c[0]]
    (url,) = [e for e in worker["env"] if e["name"] == "MEDVLM_JOB__LEDGER_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "ledger-db", "key": "url"}
    (policy,) = [
        p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("worker")
    ]
    assert {"ipBlock": {"cidr": "10.30.0.5/32"}} in [
        to for r in policy["spec"]["egress"] for to in r["to"]
    ]


def test_every_container_is_bounded_and_unprivileged(rendered: list[dict[str, Any]]) -> None:
    autoscaling = rayservice(rendered)["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    seen = 0
    for name, container, pod in containers(rendered):
        seen += 1
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container.get("resources", {}).get(section, {})), name
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True, name
        assert pod["securityContext"].get("runAsUser", ctx.get("runAsUser", 0)) != 0, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"], name
        assert ctx["readOnlyRootFilesystem"] is True, name
        # Only KubeRay's autoscaler sidecar (which KubeRay adds to the head) calls the API.
        assert pod["automountServiceAccountToken"] is (autoscaling and "/head/" in name), name
        if name.startswith(("Job/", "Pod/")):
            # Hooks and test pods: non-root like the worker, scratch space only under /tmp.
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            volumes = {v["name"]: v for v in pod["volumes"]}
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]], name
    # ray head, ray worker, prefect worker, postgresql, the setup hook Job, the helm test pod
    assert seen == 6


def test_namespace_is_default_deny_and_no_policy_allows_everything(
    rendered: list[dict[str, Any]],
) -> None:
    policies = of_kind(rendered, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1
    for policy in policies:
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction) or []:
                name = policy["metadata"]["name"]
                assert rule.get(peers_key), f"{name}: a {direction} rule without peers allows all"
                for peer in rule[peers_key]:
                    assert peer.get("ipBlock", {}).get("cidr") not in {"0.0.0.0/0", "::/0"}, name
                    assert peer != {"namespaceSelector": {}}, name


def test_network_policies_allow_only_the_planned_flows(rendered: list[dict[str, Any]]) -> None:
    by_name = {
        p["metadata"]["name"].removeprefix("medvlm-"): p["spec"]
        for p in of_kind(rendered, "NetworkPolicy")
    }
    worker_egress_ports = sorted(
        port["port"] for rule in by_name["prefect-worker"]["egress"] for port in rule["ports"]
    )
    assert worker_egress_ports == [443, 443, 4200, 5432, 8000]  # PACS, EHR, Prefect, DB, Serve
    assert "ingress" not in by_name["prefect-worker"]
    ray_ingress = by_name["ray"]["ingress"]
    ports = sorted(p["port"] for rule in ray_ingress for p in rule.get("ports", []))
    assert ports == [8000, 8265]  # Serve from the worker, dashboard from the KubeRay operator
    assert by_name["postgresql"]["egress"] == []
    (db_rule,) = by_name["postgresql"]["ingress"]
    assert db_rule["ports"] == [{"protocol": "TCP", "port": 5432}]


def test_nothing_is_exposed_outside_the_cluster(
    rendered: list[dict[str, Any]], rendered_with_secrets: list[dict[str, Any]]
) -> None:
    for docs in (rendered, rendered_with_secrets):
        assert of_kind(docs, "Ingress") == [] and of_kind(docs, "Gateway") == []
        for service in of_kind(docs, "Service"):
            assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        spec = rayservice(docs)["spec"]
        assert spec["serveService"]["spec"]["type"] == "ClusterIP"
        head = spec["rayClusterConfig"]["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)
        for _, container, _ in containers(docs):
            assert all("hostPort" not in p for p in container.get("ports", []))


# -- documentation -------------------------------------------------------------------------------


def _documented_keys(values_file: Path) -> tuple[list[str], list[str]]:
    """Dotted keys of values.yaml with a helm-docs `# --` comment, and those without one."""
    documented: list[str] = []
    missing: list[str] = []
    stack: list[tuple[int, str]] = []
    comment = False
    for line in values_file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if match is None:  # list items and block continuation lines
            comment = False
            continue
        indent, key, rest = len(match[1]), match[2], match[3].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(parent in documented for _, parent in stack):
            comment = False
            continue  # inside a documented block value (e.g. resources)
        path = f"{stack[-1][1]}.{key}" if stack else key
        is_parent = rest == ""
        if comment:
            documented.append(path)
        elif not is_parent:
            missing.append(path)
        stack.append((indent, path))
        comment = False
    return documented, missing


def test_every_value_is_documented_in_values_and_readme() -> None:
    documented, missing = _documented_keys(CHART / "values.yaml")
    assert missing == []
    assert len(documented) > 50
    readme = (CHART / "README.md").read_text()
    absent = [key for key in documented if f"| {key} |" not in readme]
    assert absent == []


def test_every_medvlm_variable_names_a_settings_field(
    rendered: list[dict[str, Any]],
    rendered_with_secrets: list[dict[str, Any]],
    rendered_with_options: list[dict[str, Any]],
) -> None:
    from pydantic import BaseModel

    from medvlm.settings import MedvlmSettings

    names = {
        env["name"]
        for docs in (rendered, rendered_with_secrets, rendered_with_options)
        for _, container, _ in containers(docs)
        for env in container.get("env", [])
        if env["name"].startswith("MEDVLM_")
        and env["name"] != "MEDVLM_CODE_DIR"  # read by prefect.yaml's pull step, not settings
    }
    assert "MEDVLM_JOB__LEDGER_URL" in names and "MEDVLM_MODEL__SOURCE" in names
    assert "MEDVLM_PACS__SCP_PORT" in names
    unknown = []
    for name in sorted(names):
        model: type[BaseModel] = MedvlmSettings
        parts = name.removeprefix("MEDVLM_").lower().split("__")
        for depth, part in enumerate(parts):
            field = model.model_fields.get(part)
            if field is None:
                unknown.append(name)
                break
            annotation = field.annotation
            if depth < len(parts) - 1:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    unknown.append(name)
                    break
                model = annotation
    assert unknown == []  # the worker would refuse to start on an unknown variable (a typo)


# -- replicas: fixed, autoscaled, spread ---------------------------------------------------------

AUTOSCALING = [
    *REQUIRED,
    "--set", "serve.autoscaling.enabled=true",
    "--set", "serve.autoscaling.minReplicas=1",
    "--set", "serve.autoscaling.maxReplicas=3",
    "--set", "serve.autoscaling.upscaleDelayS=10",
    "--set", "serve.maxReplicasPerNode=1",
    "--set", "ray.gpuWorkers.maxReplicas=3",
    "--set", "networkPolicy.kubernetesApiEgress[0].cidr=10.96.0.1/32",
    "--set", "networkPolicy.kubernetesApiEgress[0].ports={443}",
]  # fmt: skip


@pytest.fixture(scope="session", params=sorted(set(PROFILES) - {"gpu-multinode"}))
def rendered_fixed(request: pytest.FixtureRequest, helm: str) -> list[dict[str, Any]]:
    """The profiles with a fixed number of replicas (the multi-node GPU values autoscale)."""
    return render(helm, *PROFILES[request.param])


@pytest.fixture(scope="session")
def rendered_autoscaling(helm: str) -> list[dict[str, Any]]:
    return render(helm, *AUTOSCALING)


def _serve_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config = yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])
    (deployment,) = config["applications"][0]["deployments"]
    return dict(deployment)


def _serving_env(container: dict[str, Any]) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for e in container["env"]
        if e["name"].startswith("MEDVLM_SERVING__") and "value" in e
    }


@pytest.mark.parametrize("autoscaled", [False, True], ids=["fixed", "autoscaling"])
def test_serve_config_is_what_the_replicas_settings_build(
    helm: str, autoscaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment options in serveConfigV2 equal those ``serving.app`` builds from the env
    the chart gives the Ray pods, so Serve's config and the cluster app never disagree."""
    from medvlm.settings import MedvlmSettings
    from serving.app import deployment_options

    docs = render(helm, *(AUTOSCALING if autoscaled else REQUIRED))
    deployment = _serve_deployment(docs)
    deployment.pop("name")
    (_, head, _), *_ = containers([rayservice(docs)])
    for name, value in _serving_env(head).items():
        monkeypatch.setenv(name, value)
    assert deployment_options(MedvlmSettings().serving) == deployment
    assert ("autoscaling_config" in deployment) is autoscaled
    assert ("num_replicas" in deployment) is not autoscaled


def test_autoscaling_enables_kuberay_autoscaler_with_a_bounded_hardened_sidecar(
    rendered_fixed: list[dict[str, Any]],
    rendered_autoscaling: list[dict[str, Any]],
    rayservice_validator: Any,
) -> None:
    fixed = rayservice(rendered_fixed)["spec"]["rayClusterConfig"]
    assert fixed["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in fixed
    rs = rayservice(rendered_autoscaling)
    assert list(rayservice_validator.iter_errors(rs)) == []
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["resources"]["requests"] == options["resources"]["limits"]
    assert options["securityContext"]["allowPrivilegeEscalation"] is False
    assert options["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Only the head, where the autoscaler runs, gets an API token (KubeRay binds its Role to
    # the head's ServiceAccount); the workers still get none.
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    for group in cluster["workerGroupSpecs"]:
        assert group["template"]["spec"]["automountServiceAccountToken"] is False
    deployment = _serve_deployment(rendered_autoscaling)
    assert deployment["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 10,
        "downscale_delay_s": 600,
        "look_back_period_s": 30,
    }
    assert deployment["max_replicas_per_node"] == 1


def test_prefect_worker_sizes_its_concurrency_for_max_replicas(
    rendered_autoscaling: list[dict[str, Any]],
) -> None:
    from flows.services import model_capacity
    from medvlm.settings import MedvlmSettings, ServingSettings

    ((_, worker, _),) = [c for c in containers(rendered_autoscaling) if "prefect-worker" in c[0]]
    env = _serving_env(worker)
    assert "MEDVLM_SERVING__NUM_REPLICAS" not in env
    serving = {k.removeprefix("MEDVLM_SERVING__").lower(): v for k, v in env.items()}
    settings = MedvlmSettings(serving=ServingSettings.model_validate(serving))
    assert model_capacity(settings) == 3 * 16


def test_only_the_head_may_reach_the_kubernetes_api_and_only_with_autoscaling(
    rendered_fixed: list[dict[str, Any]], rendered_autoscaling: list[dict[str, Any]]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    names = {p["metadata"]["name"] for p in of_kind(rendered_fixed, "NetworkPolicy")}
    assert "medvlm-ray-autoscaler" not in names
    (policy,) = [
        p
        for p in of_kind(rendered_autoscaling, "NetworkPolicy")
        if p["metadata"]["name"] == "medvlm-ray-autoscaler"
    ]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    assert policy["spec"]["podSelector"]["matchLabels"]["medvlm.io/ray-node"] == "head"
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            [
                "--set",
                "serve.autoscaling.minReplicas=3",
                "--set",
                "serve.autoscaling.maxReplicas=2",
            ],
            "serve.autoscaling.minReplicas (3) exceeds serve.autoscaling.maxReplicas (2)",
        ),
        (
            ["--set", "serve.autoscaling.targetOngoingRequests=32"],
            "targetOngoingRequests (32) exceeds serve.maxOngoingRequests (16)",
        ),
        ([], "set networkPolicy.kubernetesApiEgress"),
    ],
)
def test_inconsistent_autoscaling_values_fail_to_render(
    helm: str, values: list[str], message: str
) -> None:
    egress = [] if not values else AUTOSCALING[-4:]
    done = template(helm, *REQUIRED, "--set", "serve.autoscaling.enabled=true", *egress, *values)
    assert done.returncode != 0
    assert message in done.stderr


def test_the_prefect_worker_tells_prefect_yamls_pull_step_where_the_code_is(
    rendered: list[dict[str, Any]],
) -> None:
    pull = yaml.safe_load((CHART.parents[1] / "prefect.yaml").read_text())["pull"]
    (step,) = [s["prefect.deployments.steps.set_working_directory"] for s in pull]
    assert step["directory"] == "{{ $MEDVLM_CODE_DIR }}"
    ((_, worker, _),) = [c for c in containers(rendered) if "prefect-worker" in c[0]]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["MEDVLM_CODE_DIR"] == "/opt/medvlm-pipeline"


# -- the model version: required, one value for the Ray pods and the worker ----------------------


def test_empty_model_version_fails_template_and_lint_naming_the_value(helm: str) -> None:
    done = template(helm)
    assert done.returncode != 0
    assert "/model/version" in done.stderr  # values.schema.json: minLength 1
    # Without the schema (--skip-schema-validation), the templates' `required` says why.
    done = template(helm, "--skip-schema-validation")
    assert done.returncode != 0
    assert "model.version is required" in done.stderr
    assert "MEDVLM_MODEL__VERSION" in done.stderr
    # Helm 4's lint only logs `required` and `fail`; the schema makes it fail.
    done = run_helm(helm, "lint", "--strict", str(CHART))
    assert done.returncode != 0
    assert "/model/version" in done.stdout + done.stderr


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_model_version_reaches_the_ray_pods_and_the_worker(helm: str, profile: str) -> None:
    expected = {
        "default": MODEL_VERSION,
        "ci-cpu": yaml.safe_load(CI_VALUES.read_text())["model"]["version"],
        "gpu-multinode": yaml.safe_load(GPU_VALUES.read_text())["model"]["version"],
    }[profile]
    assert expected
    seen = set()
    for name, container, _ in containers(render(helm, *PROFILES[profile])):
        if "postgresql" in name or name.startswith(("Job/", "Pod/")):
            continue
        assert _env(container)["MEDVLM_MODEL__VERSION"] == expected, name
        seen.add(container["name"])
    assert seen == {"ray-head", "ray-worker", "prefect-worker"}


def _worker(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Prefect worker's container and pod spec."""
    ((_, container, pod),) = [c for c in containers(docs) if "prefect-worker" in c[0]]
    return container, pod


def _worker_settings_env(
    container: dict[str, Any], pod: dict[str, Any], files: Path
) -> dict[str, str]:
    """The MEDVLM_* variables the worker's container gets, as the kubelet would set them: a
    secretKeyRef becomes a fake value, $(VAR) references are expanded, and a path into a mounted
    Secret is moved under ``files``, where the file the Secret's items name is written (fake)."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = f"fake-{ref['name']}-{ref['key']}"
        else:
            env[entry["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env[m.group(1)], str(entry["value"])
            )
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name, value in env.items():
        for mount in container.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret")
            if secret is None or not value.startswith(mount["mountPath"] + "/"):
                continue
            relative = value.removeprefix(mount["mountPath"] + "/")
            assert mount["readOnly"] is True, mount
            assert relative in [item["path"] for item in secret["items"]], (name, secret)
            path = files / mount["name"] / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"fake {secret['secretName']} {relative} of a site\n")
            env[name] = str(path)
    return {k: v for k, v in env.items() if k.startswith("MEDVLM_")}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_worker_environment_loads_into_settings_with_a_remote_model_identity(
    helm: str, profile: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker's rendered env, as the pod gets it, loads through ``MedvlmSettings()``'s own
    environment loading, and the model identity of an ``http`` endpoint (which needs the model
    version) and the pseudonym key (read from the mounted Secret file) resolve from it."""
    from flows.services import model_identity
    from medvlm.settings import MedvlmSettings

    docs = render(helm, *PROFILES[profile], "--set", "pseudonymKey.existingSecret=site-key")
    container, pod = _worker(docs)
    env = _worker_settings_env(container, pod, tmp_path)
    env["MEDVLM_JOB__LEDGER_PASSWORD"] = "p@ss:w/rd%"  # what a generated Secret may hold
    for name in list(os.environ):
        if name.startswith("MEDVLM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = MedvlmSettings()
    identity, local_source = model_identity(settings)
    assert settings.job.model_endpoint == "http" and local_source is None
    assert identity.version == env["MEDVLM_MODEL__VERSION"]
    assert identity.name == settings.model.served_name
    key_file = Path(env["MEDVLM_JOB__PSEUDONYM_KEY_FILE"])
    assert key_file.is_relative_to(tmp_path)
    assert settings.job.pseudonym_key_bytes() == key_file.read_text().strip().encode()
    # The ledger's password is set into its URL by the app, escaped.
    from sqlalchemy.engine import make_url

    assert settings.job.ledger_url is not None
    ledger = make_url(settings.job.ledger_url)
    assert ledger.password == "p@ss:w/rd%"
    assert ledger._replace(password=None) == make_url(env["MEDVLM_JOB__LEDGER_URL"])


# -- the pseudonym key ---------------------------------------------------------------------------


def test_pseudonym_key_secret_is_mounted_read_only_into_the_worker_only(helm: str) -> None:
    docs = render(
        helm, *REQUIRED,
        "--set", "pseudonymKey.existingSecret=site-key", "--set", "pseudonymKey.key=hmac",
    )  # fmt: skip
    container, pod = _worker(docs)
    assert _env(container)["MEDVLM_JOB__PSEUDONYM_KEY_FILE"] == "/etc/medvlm/pseudonym/hmac"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/medvlm/pseudonym"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {
        "secretName": "site-key",
        "defaultMode": 0o440,  # the pod's fsGroup reads it; nobody writes it
        "items": [{"key": "hmac", "path": "hmac"}],
    }
    # The Ray pods never HMAC patient identifiers: no key there.
    for name, spec in pod_specs([rayservice(docs)]):
        assert "site-key" not in yaml.safe_dump(spec), name
        assert "PSEUDONYM" not in yaml.safe_dump(spec), name
    # Unset: no variable, no volume (the settings fall back to plain SHA-256).
    container, pod = _worker(render(helm, *REQUIRED))
    assert "MEDVLM_JOB__PSEUDONYM_KEY_FILE" not in _env(container)
    assert "pseudonym" not in yaml.safe_dump(pod)


# -- GPUs per replica and the GPUs of the worker group -------------------------------------------


@pytest.mark.parametrize(
    ("values", "gpus"),
    [
        (["--set", "model.tensorParallelSize=2", "--set", "ray.gpuWorkers.gpus=2"], 2),
        (["--set", "model.tensorParallelSize=4", "--set", "ray.gpuWorkers.gpus=8"], 4),
        (["-f", str(CI_VALUES), "--set", "model.tensorParallelSize=2"], 0),  # a CPU group
    ],
)
def test_replica_gpus_are_the_tensor_parallel_size(
    helm: str, values: list[str], gpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medvlm.settings import MedvlmSettings
    from serving.app import deployment_options

    docs = render(helm, *REQUIRED, *values)
    deployment = _serve_deployment(docs)
    assert deployment["ray_actor_options"]["num_gpus"] == gpus
    for _, container, _ in containers([rayservice(docs)]):
        assert _env(container)["MEDVLM_SERVING__NUM_GPUS"] == str(gpus)
    # What cluster_app builds from that env asks the same.
    (_, head, _), *_ = containers([rayservice(docs)])
    for name, value in _serving_env(head).items():
        monkeypatch.setenv(name, value)
    assert deployment_options(MedvlmSettings().serving)["ray_actor_options"]["num_gpus"] == gpus


GPU_GROUP_TOO_SMALL = [
    (
        ["--set", "serve.numReplicas=2"],
        "serve.numReplicas (2) replicas x model.tensorParallelSize (1) need 2 GPUs, more than "
        "the GPU worker group has: ray.gpuWorkers.replicas (1) pods x ray.gpuWorkers.gpus (1) "
        "= 1 GPUs",
    ),
    (
        [
            "--set", "serve.numReplicas=2", "--set", "model.tensorParallelSize=2",
            "--set", "ray.gpuWorkers.gpus=2",
        ],
        "need 4 GPUs, more than the GPU worker group has: ray.gpuWorkers.replicas (1) pods x "
        "ray.gpuWorkers.gpus (2) = 2 GPUs",
    ),
    (
        [*AUTOSCALING, "--set", "serve.autoscaling.maxReplicas=4"],
        "serve.autoscaling.maxReplicas (4) replicas x model.tensorParallelSize (1) need 4 GPUs, "
        "more than the GPU worker group has: ray.gpuWorkers.maxReplicas (3) pods",
    ),
    (  # enough GPUs in all, but a pod of 3 GPUs holds one replica of 2
        [
            "--set", "serve.numReplicas=3", "--set", "model.tensorParallelSize=2",
            "--set", "ray.gpuWorkers.gpus=3", "--set", "ray.gpuWorkers.replicas=2",
            "--set", "ray.gpuWorkers.maxReplicas=2",
        ],
        "serve.numReplicas (3) replicas do not fit in the GPU worker group: one pod holds 1 "
        "replicas",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("values", "message"), GPU_GROUP_TOO_SMALL)
def test_replicas_needing_more_gpus_than_the_worker_group_has_fail_to_render(
    helm: str, values: list[str], message: str
) -> None:
    done = template(helm, *REQUIRED, *values)
    assert done.returncode != 0
    assert message in done.stderr


@pytest.mark.parametrize(
    "values",
    [
        ["--set", "serve.numReplicas=2", "--set", "ray.gpuWorkers.replicas=2",
         "--set", "ray.gpuWorkers.maxReplicas=2"],
        ["--set", "serve.numReplicas=2", "--set", "model.tensorParallelSize=2",
         "--set", "ray.gpuWorkers.gpus=4"],
        # Autoscaling counts the group's maxReplicas, not the pods it starts with.
        [*AUTOSCALING, "--set", "ray.gpuWorkers.replicas=1"],
        # A CPU group asks no GPUs: only CPUs bound its replicas.
        ["-f", str(CI_VALUES), "--set", "serve.numReplicas=4"],
    ],
)  # fmt: skip
def test_replicas_that_fit_the_worker_group_render(helm: str, values: list[str]) -> None:
    docs = render(helm, *REQUIRED, *values)
    assert _serve_deployment(docs)["ray_actor_options"]["num_gpus"] in {0, 1, 2}


# -- RayService upgrades -------------------------------------------------------------------------


def test_upgrade_strategy_defaults_to_none_and_validates_against_the_crd(
    helm: str,
    rendered: list[dict[str, Any]],
    rayservice_crd_schema: dict[str, Any],
    rayservice_validator: Any,
) -> None:
    field = rayservice_crd_schema["properties"]["spec"]["properties"]["upgradeStrategy"]
    assert field["properties"]["type"]["type"] == "string"
    # A fixed GPU cluster: no second cluster during an upgrade (both profiles).
    assert rayservice(rendered)["spec"]["upgradeStrategy"] == {"type": "None"}
    rs = rayservice(render(helm, *REQUIRED, "--set", "ray.upgradeStrategy.type=NewCluster"))
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert list(rayservice_validator.iter_errors(rs)) == []
    # The strict CRD check would catch a misspelled field under upgradeStrategy.
    rs["spec"]["upgradeStrategy"]["typ"] = "None"
    assert any("typ" in e.message for e in rayservice_validator.iter_errors(rs))


@pytest.mark.parametrize("kind", ["NewClusterWithIncrementalUpgrade", "Recreate", "none"])
def test_unsupported_upgrade_strategy_fails_to_render(helm: str, kind: str) -> None:
    done = template(helm, *REQUIRED, "--set", f"ray.upgradeStrategy.type={kind}")
    assert done.returncode != 0
    assert "/ray/upgradeStrategy/type" in done.stderr
    done = template(
        helm, *REQUIRED, "--skip-schema-validation", "--set", f"ray.upgradeStrategy.type={kind}"
    )
    assert done.returncode != 0
    assert "ray.upgradeStrategy.type must be None or NewCluster" in done.stderr


# -- PodDisruptionBudgets ------------------------------------------------------------------------


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str]]]:
    """Every pod template's (or test pod's) name and labels."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield name, doc["spec"]["template"]["metadata"]["labels"]
        elif doc["kind"] == "Pod":
            yield name, doc["metadata"]["labels"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["metadata"]["labels"]


def test_disruption_budgets_select_exactly_their_pods(rendered: list[dict[str, Any]]) -> None:
    pods = dict(pod_templates(rendered))
    group = rayservice(rendered)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    expected = {
        "medvlm-prefect-worker": ["Deployment/medvlm-prefect-worker"],
        f"medvlm-ray-{group}-workers": [f"RayService/medvlm/{group}"],  # not the head
    }
    budgets = {b["metadata"]["name"]: b["spec"] for b in of_kind(rendered, "PodDisruptionBudget")}
    assert set(budgets) == set(expected)
    for name, spec in budgets.items():
        selector = spec["selector"]["matchLabels"]
        assert set(spec["selector"]) == {"matchLabels"}
        selected = [pod for pod, labels in pods.items() if selector.items() <= labels.items()]
        assert selected == expected[name], name
        # The selector labels are a subset of the pod template labels.
        for pod in expected[name]:
            assert selector.items() <= pods[pod].items()
        assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec, name


def test_disruption_budget_values(helm: str) -> None:
    budgets = {
        b["metadata"]["name"]: b["spec"]
        for b in of_kind(
            render(
                helm, *REQUIRED,
                "--set", "prefectWorker.replicas=3",
                "--set", "prefectWorker.podDisruptionBudget.minAvailable=2",
                "--set", "prefectWorker.podDisruptionBudget.maxUnavailable=",
                "--set", "ray.gpuWorkers.podDisruptionBudget.maxUnavailable=50%",
            ),
            "PodDisruptionBudget",
        )
    }  # fmt: skip
    assert budgets["medvlm-prefect-worker"]["minAvailable"] == 2
    assert "maxUnavailable" not in budgets["medvlm-prefect-worker"]
    assert budgets["medvlm-ray-gpu-workers"]["maxUnavailable"] == "50%"
    docs = render(
        helm, *REQUIRED,
        "--set", "prefectWorker.podDisruptionBudget.enabled=false",
        "--set", "ray.gpuWorkers.podDisruptionBudget.enabled=false",
    )  # fmt: skip
    assert of_kind(docs, "PodDisruptionBudget") == []
    docs = render(helm, *REQUIRED, "--set", "prefectWorker.enabled=false")
    assert [b["metadata"]["name"] for b in of_kind(docs, "PodDisruptionBudget")] == [
        "medvlm-ray-gpu-workers"
    ]
    done = template(helm, *REQUIRED, "--set", "prefectWorker.podDisruptionBudget.minAvailable=1")
    assert done.returncode != 0
    assert "prefectWorker.podDisruptionBudget: set minAvailable or maxUnavailable, not both" in (
        done.stderr
    )


# -- NOTES.txt -----------------------------------------------------------------------------------


def notes(helm: str, *args: str) -> str:
    """The release notes ``helm install`` prints (client-side dry run: no cluster)."""
    done = run_helm(
        helm, "install", "medvlm", str(CHART), "--namespace", "medvlm", "--dry-run=client", *args
    )
    assert done.returncode == 0, done.stderr
    assert "NOTES:" in done.stdout
    return done.stdout.split("NOTES:", 1)[1]


@pytest.mark.parametrize(
    "values",
    [
        PROFILES["default"],
        PROFILES["ci-cpu"],
        ALL_SECRETS,
        AUTOSCALING,
        [*REQUIRED, "--set", "prefectWorker.enabled=false",
         "--set", "database.internal.enabled=false",
         "--set", "ray.upgradeStrategy.type=NewCluster"],
        ALL_OPTIONS,
    ],
    ids=["default", "ci-cpu", "all-secrets", "autoscaling", "no-worker", "all-options"],
)  # fmt: skip
def test_notes_render_what_was_installed_and_the_next_steps(helm: str, values: list[str]) -> None:
    text = notes(helm, *values)
    docs = render(helm, *values)
    rs = rayservice(docs)
    # KubeRay's stable head Service of a RayService is `<name>-head-svc`.
    assert f"port-forward svc/{rs['metadata']['name']}-head-svc 8265:8265" in text
    assert f"get rayservice {rs['metadata']['name']}" in text
    tested = bool(of_kind(docs, "Pod"))
    assert ("helm test medvlm -n medvlm --logs" in text) is tested
    assert "helm test" in text  # without the test pod: what to check instead
    version = _env(next(c for _, c, _ in containers([rs])))["MEDVLM_MODEL__VERSION"]
    assert f'version "{version}"' in text
    if of_kind(docs, "Deployment"):
        assert "https://ehr.hospital.internal/fhir/R4" in text  # where the drafts go
        assert "preliminary" in text
    else:
        assert "Prefect worker" not in text
    pseudonym_set = "pseudonymKey.existingSecret=pseudonym" in values
    assert ("pseudonymKey.existingSecret is not set" in text) is not pseudonym_set
    upgrade = rs["spec"]["upgradeStrategy"]["type"]
    assert ("delete raycluster" in text) is (upgrade == "None")
    kinds = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    assert ("Setup hook Job medvlm-setup" in text) is ("Job/medvlm-setup" in kinds)
    assert ("Service medvlm-dicom-scp (NodePort" in text) is ("Service/medvlm-dicom-scp" in kinds)
    provision = "Job/medvlm-weights-provision" in kinds
    assert ("verified every file's sha256" in text) is provision


# -- values.schema.json --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def values_schema() -> dict[str, Any]:
    schema: dict[str, Any] = yaml.safe_load(VALUES_SCHEMA.read_text())  # JSON is YAML
    return schema


def _key_paths(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in values.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _key_paths(value, (*prefix, key))


def _declared(schema: dict[str, Any], path: tuple[str, ...]) -> str:
    """How the schema takes the key ``path``: "declared" (named in `properties` at every level),
    "free" (inside a declared free-form mapping, e.g. labels or resources' entries) or
    "refused"."""
    node = schema
    for key in path:
        if key in node.get("properties", {}):
            node = node["properties"][key]
            continue
        extra = node.get("additionalProperties", "properties" not in node)
        return "refused" if extra is False else "free"
    return "declared"


def _schema_paths(
    schema: dict[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for key, sub in schema.get("properties", {}).items():
        yield (*prefix, key)
        yield from _schema_paths(sub, (*prefix, key))


def _objects(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if "properties" in schema:
        yield path or "(top level)", schema
    for key, sub in schema.get("properties", {}).items():
        yield from _objects(sub, f"{path}.{key}".lstrip("."))


def test_values_schema_declares_every_key_of_values_yaml(values_schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(values_schema)
    # The one value without a default: the schema refuses it empty.
    assert [(list(e.absolute_path), e.validator) for e in validator.iter_errors(values)] == [
        (["model", "version"], "minLength")
    ]
    values["model"]["version"] = MODEL_VERSION
    assert [e.message for e in validator.iter_errors(values)] == []
    paths = list(_key_paths(values))
    assert len(paths) > 150
    undeclared = [".".join(p) for p in paths if _declared(values_schema, p) == "refused"]
    assert undeclared == []
    # Every key the schema names is one values.yaml has (a schema that drifted from the values).
    stale = [".".join(p) for p in _schema_paths(values_schema) if p not in set(paths)]
    assert stale == []
    # The walk can fail: a misspelled key is refused, a label under commonLabels is free.
    assert _declared(values_schema, ("prefectWorkr", "replicas")) == "refused"
    assert _declared(values_schema, ("serve", "autoscaling", "maxReplica")) == "refused"
    assert _declared(values_schema, ("commonLabels", "team")) == "free"


def test_values_schema_closes_every_section(values_schema: dict[str, Any]) -> None:
    assert values_schema["additionalProperties"] is False
    open_sections = [
        path
        for path, node in _objects(values_schema)
        if node.get("additionalProperties") is not False
    ]
    assert open_sections == []
    for section in ("ray", "serve", "model", "prefectWorker", "pseudonymKey", "networkPolicy"):
        assert values_schema["properties"][section]["additionalProperties"] is False


@pytest.mark.parametrize(
    ("setting", "refused"),
    [
        ("prefectWorkr.replicas=5", "additional properties 'prefectWorkr' not allowed"),
        ("prefectWorker.replica=5", "additional properties 'replica' not allowed"),
        ("ray.gpuWorkers.gpu=2", "additional properties 'gpu' not allowed"),
        ("serve.numGpusPerReplica=2", "additional properties 'numGpusPerReplica' not allowed"),
        ("pseudonymKey.existingSecrets=x", "additional properties 'existingSecrets' not allowed"),
        ("prefectWorker.podDisruptionBudget.maxUnavailable=-1", "/maxUnavailable"),
        ("model.weights.source=s3", "/model/weights/source"),
        ("model.weights.provision.source=s3", "/model/weights/provision/source"),
        ("pacs.dimseRetrieve=moov", "/pacs/dimseRetrieve"),
        ("pacs.storageScpService.type=ExternalName", "/pacs/storageScpService/type"),
        ("metrics.prometheusPodSelectors.app=x", "'prometheusPodSelectors' not allowed"),
        ("setupJob.enable=false", "additional properties 'enable' not allowed"),
    ],
)
def test_values_schema_refuses_a_misspelled_or_invalid_value(
    helm: str, setting: str, refused: str
) -> None:
    done = template(helm, *REQUIRED, "--set", setting)
    assert done.returncode != 0
    assert refused in done.stderr


# -- every optional feature at once ---------------------------------------------------------------


@pytest.fixture(scope="session")
def rendered_with_options(helm: str) -> list[dict[str, Any]]:
    return render(helm, *ALL_OPTIONS)


def test_every_optional_feature_validates_against_kubernetes_and_kuberay_schemas(
    rendered_with_options: list[dict[str, Any]], rayservice_validator: Any
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = rendered_with_options
    names = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    assert {
        "Job/medvlm-setup",
        "Job/medvlm-weights-provision",
        "Pod/medvlm-test",
        "Service/medvlm-dicom-scp",
        "NetworkPolicy/medvlm-ray-gcs-redis",
    } <= names
    for doc in docs:
        if doc["kind"] == "RayService":
            errors = [e.message for e in rayservice_validator.iter_errors(doc)]
            assert errors == []
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_every_container_of_the_optional_features_is_bounded_and_unprivileged(
    rendered_with_options: list[dict[str, Any]],
) -> None:
    seen = set()
    for name, container, pod in containers(rendered_with_options):
        seen.add(name)
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][section]), name
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}, name
        assert pod["automountServiceAccountToken"] is False, name
    assert "Job/medvlm-weights-provision/provision" in seen


# -- the setup hook Job: ledger migration, then the Prefect deployments --------------------------


def _setup_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [j for j in of_kind(docs, "Job") if j["metadata"]["name"] == "medvlm-setup"]
    return job


def _ledger_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in container["env"] if e["name"].startswith("MEDVLM_JOB__LEDGER_")]


def test_setup_job_is_a_post_install_hook_that_migrates_the_ledger_then_deploys(
    rendered: list[dict[str, Any]],
) -> None:
    from typer.testing import CliRunner

    from medvlm.cli import app

    job = _setup_job(rendered)
    assert job["metadata"]["annotations"] == {
        "helm.sh/hook": "post-install,post-upgrade",
        "helm.sh/hook-weight": "0",
        "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    script = container["command"][-1]
    migrate = script.index("until medvlm db upgrade; do")
    deploy = script.index('prefect --no-prompt deploy --all --prefect-file "$deploy_file"')
    assert migrate < script.index('cd "$MEDVLM_CODE_DIR"') < deploy
    # The command the Job runs is the CLI's: `medvlm db upgrade` exists.
    done = CliRunner().invoke(app, ["db", "upgrade", "--help"])
    assert done.exit_code == 0 and "Migrate the ledger" in done.output
    # Same image and Prefect API as the worker, which runs the deployments' flows.
    worker, _ = _worker(rendered)
    assert container["image"] == worker["image"]
    env = _env(container)
    assert env["PREFECT_API_URL"] == _env(worker)["PREFECT_API_URL"]
    assert env["MEDVLM_CODE_DIR"] == _env(worker)["MEDVLM_CODE_DIR"]
    assert env["WORK_POOL_NAME"] == worker["args"][worker["args"].index("--pool") + 1]


@pytest.mark.parametrize(
    "values",
    [
        ALL_SECRETS,
        [
            *REQUIRED,
            "--set", "database.internal.enabled=false",
            "--set", "database.external.urlSecret.name=ledger-db",
            "--set", "database.external.cidrs={10.30.0.5/32}",
        ],
    ],
    ids=["internal-db", "external-db"],
)  # fmt: skip
def test_setup_job_and_helm_test_get_the_workers_ledger_env(helm: str, values: list[str]) -> None:
    docs = render(helm, *values)
    worker, _ = _worker(docs)
    ledger = _ledger_env(worker)
    assert ledger
    (setup,) = _setup_job(docs)["spec"]["template"]["spec"]["containers"]
    ((test_pod,),) = [p["spec"]["containers"] for p in of_kind(docs, "Pod")]
    for container in (setup, test_pod):
        assert _ledger_env(container) == ledger
    auth = [e for e in worker["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert [e for e in setup["env"] if e["name"] == "PREFECT_API_AUTH_STRING"] == auth


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run_setup_script(
    job: dict[str, Any], tmp_path: Path, *, migration_failures: int
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The setup Job's shell script, run here with stand-ins for `medvlm`, `prefect` and `sleep`
    that log their calls (and prefect.yaml's deploy file), in a copy of the code directory."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["sh", "-c"]
    bin_dir, code_dir = tmp_path / "bin", tmp_path / "code"
    bin_dir.mkdir()
    code_dir.mkdir()
    shutil.copy(ROOT / "prefect.yaml", code_dir / "prefect.yaml")
    log = tmp_path / "calls.log"
    _stub(
        bin_dir, "medvlm",
        f'echo "medvlm $*" >> {log}\n'
        f'n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/count\n'
        f'[ "$n" -ge {migration_failures} ]\n',
    )  # fmt: skip
    _stub(
        bin_dir, "prefect",
        f'echo "prefect $* (in $PWD)" >> {log}\n'
        '[ "$2" = inspect ] && exit 1\n'  # the work pool does not exist yet
        f'if [ "$2" = deploy ]; then cp "$5" {tmp_path}/deployed.yaml; fi\n',
    )  # fmt: skip
    _stub(bin_dir, "sleep", f'echo "sleep $*" >> {log}\n')
    (bin_dir / "python").symlink_to(sys.executable)
    env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        MEDVLM_CODE_DIR=str(code_dir),
        TMPDIR=str(tmp_path),
        HOME=str(tmp_path),
    )
    done = subprocess.run(
        ["sh", "-c", container["command"][2]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return done, calls


def test_setup_script_migrates_with_retries_then_registers_prefect_yaml_in_the_pool(
    helm: str, tmp_path: Path
) -> None:
    docs = render(helm, *REQUIRED, "--set", "prefectWorker.pool=radiology")
    done, calls = _run_setup_script(_setup_job(docs), tmp_path, migration_failures=2)
    assert done.returncode == 0, done.stderr
    code = tmp_path / "code"
    assert calls == [
        "medvlm db upgrade",
        "sleep 10",
        "medvlm db upgrade",
        "sleep 10",
        "medvlm db upgrade",
        f"prefect work-pool inspect radiology (in {tmp_path})",
        f"prefect work-pool create radiology --type process (in {tmp_path})",
        f"prefect --no-prompt deploy --all --prefect-file {tmp_path}/prefect-deploy.yaml"
        f" (in {code})",
    ]
    # The deployments registered are prefect.yaml's, each in the release's work pool.
    original = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployed = yaml.safe_load((tmp_path / "deployed.yaml").read_text())
    assert [d["work_pool"]["name"] for d in deployed["deployments"]] == ["radiology"] * len(
        original["deployments"]
    )
    for deployment in original["deployments"]:
        deployment["work_pool"]["name"] = "radiology"
    assert deployed == original


def test_setup_script_fails_without_deploying_when_the_migration_keeps_failing(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    done, calls = _run_setup_script(_setup_job(rendered), tmp_path, migration_failures=1000)
    assert done.returncode != 0
    assert calls.count("medvlm db upgrade") == 30
    assert not [c for c in calls if c.startswith("prefect")]
    assert "the ledger migration failed 30 times" in done.stderr


def test_setup_job_toggles(helm: str, tmp_path: Path) -> None:
    docs = render(helm, *REQUIRED, "--set", "setupJob.registerDeployments=false")
    done, calls = _run_setup_script(_setup_job(docs), tmp_path, migration_failures=0)
    assert done.returncode == 0, done.stderr
    assert calls == ["medvlm db upgrade"]
    policy = _policies(docs)["setup"]
    assert [p["port"] for r in policy["egress"] for p in r["ports"]] == [5432]  # no Prefect API
    for values in (["--set", "setupJob.enabled=false"], ["--set", "prefectWorker.enabled=false"]):
        docs = render(helm, *REQUIRED, *values)
        assert "Job/medvlm-setup" not in [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
        assert "setup" not in _policies(docs)
        assert "component: setup" not in yaml.safe_dump(docs)


# -- NetworkPolicy reachability ------------------------------------------------------------------


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        p["metadata"]["name"].removeprefix("medvlm-"): p["spec"]
        for p in of_kind(docs, "NetworkPolicy")
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def _peer_matches(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    """A peer of the release's namespace (podSelector only) that selects a pod with ``labels``."""
    return set(peer) == {"podSelector"} and _selects(peer["podSelector"], labels)


def allowed(docs: list[dict[str, Any]], source: str, target: str, port: int) -> bool:
    """Whether the policies let pod ``source`` open TCP ``port`` on pod ``target`` (both pod
    template names of ``pod_templates``): an egress rule of a policy selecting the source and
    an ingress rule of a policy selecting the target must both allow it."""
    pods = dict(pod_templates(docs))
    src, dst = pods[source], pods[target]

    def allows(direction: str, selected: dict[str, str], peer_labels: dict[str, str]) -> bool:
        key = "to" if direction == "egress" else "from"
        return any(
            any(_peer_matches(peer, peer_labels) for peer in rule[key])
            and {"protocol": "TCP", "port": port} in rule["ports"]
            for policy in of_kind(docs, "NetworkPolicy")
            if _selects(policy["spec"]["podSelector"], selected)
            for rule in policy["spec"].get(direction) or []
        )

    return allows("egress", src, dst) and allows("ingress", dst, src)


def test_network_policies_let_the_helm_test_and_setup_pods_reach_only_their_services(
    rendered: list[dict[str, Any]],
) -> None:
    group = rayservice(rendered)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    serve, db = f"RayService/medvlm/{group}", "StatefulSet/medvlm-postgresql"
    worker, setup, test = (
        "Deployment/medvlm-prefect-worker",
        "Job/medvlm-setup",
        "Pod/medvlm-test",
    )
    # The checker sees what it should: the worker's own flows, and nothing the Ray pods lack.
    assert allowed(rendered, worker, serve, 8000) and allowed(rendered, worker, db, 5432)
    assert not allowed(rendered, serve, db, 5432)
    assert allowed(rendered, test, serve, 8000)
    assert allowed(rendered, test, db, 5432)
    assert allowed(rendered, setup, db, 5432)
    assert not allowed(rendered, setup, serve, 8000)
    assert not allowed(rendered, test, "RayService/medvlm/head", 8265)
    policies = _policies(rendered)
    # The test pod calls nothing else; the setup Job adds the Prefect API (from values).
    assert sorted(p["port"] for r in policies["test"]["egress"] for p in r["ports"]) == [
        5432,
        8000,
    ]
    assert sorted(p["port"] for r in policies["setup"]["egress"] for p in r["ports"]) == [
        4200,
        5432,
    ]
    for name in ("test", "setup"):
        assert "ingress" not in policies[name]  # nothing calls them
    # DNS: the instance-wide policy selects them too.
    pods = dict(pod_templates(rendered))
    for pod in (test, setup):
        assert _selects(policies["dns-egress"]["podSelector"], pods[pod])


# -- helm test -----------------------------------------------------------------------------------


def _test_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = of_kind(docs, "Pod")
    return pod


def test_helm_test_pod_checks_serve_and_the_ledger_where_the_worker_reaches_them(
    rendered_with_secrets: list[dict[str, Any]], helm: str
) -> None:
    pod = _test_pod(rendered_with_secrets)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    worker, _ = _worker(rendered_with_secrets)
    model_env = {
        "MEDVLM_JOB__MODEL_ENDPOINT",
        "MEDVLM_JOB__MODEL_URL",
        "MEDVLM_MODEL__SERVED_NAME",
        "MEDVLM_SERVING__API_KEY",
    }
    assert [e for e in container["env"] if e["name"] in model_env] == [
        e for e in worker["env"] if e["name"] in model_env
    ]
    assert _env(container)["MEDVLM_JOB__MODEL_URL"] == "http://medvlm-serve-svc:8000"
    assert container["image"] == worker["image"]
    for values in (["--set", "tests.enabled=false"], ["--set", "prefectWorker.enabled=false"]):
        docs = render(helm, *REQUIRED, *values)
        assert of_kind(docs, "Pod") == [] and "test" not in _policies(docs)


class _ModelService:
    """A stand-in for Serve's ``GET /v1/models`` on loopback."""

    def __init__(self, served: str, api_key: str | None) -> None:
        outer = self
        self.requests: list[tuple[str, str | None]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                outer.requests.append((self.path, auth))
                if api_key is not None and auth != f"Bearer {api_key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path != "/v1/models":
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"object": "list", "data": [{"id": served}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_helm_test(
    pod: dict[str, Any], tmp_path: Path, model_url: str, ledger_url: str
) -> subprocess.CompletedProcess[str]:
    """The test pod's script, run here with the pod's env: secrets faked as in the kubelet,
    the Serve URL and the ledger replaced by local ones."""
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    for entry in container["env"]:
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = f"fake-{ref['name']}-{ref['key']}"
        else:
            env[entry["name"]] = str(entry["value"])
    env.pop("MEDVLM_JOB__LEDGER_PASSWORD")
    env.update(
        HOME=str(tmp_path),
        MEDVLM_HOME=str(tmp_path / "medvlm"),
        MEDVLM_JOB__MODEL_URL=model_url,
        MEDVLM_JOB__LEDGER_URL=ledger_url,
        CHECK_TIMEOUT_S="5",
    )
    return subprocess.run(
        [sys.executable, "-c", container["command"][2]],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_helm_test_script_passes_only_when_the_model_is_served_and_the_ledger_answers(
    rendered_with_secrets: list[dict[str, Any]], tmp_path: Path
) -> None:
    pod = _test_pod(rendered_with_secrets)
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    api_key = "fake-serve-api-api-key"  # what _run_helm_test makes of the secretKeyRef
    good = _ModelService("medvlm-draft", api_key)
    other = _ModelService("another-model", api_key)
    try:
        done = _run_helm_test(pod, tmp_path, good.url, ledger)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"model service {good.url}/v1/models: serves 'medvlm-draft'" in done.stdout
        assert "ledger (sqlite)" in done.stdout and "answered" in done.stdout
        assert good.requests == [("/v1/models", f"Bearer {api_key}")]
        # Another model served, the route prefix wrong, or the ledger down: the test fails.
        done = _run_helm_test(pod, tmp_path, other.url, ledger)
        assert done.returncode == 1 and "not 'medvlm-draft'" in done.stdout
        done = _run_helm_test(pod, tmp_path, good.url + "/wrong-prefix", ledger)
        assert done.returncode == 1 and "HTTPError" in done.stdout
        with socket.socket() as closed:  # a port nothing listens on
            closed.bind(("127.0.0.1", 0))
            down = f"postgresql+psycopg://medvlm@127.0.0.1:{closed.getsockname()[1]}/medvlm"
            done = _run_helm_test(pod, tmp_path, good.url, down)
        assert done.returncode == 1, done.stdout
        assert "serves 'medvlm-draft'" in done.stdout
        assert "ledger (postgresql)" in done.stdout and "connection refused" in done.stdout
    finally:
        good.close()
        other.close()


# -- runtimeClassName and priorityClassName ------------------------------------------------------


def test_runtime_and_priority_classes_reach_their_pods_only_when_set(
    rendered: list[dict[str, Any]], rendered_with_options: list[dict[str, Any]]
) -> None:
    for name, spec in pod_specs(rendered):
        assert "runtimeClassName" not in spec and "priorityClassName" not in spec, name
    specs = dict(pod_specs(rendered_with_options))
    expected = {
        "RayService/medvlm/head": ("kata", "medvlm-critical"),
        "RayService/medvlm/gpu": ("nvidia", "medvlm-gpu"),
        "Deployment/medvlm-prefect-worker": ("gvisor", "medvlm-worker"),
    }
    for name, spec in specs.items():
        classes = (spec.get("runtimeClassName"), spec.get("priorityClassName"))
        assert classes == expected.get(name, (None, None)), name


# -- GCS fault tolerance -------------------------------------------------------------------------


def test_gcs_fault_tolerance_is_rendered_only_when_enabled_and_fits_the_crd(
    rendered: list[dict[str, Any]],
    rendered_with_options: list[dict[str, Any]],
    rayservice_crd_schema: dict[str, Any],
    rayservice_validator: Any,
) -> None:
    cluster = rayservice(rendered)["spec"]["rayClusterConfig"]
    assert "gcsFaultToleranceOptions" not in cluster
    assert "ray-gcs-redis" not in _policies(rendered)
    crd = rayservice_crd_schema["properties"]["spec"]["properties"]["rayClusterConfig"]
    assert {"redisAddress", "redisPassword"} <= set(
        crd["properties"]["gcsFaultToleranceOptions"]["properties"]
    )
    rs = copy.deepcopy(rayservice(rendered_with_options))
    assert rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.redis.svc.cluster.local:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "ray-redis", "key": "password"}}},
    }
    assert list(rayservice_validator.iter_errors(rs)) == []
    rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAdress"] = "x:6379"
    assert any("redisAdress" in e.message for e in rayservice_validator.iter_errors(rs))
    # The head (and KubeRay's Redis cleanup Job, made from its template) may reach Redis.
    policy = _policies(rendered_with_options)["ray-gcs-redis"]
    assert policy["podSelector"]["matchLabels"]["medvlm.io/ray-node"] == "head"
    assert policy["egress"] == [
        {
            "to": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}
            ],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }
    ]


def test_gcs_fault_tolerance_without_a_password_or_address(helm: str) -> None:
    gcs = [
        "--set", "ray.gcsFaultTolerance.enabled=true",
        "--set", "networkPolicy.redisEgress[0].cidr=10.40.0.5/32",
        "--set", "networkPolicy.redisEgress[0].ports={6379}",
    ]  # fmt: skip
    options = rayservice(
        render(helm, *REQUIRED, *gcs, "--set", "ray.gcsFaultTolerance.redisAddress=10.40.0.5:6379")
    )["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {"redisAddress": "10.40.0.5:6379"}
    done = template(helm, *REQUIRED, *gcs)
    assert done.returncode != 0 and "needs ray.gcsFaultTolerance.redisAddress" in done.stderr
    done = template(
        helm, *REQUIRED,
        "--set", "ray.gcsFaultTolerance.enabled=true",
        "--set", "ray.gcsFaultTolerance.redisAddress=10.40.0.5:6379",
    )  # fmt: skip
    assert done.returncode != 0 and "set networkPolicy.redisEgress" in done.stderr


# -- metrics -------------------------------------------------------------------------------------


def _metrics_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule
        for rule in _policies(docs)["ray"]["ingress"]
        if any(p["port"] not in (8000, 8265) for p in rule.get("ports", []))
    ]


def test_ray_pods_export_metrics_on_the_port_the_policy_opens_to_prometheus_only(
    helm: str, rendered: list[dict[str, Any]], rendered_with_options: list[dict[str, Any]]
) -> None:
    for docs, port in ((rendered, 8080), (rendered_with_options, 8080)):
        cluster = rayservice(docs)["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert group["rayStartParams"]["metrics-export-port"] == str(port)
            (container,) = group["template"]["spec"]["containers"]
            assert {"name": "metrics", "containerPort": port} in container["ports"]
    assert _metrics_rules(rendered) == []  # off by default: no one may scrape
    (rule,) = _metrics_rules(rendered_with_options)
    assert rule == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 8080}],
    }
    # A pod selector alone: Prometheus in the release's namespace; another port everywhere.
    docs = render(
        helm, *REQUIRED,
        "--set", "metrics.prometheusPodSelector.app=prometheus",
        "--set", "metrics.rayPort=9090",
        "--set-string", "ray.head.rayStartParams.metrics-export-port=7000",
    )  # fmt: skip
    (rule,) = _metrics_rules(docs)
    assert rule == {
        "from": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}],
        "ports": [{"protocol": "TCP", "port": 9090}],
    }
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "9090"
    # The Prefect worker exports no metrics (see the README): no port beyond its health check.
    worker, _ = _worker(docs)
    assert [p["name"] for p in worker["ports"]] == ["health"]
    assert "PREFECT_CLIENT_METRICS_ENABLED" not in _env(worker)


# -- the DICOM storage SCP (C-MOVE) --------------------------------------------------------------


def test_no_storage_scp_without_c_move(helm: str, rendered: list[dict[str, Any]]) -> None:
    for docs in (
        rendered,
        render(
            helm, *REQUIRED, "--set", "pacs.kind=dimse", "--set", "pacs.dimseHost=pacs.h",
            "--set", "networkPolicy.pacsScpIngress={10.20.0.10/32}",
        ),
    ):  # fmt: skip
        worker, _ = _worker(docs)
        assert [s["metadata"]["name"] for s in of_kind(docs, "Service")] == ["medvlm-postgresql"]
        assert "ingress" not in _policies(docs)["prefect-worker"]
        assert not [n for n in _env(worker) if "SCP" in n] and "--limit" not in worker["args"]
    assert _env(worker)["MEDVLM_PACS__DIMSE_RETRIEVE"] == "get"


def test_c_move_opens_the_storage_scp_behind_a_service_to_the_pacs_only(
    rendered_with_options: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from medvlm.settings import MedvlmSettings

    docs = rendered_with_options
    worker, pod = _worker(docs)
    (port,) = [p for p in worker["ports"] if p["name"] == "dicom-scp"]
    assert port == {"name": "dicom-scp", "containerPort": 4343, "protocol": "TCP"}
    # One flow run at a time: each run's process listens on that port.
    assert worker["args"][worker["args"].index("--limit") + 1] == "1"
    (service,) = [
        s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "medvlm-dicom-scp"
    ]
    spec = service["spec"]
    assert spec["type"] == "NodePort" and spec["externalTrafficPolicy"] == "Local"
    assert spec["ports"] == [
        {"name": "dicom-scp", "port": 4343, "targetPort": "dicom-scp", "protocol": "TCP",
         "nodePort": 30104}
    ]  # fmt: skip
    selected = [
        n for n, labels in pod_templates(docs) if spec["selector"].items() <= labels.items()
    ]
    assert selected == ["Deployment/medvlm-prefect-worker"]
    # The PACS's CIDR, and nothing else, may open the SCP port.
    assert _policies(docs)["prefect-worker"]["ingress"] == [
        {"from": [{"ipBlock": {"cidr": "10.20.0.10/32"}}],
         "ports": [{"protocol": "TCP", "port": 4343}]}
    ]  # fmt: skip
    # The settings the flow runs load: C-MOVE to our SCP, listening on the pod's addresses.
    env = _worker_settings_env(worker, pod, tmp_path)
    for name in list(os.environ):
        if name.startswith("MEDVLM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MEDVLM_JOB__LEDGER_PASSWORD", "x")
    pacs = MedvlmSettings().pacs
    assert (pacs.kind, pacs.dimse_retrieve) == ("dimse", "move")
    assert (pacs.scp_aet, pacs.scp_host, pacs.scp_port) == ("MEDVLM_SCP", "0.0.0.0", 4343)


def test_storage_scp_service_types(helm: str) -> None:
    move = [
        *REQUIRED, "--set", "pacs.kind=dimse", "--set", "pacs.dimseHost=pacs.h",
        "--set", "pacs.dimseRetrieve=move",
        "--set", "networkPolicy.pacsScpIngress={10.20.0.10/32,10.20.0.11/32}",
    ]  # fmt: skip

    def scp_service(*values: str) -> dict[str, Any]:
        docs = render(helm, *move, *values)
        (service,) = [s for s in of_kind(docs, "Service") if "dicom-scp" in s["metadata"]["name"]]
        return dict(service["spec"])

    spec = scp_service()
    assert spec["type"] == "ClusterIP" and "externalTrafficPolicy" not in spec
    assert "nodePort" not in spec["ports"][0]
    spec = scp_service(
        "--set", "pacs.storageScpService.type=LoadBalancer",
        "--set", "pacs.storageScpService.port=104",
    )  # fmt: skip
    assert spec["loadBalancerSourceRanges"] == ["10.20.0.10/32", "10.20.0.11/32"]
    assert spec["externalTrafficPolicy"] == "Local" and spec["ports"][0]["port"] == 104
    assert "nodePort" not in spec["ports"][0]  # 0: Kubernetes picks one
    done = template(helm, *move, "--set", "prefectWorker.replicas=2")
    assert done.returncode != 0 and "set prefectWorker.replicas to 1" in done.stderr
    done = template(helm, *move[:-2])
    assert done.returncode != 0 and "set networkPolicy.pacsScpIngress" in done.stderr


# -- model weights provisioning ------------------------------------------------------------------


def _provision_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [j for j in of_kind(docs, "Job") if j["metadata"]["name"].endswith("provision")]
    return job


def test_weights_provisioning_job_copies_into_what_the_ray_pods_read(
    rendered: list[dict[str, Any]], rendered_with_options: list[dict[str, Any]]
) -> None:
    assert not [j for j in of_kind(rendered, "Job") if "provision" in j["metadata"]["name"]]
    job = _provision_job(rendered_with_options)
    assert job["metadata"]["annotations"] == {
        "helm.sh/hook": "pre-install,pre-upgrade",
        "helm.sh/hook-weight": "-10",
        "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
    }
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["checkpoint-source"]["persistentVolumeClaim"] == {"claimName": "staging"}
    assert mounts["checkpoint-source"] == {
        "name": "checkpoint-source", "mountPath": "/source", "readOnly": True
    }  # fmt: skip
    assert volumes["model-weights"]["persistentVolumeClaim"] == {"claimName": "medvlm-models"}
    assert mounts["model-weights"].get("readOnly", False) is False
    env = _env(container)
    assert env["WEIGHTS_SOURCE"] == "/source/exports/med-r1"
    # The directory it fills is the one the Ray workers load, from the same claim.
    (group,) = rayservice(rendered_with_options)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (ray_container,) = group["template"]["spec"]["containers"]
    assert env["WEIGHTS_TARGET"] == _env(ray_container)["MEDVLM_MODEL__SOURCE"]
    assert str(env["WEIGHTS_TARGET"]).startswith(mounts["model-weights"]["mountPath"] + "/")
    ray_volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert ray_volumes["model-weights"]["persistentVolumeClaim"]["claimName"] == "medvlm-models"
    assert env["WEIGHTS_MANIFEST_FILE"] == "SHA256SUMS" and env["WEIGHTS_MANIFEST"] == "{}"
    script = container["command"][-1]
    assert "sha256" in script and "mismatch" in script


def _run_provision(
    job: dict[str, Any], tmp_path: Path, manifest: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The provisioning Job's script, run here: /source and the weights mount moved under
    ``tmp_path``."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    weights_mount = next(
        m["mountPath"] for m in container["volumeMounts"] if m["name"] == "model-weights"
    )
    run_env = {
        "PATH": os.environ["PATH"],
        "WEIGHTS_SOURCE": str(env["WEIGHTS_SOURCE"]).replace("/source", str(tmp_path / "src"), 1),
        "WEIGHTS_TARGET": str(env["WEIGHTS_TARGET"]).replace(
            weights_mount, str(tmp_path / "pvc"), 1
        ),
        "WEIGHTS_MANIFEST": (
            json.dumps(manifest) if manifest is not None else str(env["WEIGHTS_MANIFEST"])
        ),
        "WEIGHTS_MANIFEST_FILE": str(env["WEIGHTS_MANIFEST_FILE"]),
    }
    return subprocess.run(
        [sys.executable, "-c", container["command"][-1]],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checkpoint(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"architectures": ["Qwen2VLForConditionalGeneration"]}',
        "model-00001-of-00002.safetensors": os.urandom(3 << 20),
        "sub/tokenizer.json": b'{"version": "1.0"}',
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_weights_provisioning_copies_verifies_and_refuses_a_mismatch(
    helm: str, tmp_path: Path
) -> None:
    docs = render(
        helm, *REQUIRED,
        "--set", "model.weights.provision.enabled=true",
        "--set", "model.weights.provision.volume.nfs.server=nas.hospital.internal",
        "--set", "model.weights.provision.volume.nfs.path=/export/models",
        "--set", "model.weights.provision.manifest.placeholder=" + "0" * 64,
    )  # fmt: skip
    job = _provision_job(docs)
    source, target = tmp_path / "src", tmp_path / "pvc" / "med-r1"
    source.mkdir()
    files = _checkpoint(source)
    (source / "unlisted.bin").write_bytes(b"not in the manifest")
    manifest = {name: _sha256(data) for name, data in files.items()}

    done = _run_provision(job, tmp_path, manifest)
    assert done.returncode == 0, done.stderr
    assert "3 files copied and verified" in done.stdout
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*")
            if p.is_file()} == files  # fmt: skip
    assert sorted(p.name for p in target.parent.iterdir()) == ["med-r1"]  # no .partial/.old
    # Again: the files match already; nothing is copied.
    done = _run_provision(job, tmp_path, manifest)
    assert done.returncode == 0 and "nothing copied" in done.stdout
    # A source file that does not match the manifest: fails, the good checkpoint stays.
    (source / "sub" / "tokenizer.json").write_bytes(b"tampered")
    done = _run_provision(job, tmp_path, {**manifest, "config.json": "0" * 64})
    assert done.returncode == 1
    assert "config.json: sha256 mismatch" in done.stderr
    assert "sub/tokenizer.json: sha256 mismatch" in done.stderr
    assert (target / "sub" / "tokenizer.json").read_bytes() == files["sub/tokenizer.json"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["med-r1"]
    # A file the manifest lists but the source lacks; a path out of the checkpoint.
    done = _run_provision(job, tmp_path, {**manifest, "missing.bin": "0" * 64})
    assert done.returncode == 1 and "missing.bin: not in the source" in done.stderr
    done = _run_provision(job, tmp_path, {"../escape": "0" * 64})
    assert done.returncode == 1 and "not a relative path inside the checkpoint" in done.stderr


def test_weights_provisioning_reads_a_sha256sum_manifest_from_the_source(
    rendered_with_options: list[dict[str, Any]], tmp_path: Path
) -> None:
    job = _provision_job(rendered_with_options)
    source = tmp_path / "src" / "exports" / "med-r1"
    source.mkdir(parents=True)
    files = _checkpoint(source)
    lines = [f"{_sha256(data)}  {name}" for name, data in files.items()]
    (source / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    done = _run_provision(job, tmp_path)
    assert done.returncode == 0, done.stderr
    target = tmp_path / "pvc" / "med-r1"
    assert (target / "model-00001-of-00002.safetensors").read_bytes() == files[
        "model-00001-of-00002.safetensors"
    ]
    (source / "SHA256SUMS").write_text(lines[0] + "\nnot a manifest line\n")
    done = _run_provision(job, tmp_path)
    assert done.returncode == 1 and "SHA256SUMS line 2" in done.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "model.weights.source=hostPath"], "it needs model.weights.source pvc"),
        (["--set", "model.weights.subPath="], "needs model.weights.subPath"),
        (["--set", "model.weights.provision.volume=null"], "provision.volume must name"),
        (["--set", "model.weights.provision.manifestFile="], "set exactly one of manifest"),
        (
            ["--set", "model.weights.provision.manifest.config\\.json=" + "a" * 64],
            "set exactly one of manifest",
        ),
    ],
)
def test_inconsistent_weights_provisioning_fails_to_render(
    helm: str, values: list[str], message: str
) -> None:
    provision = [
        "--set", "model.weights.provision.enabled=true",
        "--set", "model.weights.provision.volume.persistentVolumeClaim.claimName=staging",
        "--set", "model.weights.provision.manifestFile=SHA256SUMS",
    ]  # fmt: skip
    done = template(helm, *REQUIRED, *provision, *values)
    assert done.returncode != 0
    assert message in done.stderr
