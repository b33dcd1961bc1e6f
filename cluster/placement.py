"""Where a serving replica runs: the device it computes on and the Ray resources it asks for.

`herd serve deploy --device auto|cpu|cuda` is decided here, once, at deploy time, from what the
cluster reports (auto: any GPU in the cluster -> cuda). The Serve options follow from it:

- TP=1 on cuda: the replica asks for one GPU (`ray_actor_options.num_gpus`), so Ray sets its
  CUDA_VISIBLE_DEVICES and the weights go to `cuda:0` of that view;
- TP=N: one small bundle for the replica plus one bundle per TP worker, each with one GPU on cuda,
  STRICT_PACK by default so that a TP group (which all-reduces every layer) stays on one node;
- the TP group talks NCCL on GPUs and gloo on CPUs.

A `--device cuda` that the cluster cannot place fails at deploy with the counts, instead of a
replica waiting forever for a GPU that no node has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TP_STRATEGY = "STRICT_PACK"
REPLICA_BUNDLE_CPUS = 0.2  # the TP replica only drives its workers


class PlacementError(ValueError):
    """A deployment the cluster's resources cannot hold (bad usage: exit code 2)."""


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    ip: str
    cpus: float
    gpus: float


def cluster_nodes(dashboard_url: str) -> list[NodeResources]:
    """The alive nodes and their total CPUs/GPUs, from the dashboard's state API."""
    from ray.util.state import list_nodes
    nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [NodeResources(n.node_id, n.node_ip, float(n.resources_total.get("CPU", 0)),
                          float(n.resources_total.get("GPU", 0))) for n in nodes]


def resolve_device(requested: str, nodes: list[NodeResources]) -> str:
    """'auto' becomes 'cuda' when any node has a GPU, else 'cpu'; explicit choices stay."""
    if requested not in DEVICES:
        raise PlacementError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if requested != "auto":
        return requested
    return "cuda" if any(n.gpus >= 1 for n in nodes) else "cpu"


def check_gpus(device: str, tp: int, replicas: int, nodes: list[NodeResources]) -> None:
    """Fail now, with the counts, when cuda replicas cannot be placed (GPUs of a TP group on one node)."""
    if device != "cuda":
        return
    per_node = sorted(int(n.gpus) for n in nodes)
    total = sum(per_node)
    if not any(g >= tp for g in per_node):
        raise PlacementError(
            f"--device cuda with --tp {tp} needs {tp} GPU(s) on one node; the cluster's {len(nodes)} node(s) "
            f"have {per_node or [0]} GPUs ({total} in all). Use --device cpu, a smaller --tp, or add GPU nodes")
    fits = sum(g // tp for g in per_node)
    if fits < replicas:
        raise PlacementError(
            f"--device cuda: {replicas} replica(s) of TP={tp} need {replicas * tp} GPUs ({tp} per node per "
            f"replica); the cluster's nodes have {per_node} GPUs, room for {fits} replica(s). "
            "Lower --min-replicas or add GPU nodes")


def resource_options(device: str, tp: int, replica_cpus: float, worker_cpus: float,
                     strategy: str | None = None) -> dict[str, Any]:
    """The Serve deployment options that place one replica (and its TP workers)."""
    gpu = 1 if device == "cuda" else 0
    if tp <= 1:
        actor: dict[str, Any] = {"num_cpus": replica_cpus}
        if gpu:
            actor["num_gpus"] = gpu
        return {"ray_actor_options": actor}
    worker: dict[str, float] = {"CPU": worker_cpus}
    if gpu:
        worker["GPU"] = gpu
    return {"ray_actor_options": {"num_cpus": REPLICA_BUNDLE_CPUS},
            "placement_group_bundles": [{"CPU": REPLICA_BUNDLE_CPUS}] + [dict(worker) for _ in range(tp)],
            "placement_group_strategy": strategy or DEFAULT_TP_STRATEGY}


def tp_worker_options(device: str, worker_cpus: float, placement_group=None, rank: int = 0) -> dict[str, Any]:
    """Ray actor options of TP worker `rank`: its own bundle (rank + 1) of the replica's group."""
    options: dict[str, Any] = {"num_cpus": worker_cpus}
    if device == "cuda":
        options["num_gpus"] = 1
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=rank + 1)
    return options


def torch_device(device: str) -> str:
    """The torch device inside a replica or TP worker: Ray's CUDA_VISIBLE_DEVICES leaves one GPU, cuda:0."""
    return "cuda:0" if device == "cuda" else "cpu"


def dist_backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def app_device(requested: str) -> str:
    """The device inside Serve's application builder: the CLI sends 'cpu' or 'cuda'; an 'auto' left in a
    hand-written config (a RayService) is decided from the cluster this builder runs in."""
    if requested != "auto":
        return resolve_device(requested, [])
    import ray
    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def device_config(args: dict) -> dict[str, Any]:
    """The app-config keys for the device and memory choices (the engine reads them from there)."""
    def opt(key: str, kind):
        return None if args.get(key) is None else kind(args[key])
    return {"device": args.get("device", "cpu"),
            "gpu_memory_utilization": opt("gpu_memory_utilization", float),
            "kv_cache_gib": opt("kv_cache_gib", float),
            "tp_setup_timeout_s": float(args.get("tp_setup_timeout_s") or 600.0)}
