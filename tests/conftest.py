"""Shared fixtures: a trained tokenizer, tiny models, and HF reference models built from them."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch

# Without an NVIDIA GPU, Triton kernels run in Triton's interpreter (on CPU tensors): the tests of
# the paged-attention kernel check the very code a GPU runs. Read when triton is first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HERD_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "herd"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # per venv
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))

from llama.config import LlamaConfig  # noqa: E402
from llama.model import Transformer, init_weights  # noqa: E402
from llama.tiny import train_tokenizer  # noqa: E402
from llama.weights import save_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=1000)


def make_model(cfg: LlamaConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return init_weights(Transformer(cfg), seed=seed).eval()


def to_hf(model: Transformer, directory: Path):
    """The same weights as a transformers LlamaForCausalLM (the reference implementation)."""
    from transformers import LlamaForCausalLM
    save_model(model, directory)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture
def storage_dir(tmp_path) -> Path:
    return tmp_path / "storage"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One real S3-compatible server for the session, stopped at the end."""
    from seaweed import create_bucket, start_seaweed
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    create_bucket(server, "herd")
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_url(request, tmp_path, monkeypatch) -> str:
    """A fresh, empty storage root on each backend (the same tests run against both)."""
    if request.param == "local":
        return str(tmp_path / "storage")
    server = request.getfixturevalue("seaweed")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://herd/{uuid.uuid4().hex[:12]}"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_port() -> int:
    """The port for a test deployment: Serve keeps the HTTP port of its first deployment on a
    cluster (a later module deploying elsewhere would never answer), else a free one."""
    from cluster import serve_control
    try:
        details = serve_control._client(serve_control.job_api_url(None)).get_serve_details()
        if (details.get("http_options") or {}).get("port"):
            return int(details["http_options"]["port"])
    except Exception:  # noqa: BLE001 - Serve not started on this cluster yet
        pass
    return _free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head for the session, started and stopped through `herd cluster up/down`."""
    from clirun import herd
    os.environ["HERD_DASHBOARD_PORT"] = str(_free_port())
    os.environ["HERD_GCS_PORT"] = str(_free_port())
    os.environ.pop("RAY_ADDRESS", None)
    result = herd("cluster", "up")
    assert "started: local Ray cluster" in result.output, result.output
    yield f"http://127.0.0.1:{os.environ['HERD_DASHBOARD_PORT']}"
    herd("cluster", "down")
