"""A fine-tuning job that starts from a spec file instead of `herd finetune submit`.

A KubeRay RayJob (infra/kuberay-rayjob.yaml) runs `python -m jobs.run --job-id ID --spec FILE
--data FILE` with no Herd CLI in the loop: the entrypoint validates the spec and the data as the
CLI would, stores the data next to the job record and creates the record itself. When KubeRay
retries the entrypoint, the record is already there and the job resumes from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.job_store import JobSpec, JobStore
from cluster.storage import NotFound, Storage


def read_spec(path: str | Path) -> JobSpec:
    """JSON or YAML with JobSpec's fields (`herd finetune submit`'s options, snake_case)."""
    text = Path(path).read_text()
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml
        return JobSpec.model_validate(yaml.safe_load(text))
    return JobSpec.model_validate(json.loads(text))


def ensure_job(storage: Storage, job_id: str, spec_path: str | Path, data: str | Path) -> bool:
    """Create job `job_id` from the files unless it exists; True if it was created (else: a retry)."""
    from cluster.finetune import check_submission
    store = JobStore(storage)
    try:
        store.read(job_id)
        return False
    except NotFound:
        pass
    spec = read_spec(spec_path)
    spec = spec.model_copy(update={"data_sha256": check_submission(storage, spec, Path(data))})
    storage.upload_file(data, store.data_key(job_id))
    store.create(job_id, spec)
    return True
