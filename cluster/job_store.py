"""Fine-tuning jobs in the storage root: `jobs/<id>/job.json`, `metrics.jsonl`, `data.jsonl`, `log`.

The CLI writes the spec at submission; the job (on the cluster) updates the state and appends
metrics; any later shell reads them back. The spec is a pydantic model so that bad values are
refused at submission with the field named.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.names import check_name
from cluster.storage import NotFound, Storage

JOBS = "jobs"
States = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED"]


class JobSpec(BaseModel):
    """Everything a fine-tuning run needs; defaults are what `herd finetune submit` uses."""

    model_config = ConfigDict(extra="forbid")

    model: str
    adapter: str = Field(description="adapter name (LoRA) or new base model name (full)")
    method: Literal["lora", "full"] = "lora"
    zero: int = Field(default=2, ge=0, le=3)
    offload: bool = False
    workers: int = Field(default=2, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(default=2e-4, gt=0)
    warmup_steps: int = Field(default=2, ge=0)
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    max_seq_len: int = Field(default=512, ge=8)
    batch_size: int = Field(default=4, ge=1, description="micro batch per worker")
    grad_accum: int = Field(default=1, ge=1)
    grad_clip: float = Field(default=1.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    log_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    max_failures: int = Field(default=2, ge=0)
    promote: bool = False
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    pack: bool = Field(default=False, description="several examples per sequence (block-diagonal attention)")
    activation_checkpointing: bool = False
    dry_run: bool = Field(default=False, description="train and report only: no checkpoint, nothing published")
    publish_shard_mb: float = Field(default=4096, gt=0, description="safetensors shard size of a full fine-tune")
    data_sha256: str = ""
    fail_at_step: int | None = Field(default=None, description="test hook: kill rank 0 at this step once")

    @model_validator(mode="after")
    def _names(self) -> "JobSpec":
        check_name(self.model, "model name")
        check_name(self.adapter, "adapter name")
        if self.offload and self.zero == 0:
            raise ValueError("--offload needs ZeRO stage 1, 2 or 3 (optimizer state offload is a ZeRO feature)")
        return self


def new_job_id() -> str:
    return f"ft-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class JobStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    def prefix(self, job_id: str) -> str:
        check_name(job_id, "job id")
        return f"{JOBS}/{job_id}"

    def data_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}/data.jsonl"

    def checkpoints_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}/checkpoints"

    def create(self, job_id: str, spec: JobSpec) -> dict:
        record = {"id": job_id, "spec": spec.model_dump(), "state": "PENDING", "created": _now(),
                  "updated": _now(), "result": None, "error": None, "attempts": 0}
        self.storage.write_text(f"{self.prefix(job_id)}/job.json", json.dumps(record, indent=2))
        return record

    def read(self, job_id: str) -> dict:
        try:
            return json.loads(self.storage.read_text(f"{self.prefix(job_id)}/job.json"))
        except NotFound:
            raise NotFound(f"job {job_id!r} not found in {self.storage.url}; see `herd finetune list`") from None

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec(**self.read(job_id)["spec"])

    def update(self, job_id: str, **changes: Any) -> dict:
        record = self.read(job_id)
        record.update(changes, updated=_now())
        self.storage.write_text(f"{self.prefix(job_id)}/job.json", json.dumps(record, indent=2))
        return record

    def list(self) -> list[dict]:
        out = []
        for job_id in self.storage.list_children(JOBS):
            try:
                out.append(self.read(job_id))
            except (NotFound, ValueError):
                continue
        return sorted(out, key=lambda r: r["created"])

    # metrics.jsonl: one JSON object a line, appended by rank 0 every `log_every` steps.
    def append_metrics(self, job_id: str, rows: list[dict]) -> None:
        key = f"{self.prefix(job_id)}/metrics.jsonl"
        try:
            old = self.storage.read_text(key)
        except NotFound:
            old = ""
        self.storage.write_text(key, old + "".join(json.dumps(r) + "\n" for r in rows))

    def metrics(self, job_id: str) -> list[dict]:
        try:
            text = self.storage.read_text(f"{self.prefix(job_id)}/metrics.jsonl")
        except NotFound:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_log(self, job_id: str, text: str) -> None:
        self.storage.write_text(f"{self.prefix(job_id)}/log", text)
