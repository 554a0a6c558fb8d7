"""The Kubernetes deployment in ``k8s/``, checked offline.

- Core manifests and every pod the deployment creates (from the Helm values, the RayCluster and
  the manifests) validate strictly against the Kubernetes OpenAPI schemas shipped with
  kubernetes-validate (unknown fields fail).
- The KubeRay RayCluster (a CRD, not in the core schemas) is checked structurally.
- The Dagster instance the chart renders from the Helm values (PostgreSQL storage, K8sRunLauncher,
  queued run coordinator, ...) validates against Dagster's own config schemas, and the app reads
  its settings from the ConfigMap.
- Security: every pod and container is non-root, read-only, capability-free and has resource
  requests and limits; the NetworkPolicies, evaluated flow by flow, allow exactly the intended
  connections.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
NAMESPACE = "desi-anomaly"
K8S_VERSION = "1.33.0"  # oldest Kubernetes the deployment targets (schemas ship with the package)
RAY_CLUSTER = "desi-ray"
REQUIRED_ENV = (
    "DESI_ANOMALY_STORAGE_ROOT",
    "DESI_ANOMALY_DATA_ROOT",
    "DESI_ANOMALY_DUCKDB_PATH",
    "DESI_ANOMALY_RAY_ADDRESS",
)


# --- loading -------------------------------------------------------------------------------


def manifests() -> list[dict]:
    docs = []
    for path in sorted([*K8S.glob("manifests/*.yaml"), *K8S.glob("jobs/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = f"{path.parent.name}/{path.name}"
                docs.append(doc)
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def find(kind: str, name: str | None = None) -> list[dict]:
    return [
        d
        for d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((K8S / "helm" / "values.yaml").read_text())


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (cluster,) = find("RayCluster")
    return cluster


@pytest.fixture(scope="module")
def configmap_env() -> dict[str, str]:
    (cm,) = find("ConfigMap", "desi-anomaly-env")
    return cm["data"]


def dockerfile_args() -> dict[str, str]:
    text = (K8S / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


# --- the pods of the deployment ------------------------------------------------------------


@dataclass
class Workload:
    """A pod the deployment runs: its labels (as scheduled) and its pod spec."""

    name: str
    labels: dict[str, str]
    spec: dict
    namespace: str = NAMESPACE
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.namespace_labels = self.namespace_labels or {
            "kubernetes.io/metadata.name": self.namespace
        }


def _helm_pod(component: dict, name: str, image: str, extra_labels: dict) -> Workload:
    """The pod the Dagster chart renders for a webserver/daemon/user-code component."""
    container = {
        "name": name,
        "image": image,
        "securityContext": component["securityContext"],
        "resources": component["resources"],
        "volumeMounts": component.get("volumeMounts", []),
    }
    spec = {
        "securityContext": component["podSecurityContext"],
        "containers": [container],
        "volumes": component.get("volumes", []),
    }
    return Workload(name, {**extra_labels, **component.get("labels", {})}, spec)


def _image(image: dict) -> str:
    return f"{image['repository']}:{image['tag']}"


def helm_workloads(values: dict) -> list[Workload]:
    web, daemon = values["dagsterWebserver"], values["dagsterDaemon"]
    (code,) = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_pod = {
        "securityContext": launcher["runK8sConfig"]["podSpecConfig"]["securityContext"],
        "containers": [
            {
                "name": "dagster",
                "image": _image(code["image"]),  # runs use the code location's image
                "securityContext": launcher["securityContext"],
                "resources": launcher["resources"],
                "volumeMounts": launcher["volumeMounts"],
                "envFrom": [{"configMapRef": m} for m in launcher["envConfigMaps"]],
            }
        ],
        "volumes": launcher["volumes"],
    }
    return [
        _helm_pod(web, "webserver", _image(web["image"]), {"component": "dagster-webserver"}),
        _helm_pod(daemon, "daemon", _image(daemon["image"]), {"component": "dagster-daemon"}),
        _helm_pod(
            code,
            "code-server",
            _image(code["image"]),
            {"component": "user-deployments", "deployment": code["name"]},
        ),
        Workload("run-worker", dict(launcher["labels"]), run_pod),
    ]


def ray_workloads(cluster: dict) -> list[Workload]:
    """Head and worker pods with the labels KubeRay gives them."""
    name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]
    pods = [
        Workload(
            "ray-head",
            {**head["metadata"]["labels"], "ray.io/cluster": name, "ray.io/node-type": "head"},
            head["spec"],
        )
    ]
    for group in cluster["spec"]["workerGroupSpecs"]:
        template = group["template"]
        labels = {
            **template["metadata"]["labels"],
            "ray.io/cluster": name,
            "ray.io/node-type": "worker",
            "ray.io/group": group["groupName"],
        }
        pods.append(Workload(f"ray-worker-{group['groupName']}", labels, template["spec"]))
    return pods


def manifest_workloads() -> list[Workload]:
    pods = []
    for doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = doc["spec"]["template"]
            pods.append(Workload(doc["metadata"]["name"], template["metadata"]["labels"], template))
            pods[-1].spec = template["spec"]
    return pods


@pytest.fixture(scope="module")
def workloads(values, raycluster) -> dict[str, Workload]:
    every = [*helm_workloads(values), *ray_workloads(raycluster), *manifest_workloads()]
    return {w.name: w for w in every}


# --- schema validation ----------------------------------------------------------------------


def test_every_manifest_file_is_documented_and_namespaced():
    readme = (K8S / "README.md").read_text()
    for path in sorted([*K8S.glob("manifests/*.yaml"), *K8S.glob("jobs/*.yaml")]):
        assert str(path.relative_to(REPO)) in readme, path.name
    for doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, (doc["_file"], doc["kind"])


@pytest.mark.parametrize(
    "doc",
    [d for d in manifests() if not d["apiVersion"].startswith("ray.io/")],
    ids=lambda d: f"{d['_file']}:{d['kind']}/{d['metadata']['name']}",
)
def test_core_manifests_validate_against_the_kubernetes_schemas(doc):
    kubernetes_validate.validate(strip(doc), K8S_VERSION, strict=True)


def test_kubernetes_validation_is_strict_and_offline():
    """The validator really rejects a misspelt field (so the tests above can fail)."""
    (statefulset,) = find("StatefulSet")
    bad = strip(statefulset)
    container = dict(bad["spec"]["template"]["spec"]["containers"][0])
    container["securityContext"] = {**container["securityContext"], "runAsNonRot": True}
    bad["spec"] = {
        **bad["spec"],
        "template": {**bad["spec"]["template"], "spec": {"containers": [container]}},
    }
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonRot"):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_pod_spec_validates_against_the_kubernetes_schemas(workloads):
    """The pods rendered from the Helm values and the RayCluster's pod templates."""
    assert set(workloads) >= {
        "webserver",
        "daemon",
        "code-server",
        "run-worker",
        "ray-head",
        "ray-worker-cpu",
        "ray-worker-gpu",
        "dagster-postgresql",
    }
    for w in workloads.values():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": w.name, "namespace": w.namespace, "labels": w.labels},
            "spec": w.spec,
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# --- the KubeRay cluster --------------------------------------------------------------------


# The part of KubeRay's RayCluster CRD (ray.io/v1) this deployment uses; unknown fields fail.
# Pod templates are validated against the core Pod schema separately.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
    "additionalProperties": False,
}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "image": {"type": "string"},
                        "resources": {"type": "object"},
                        "securityContext": {"type": "object"},
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "volumeMounts": {"type": "array"},
                    },
                },
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "rayStartParams": _STRING_MAP,
                        "template": _TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "rayStartParams": _STRING_MAP,
                            "template": _TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def test_raycluster_matches_the_crd_fields_it_uses(raycluster):
    import jsonschema

    jsonschema.validate(strip(raycluster), RAYCLUSTER_SCHEMA)
    typo = strip(raycluster)
    typo["spec"] = {**typo["spec"], "workerGroupSpec": typo["spec"]["workerGroupSpecs"]}
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(typo, RAYCLUSTER_SCHEMA)


def test_ray_autoscaler_container_settings_are_valid_kubernetes(raycluster):
    options = raycluster["spec"]["autoscalerOptions"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "autoscaler"},
        "spec": {
            "containers": [
                {
                    "name": "autoscaler",
                    "image": "autoscaler:1",
                    "resources": options["resources"],
                    "securityContext": options["securityContext"],
                }
            ]
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert raycluster["metadata"]["name"] == RAY_CLUSTER
    spec = raycluster["spec"]
    assert spec["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["client"] == 10001 and ports["gcs-server"] == 6379
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"].startswith("registry.example.org/desi-anomaly:")
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"]
    autoscaler = spec["autoscalerOptions"]
    assert autoscaler["resources"]["limits"] and autoscaler["securityContext"]["runAsNonRoot"]


def test_ray_address_points_at_the_kuberay_head_service(configmap_env, raycluster):
    address = configmap_env["DESI_ANOMALY_RAY_ADDRESS"]
    head_service = f"{raycluster['metadata']['name']}-head-svc"  # KubeRay's naming
    assert re.fullmatch(
        rf"ray://{head_service}(\.{NAMESPACE}(\.svc(\.cluster\.local)?)?)?:10001", address
    )


# --- Dagster: the instance the chart renders from the values ----------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _snake_keys(obj: Any) -> Any:
    """The chart's ``snakeCaseDictRecursive`` (used for volumes and volume mounts)."""
    if isinstance(obj, dict):
        return {_snake(k): _snake_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_snake_keys(v) for v in obj]
    return obj


def postgres_config(values: dict) -> dict:
    pg = values["postgresql"]
    db = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        db["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": db}


def run_launcher_config(values: dict) -> dict:
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    cfg = {
        "load_incluster_config": k8s["loadInclusterConfig"],
        "job_namespace": k8s.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": k8s["imagePullPolicy"],
        "service_account_name": values["serviceAccount"]["name"],
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}]
        + [m["name"] for m in k8s["envConfigMaps"]],
        "env_secrets": [s["name"] for s in k8s["envSecrets"]],
        "env_vars": k8s["envVars"],
        "volume_mounts": _snake_keys(k8s["volumeMounts"]),
        "volumes": _snake_keys(k8s["volumes"]),
        "labels": k8s["labels"],
        "fail_pod_on_run_failure": k8s["failPodOnRunFailure"],
        "resources": k8s["resources"],
        "security_context": k8s["securityContext"],
        "run_k8s_config": {_snake(k): v for k, v in k8s["runK8sConfig"].items()},
    }
    return cfg


def instance_config(values: dict) -> dict:
    """dagster.yaml as the chart's configmap-instance.yaml renders it from the values."""
    storage = {"config": postgres_config(values)}
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = daemon["runMonitoring"]
    retention = values["retention"]
    concurrency = values["concurrency"]
    rendered = {
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            **storage,
        },
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            **storage,
        },
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            **storage,
        },
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": run_launcher_config(values),
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
            },
        },
        "compute_logs": {
            "module": "dagster.core.storage.noop_compute_log_manager",
            "class": "NoOpComputeLogManager",
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        },
        "run_retries": {
            "enabled": daemon["runRetries"]["enabled"],
            "max_retries": daemon["runRetries"]["maxRetries"],
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
        "retention": {
            "sensor": {"purge_after_days": retention["sensor"]["purgeAfterDays"]},
            "schedule": {"purge_after_days": retention["schedule"]["purgeAfterDays"]},
        },
        "concurrency": {"pools": {"default_limit": concurrency["pools"]["defaultLimit"]}},
    }
    additional = values.get("additionalInstanceConfig") or {}
    clash = set(additional) & set(rendered)
    assert not clash, f"additionalInstanceConfig repeats keys the chart renders: {clash}"
    return {**rendered, **additional}


@pytest.fixture
def chart_env(monkeypatch):
    """Environment variables the chart sets in every Dagster pod (config sources read them)."""
    for name, value in {
        "DAGSTER_HOME": "/opt/dagster/dagster_home",
        "DAGSTER_PG_PASSWORD": "not-a-real-password",
        "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "dagster-instance",
        "DAGSTER_K8S_PG_PASSWORD_SECRET": "dagster-postgresql-secret",
        "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": "dagster-pipeline-env",
    }.items():
        monkeypatch.setenv(name, value)


def _assert_valid(config_type, value) -> Any:
    from dagster._config import process_config

    result = process_config(config_type, value)
    assert result.success, [e.message for e in result.errors]
    return result.value


def test_instance_config_validates_against_dagsters_schema(values, chart_env):
    from dagster._core.instance.config import dagster_instance_config_schema

    processed = _assert_valid(dagster_instance_config_schema(), instance_config(values))
    assert processed["run_launcher"]["class"] == "K8sRunLauncher"
    # What Dagster writes locally goes to the writable /tmp, not the read-only DAGSTER_HOME.
    artifacts = processed["local_artifact_storage"]["config"]["base_dir"]
    assert artifacts.startswith("/tmp/")
    # And the schema check is real: a misspelt field is refused.
    from dagster._config import process_config

    broken = instance_config(values)
    broken["run_monitoring"]["start_timeout_secs"] = 3
    assert not process_config(dagster_instance_config_schema(), broken).success


def test_run_launcher_config_validates_against_k8s_run_launcher(values, chart_env):
    from dagster_k8s import K8sRunLauncher

    processed = _assert_valid(K8sRunLauncher.config_type(), run_launcher_config(values))
    assert processed["job_namespace"] == NAMESPACE
    assert processed["env_config_maps"][-1] == "desi-anomaly-env"
    mounts = {m["name"]: m["mount_path"] for m in processed["volume_mounts"]}
    assert mounts == {"tmp": "/tmp", "desi-data": "/data"}
    volumes = {v["name"]: v for v in processed["volumes"]}
    assert volumes["desi-data"]["persistent_volume_claim"]["claim_name"] == "desi-anomaly-data"


def test_run_pods_container_context_is_accepted_by_dagster_k8s(values):
    from dagster_k8s.container_context import K8sContainerContext

    cfg = run_launcher_config(values)
    context = K8sContainerContext.create_from_config(
        {
            "k8s": {
                "env_config_maps": cfg["env_config_maps"][1:],
                "volume_mounts": cfg["volume_mounts"],
                "volumes": cfg["volumes"],
                "labels": cfg["labels"],
                "resources": cfg["resources"],
                "security_context": cfg["security_context"],
                "run_k8s_config": cfg["run_k8s_config"],
                "namespace": NAMESPACE,
            }
        }
    )
    assert context.namespace == NAMESPACE
    # dagster-k8s maps the camelCase fields onto the Kubernetes client models (unknown keys fail).
    pod_spec = context.run_k8s_config.pod_spec_config
    assert pod_spec["security_context"]["run_as_non_root"] is True
    assert pod_spec["security_context"]["seccomp_profile"] == {"type": "RuntimeDefault"}
    assert context.run_k8s_config.job_spec_config["backoff_limit"] == 0
    container = context.run_k8s_config.container_config
    assert container["security_context"]["read_only_root_filesystem"] is True
    typo = {"pod_spec_config": {"securityContext": {"runAsNonRot": True}}}
    with pytest.raises(Exception, match="runAsNonRot"):
        K8sContainerContext.create_from_config({"k8s": {"run_k8s_config": typo}})


def test_run_coordinator_and_storage_validate(values, chart_env):
    from dagster._core.run_coordinator import QueuedRunCoordinator

    pytest.importorskip("dagster_postgres")
    from dagster_postgres import DagsterPostgresStorage

    coordinator = instance_config(values)["run_coordinator"]["config"]
    _assert_valid(QueuedRunCoordinator.config_type(), coordinator)
    _assert_valid(DagsterPostgresStorage.config_type(), postgres_config(values))


def test_postgres_url_uses_an_installed_driver(values, chart_env):
    """The chart's scheme must name a driver the image has: dagster-postgres ships psycopg2."""
    pytest.importorskip("dagster_postgres")
    import sqlalchemy
    from dagster_postgres.utils import pg_url_from_config

    processed = _assert_valid(
        __import__("dagster_postgres").DagsterPostgresStorage.config_type(), postgres_config(values)
    )
    url = pg_url_from_config(processed)
    assert url.startswith("postgresql+psycopg2://dagster:")
    engine = sqlalchemy.create_engine(url)  # imports the DBAPI; does not connect
    assert engine.dialect.driver == "psycopg2"
    engine.dispose()


def test_code_location_loads_from_the_values(values):
    """The module/attribute the code server serves exist and are Dagster Definitions."""
    import dagster as dg

    (code,) = values["dagster-user-deployments"]["deployments"]
    args = code["codeServerArgs"]
    module = args[args.index("--module-name") + 1]
    attribute = args[args.index("--attribute") + 1]
    defs = getattr(importlib.import_module(module), attribute)
    assert isinstance(defs, dg.Definitions)
    assert code["port"] == 3030


# --- settings the app reads -----------------------------------------------------------------


def test_configmap_sets_the_settings_the_app_reads(configmap_env):
    for name in REQUIRED_ENV:
        assert configmap_env.get(name), name
    source = "\n".join(p.read_text() for p in (REPO / "desi_anomaly").rglob("*.py"))
    for name in configmap_env:
        if name.startswith("DESI_ANOMALY_"):
            assert name in source, f"{name} is set but the package never reads it"


def test_app_resources_built_from_the_configmap(configmap_env):
    from desi_anomaly.orchestration.resources import resources_from_env

    resources = resources_from_env(dict(configmap_env))
    assert resources["storage"].root == configmap_env["DESI_ANOMALY_STORAGE_ROOT"]
    assert resources["data_root"].root == configmap_env["DESI_ANOMALY_DATA_ROOT"]
    assert resources["storage"].duckdb_path == configmap_env["DESI_ANOMALY_DUCKDB_PATH"]
    ray_resource = next(r for r in resources.values() if hasattr(r, "address"))
    assert ray_resource.address == configmap_env["DESI_ANOMALY_RAY_ADDRESS"]


def test_data_paths_are_on_the_shared_volume_in_every_pod_that_uses_them(workloads, configmap_env):
    """Run pods, the code server and all Ray pods see the same files under the same paths."""
    (pvc,) = find("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    roots = [configmap_env[k] for k in REQUIRED_ENV if k != "DESI_ANOMALY_RAY_ADDRESS"]
    for name in ("code-server", "run-worker", "ray-head", "ray-worker-cpu", "ray-worker-gpu"):
        spec = workloads[name].spec
        claims = {
            v["name"]
            for v in spec.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert claims, name
        mounts = [
            m["mountPath"]
            for c in spec["containers"]
            for m in c["volumeMounts"]
            if m["name"] in claims
        ]
        for root in roots:
            assert any(root == m or root.startswith(m.rstrip("/") + "/") for m in mounts), (
                name,
                root,
            )


# --- images --------------------------------------------------------------------------------


def test_dockerfile_pins_torch_first_and_runs_as_non_root(values):
    text = (K8S / "Dockerfile").read_text()
    args = dockerfile_args()
    make_pin = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == make_pin == "2.13.0"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    package_at = text.index("pip install /src")
    assert torch_at < package_at
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users, "the image must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    assert values["dagster-user-deployments"]["deployments"][0]["securityContext"][
        "runAsUser"
    ] == int(uid)


def test_dagster_versions_match_across_images(values):
    args = dockerfile_args()
    major, minor, patch = args["DAGSTER_VERSION"].split(".")
    assert args["DAGSTER_LIBS_VERSION"] == f"0.{int(minor) + 16}.{patch}" and major == "1"
    for component in ("dagsterWebserver", "dagsterDaemon"):
        assert str(values[component]["image"]["tag"]) == args["DAGSTER_VERSION"], component
    header = (K8S / "helm" / "values.yaml").read_text().split("\n\n")[0]
    assert f"--version {args['DAGSTER_VERSION']}" in header


# --- security --------------------------------------------------------------------------------


def _containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_pod_and_container_is_locked_down(workloads, raycluster):
    for w in workloads.values():
        pod = w.spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, w.name
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", w.name
        assert pod.get("runAsUser", 1) != 0, w.name
        assert not w.spec.get("hostNetwork") and not w.spec.get("hostPID"), w.name
        assert not any("hostPath" in v for v in w.spec.get("volumes", [])), w.name
        for c in _containers(w.spec):
            sc = c.get("securityContext", {})
            where = f"{w.name}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged") is not True, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not c["image"].endswith(":latest") and ":" in c["image"], where
            # A read-only root needs a writable /tmp.
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, where
    autoscaler = raycluster["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["readOnlyRootFilesystem"] and autoscaler["capabilities"]["drop"] == ["ALL"]


def test_every_container_has_resource_requests_and_limits(workloads, raycluster):
    def check(resources: dict, where: str) -> None:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), (where, kind)

    for w in workloads.values():
        for c in _containers(w.spec):
            check(c.get("resources", {}), f"{w.name}/{c['name']}")
    check(raycluster["spec"]["autoscalerOptions"]["resources"], "ray-autoscaler")


def test_secrets_are_not_in_the_repository(values):
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]
    assert not find("Secret")
    (sts,) = find("StatefulSet")
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}


# --- network policies: evaluated flow by flow -------------------------------------------------


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in vals,
            "NotIn": key not in labels or labels[key] not in vals,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, pod: Workload, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod flows only
    if "namespaceSelector" in peer:
        ns_ok = _selects(peer["namespaceSelector"], pod.namespace_labels)
    else:
        ns_ok = pod.namespace == policy_ns
    return ns_ok and _selects(peer.get("podSelector"), pod.labels)


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        start = p.get("port")
        if start is None or start == port or start <= port <= p.get("endPort", start):
            return True
    return False


def _direction_allows(
    policies: list[dict], pod: Workload, peer: Workload, port: int, proto: str, egress: bool
) -> bool:
    kind, key, peers_key = ("Egress", "egress", "to") if egress else ("Ingress", "ingress", "from")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(x, peer, policy["metadata"]["namespace"]) for x in peers
            )
            if peer_ok and _port_matches(rule.get("ports"), port, proto):
                return True
    return False


def allowed(policies, src: Workload, dst: Workload, port: int, proto: str = "TCP") -> bool:
    return _direction_allows(policies, src, dst, port, proto, egress=True) and _direction_allows(
        policies, dst, src, port, proto, egress=False
    )


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    return find("NetworkPolicy")


KUBE_DNS = Workload("kube-dns", {"k8s-app": "kube-dns"}, {}, namespace="kube-system")
OUTSIDER = Workload("outsider", {"app": "something-else"}, {}, namespace="default")
INGRESS = Workload("ingress", {"app": "ingress-nginx"}, {}, namespace="ingress-nginx")


def test_default_deny_covers_the_whole_namespace(policies, workloads):
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny policy"
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in policies)
    # Every pod is isolated both ways, and some allow rule selects it (it can do its job).
    for w in workloads.values():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], w.labels)]
        assert any(p["spec"]["podSelector"] for p in selecting), w.name


ALLOWED = [
    ("webserver", "dagster-postgresql", 5432),
    ("daemon", "dagster-postgresql", 5432),
    ("code-server", "dagster-postgresql", 5432),
    ("run-worker", "dagster-postgresql", 5432),
    ("webserver", "code-server", 3030),
    ("daemon", "code-server", 3030),
    ("run-worker", "ray-head", 10001),
    ("run-worker", "ray-head", 8265),
    ("ray-worker-cpu", "ray-head", 6379),
    ("ray-worker-gpu", "ray-head", 6379),
    ("ray-head", "ray-worker-cpu", 41000),
    ("ray-worker-cpu", "ray-worker-gpu", 12345),
]
DENIED = [
    ("ray-head", "dagster-postgresql", 5432),
    ("ray-worker-cpu", "dagster-postgresql", 5432),
    ("ray-worker-gpu", "code-server", 3030),
    ("run-worker", "code-server", 3030),
    ("run-worker", "ray-worker-cpu", 41000),
    ("webserver", "ray-worker-cpu", 6379),
    ("run-worker", "ray-head", 6379),
    ("dagster-postgresql", "ray-head", 10001),
    ("code-server", "webserver", 80),
]


@pytest.mark.parametrize(("src", "dst", "port"), ALLOWED)
def test_intended_flows_are_allowed(policies, workloads, src, dst, port):
    assert allowed(policies, workloads[src], workloads[dst], port)


@pytest.mark.parametrize(("src", "dst", "port"), DENIED)
def test_other_flows_are_denied(policies, workloads, src, dst, port):
    assert not allowed(policies, workloads[src], workloads[dst], port)


def test_dns_for_everyone_and_nothing_from_outside_but_the_webserver(policies, workloads):
    for w in workloads.values():
        assert allowed(policies, w, KUBE_DNS, 53, "UDP"), w.name
        assert not allowed(policies, w, OUTSIDER, 443), w.name
        reachable = allowed(policies, INGRESS, w, 80)
        assert reachable == (w.name == "webserver"), w.name
        for port in (5432, 3030, 10001, 6379, 8265):
            assert not allowed(policies, OUTSIDER, w, port), (w.name, port)


def test_policy_evaluator_sees_the_default_deny(workloads):
    """Without the allow policies every flow is denied; without any policy all are allowed."""
    deny = [p for p in find("NetworkPolicy") if p["metadata"]["name"] == "default-deny-all"]
    assert not allowed(deny, workloads["run-worker"], workloads["dagster-postgresql"], 5432)
    assert allowed([], workloads["ray-head"], workloads["dagster-postgresql"], 5432)
