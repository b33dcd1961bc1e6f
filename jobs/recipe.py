"""The fine-tuning recipe: what each worker runs, start to publish.

It runs under Ray Train's TorchTrainer (jobs/run.py) but knows nothing of Ray: the process
group is already formed when it starts; metrics leave through `Hooks`, which also say where
checkpoints go (each rank writes its files straight to the storage root: jobs/checkpoints.py).
Tests run the same function single-process or under torch.multiprocessing.

Per worker: pick the accelerator from the spec (jobs/accelerator.py), build the base model
(partitioned from the start under ZeRO-3, else read straight into the training dtype:
jobs/loading.py), wrap it with LoRA (or train it whole), hand it to `deepspeed.initialize`
(ZeRO 0-3, optional CPU offload), then loop over deterministic, length-bucketed (or packed:
jobs/packing.py) batches with gradient accumulation, a cosine schedule with warmup and clipping.
Every `log_every` steps it reports step, loss, lr, tokens/s and each worker's peak memory; every
`checkpoint_every` steps (and at the end) a DeepSpeed checkpoint (the run's last two are kept).
At the end it publishes, gathering only what it writes (jobs/publish.py).
"""

from __future__ import annotations

import math
import os
import random
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cluster.job_store import JobSpec, JobStore
from cluster.models import local_model_dir
from cluster.registry import AdapterRegistry
from cluster.storage import Storage, open_storage
from jobs import checkpoints
from jobs.accelerator import training_dtype, use_accelerator
from jobs.packing import DocumentMask, collate_packed, pack_examples
from llama.config import LlamaConfig
from llama.lora import LoraSpec, apply_lora, lora_layers, save_adapter
from llama.sft_data import IGNORE, Example, read_dataset, tokenize_dialog
from llama.tokenizer import Tokenizer


class Hooks(Protocol):
    """How the recipe talks to whatever runs it (Ray Train, jobs.local, a test)."""

    def report(self, metrics: dict) -> None: ...

    def checkpoint_place(self) -> tuple[Storage, str]:
        """(storage root, key prefix) under which this run's checkpoint folders go."""

    def restored_checkpoint(self) -> tuple[Storage, str] | None:
        """The checkpoint folder to continue from (storage root, key), or None to start afresh."""


def _model_ready(hooks, module: torch.nn.Module) -> None:
    """Optional hook: `hooks.model_ready(module)` once DeepSpeed holds the model (tests probe memory)."""
    ready = getattr(hooks, "model_ready", None)
    if ready is not None:
        ready(module)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this attempt
    first_step: int = 0
    published: dict | None = None
    eval_loss: float | None = None


# ---- data -----------------------------------------------------------------------------------

def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * eval_fraction) if len(examples) >= 10 else 0
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches for one epoch, the same on every worker for the same seed/epoch.

    Shuffle, sort within windows of 50 batches (so a batch holds similar lengths and little
    padding), cut into batches, then shuffle the batch order.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    buckets = [sorted(order[i:i + window], key=lambda j: lengths[j]) for i in range(0, len(order), window)]
    batches = [b[i:i + batch_size] for b in buckets for i in range(0, len(b), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return tokens, labels


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---- DeepSpeed ------------------------------------------------------------------------------

def deepspeed_config(spec: JobSpec, cfg: LlamaConfig | None = None) -> dict:
    zero: dict = {"stage": spec.zero}
    if spec.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.use_gpu}
    if cfg is not None:
        from jobs.loading import zero_tuning
        zero.update(zero_tuning(cfg, spec.zero))
    return {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": spec.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _optimizer(spec: JobSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=spec.lr, weight_decay=spec.weight_decay, adamw_mode=True)
    # fused: one kernel per step, without the partition-sized temporaries the for-loop version
    # allocates (sqrt, divide): ~2 x 4Ψ/N bytes of peak memory on a ZeRO worker.
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


def lora_spec_of(spec: JobSpec) -> LoraSpec:
    return LoraSpec(r=spec.lora_rank, lora_alpha=spec.lora_alpha, target_modules=list(spec.lora_targets),
                    lora_dropout=spec.lora_dropout, base_model_name_or_path=spec.model)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Keeps one [B, T, dim] tensor per layer instead of all its intermediates (~30% slower steps,
    activation memory down by roughly the number of tensors a layer keeps). Non-reentrant
    checkpointing, which works with ZeRO-3's gather hooks and with frozen (LoRA) bases.
    """
    from torch.utils.checkpoint import checkpoint
    for layer in model.layers:
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
        layer.forward = forward


# ---- the loop -------------------------------------------------------------------------------

def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak: GPU memory allocated on a GPU, the process's peak RSS on a CPU.

    The RSS peak is Linux's VmHWM (this process image's own high-water mark): getrusage's
    ru_maxrss survives exec, so a worker spawned from a large parent would report the parent's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _comm_device() -> torch.device:
    """Where small collective tensors must live: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def _all_gather(value: float) -> list[float]:
    """One number from every worker, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    device = _comm_device()
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [t.item() for t in out]


@dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    def forward(self, engine, device: torch.device) -> torch.Tensor:
        tokens = self.tokens.to(device)
        if self.doc_ids is None:
            return engine(tokens)
        return engine(tokens, self.positions.to(device), DocumentMask(self.doc_ids.to(device)))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def training_units(train_set: list[Example], spec: JobSpec) -> list[list[int]]:
    """What one batch row holds: one example each, or with --pack several (by example index)."""
    if not spec.pack:
        return [[i] for i in range(len(train_set))]
    return pack_examples([len(e.input_ids) for e in train_set], spec.max_seq_len)


def make_batch(units: list[list[Example]], pack: bool) -> Batch:
    if pack:
        return Batch(*collate_packed(units))
    return Batch(*collate([u[0] for u in units]))


def train(spec: JobSpec, job_id: str, storage_url: str, hooks: Hooks) -> TrainResult:
    """Run (or resume) a job on this worker; metrics go to metrics.jsonl, checkpoints to `hooks`.

    Metrics are not sent through `ray.train.report` at every step: in Ray 2.60 each report
    synchronises with the controller (about 2 s), so Ray sees metrics with each checkpoint.
    """
    device = use_accelerator(spec.use_gpu)  # before DeepSpeed is imported
    from jobs.extensions import prepare
    prepare()
    import deepspeed

    from jobs.loading import build_model, share_fp32_master, zero_init

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    storage = open_storage(storage_url)
    store = JobStore(storage)

    # Data: the copy uploaded at submission, tokenized the same way on every worker.
    model_dir = local_model_dir(storage, spec.model)
    tok = Tokenizer(model_dir / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.jsonl"
        storage.download_file(store.data_key(job_id), data_path)
        dialogs = read_dataset(data_path)
    examples = [tokenize_dialog(tok, d, spec.max_seq_len) for d in dialogs]
    examples = [e for e in examples if e.n_loss_tokens > 0]
    if not examples:
        raise ValueError(f"no example keeps an answer token within --max-seq-len {spec.max_seq_len}")
    train_set, eval_set = split_examples(examples, spec.eval_fraction, spec.seed)
    units = training_units(train_set, spec)
    lengths = [sum(len(train_set[i].input_ids) for i in u) for u in units]
    micro_per_rank = len(epoch_batches(lengths, spec.batch_size, spec.seed, 0)) // world
    steps_per_epoch = micro_per_rank // spec.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(units)} training rows are too few for {world} workers x batch "
                         f"{spec.batch_size} x accumulation {spec.grad_accum}")
    total_steps = math.ceil(spec.epochs * steps_per_epoch)
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)

    # Model: partitioned from the start under ZeRO-3; same seed on every rank, so LoRA's random A
    # starts identical everywhere.
    ds_config = deepspeed_config(spec, LlamaConfig.load(model_dir / "config.json"))
    model = build_model(model_dir, spec.zero, ds_config, training_dtype(spec.use_gpu), device)
    torch.manual_seed(spec.seed)
    if spec.method == "lora":
        if spec.zero == 3:
            with zero_init(ds_config):
                apply_lora(model, lora_spec_of(spec), trainable_only=True)
        else:
            apply_lora(model, lora_spec_of(spec), trainable_only=True)
    if spec.activation_checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(spec, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec.warmup_steps, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    share_fp32_master(optimizer)  # fp32 training: the master copy would duplicate the partition
    _model_ready(hooks, engine.module)
    start_step = 0
    restored = hooks.restored_checkpoint()
    if restored is not None:
        start_step = checkpoints.load(engine, *restored, load_module_strict=spec.method != "lora")
    result = TrainResult(first_step=start_step)
    if rank == 0:
        print(f"[herd] job {job_id}: {len(train_set)} train / {len(eval_set)} eval examples, "
              f"{world} workers on {device.type}, ZeRO-{spec.zero}{' + offload' if spec.offload else ''}, "
              f"{spec.method}{', packed' if spec.pack else ''}, "
              f"{total_steps} steps" + (f", resuming at step {start_step}" if start_step else ""), flush=True)

    pending: list[dict] = []
    t_last, tokens_since = time.time(), 0
    mine_epoch, mine = -1, []
    for step in range(start_step, total_steps):
        if spec.fail_at_step is not None and step == spec.fail_at_step and start_step == 0 and rank == 0:
            print(f"[herd] injected failure at step {step}", flush=True)
            os._exit(1)
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != mine_epoch:  # this rank's batches, shuffled once per epoch
            mine_epoch, mine = epoch, epoch_batches(lengths, spec.batch_size, spec.seed, epoch)[rank::world]
        step_loss = 0.0
        engine.train()
        for micro in mine[i * spec.grad_accum:(i + 1) * spec.grad_accum]:
            batch = make_batch([[train_set[j] for j in units[u]] for u in micro], spec.pack)
            logits = batch.forward(engine, device)
            labels = batch.labels.to(device)
            n = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
            loss = token_loss_sum(logits, labels) / n
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / spec.grad_accum
            tokens_since += int((batch.tokens != 0).sum())
        loss_avg, tokens_all = _all_reduce([step_loss / world, float(tokens_since)])
        result.losses.append(loss_avg)
        done = step + 1
        if done % spec.log_every == 0 or done == total_steps:
            elapsed = max(time.time() - t_last, 1e-6)
            per_worker = _all_gather(peak_memory_mb(device))
            mem = max(per_worker)
            row = {"step": done, "total_steps": total_steps, "epoch": epoch, "loss": loss_avg,
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_all / elapsed,
                   "peak_memory_mb": mem, "peak_memory_mb_per_worker": per_worker, "time": time.time()}
            pending.append(row)
            t_last, tokens_since = time.time(), 0
            if rank == 0:
                print(f"[herd] step {done}/{total_steps} loss {loss_avg:.4f} lr {row['lr']:.2e} "
                      f"tok/s {row['tokens_per_s']:.0f} mem {mem:.0f}MB", flush=True)
                store.append_metrics(job_id, pending)
            pending = []
        if not spec.dry_run and (done % spec.checkpoint_every == 0 or done == total_steps):
            _checkpoint(engine, hooks, rank, done, {"step": done, "loss": loss_avg})
            t_last = time.time()  # tokens/s counts training time, not checkpoint uploads

    result.eval_loss = _evaluate(engine, eval_set, spec, rank, world, device)
    if spec.dry_run:
        return result
    final_loss = result.losses[-1] if result.losses else None
    result.published = _publish(engine, spec, job_id, storage, model_dir, rank,
                                {"train_loss": final_loss, "eval_loss": result.eval_loss, "steps": total_steps})
    return result


def _checkpoint(engine, hooks: Hooks, rank: int, step: int, metrics: dict) -> None:
    """Every rank writes its own files straight to the storage root (jobs/checkpoints.py); rank 0
    then keeps only the run's last two checkpoints."""
    storage, prefix = hooks.checkpoint_place()
    checkpoints.save(engine, storage, checkpoints.step_folder(prefix, step), step,
                     exclude_frozen_parameters=bool(lora_layers(engine.module)))
    if rank == 0:
        checkpoints.keep_latest(storage, prefix)
    hooks.report(metrics)


@torch.no_grad()
def _evaluate(engine, eval_set: list[Example], spec: JobSpec, rank: int, world: int, device) -> float | None:
    if not eval_set:
        return None
    engine.eval()
    total, count = 0.0, 0.0
    batches = [eval_set[i:i + spec.batch_size] for i in range(0, len(eval_set), spec.batch_size)]
    # Every rank runs the same number of forwards (ZeRO-3 gathers are collective).
    for b in range(math.ceil(len(batches) / world) * world):
        idx = b if b < len(batches) else 0
        tokens, labels = collate(batches[idx])
        loss_sum = token_loss_sum(engine(tokens.to(device)), labels.to(device))
        if b % world == rank and b < len(batches):
            total += loss_sum.item()
            count += int((labels[:, 1:] != IGNORE).sum())
    total, count = _all_reduce([total, count])
    return total / max(count, 1)


def _publish(engine, spec: JobSpec, job_id: str, storage, model_dir: Path, rank: int, metrics: dict) -> dict | None:
    """Publish a new adapter version (LoRA: only its tensors are gathered) or a new base model
    (full: streamed shard by shard). Collective: every rank calls it."""
    from jobs.publish import lora_state, publish_full
    if spec.zero == 3:
        engine.empty_partition_cache()  # settle parameters a last forward prefetched, partition all
    if spec.method == "lora":
        state = lora_state(engine.module, rank)
        if rank != 0:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(tmp, lora_spec_of(spec), state)
            version = AdapterRegistry(storage).push(
                tmp, spec.adapter, base_model=spec.model, job_id=job_id, metrics=metrics,
                extra={"data_sha256": spec.data_sha256}, promote=spec.promote)
        published = {"kind": "adapter", "name": spec.adapter, "version": version}
    else:
        publish_full(engine.module, storage, spec.adapter, model_dir, rank, spec.publish_shard_mb * 2**20)
        if rank != 0:
            return None
        published = {"kind": "model", "name": spec.adapter}
    JobStore(storage).update(job_id, result={**published, "metrics": metrics, "data_sha256": spec.data_sha256})
    print(f"[herd] published {published}", flush=True)
    return published


def checkpoint_steps(store: JobStore, job_id: str) -> list[tuple[int, str]]:
    """(step, key of the checkpoint folder) for every complete checkpoint of a job, oldest first."""
    return checkpoints.complete_checkpoints(store.storage, store.checkpoints_key(job_id))


class LocalHooks:
    """Hooks for running the recipe without Ray: checkpoints go to a folder (or an s3:// prefix)."""

    def __init__(self, checkpoint_root: str | Path, restore_from: str | Path | None = None, on_model=None):
        self.place = checkpoints.split_url(checkpoint_root)
        self.restore_from = restore_from
        self.reports: list[dict] = []
        self.on_model = on_model

    def model_ready(self, module) -> None:
        if self.on_model is not None:
            self.on_model(module)

    def report(self, metrics: dict) -> None:
        self.reports.append(dict(metrics))

    def checkpoint_place(self) -> tuple[Storage, str]:
        return self.place

    def restored_checkpoint(self) -> tuple[Storage, str] | None:
        return None if self.restore_from is None else checkpoints.split_url(self.restore_from)
