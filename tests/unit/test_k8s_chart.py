"""The Helm chart k8s/medvlm, checked offline: lint, render, schemas, and the rules schemas miss.

Rendered objects are validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
strict) and the RayService against the KubeRay v1.7.0 CRD schema (``jsonschema``, with unknown
fields rejected as the API server's pruning would silently drop them). The remaining tests pin
what neither schema can say: GPU requests equal limits, a head node with zero GPUs, image tags
matching ``rayVersion``, secrets only through ``secretKeyRef``, hardened containers, a default-deny
NetworkPolicy and nothing exposed outside the cluster.

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
KUBERNETES_VERSION = "1.30.0"
PROFILES = {"default": [], "ci-cpu": ["-f", str(CI_VALUES)]}
# Every optional Secret reference set, so that each secret branch of the templates renders.
ALL_SECRETS = [
    "--set", "serve.apiKeySecret.name=serve-api",
    "--set", "prefectWorker.apiAuthSecret.name=prefect-auth",
    "--set", "pacs.auth=basic", "--set", "pacs.username=medvlm",
    "--set", "pacs.passwordSecret.name=pacs-basic",
    "--set", "pacs.tokenSecret.name=pacs-token",
    "--set", "ehr.tokenSecret.name=ehr-token",
    "--set", "ehr.auth=smart", "--set", "ehr.smartPrivateKeySecret.name=smart-key",
    "--set", "model.weights.source=hub", "--set", "model.weights.hubId=org/model",
    "--set", "model.weights.hubTokenSecret.name=hub-token",
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


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    done = _helm(helm, "template", "medvlm", str(CHART), "--namespace", "medvlm", *args)
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
    done = _helm(helm, "template", "medvlm", str(CHART), "--set", "ray.image.tag=2.59.0-py311-gpu")
    assert done.returncode != 0
    assert "must be ray.version" in done.stderr


def test_replica_asking_more_gpus_than_a_worker_has_fails_to_render(helm: str) -> None:
    done = _helm(helm, "template", "medvlm", str(CHART), "--set", "serve.numGpusPerReplica=2")
    assert done.returncode != 0
    assert "exceeds the GPUs of one worker pod" in done.stderr


# -- schemas -------------------------------------------------------------------------------------


def test_rendered_objects_validate_against_kubernetes_schemas(
    rendered: list[dict[str, Any]], rendered_with_secrets: list[dict[str, Any]]
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = [d for d in rendered + rendered_with_secrets if d["kind"] != "RayService"]
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "ServiceAccount"} <= {
        d["kind"] for d in objects
    }
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
def rayservice_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    if not KUBERAY_CRD.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {KUBERAY_CRD}")
    crd = yaml.safe_load(KUBERAY_CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


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
                    # Internal database: only the password variable is interpolated, by reference.
                    assert re.fullmatch(r"[^:]+://[^:]+:\$\(LEDGER_DB_PASSWORD\)@.+", env["value"])
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
        "LEDGER_DB_PASSWORD",
    } <= secret_env_seen


def test_external_database_url_comes_from_a_secret(helm: str) -> None:
    docs = render(
        helm,
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

    docs = render(helm, *(AUTOSCALING if autoscaled else []))
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
    done = _helm(
        helm, "template", "medvlm", str(CHART), "--set", "serve.autoscaling.enabled=true",
        *egress, *values,
    )  # fmt: skip
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
