"""Deployment files in infra/, validated with the schemas that ship in Ray and against `herd plan`."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from clirun import herd, herd_json
from cluster.job_spec_file import ensure_job, read_spec
from cluster.job_store import JobStore
from cluster.models import create_tiny_model
from cluster.plan import PlanInput, plan
from cluster.storage import open_storage
from serving.app import build_app, deployment_options

INFRA = Path(__file__).resolve().parents[1] / "infra"
GIB = 2**30


def _docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((INFRA / name).read_text()) if d}


def _images() -> dict[str, str]:
    """Image name -> Dockerfile, from each Dockerfile's `# herd-image:` line."""
    out = {}
    for f in INFRA.glob("Dockerfile*"):
        m = re.search(r"^# herd-image: (\S+)$", f.read_text(), re.M)
        assert m, f"{f} names no image"
        out[m[1]] = f.name
    return out


def _quantity_gib(q: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", str(q))
    assert m, q
    return float(m[1]) * units[m[2]]


def _check_ray_cluster_spec(spec: dict) -> list[dict]:
    """What KubeRay's CRD requires of a RayCluster spec; returns the worker groups' containers."""
    images = _images()
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    head_c = head["template"]["spec"]["containers"][0]
    assert images[head_c["image"].split(":")[0]] == "Dockerfile"  # the CPU image
    assert "nvidia.com/gpu" not in head_c.get("resources", {}).get("limits", {})
    workers = []
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group and group["template"]["spec"]["containers"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        c = group["template"]["spec"]["containers"][0]
        assert images[c["image"].split(":")[0]] == "Dockerfile.gpu"
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert int(group["rayStartParams"]["num-gpus"]) == gpus
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("DS_ACCELERATOR") != "cpu"  # GPU workers run DeepSpeed on CUDA
        workers.append({"group": group, "container": c, "gpus": gpus, "env": env})
    return workers


def test_images_cpu_and_gpu():
    images = _images()
    assert set(images.values()) == {"Dockerfile", "Dockerfile.gpu"}
    gpu = (INFRA / "Dockerfile.gpu").read_text()
    assert "DS_ACCELERATOR=cpu" not in gpu and re.search(r"^FROM nvidia/cuda:(\d+)\.", gpu, re.M)
    cuda_major = re.search(r"^FROM nvidia/cuda:(\d+)\.", gpu, re.M)[1]
    assert re.search(rf"whl/cu{cuda_major}\d", gpu)  # the torch build for the base image's CUDA
    pinned = re.search(r"^torch==(\S+)$", (INFRA.parent / "constraints.txt").read_text(), re.M)[1]
    assert f"torch=={pinned}" in gpu and f"torch=={pinned}" in (INFRA / "Dockerfile").read_text()


def test_raycluster_manifest():
    docs = _docs("kuberay-cluster.yaml")
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    (worker,) = _check_ray_cluster_spec(rc["spec"])
    assert worker["group"]["minReplicas"] < worker["group"]["maxReplicas"]  # autoscaling
    assert "eks.amazonaws.com/role-arn" in docs["ServiceAccount"]["metadata"]["annotations"]  # S3 via IAM role
    assert not any("AWS_" in e for e in yaml.safe_dump(rc).split())


def test_rayservice_runs_herds_app_with_tp8_as_herd_plan_says():
    rs = _docs("kuberay-rayservice.yaml")["RayService"]
    assert rs["apiVersion"] == "ray.io/v1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    app = config.applications[0]
    assert app.import_path == "serving.app:build_app"
    args = app.args
    build_app(dict(args))  # the builder accepts these arguments as they are
    assert (args["tp"], args["device"], args["min_replicas"] < args["max_replicas"]) == (8, "cuda", True)
    assert args["storage"].startswith("s3://")
    options = deployment_options(args)
    assert options["placement_group_bundles"][1:] == [{"CPU": args["worker_cpus"], "GPU": 1}] * 8
    assert options["placement_group_strategy"] == "STRICT_PACK"
    (worker,) = _check_ray_cluster_spec(rs["spec"]["rayClusterConfig"])
    # herd plan for the GPUs the worker group runs on (A100 40 GB): TP=8, one replica per 8-GPU pod
    served = plan(PlanInput(model="70b", gpu_memory_gib=40, gpus_per_node=worker["gpus"],
                            max_concurrent=args["max_batch"], context=args["max_seq_len"],
                            utilization=args["gpu_memory_utilization"]))["serving"]
    assert served["tp"] == args["tp"] == worker["gpus"] and served["replicas_per_node"] == 1
    assert worker["group"]["maxReplicas"] == args["max_replicas"]  # a pod per replica at the upper bound
    # the pod's memory holds the node-local model cache's reads (bf16 weights, 138 GB)
    assert _quantity_gib(worker["container"]["resources"]["limits"]["memory"]) * GIB >= served["weights_gb"] * 1e9
    keyed = [e for e in worker["container"]["env"] if e["name"] == "HERD_API_KEY"]
    assert keyed and keyed[0]["valueFrom"]["secretKeyRef"]["name"]  # the API key from a Kubernetes secret


def test_dry_run_prints_the_rayservice_format(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", "very-secret")
    rs = yaml.safe_load(_docs("kuberay-rayservice.yaml")["RayService"]["spec"]["serveConfigV2"])
    args = rs["applications"][0]["args"]
    text = herd("serve", "deploy", "--dry-run", "--model", args["model"], "--tp", str(args["tp"]), "--device",
                "cuda", "--max-batch", str(args["max_batch"]), "--max-seq-len", str(args["max_seq_len"]),
                storage=args["storage"]).stdout
    printed = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert "very-secret" not in text
    app = printed.applications[0]
    assert app.import_path == rs["applications"][0]["import_path"] and app.route_prefix == "/"
    assert set(args) <= set(app.args)  # the RayService uses the CLI's own argument names
    assert {k: app.args[k] for k in ("model", "tp", "device", "max_batch", "max_seq_len", "storage")} == \
        {k: args[k] for k in ("model", "tp", "device", "max_batch", "max_seq_len", "storage")}
    as_json = herd_json("serve", "deploy", "--dry-run", "--model", "m", storage=tmp_path)
    ServeDeploySchema.model_validate(as_json)


def test_rayjob_lora_zero2_creates_its_own_job_record(tmp_path):
    docs = _docs("kuberay-rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["entrypoint"].startswith("python -m jobs.run ")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["DS_ACCELERATOR"] == "cuda"
    workers = _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    files = docs["ConfigMap"]["data"]
    (tmp_path / "spec.json").write_text(files["spec.json"])
    (tmp_path / "train.jsonl").write_text(files["train.jsonl"])
    spec = read_spec(tmp_path / "spec.json")
    assert (spec.model, spec.method, spec.zero, spec.use_gpu) == ("llama2-7b", "lora", 2, True)
    total_gpus = sum(w["gpus"] * w["group"]["replicas"] for w in workers)
    assert spec.workers == total_gpus
    need = plan(PlanInput(model="7b", method="lora", zero=2, gpu_memory_gib=40, gpus=spec.workers,
                          context=spec.max_seq_len, micro_batch=spec.batch_size, lora_rank=spec.lora_rank))["finetune"]
    assert need["smallest_gpus"] <= spec.workers
    row = next(r for r in need["stages"] if r["zero"] == 2 and not r["offload"])
    assert row["fits"]
    # a worker pod's memory holds the bf16 base while it is loaded, plus any offloaded state
    assert all(_quantity_gib(w["container"]["resources"]["limits"]["memory"]) * GIB >=
               (row["frozen_base_gb"] + row["host_gb"]) * 1e9 for w in workers)
    # what the entrypoint does with the mounted files: validate, store the data, create the record
    entry = job["spec"]["entrypoint"].split()
    job_id = entry[entry.index("--job-id") + 1]
    storage = open_storage(str(tmp_path / "storage"))
    create_tiny_model(storage, "llama2-7b")  # a tiny stand-in under the spec's model name
    assert ensure_job(storage, job_id, tmp_path / "spec.json", tmp_path / "train.jsonl") is True
    record = JobStore(storage).read(job_id)
    assert record["state"] == "PENDING" and record["spec"]["adapter"] == "support-bot"
    assert storage.read_text(JobStore(storage).data_key(job_id)) == files["train.jsonl"]
    assert ensure_job(storage, job_id, tmp_path / "spec.json", tmp_path / "train.jsonl") is False  # a retry


def test_cluster_launcher_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray-cluster-launcher.yaml").read_text())
    jsonschema.validate(config, schema)
    images = _images()
    assert images[config["docker"]["head_image"].split(":")[0]] == "Dockerfile"
    assert images[config["docker"]["worker_image"].split(":")[0]] == "Dockerfile.gpu"
    nodes = config["available_node_types"]
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())  # S3 through an instance role
    gpu = next(n for n in nodes.values() if n["resources"].get("GPU"))
    served = plan(PlanInput(model="70b", gpu_memory_gib=40, gpus_per_node=gpu["resources"]["GPU"]))["serving"]
    assert gpu["resources"]["GPU"] % served["tp"] == 0  # whole TP groups per node
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to catch a typo
        jsonschema.validate({**config, "docker": {**config["docker"], "imagee": "x"}}, schema)
