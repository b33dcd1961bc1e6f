"""Device choice, Serve resource options and device-aware loading (cluster/placement.py, llama/weights.py)."""

import pytest
import torch
import yaml

from clirun import herd, herd_json
from cluster.models import create_tiny_model, load_base
from cluster.placement import NodeResources, PlacementError, check_gpus, resolve_device
from cluster.storage import open_storage
from llama.weights import load_safetensors
from serving.app import deployment_options

CPU_ONLY = [NodeResources("h", "10.0.0.1", 8, 0)]
GPUS = [NodeResources("h", "10.0.0.1", 8, 0), NodeResources("a", "10.0.0.2", 16, 4), NodeResources("b", "10.0.0.3", 16, 2)]


def test_auto_is_decided_from_the_clusters_gpus():
    assert resolve_device("auto", CPU_ONLY) == "cpu"
    assert resolve_device("auto", GPUS) == "cuda"
    assert resolve_device("cpu", GPUS) == "cpu" and resolve_device("cuda", CPU_ONLY) == "cuda"
    with pytest.raises(PlacementError, match="unknown device 'tpu'"):
        resolve_device("tpu", GPUS)


def test_cuda_without_enough_gpus_fails_with_the_counts():
    check_gpus("cuda", 4, 1, GPUS)  # node a holds a TP=4 group
    check_gpus("cpu", 8, 9, CPU_ONLY)  # cpu never asks for GPUs
    with pytest.raises(PlacementError, match=r"needs 8 GPU\(s\) on one node.*\[0, 2, 4\] GPUs \(6 in all\)"):
        check_gpus("cuda", 8, 1, GPUS)
    check_gpus("cuda", 2, 3, GPUS)  # two TP=2 groups on node a, one on node b
    with pytest.raises(PlacementError, match=r"4 replica\(s\) of TP=2 need 8 GPUs.*room for 3 replica"):
        check_gpus("cuda", 2, 4, GPUS)
    with pytest.raises(PlacementError, match=r"cluster's 1 node\(s\) have \[0\] GPUs"):
        check_gpus("cuda", 1, 1, CPU_ONLY)


def test_serve_options_ask_for_one_gpu_per_replica_or_tp_worker():
    tp1 = deployment_options({"device": "cuda", "tp": 1, "replica_cpus": 2.0})
    assert tp1["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1}
    assert "placement_group_bundles" not in tp1
    tp4 = deployment_options({"device": "cuda", "tp": 4, "worker_cpus": 3.0})
    assert tp4["placement_group_bundles"] == [{"CPU": 0.2}] + [{"CPU": 3.0, "GPU": 1}] * 4
    assert tp4["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in tp4["ray_actor_options"]  # the replica drives its workers, holds no GPU
    cpu = deployment_options({"device": "cpu", "tp": 2, "worker_cpus": 1.0})
    assert cpu["placement_group_bundles"] == [{"CPU": 0.2}, {"CPU": 1.0}, {"CPU": 1.0}]
    assert "num_gpus" not in deployment_options({"device": "cpu"})["ray_actor_options"]


def test_dry_run_prints_the_device_and_memory_options(tmp_path):
    out = herd_json("serve", "deploy", "--model", "m", "--dry-run", "--device", "cuda", "--tp", "2",
                    "--max-seq-len", "2048", "--gpu-memory-utilization", "0.85", "--kv-cache-gib", "12",
                    "--timeout", "900", storage=tmp_path / "s")
    args = out["applications"][0]["args"]
    assert (args["device"], args["max_seq_len"], args["gpu_memory_utilization"], args["kv_cache_gib"]) == \
        ("cuda", 2048, 0.85, 12.0)
    assert args["tp_setup_timeout_s"] == 900
    text = herd("serve", "deploy", "--model", "m", "--dry-run", storage=tmp_path / "s").stdout
    assert yaml.safe_load(text)["applications"][0]["args"]["device"] == "auto"  # decided by build_app


def test_weights_load_in_the_requested_dtype_tensor_by_tensor(tmp_path):
    storage = open_storage(str(tmp_path / "s"))
    create_tiny_model(storage, "m")  # stored in fp32
    state = load_safetensors(storage.local_path("models/m"), device="cpu", dtype=torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    model, _ = load_base(storage, "m", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weights_go_straight_to_the_gpu_in_bf16(tmp_path):
    storage = open_storage(str(tmp_path / "s"))
    create_tiny_model(storage, "m")
    model, _ = load_base(storage, "m", device="cuda:0")  # fp32 checkpoint, auto dtype: bf16 on a GPU
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
