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
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "k8s" / "medvlm"
CI_VALUES = CHART / "ci" / "values-cpu.yaml"
KUBERAY_CRD = ROOT.parent / "shared" / "k8s-crds" / "kuberay-v1.7.0" / "ray.io_rayservices.yaml"
VALUES_SCHEMA = CHART / "values.schema.json"
KUBERNETES_VERSION = "1.30.0"
# The values without a default (values.yaml leaves model.version empty on purpose).
MODEL_VERSION = "med-r1-2025.06"
REQUIRED = ["--set", f"model.version={MODEL_VERSION}"]
PROFILES = {"default": REQUIRED, "ci-cpu": ["-f", str(CI_VALUES)]}
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


@pytest.fixture(scope="session")
def helm() -> str:
    home = Path(os.environ.get("MEDVLM_HOME", Path.home() / ".cache" / "medvlm"))
    candidate = home / "bin" / "helm"
    if not candidate.is_file():
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-k8s-tools.sh")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not candidate.is_file():
            on_path = shutil.which("helm")
            if on_path is None:
                pytest.skip(
                    "helm is not installed and scripts/install-k8s-tools.sh failed: "
                    + (done.stderr.strip().splitlines() or ["no output"])[-1]
                )
            return on_path
    return str(candidate)


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart with ``args`` only: callers add ``REQUIRED`` or a profile."""
    return _helm(helm, "template", "medvlm", str(CHART), "--namespace", "medvlm", *args)


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    done = template(helm, *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


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
    """Every pod template: Deployments, StatefulSets, and the RayService's head and workers."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            yield name, doc["spec"]["template"]["spec"]
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
    done = _helm(helm, "lint", "--strict", str(CHART), *PROFILES[profile])
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
    if not KUBERAY_CRD.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {KUBERAY_CRD}")
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
        assert pod["automountServiceAccountToken"] is False, name
    assert seen == 4  # ray head, ray worker, prefect worker, postgresql


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
    rendered: list[dict[str, Any]], rendered_with_secrets: list[dict[str, Any]]
) -> None:
    from pydantic import BaseModel

    from medvlm.settings import MedvlmSettings

    names = {
        env["name"]
        for docs in (rendered, rendered_with_secrets)
        for _, container, _ in containers(docs)
        for env in container.get("env", [])
        if env["name"].startswith("MEDVLM_")
        and env["name"] != "MEDVLM_CODE_DIR"  # read by prefect.yaml's pull step, not settings
    }
    assert "MEDVLM_JOB__LEDGER_URL" in names and "MEDVLM_MODEL__SOURCE" in names
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
    rendered: list[dict[str, Any]],
    rendered_autoscaling: list[dict[str, Any]],
    rayservice_validator: Any,
) -> None:
    fixed = rayservice(rendered)["spec"]["rayClusterConfig"]
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
    rendered: list[dict[str, Any]], rendered_autoscaling: list[dict[str, Any]]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    names = {p["metadata"]["name"] for p in of_kind(rendered, "NetworkPolicy")}
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
    done = _helm(helm, "lint", "--strict", str(CHART))
    assert done.returncode != 0
    assert "/model/version" in done.stdout + done.stderr


def _env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_model_version_reaches_the_ray_pods_and_the_worker(helm: str, profile: str) -> None:
    expected = {
        "default": MODEL_VERSION,
        "ci-cpu": yaml.safe_load(CI_VALUES.read_text())["model"]["version"],
    }[profile]
    assert expected
    seen = set()
    for name, container, _ in containers(render(helm, *PROFILES[profile])):
        if "postgresql" in name:
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
    """Every pod template's name and labels."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            yield name, doc["spec"]["template"]["metadata"]["labels"]
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
    done = _helm(
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
    ],
    ids=["default", "ci-cpu", "all-secrets", "autoscaling", "no-worker"],
)  # fmt: skip
def test_notes_render_what_was_installed_and_the_next_steps(helm: str, values: list[str]) -> None:
    text = notes(helm, *values)
    docs = render(helm, *values)
    rs = rayservice(docs)
    # KubeRay's stable head Service of a RayService is `<name>-head-svc`.
    assert f"port-forward svc/{rs['metadata']['name']}-head-svc 8265:8265" in text
    assert f"get rayservice {rs['metadata']['name']}" in text
    assert "helm test" in text  # says there are no test hooks: what to check instead
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
    ],
)
def test_values_schema_refuses_a_misspelled_or_invalid_value(
    helm: str, setting: str, refused: str
) -> None:
    done = template(helm, *REQUIRED, "--set", setting)
    assert done.returncode != 0
    assert refused in done.stderr
