"""Secrets stay out of what the Ray dashboard shows: runtime_env of jobs and the endpoint, the job's
entrypoint; and temporary AWS credentials reach pyarrow whole."""

import shlex

import pytest

from cluster import finetune, ray_cluster
from cluster.job_store import JobSpec, JobStore
from cluster.storage import open_storage

SECRETS = {"HERD_API_KEY": "sk-very-secret", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "AWS_SESSION_TOKEN": "tok3n"}


@pytest.fixture
def secret_env(monkeypatch):
    for key, value in {**SECRETS, "HERD_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HERD_FORWARD_AWS_ENV", raising=False)


def test_forwarded_env_keeps_secrets_unless_asked(secret_env):
    env = ray_cluster.forwarded_env(("AWS_", "HERD_"))
    assert env["HERD_S3_ENDPOINT"] == "http://127.0.0.1:9" and env["AWS_REGION"] == "eu-west-1"
    assert not set(SECRETS) & set(env)
    env = ray_cluster.forwarded_env(("AWS_", "HERD_"), forward_aws=True)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and env["AWS_SESSION_TOKEN"] == "tok3n"
    assert "HERD_API_KEY" not in env  # never, even when AWS credentials are forwarded


@pytest.mark.parametrize("forward", [False, True])
def test_job_submission_quotes_the_storage_url_and_keeps_secrets(secret_env, tmp_path, monkeypatch, forward):
    submitted = {}

    class Recorder:
        def __init__(self, url):
            pass

        def submit_job(self, **kwargs):
            submitted.update(kwargs)

    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Recorder)
    monkeypatch.setattr(finetune, "ensure_cluster", lambda address, say: "http://127.0.0.1:1")
    url = str(tmp_path / "my storage; echo pwned")
    storage = open_storage(url)
    JobStore(storage).create("ft-1", JobSpec(model="base", adapter="a1"))
    finetune._submit_ray_job(storage, "ft-1", None, resume=False, say=print, forward_aws=forward)
    argv = shlex.split(submitted["entrypoint"])
    assert argv[argv.index("--storage") + 1] == storage.url and "echo" not in argv
    env = submitted["runtime_env"]["env_vars"]
    assert "HERD_API_KEY" not in env and "sk-very-secret" not in str(submitted)
    assert ("AWS_SECRET_ACCESS_KEY" in env) == forward and env["HERD_S3_ENDPOINT"] == "http://127.0.0.1:9"
    assert (env.get("HERD_FORWARD_AWS_ENV") == "1") == forward  # the driver forwards them to its workers


def test_pyarrow_gets_the_session_token(secret_env):
    from jobs.run import ray_storage
    path, fs = ray_storage("s3://bucket/prefix", "ft-1")
    options = fs.__reduce__()[1][0]
    assert path == "bucket/prefix/jobs/ft-1/checkpoints"
    assert (options["access_key"], options["secret_key"], options["session_token"]) == ("AKIAEXAMPLE", "s3cr3t",
                                                                                        "tok3n")
