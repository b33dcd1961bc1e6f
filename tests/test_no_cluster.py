"""Every verb that needs the cluster or the endpoint, run with none there: one line naming what is
missing and how to get it (`herd cluster up`, `--address`, `herd serve deploy`), exit code 1."""

import pytest

from clirun import herd
from conftest import _free_port
from cluster.job_store import JobSpec, JobStore
from cluster.models import create_tiny_model
from cluster.storage import open_storage


@pytest.fixture
def nowhere(storage_dir, monkeypatch):
    """No local cluster (a dashboard port nothing listens on), a model and a submitted job in storage."""
    monkeypatch.setenv("HERD_DASHBOARD_PORT", str(_free_port()))
    for var in ("RAY_ADDRESS", "HERD_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    storage = open_storage(str(storage_dir))
    create_tiny_model(storage, "base")
    store = JobStore(storage)
    store.create("ft-1", JobSpec(model="base", adapter="a1"))
    store.update("ft-1", ray_submission_id="ft-1", state="RUNNING", address=None)
    return storage_dir


def _one_line(result, *needles: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv", [
    ("chat", "hi"), ("serve", "status"), ("serve", "shutdown"),
    ("serve", "scale", "--min-replicas", "1", "--max-replicas", "2"),
])
def test_endpoint_verbs_without_a_cluster(nowhere, argv):
    _one_line(herd(*argv, expect=None), "no Ray cluster", "herd cluster up", "--address")


@pytest.mark.parametrize("verb", ["stop", "logs"])
def test_job_verbs_without_a_cluster(nowhere, verb):
    _one_line(herd("finetune", verb, "ft-1", storage=nowhere, expect=None), "herd cluster up", "--address")


def test_cluster_status_without_a_cluster(nowhere):
    r = herd("cluster", "status", expect=1)
    assert "herd cluster up" in r.output and "Traceback" not in r.output


def test_an_address_where_nothing_answers(nowhere):
    address = f"http://127.0.0.1:{_free_port()}"
    line = _one_line(herd("serve", "deploy", "--model", "base", "--address", address, storage=nowhere,
                          expect=None), "--address")
    assert address in line
    _one_line(herd("serve", "status", "--address", address, expect=None), address, "--address")


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("argv", [("chat", "hi"), ("serve", "scale", "--min-replicas", "1", "--max-replicas", "2")])
def test_endpoint_verbs_with_a_cluster_but_no_endpoint(argv):
    _one_line(herd(*argv, expect=None), "no endpoint is deployed", "herd serve deploy")
