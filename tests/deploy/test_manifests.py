"""The Kubernetes manifests, as `kubectl apply -k manifests/overlays/<env>` would send them.

Kubernetes cannot run here, so each overlay is rendered with ``kubectl kustomize`` and
every object is checked the way the API server would: built-in kinds against
Kubernetes' own OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail),
custom resources against KServe's CRD schemas (``tests/k8s_schemas.py``). Then the
things a user depends on: probes, configuration and secret wiring, RBAC, the
ServingRuntime, and what each environment brings (PostgreSQL and MinIO in dev only).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from api.settings import Settings
from taskvision.storage import parse_s3_url
from tests.deploy.conftest import MANIFESTS, OVERLAYS, kustomize
from tests.support.k8s_schemas import (
    SchemaNotFoundError,
    SchemaViolationError,
    custom_resource_errors,
    load_crd_schemas,
    validate_custom_resource,
)

# The Kubernetes release whose schemas the built-in kinds must satisfy (KServe needs >= 1.29).
K8S_VERSION = "1.32.0"
SECRET_NAME = "taskvision-secrets"
SERVING_IMAGE = "ghcr.io/taskvision/taskvision-serving"
API_IMAGE = "ghcr.io/taskvision/taskvision-api"
# Settings read outside api.settings.Settings (components.lib.runtime reads this one).
NON_SETTINGS_KEYS = {"TASKVISION_TRAINING_IMAGE"}

Obj = dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------------


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def get(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def api_deployment(objs: list[Obj]) -> Obj:
    return get(objs, "Deployment", "taskvision-api")


def api_container(objs: list[Obj]) -> Obj:
    containers = api_deployment(objs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "api")


def config_map(objs: list[Obj]) -> Obj:
    """The control plane's ConfigMap (kustomize appends a content hash to its name)."""
    ref = next(e["configMapRef"]["name"] for e in api_container(objs)["envFrom"] if "configMapRef" in e)
    return get(objs, "ConfigMap", ref)


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def serving_runtime(objs: list[Obj]) -> Obj:
    return get(objs, "ServingRuntime", "taskvision-predictor")


def is_custom(obj: Obj, schemas: dict[tuple[str, str], Any]) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return any(api_version.rpartition("/")[0] == group for api_version, _ in schemas)


def walk(value: Any) -> Any:
    """Every dict in a nested structure."""
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from walk(child)


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    return load_crd_schemas()


@pytest.fixture(params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> tuple[str, list[Obj]]:
    return request.param, rendered[request.param]


# --- every object is one the API server accepts -----------------------------------------------------


def test_every_object_is_valid_against_its_schema(
    overlay: tuple[str, list[Obj]], crd_schemas: dict[tuple[str, str], Any]
) -> None:
    name, objs = overlay
    problems: list[str] = []
    for obj in objs:
        what = f"{obj['kind']} {obj['metadata'].get('name')} ({obj['apiVersion']})"
        if is_custom(obj, crd_schemas):
            try:
                validate_custom_resource(obj, crd_schemas)
            except (SchemaNotFoundError, SchemaViolationError) as exc:
                problems.append(str(exc))
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{what}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{what}: not a Kubernetes {K8S_VERSION} kind nor a known CRD: {exc.message}")
    assert not problems, f"overlay {name}:\n" + "\n".join(problems)


def test_the_custom_resources_are_the_servingruntime(
    overlay: tuple[str, list[Obj]], crd_schemas: dict[tuple[str, str], Any]
) -> None:
    """Guards the test above: it must have validated our custom resource against its CRD."""
    _, objs = overlay
    custom = [(o["apiVersion"], o["kind"]) for o in objs if is_custom(o, crd_schemas)]
    assert custom == [("serving.kserve.io/v1alpha1", "ServingRuntime")]


def test_everything_lives_in_the_overlays_namespace(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    namespace = OVERLAYS[name]
    assert [o["metadata"]["name"] for o in of_kind(objs, "Namespace")] == [namespace]
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']} {obj['metadata']['name']}"


# --- the control plane ------------------------------------------------------------------------------


def test_probes_use_readyz_and_healthz_on_the_served_port(
    overlay: tuple[str, list[Obj]], api_serve_help: str
) -> None:
    _, objs = overlay
    container = api_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == 8000
    # The server listens where the probes look: `taskvision serve --host 0.0.0.0 --port 8000`.
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--port") + 1] == "8000"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert "--host" in api_serve_help and "--port" in api_serve_help


def test_service_reaches_the_control_plane_pods(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    service = get(objs, "Service", "taskvision-api")
    pod_labels = api_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in api_container(objs)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_config_comes_from_the_configmap_and_secrets_from_the_secret(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    container = api_container(objs)
    sources = container["envFrom"]
    assert any("configMapRef" in s for s in sources)
    assert {"secretRef": {"name": SECRET_NAME}} in sources
    config = config_map(objs)["data"]
    assert config["TASKVISION_SERVING_BACKEND"] == "kserve"
    assert re.fullmatch(
        r"http://ml-pipeline\.kubeflow\.svc\.cluster\.local:8888", config["TASKVISION_KFP_HOST"]
    )
    assert config["TASKVISION_TRAINING_IMAGE"].startswith("ghcr.io/taskvision/taskvision-train:")
    assert int(config["TASKVISION_TRAIN_GPU_COUNT"]) >= 0
    assert config["TASKVISION_ISVC_RUNTIME"] == serving_runtime(objs)["metadata"]["name"]
    env = env_of(container)
    assert env["TASKVISION_K8S_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    for key in ("TASKVISION_S3_ACCESS_KEY", "TASKVISION_S3_SECRET_KEY", "TASKVISION_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": key}


def test_every_taskvision_variable_is_a_setting(overlay: tuple[str, list[Obj]]) -> None:
    """A misspelt TASKVISION_* variable would be ignored silently (Settings has extra="ignore")."""
    _, objs = overlay
    names = set(config_map(objs)["data"]) | set(env_of(api_container(objs)))
    fields = {f"TASKVISION_{field.upper()}" for field in Settings.model_fields}
    unknown = {n for n in names if n.startswith("TASKVISION_")} - fields - NON_SETTINGS_KEYS
    assert not unknown, f"not TaskVision settings: {sorted(unknown)}"


def test_no_secret_value_is_in_the_manifests(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    assert not of_kind(objs, "Secret"), "the operator creates the Secret; none is in git"
    for obj in objs:
        for node in walk(obj):
            name, value = node.get("name"), node.get("value")
            if not (isinstance(name, str) and isinstance(value, str)):
                continue
            assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name), f"{name} has a literal value"
            # A URL's password may only be a $(VAR) that Kubernetes expands from the secret.
            for password in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert re.fullmatch(r"\$\([A-Z_]+\)", password), f"{name} has a literal password"
    for obj in objs:
        for node in walk(obj):
            if "secretKeyRef" in node:
                assert node["secretKeyRef"]["name"] == SECRET_NAME
            if "secretRef" in node:
                assert node["secretRef"]["name"] == SECRET_NAME


def test_rbac_grants_only_inferenceservices_in_the_namespace(overlay: tuple[str, list[Obj]]) -> None:
    name, objs = overlay
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")
    (role,) = of_kind(objs, "Role")
    assert len(role["rules"]) == 1
    rule = role["rules"][0]
    assert rule["apiGroups"] == ["serving.kserve.io"]
    assert rule["resources"] == ["inferenceservices"]
    # What api/inference_services.py calls (get, create, merge-patch, delete), plus read-only list/watch.
    assert {"get", "create", "patch", "delete"} <= set(rule["verbs"])
    assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "patch", "delete"}
    assert "resourceNames" not in rule and "nonResourceURLs" not in rule

    (binding,) = of_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = api_deployment(objs)["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": OVERLAYS[name]}]
    get(objs, "ServiceAccount", account)


def test_predictor_service_account_carries_the_s3_secret_only(overlay: tuple[str, list[Obj]]) -> None:
    """KServe's storage initializer finds the S3 credentials through the predictor's service account."""
    _, objs = overlay
    account = get(objs, "ServiceAccount", "taskvision-predictor")
    assert account["secrets"] == [{"name": SECRET_NAME}]
    assert account["automountServiceAccountToken"] is False
    bound = [s["name"] for b in of_kind(objs, "RoleBinding") for s in b["subjects"]]
    assert "taskvision-predictor" not in bound


def test_control_plane_runs_as_non_root(overlay: tuple[str, list[Obj]]) -> None:
    _, objs = overlay
    pod = api_deployment(objs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = api_container(objs)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # A read-only root filesystem needs writable scratch space where the app writes.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config_map(objs)["data"]["TASKVISION_DATA_DIR"] in mounts
    assert "/tmp" in mounts


def test_servingruntime_runs_our_predictor_image(overlay: tuple[str, list[Obj]], serving_help: str) -> None:
    from api.services.inference_services import MODEL_FORMAT

    _, objs = overlay
    runtime = serving_runtime(objs)["spec"]
    assert [f["name"] for f in runtime["supportedModelFormats"]] == [MODEL_FORMAT] == ["taskvision-bundle"]
    assert "v1" in runtime["protocolVersions"]
    (container,) = runtime["containers"]
    assert container["name"] == "kserve-container"
    assert re.fullmatch(rf"{re.escape(SERVING_IMAGE)}:[\w.-]+", container["image"])
    assert "command" not in container  # the image's ENTRYPOINT, python -m serving, takes the args
    assert container["args"] == ["--model-dir=/mnt/models", "--model_name={{.Name}}", "--http_port=8080"]
    for arg in container["args"]:
        option = arg.split("=", 1)[0]
        assert re.search(rf"(^|\s){re.escape(option)}\b", serving_help), f"python -m serving has no {option}"
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys()


def test_images_can_be_set_by_an_overlay(tmp_path: Path) -> None:
    """`images:` in a kustomization retargets both the control plane and the predictor."""
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(MANIFESTS / "overlays" / "dev", overlay)],
                "images": [
                    {"name": API_IMAGE, "newName": "registry.example.com/tv-api", "newTag": "2.0"},
                    {"name": SERVING_IMAGE, "newName": "registry.example.com/tv-serving", "newTag": "2.0"},
                ],
            }
        )
    )
    objs = kustomize(overlay)
    assert api_container(objs)["image"] == "registry.example.com/tv-api:2.0"
    assert serving_runtime(objs)["spec"]["containers"][0]["image"] == "registry.example.com/tv-serving:2.0"


# --- what each environment brings -------------------------------------------------------------------


def test_dev_runs_postgresql_on_a_persistent_volume(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["dev"]
    postgres = get(objs, "StatefulSet", "taskvision-postgres")
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:")
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}
    pg_env = env_of(container)
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME

    # The control plane's URL points at that server, database and user, with the secret's password.
    api_env = list(env_of(api_container(objs)))
    url = env_of(api_container(objs))["TASKVISION_DATABASE_URL"]["value"]
    assert api_env.index("POSTGRES_PASSWORD") < api_env.index("TASKVISION_DATABASE_URL")  # for $(...)
    parsed = make_url(url.replace("$(POSTGRES_PASSWORD)", "pw"))
    parsed.get_dialect()  # the driver (psycopg) is one the project installs
    assert parsed.drivername == "postgresql+psycopg"
    assert parsed.username == pg_env["POSTGRES_USER"]["value"]
    assert parsed.database == pg_env["POSTGRES_DB"]["value"]
    service = get(objs, "Service", parsed.host)
    assert parsed.port in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= postgres["spec"]["template"]["metadata"]["labels"].items()


def test_dev_runs_minio_and_the_control_plane_uses_it(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["dev"]
    minio = get(objs, "StatefulSet", "taskvision-minio")
    (claim,) = minio["spec"]["volumeClaimTemplates"]
    (container,) = minio["spec"]["template"]["spec"]["containers"]
    assert "minio" in container["image"]
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}
    # MinIO's root user is the control plane's S3 key pair, from the same secret.
    minio_env = env_of(container)
    assert minio_env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"]["key"] == "TASKVISION_S3_ACCESS_KEY"
    assert minio_env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "TASKVISION_S3_SECRET_KEY"

    location = parse_s3_url(config_map(objs)["data"]["TASKVISION_STORAGE_URL"])
    host, port = location.endpoint.split(":")
    service = get(objs, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= minio["spec"]["template"]["metadata"]["labels"].items()
    assert location.secure is False and location.bucket


def test_prod_uses_external_database_and_object_store(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["prod"]
    assert not of_kind(objs, "StatefulSet") and not of_kind(objs, "PersistentVolumeClaim")
    images = [c["image"] for o in objs for c in walk(o) if "image" in c and isinstance(c["image"], str)]
    assert not [i for i in images if "postgres" in i or "minio" in i]
    env = env_of(api_container(objs))
    for key in ("TASKVISION_DATABASE_URL", "TASKVISION_STORAGE_URL"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": key}
    # Not also set in the ConfigMap, where the secret's value would be shadowed or confused.
    assert not {"TASKVISION_DATABASE_URL", "TASKVISION_STORAGE_URL"} & set(config_map(objs)["data"])


def test_prod_has_more_replicas_limits_and_gpu_training(rendered: dict[str, list[Obj]]) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert api_deployment(prod)["spec"]["replicas"] > api_deployment(dev)["spec"].get("replicas", 1)
    assert api_deployment(prod)["spec"]["replicas"] >= 2
    limits = api_container(prod)["resources"]["limits"]
    assert {"cpu", "memory"} <= limits.keys()
    assert int(config_map(prod)["data"]["TASKVISION_TRAIN_GPU_COUNT"]) >= 1
    (budget,) = of_kind(prod, "PodDisruptionBudget")
    pod_labels = api_deployment(prod)["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The prod JSON patch changes the predictor's resources, not its image or args.
    prod_args, dev_args = (serving_runtime(o)["spec"]["containers"][0]["args"] for o in (prod, dev))
    assert prod_args == dev_args


# --- the validators catch broken objects ------------------------------------------------------------


def test_kubernetes_validate_catches_unknown_fields_wrong_types_and_unknown_kinds(
    rendered: dict[str, list[Obj]],
) -> None:
    deployment = api_deployment(rendered["dev"])
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="two"):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)

    unknown_kind = dict(copy.deepcopy(deployment), kind="Deploymnt")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(unknown_kind, K8S_VERSION, strict=True)


@pytest.fixture
def runtime(rendered: dict[str, list[Obj]]) -> Obj:
    return copy.deepcopy(serving_runtime(rendered["dev"]))


def test_crd_validator_accepts_the_servingruntime(runtime: Obj, crd_schemas: Any) -> None:
    assert custom_resource_errors(runtime, crd_schemas) == []


def test_crd_validator_catches_an_unknown_field(runtime: Obj, crd_schemas: Any) -> None:
    runtime["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # Kubernetes would prune it
    with pytest.raises(SchemaViolationError, match=r"spec\.containers\[0\]\.imagePullPolicyy: unknown field"):
        validate_custom_resource(runtime, crd_schemas)


def test_crd_validator_catches_a_wrong_type(runtime: Obj, crd_schemas: Any) -> None:
    runtime["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    with pytest.raises(SchemaViolationError, match=r"supportedModelFormats\[0\]\.autoSelect: 'yes'"):
        validate_custom_resource(runtime, crd_schemas)


def test_crd_validator_catches_a_missing_required_field(runtime: Obj, crd_schemas: Any) -> None:
    del runtime["spec"]["containers"]
    with pytest.raises(SchemaViolationError, match="'containers' is a required property"):
        validate_custom_resource(runtime, crd_schemas)


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("serving.kserve.io/v1alpha1", "ServingRuntim"),
        ("serving.kserve.io/v1beta9", "ServingRuntime"),
        ("apps/v1", "Deployment"),  # a built-in kind is not a custom resource
    ],
)
def test_crd_validator_refuses_a_kind_without_schema(
    runtime: Obj, crd_schemas: Any, api_version: str, kind: str
) -> None:
    runtime.update(apiVersion=api_version, kind=kind)
    with pytest.raises(SchemaNotFoundError, match=re.escape(kind)):
        validate_custom_resource(runtime, crd_schemas)


def test_crd_validator_checks_metadata_as_object_meta(runtime: Obj, crd_schemas: Any) -> None:
    runtime["metadata"]["lables"] = {"a": "b"}
    runtime["metadata"]["name"] = "Taskvision_Predictor"
    runtime["metadata"]["labels"]["taskvision.io/task"] = "x" * 64
    with pytest.raises(SchemaViolationError) as caught:
        validate_custom_resource(runtime, crd_schemas)
    problems = "\n".join(caught.value.errors)
    assert "metadata.lables: unknown field" in problems
    assert "metadata.name: 'Taskvision_Predictor' is not a DNS-1123 subdomain" in problems
    assert "metadata.labels.taskvision.io/task: value" in problems


def test_crd_validator_refuses_duplicate_keys_in_a_list_map(runtime: Obj, crd_schemas: Any) -> None:
    runtime["spec"]["containers"][0]["env"].append({"name": "HOME", "value": "/home"})
    with pytest.raises(SchemaViolationError, match="duplicate entry"):
        validate_custom_resource(runtime, crd_schemas)


def test_crd_validator_on_an_inferenceservice(crd_schemas: Any) -> None:
    """What the control plane sends: nulls are dropped like the API server does; status keeps any key."""
    isvc: Obj = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": "tv-task1",
            "namespace": "taskvision",
            "labels": {"taskvision.io/task": "task1"},
        },
        "spec": {
            "predictor": {
                "minReplicas": 0,
                "maxReplicas": 3,
                "canaryTrafficPercent": None,
                "serviceAccountName": "taskvision-predictor",
                "model": {
                    "modelFormat": {"name": "taskvision-bundle"},
                    "runtime": "taskvision-predictor",
                    "storageUri": "s3://taskvision/models/task1/run1",
                    "protocolVersion": "v1",
                },
            }
        },
        "status": {"url": "http://tv-task1.taskvision.example.com", "somethingNew": {"x": 1}},
    }
    validate_custom_resource(isvc, crd_schemas)

    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    isvc["spec"]["predictor"]["maxReplicas"] = "3"
    with pytest.raises(SchemaViolationError) as caught:
        validate_custom_resource(isvc, crd_schemas)
    problems = "\n".join(caught.value.errors)
    assert "spec.predictor.model.storageURI: unknown field" in problems
    assert "spec.predictor.maxReplicas: '3' is not of type 'integer'" in problems
