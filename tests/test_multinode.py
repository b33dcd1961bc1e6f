"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): what only shows with more than one.

One cluster for the module, kept tiny for a 2-core machine: a head (1 CPU, no GPU, dashboard on
127.0.0.2, so that nothing can pass by assuming 127.0.0.1) and worker nodes of 2 CPUs and 2
logical GPUs, each with its own model cache and temp dir. Storage is SeaweedFS (S3) only: no
path is shared between the nodes. The tests run in order; each leaves the cluster as the next expects.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from clirun import herd, herd_json
from cluster import serve_control
from cluster.job_store import JobStore
from cluster.models import create_tiny_model
from cluster.placement import resource_options, tp_worker_options
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from llama.tiny import demo_dataset
from train_helpers import write_jsonl

HEAD_IP = "127.0.0.2"
STEPS = 12  # loopback, but not the address a hard-coded default would use


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Nodes:
    """The cluster, and each worker node's own cache and temp dir."""

    def __init__(self, root: Path, s3_env: dict[str, str]):
        self.root, self.s3_env = root, s3_env
        self.dashboard_port = _free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, num_gpus=0, node_ip_address=HEAD_IP, include_dashboard=True, dashboard_host=HEAD_IP,
            dashboard_port=self.dashboard_port, dashboard_agent_listen_port=_free_port(),  # not the shared default
            env_vars=self._env("head")))
        self.url = f"http://{HEAD_IP}:{self.dashboard_port}"
        self.nodes: dict[str, object] = {}

    def _env(self, name: str) -> dict[str, str]:
        # S3 credentials on the nodes themselves (an instance role's part on a real cluster)
        env = {"HERD_CACHE_DIR": str(self.root / name / "cache"), **self.s3_env}
        if name != "head":  # (the head's job agent does not start with a TMPDIR of its own)
            (self.root / name / "tmp").mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(self.root / name / "tmp")
        return env

    def add(self, name: str) -> str:
        node = self.cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address=HEAD_IP, env_vars=self._env(name))
        self.nodes[name] = node
        return node.node_id

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name))

    def name_of(self, node_id: str) -> str:
        return next(n for n, node in self.nodes.items() if node.node_id == node_id)

    def downloads(self, name: str) -> list[dict]:
        log = self.root / name / "cache" / "models" / "downloads.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _job_agent_ready(url: str) -> bool:
    from ray.job_submission import JobSubmissionClient
    try:
        JobSubmissionClient(url).submit_job(entrypoint="true")
        return True
    except Exception:  # noqa: BLE001 - "No available agent to submit job" while the head's agent starts
        return False


@pytest.fixture(scope="module")
def nodes(seaweed, tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("nodes"))
    saved = {k: os.environ.get(k) for k in [*seaweed.env(), "HERD_SERVE_HOST", "HERD_RUNTIME_ENV"]}
    os.environ.update(seaweed.env())
    # The declared runtime env of job entrypoints: the interpreter the nodes have Herd in
    # (on a real cluster: the image's python, or an image_uri / pip list).
    os.environ["HERD_RUNTIME_ENV"] = json.dumps(
        {"env_vars": {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}})
    os.environ["HERD_SERVE_HOST"] = HEAD_IP  # keep the ingress on loopback in tests
    c = None
    try:
        c = Nodes(root, seaweed.env())
        c.add("a")
        c.add("b")
        ray.init(address=c.cluster.address)
        from ray import serve
        c.serve_port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": HEAD_IP, "port": c.serve_port})
        _wait(lambda: _job_agent_ready(c.url), 300, "the head's job agent", every=2)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_url(nodes):
    url = f"s3://herd/{uuid.uuid4().hex[:12]}"
    create_tiny_model(open_storage(url), "base", preset_name="tiny-mha")  # 4 heads, 4 KV heads: TP=2 divides
    return url


# ---- placement on logical GPUs (GPU serving issue, point 1) -----------------------------------------

def test_device_auto_and_gpu_counts_come_from_the_cluster(nodes, s3_url):
    args = {"model": "base", "tp": 1, "device": "auto", "min_replicas": 1}
    assert serve_control.place(args, nodes.url)["device"] == "cuda"  # 4 logical GPUs on two nodes
    assert serve_control.place({**args, "device": "cpu"}, nodes.url)["device"] == "cpu"
    r = herd("serve", "deploy", "--model", "base", "--device", "cuda", "--tp", "4", "--address", nodes.url,
             storage=s3_url, expect=2)
    assert "needs 4 GPU(s) on one node" in r.output and "[0, 2, 2] GPUs (4 in all)" in r.output.replace("\n", " ")


def test_replicas_and_tp_workers_get_their_gpus(nodes):
    from ray import serve

    @ray.remote
    class Probe:  # stands where a TP worker stands: same options, same bundles
        def placement(self) -> dict:
            return {"node_id": ray.get_runtime_context().get_node_id(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    @serve.deployment
    class OneGPU:
        def __call__(self, request) -> dict:
            return {"gpus": ray.get_gpu_ids(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    @serve.deployment
    class TPGroup:  # as serving/tensor_parallel.py's TPRunner places its workers
        def __init__(self):
            from ray.util.placement_group import get_current_placement_group
            pg = get_current_placement_group()
            self.workers = [Probe.options(**tp_worker_options("cuda", 0.1, pg, rank)).remote() for rank in range(2)]

        def __call__(self, request) -> list:
            return ray.get([w.placement.remote() for w in self.workers])

    try:
        serve.run(OneGPU.options(**resource_options("cuda", 1, 0.1, 0.1)).bind(), name="one", route_prefix="/one")
        serve.run(TPGroup.options(**resource_options("cuda", 2, 0.1, 0.1)).bind(), name="tp", route_prefix="/tp")
        one = _wait(lambda: _serve_call("one"), 120, "the TP=1 probe")
        assert len(one["gpus"]) == 1 and one["visible"] in ("0", "1")
        workers = _wait(lambda: _serve_call("tp"), 120, "the TP=2 probe")
        assert {w["cuda_visible_devices"] for w in workers} == {"0", "1"}  # one distinct GPU each
        assert len({w["node_id"] for w in workers}) == 1  # STRICT_PACK: the group on one node
    finally:
        serve.delete("one")
        serve.delete("tp")


def test_tp_worker_setup_times_out_instead_of_hanging(nodes, s3_url):
    from serving.tensor_parallel import TPRunner
    start = time.time()
    with pytest.raises(TimeoutError, match=r"TP=2 workers were not placed and loaded within 5s"):
        TPRunner.create(open_storage(s3_url), "base", 2, slots=1, max_loras=0, max_lora_rank=1,
                        worker_cpus=3.0, setup_timeout_s=5)  # no node has 3 CPUs: never placed
    assert time.time() - start < 60
    _wait(lambda: not list_actors(filters=[("state", "!=", "DEAD"), ("class_name", "=", "TPWorker")]), 60,
          "the unplaced workers to be removed")


def _serve_call(app: str):
    from ray import serve
    try:
        return serve.get_app_handle(app).remote(None).result(timeout_s=30)
    except Exception:  # noqa: BLE001 - not deployed yet
        return None


# ---- fine-tuning over two nodes, with a node lost mid-run ------------------------------------------

def test_finetune_across_nodes_survives_losing_one(nodes, s3_url, tmp_path):
    from cluster import finetune
    from cluster.job_store import JobSpec
    data = write_jsonl(tmp_path / "train.jsonl", demo_dataset(48))
    storage = open_storage(s3_url)
    store = JobStore(storage)
    # 1.5 CPUs per worker on 2-CPU nodes (and a 1-CPU head): one worker on each of a and b
    spec = JobSpec(model="base", adapter="mn", zero=2, workers=2, epochs=20, max_steps=STEPS, checkpoint_every=2,
                   lr=1e-2, cpus_per_worker=1.5)
    job_id = finetune.submit(storage, spec, data, nodes.url)  # what `herd finetune submit --address` calls
    info = _job_info(store, job_id)
    assert info["entrypoint"].startswith("python -m jobs.run")
    assert info["runtime_env"]["env_vars"]["PATH"].startswith(str(Path(sys.executable).parent))  # declared

    def steps():
        return [m["step"] for m in store.metrics(job_id)]
    t0 = time.time()
    _wait(lambda: len(steps()) >= 3, 240, "training steps after the first checkpoint", every=0.2)
    print(f"[timing] first steps after {time.time() - t0:.0f}s", file=sys.stderr)
    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
               if a.class_name.endswith("RayTrainWorker")]
    assert {nodes.name_of(a.node_id) for a in workers} == {"a", "b"}  # one worker per node
    nodes.remove("b")
    nodes.add("c")  # a fresh node: its own empty cache, nothing shared but S3
    record = _wait(lambda: (r := store.read(job_id))["state"] in ("SUCCEEDED", "FAILED") and r, 420,
                   "the job to finish")
    print(f"[timing] finished after {time.time() - t0:.0f}s", file=sys.stderr)
    assert record["state"] == "SUCCEEDED", record
    seen = steps()
    # Resumed from a checkpoint in S3, not from step 1 (no step repeats when the node went right
    # after a checkpoint, so the worker's own line says where it resumed).
    resumed = [int(n) for n in re.findall(r"resuming at step (\d+)", finetune.logs(storage, job_id))]
    assert resumed and min(resumed) >= 2 and seen.count(1) == 1, (resumed, seen)
    assert seen[-1] == STEPS
    assert AdapterRegistry(storage).show("mn")["job_id"] == job_id  # published to the S3 root
    assert [d["model"] for d in nodes.downloads("c")] == ["base"]  # c fetched the base once, for itself


def _job_info(store, job_id) -> dict:
    from ray.job_submission import JobSubmissionClient
    record = store.read(job_id)
    info = JobSubmissionClient(record["address"]).get_job_info(record["ray_submission_id"])
    return {"runtime_env": info.runtime_env, "entrypoint": info.entrypoint}


# ---- serving over nodes ----------------------------------------------------------------------------

def test_serving_spreads_over_nodes_and_survives_losing_one(nodes, s3_url):
    port = nodes.serve_port  # where the module's Serve instance listens
    out = herd_json("serve", "deploy", "--model", "base", "--tp", "2", "--device", "cpu", "--min-replicas", "2",
                    "--max-replicas", "2", "--worker-cpus", "0.8", "--max-loras", "0", "--port", str(port),
                    "--timeout", "300", "--address", nodes.url, storage=s3_url)
    endpoint = f"http://{HEAD_IP}:{port}"
    assert out["endpoint"] == endpoint and out["running_replicas"] == 2  # the address comes from the cluster
    assert herd_json("serve", "status", "--address", nodes.url)["endpoint"] == endpoint
    groups: dict[str, set] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", "TPWorker")], detail=True):
        groups.setdefault(a.placement_group_id, set()).add(nodes.name_of(a.node_id))
    assert len(groups) == 2 and all(len(g) == 1 for g in groups.values())  # a TP group never spans nodes
    hosts = {next(iter(g)) for g in groups.values()}
    assert hosts == {"a", "c"}  # the replicas spread over the two worker nodes
    for name in hosts:  # each node fetched the model once for all its TP workers (and a's earlier trainer)
        assert [d["model"] for d in nodes.downloads(name)] == ["base"]

    body = {"model": "base", "prompt": "In the beginning", "max_tokens": 24, "temperature": 0}
    assert httpx.post(f"{endpoint}/v1/completions", json=body, timeout=60).status_code == 200
    results: list = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t = time.time()
            try:
                r = httpx.post(f"{endpoint}/v1/completions", json=body, timeout=90)
                results.append((r.status_code, time.time() - t))
            except httpx.HTTPError as e:
                results.append((type(e).__name__, time.time() - t))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    _wait(lambda: len(results) >= 3, 60, "requests before the node goes")
    nodes.remove("c")
    before = len(results)
    _wait(lambda: sum(1 for s, _ in results[before:] if s == 200) >= 6, 120,
          "requests served by the remaining node")
    stop.set()
    for t in threads:
        t.join(timeout=100)
        assert not t.is_alive()  # every request came back: none hangs
    assert all(dt < 90 for _, dt in results)
    assert httpx.post(f"{endpoint}/v1/completions", json=body, timeout=60).status_code == 200
    herd("serve", "shutdown", "--address", nodes.url)
