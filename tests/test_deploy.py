"""Cluster deployment files: the KubeRay RayCluster and RayJob (cluster/deploy/kuberay/) have what
KubeRay requires, GPUs on the workers, secrets only from Kubernetes Secrets and one shared volume
at the same path in every pod; the AWS cluster-launcher YAML passes Ray's own schema and checks;
the job commands they carry are valid elmforge commands.

No Kubernetes or AWS here: the files are parsed and checked, not applied.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "cluster" / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
AWS = DEPLOY / "ray-cluster-aws.yaml"
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
NOT_SECRET = {"RAY_AUTH_MODE"}  # `token`: the mode, not the token
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # DNS-1035, as KubeRay validates names
# KubeRay's limits: the cluster's service names must fit 63 characters; a RayJob's cluster adds 6.
MAX_NAME = {"RayCluster": 53, "RayJob": 47}


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


def cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec: the standalone cluster's and the one the RayJob creates."""
    return {"raycluster": load(RAYCLUSTER)["spec"], "rayjob": load(RAYJOB)["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> dict[str, dict]:
    """group -> pod template spec, for the head and each worker group."""
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def all_containers(spec: dict):
    for group, pod in pod_templates(spec).items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield group, pod, container


def entrypoint_overrides() -> list[str]:
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert argv[:2] == ["elmforge", "train"], f"the RayJob entrypoint is not `elmforge train ...`: {argv}"
    return argv[2:]


def override(overrides: list[str], key: str) -> str:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    assert values, f"the entrypoint does not set {key}"
    return values[-1]


# ---- KubeRay --------------------------------------------------------------------------------


@pytest.mark.parametrize("path, kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_resource_header(path, kind):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    name = doc["metadata"]["name"]
    assert DNS_LABEL.fullmatch(name) and len(name) <= MAX_NAME[kind], (
        f"{path.name}: metadata.name {name!r} must be a DNS-1035 label of at most {MAX_NAME[kind]} characters"
    )


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_cluster_spec_has_what_kuberay_requires(which):
    spec = cluster_specs()[which]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    # KubeRay's rayStartParams is map[string]string: a bare number or boolean is rejected.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), head["rayStartParams"]
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    assert len({g["groupName"] for g in groups}) == len(groups), "worker group names repeat"
    for g in groups:
        assert DNS_LABEL.fullmatch(g["groupName"]), g["groupName"]
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[key], int), f"{g['groupName']}.{key} must be an integer"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        assert g["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_every_container_runs_our_pinned_gpu_image(which):
    images = {c["image"] for _, _, c in all_containers(cluster_specs()[which])}
    assert len(images) == 1, f"one image for the whole cluster (same Ray and Python everywhere): {images}"
    image = images.pop()
    repo, _, tag = image.rpartition(":")
    assert repo and tag != "latest" and tag.endswith("-gpu"), f"{image}: pin a tag built from docker/Dockerfile.gpu"


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_gpu_workers_have_gpu_limits(which):
    for g in cluster_specs()[which]["workerGroupSpecs"]:
        resources = g["template"]["spec"]["containers"][0]["resources"]
        gpus = int(resources["limits"]["nvidia.com/gpu"])
        assert gpus >= 1, f"{g['groupName']}: no GPUs"
        # Kubernetes requires extended resources' requests to equal their limits.
        assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    head = cluster_specs()[which]["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head should run no training or data tasks"


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_secrets_come_only_from_secret_key_refs(which):
    spec = cluster_specs()[which]
    for group, _, container in all_containers(spec):
        where = f"{group}/{container['name']}"
        assert "envFrom" not in container, f"{where}: use secretKeyRef entries, not envFrom"
        env = {e["name"]: e for e in container.get("env", [])}
        for name, entry in env.items():
            if SECRET_NAME.search(name) and name not in NOT_SECRET:
                assert "value" not in entry, f"{where}: {name} is inline; it must come from a Secret"
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{where}: {name} must use valueFrom.secretKeyRef"
        # Every Ray process needs the token; rank 0 (which logs to W&B) may land in any worker pod.
        for name in ("RAY_AUTH_TOKEN", "WANDB_API_KEY"):
            assert name in env, f"{where}: {name} missing"
        assert env["RAY_AUTH_MODE"].get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token", "KubeRay must know the cluster uses token auth (authOptions.mode)"
    token_secret = {
        c_env["valueFrom"]["secretKeyRef"]["name"]
        for _, _, c in all_containers(spec)
        for c_env in c["env"]
        if c_env["name"] == "RAY_AUTH_TOKEN"
    }
    assert token_secret == {auth["secretName"]}, "pods and KubeRay must use the same token Secret"


def test_the_job_carries_no_secret_of_its_own():
    job = load(RAYJOB)["spec"]
    runtime_env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}") or {}
    leaked = [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
    assert not leaked, f"runtimeEnvYAML env_vars {leaked}: Ray stores and shows them"
    assert not re.search(r"(KEY|TOKEN|SECRET|PASSW)\w*=", job["entrypoint"], re.IGNORECASE), job["entrypoint"]


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_every_container_mounts_the_same_shared_volume_at_the_same_path(which):
    mounts = set()
    for group, pod, container in all_containers(cluster_specs()[which]):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [
            (volumes[m["name"]]["persistentVolumeClaim"]["claimName"], m["mountPath"])
            for m in container.get("volumeMounts", [])
            if "persistentVolumeClaim" in volumes.get(m["name"], {})
        ]
        assert shared, f"{group}/{container['name']} mounts no shared volume"
        mounts.update(shared)
    assert len(mounts) == 1, f"one claim at one path in every container, found {sorted(mounts)}"


def shared_mount_path() -> str:
    head = pod_templates(cluster_specs()["rayjob"])["head"]
    volumes = {v["name"]: v for v in head["volumes"]}
    return next(
        m["mountPath"] for m in head["containers"][0]["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]
    )


def test_rayjob_runs_elmforge_train_on_shared_storage_and_cleans_up():
    job = load(RAYJOB)["spec"]
    overrides = entrypoint_overrides()
    assert "experiment=openelm_1_1b" in overrides
    assert override(overrides, "cluster.address") == "auto"
    mount = shared_mount_path()
    for key in ("storage_path", "tokenizer.path"):
        value = override(overrides, key)
        on_volume = value == mount or value.startswith(mount.rstrip("/") + "/")
        assert on_volume, f"{key}={value} is not on the shared volume {mount}"
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["rayClusterSpec"], dict)


def test_rayjob_creates_the_same_cluster_as_raycluster_yaml():
    assert cluster_specs()["rayjob"] == cluster_specs()["raycluster"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec; change both together"
    )


def test_the_rayjob_entrypoint_is_a_valid_elmforge_command_using_every_gpu(tmp_path):
    """Composed by elmforge itself (schema, value checks, batch arithmetic), with the tokenizer path
    pointed at a stand-in file, since the real one lives on the cluster's volume."""
    from cluster.config import compose_config

    (tmp_path / "tokenizer.model").write_bytes(b"")
    overrides = [
        f"tokenizer.path={tmp_path / 'tokenizer.model'}" if o.startswith("tokenizer.path=") else o
        for o in entrypoint_overrides()
    ]
    cfg = compose_config(overrides)
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster_specs()["rayjob"]["workerGroupSpecs"]
    )
    assert cfg["cluster"]["num_workers"] == gpus, "one training worker per GPU of the worker pods"
    assert cfg["cluster"]["use_gpu"] is True
    assert cfg["storage_path"] == override(overrides, "storage_path")


# ---- AWS cluster launcher ---------------------------------------------------------------------


def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"Ray's cluster-config schema is not at {path}"
    return json.loads(path.read_text())


def test_aws_launcher_config_matches_rays_schema():
    import jsonschema

    jsonschema.validate(load(AWS), ray_schema())


def test_aws_launcher_config_passes_rays_own_checks():
    """What `ray up` does first: fill in the AWS defaults, then validate (schema + node types)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(AWS)))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_aws_launcher_config_has_a_head_and_gpu_workers_in_our_image():
    cfg = load(AWS)
    assert cfg["cluster_name"] and isinstance(cfg["max_workers"], int)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_instance = re.compile(r"(p4d|p4de|p5|p5e|p5en|g5|g6|g6e)\.")
    gpu_types = [
        name for name, t in types.items()
        if name != cfg["head_node_type"] and gpu_instance.match(t["node_config"]["InstanceType"])
    ]
    assert gpu_types, "no GPU worker node type (p4d, p5 or g5 ...)"
    for name in gpu_types:
        most = types[name].get("max_workers", cfg["max_workers"])
        assert types[name].get("min_workers", 0) <= most <= cfg["max_workers"]
    kuberay_image = cluster_specs()["raycluster"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cfg["docker"]["image"] == kuberay_image, "the launcher and KubeRay should run the same image"


def test_aws_launcher_starts_ray_with_the_usual_flags():
    cfg = load(AWS)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    for flag in ("ray start --head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml"):
        assert flag in head, f"head_start_ray_commands lacks {flag}"
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "ray stop" in head and "ray stop" in worker


def test_aws_launcher_mounts_shared_storage_and_keeps_secrets_out():
    cfg = load(AWS)
    run_options = " ".join(cfg["docker"]["run_options"])
    assert re.search(r"--volume (\S+):(\S+)", run_options), "no shared storage mounted into the container"
    strings = json.dumps(cfg)
    assert not re.search(r"(WANDB_API_KEY|RAY_AUTH_TOKEN|HF_TOKEN)\s*=", strings), "a secret is set inline"
    assert "env_vars" not in strings
