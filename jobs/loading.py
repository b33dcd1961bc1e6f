"""Building a worker's model without any worker holding the whole model it does not need.

ZeRO-3: the model is constructed under `deepspeed.zero.Init`, which partitions each module's
parameters as soon as the module exists (one layer at a time is ever whole), and each rank then
reads only its own flat range of every tensor from the safetensors files (`read_flat_range`),
so host memory per worker is ~1/N of the weights. ZeRO 0-2 and LoRA hold every weight anyway:
they are read tensor by tensor straight into the training dtype on the worker's device, never
as a whole fp32 copy first (a bf16 LoRA base on a GPU never exists in fp32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from llama.weights import check_model_dir, herd_to_hf_name, load_model_streamed, read_flat_range, tensor_files


def zero3_tuning(cfg: LlamaConfig) -> dict:
    """ZeRO-3 bucket sizes and limits scaled to the model.

    Prefetch, reduce bucket and persistence follow the hidden size (the values transformers'
    "auto" picks): only norms stay whole, and about a layer is gathered ahead. DeepSpeed's default
    of keeping up to 1e9 elements gathered, and not releasing a parameter reused within 1e9
    elements, is most of a small model; here a parameter is released unless it is reused within a
    layer (only the last layer stays whole across the forward/backward turn), and at most two
    layers' worth (never more than DeepSpeed's 1e9) is live at once.
    """
    h = cfg.dim
    layer = (cfg.num_parameters() - 2 * cfg.vocab_size * h - h) // cfg.n_layers
    return {"stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
            "reduce_bucket_size": h * h, "stage3_max_live_parameters": int(min(1e9, 2 * layer)),
            "stage3_max_reuse_distance": int(min(1e9, layer))}


def zero_tuning(cfg: LlamaConfig, stage: int) -> dict:
    """DeepSpeed's ZeRO bucket sizes for this model (its defaults are sized for GPUs and 1B+ models).

    ZeRO-1/2 keep a reduce bucket and an all-gather bucket of 5e8 elements by default (2 GB each
    in fp32): bigger than a 200M model, so ZeRO-2 held every gradient whole until the bucket
    filled at the end of the backward pass. Scaled like ZeRO-3's reduce bucket (hidden^2, what
    transformers' "auto" picks). ZeRO-3: `zero3_tuning`.
    """
    if stage == 3:
        return zero3_tuning(cfg)
    if stage in (1, 2):
        return {"reduce_bucket_size": cfg.dim * cfg.dim, "allgather_bucket_size": cfg.dim * cfg.dim}
    return {}


def share_fp32_master(optimizer) -> int:
    """Let DeepSpeed's ZeRO optimizer update the model's own fp32 partition instead of a copy.

    DeepSpeed keeps fp32 "master" weights beside the training-dtype partition it copies them
    into after each step; when training in fp32 (CPU jobs) both hold the same numbers, and the
    copy costs 4Ψ/N bytes per worker (ZeRO-3 means to skip it, but compares a torch.device with
    a device-name string, which never matches; ZeRO-1/2 always clone). Call once after
    `deepspeed.initialize` and before the first step or checkpoint load: the master tensors keep
    their identity (the optimizer state is keyed by them), only their storage becomes the
    model's. Does nothing in mixed precision. Returns the bytes freed.
    """
    import deepspeed.comm as ds_dist
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pairs = list(zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat))
    elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        pairs = [(master, parts[ds_dist.get_rank(group=group)]) for master, parts, group in
                 zip(optimizer.single_partition_of_fp32_groups, optimizer.parallel_partitioned_bit16_groups,
                     optimizer.real_dp_process_group)]
    else:
        return 0
    freed = 0
    for master, own in pairs:
        if (master.dtype == own.dtype and master.device == own.device and master.shape == own.shape
                and master.data_ptr() != own.data_ptr()):
            freed += master.numel() * master.element_size()
            master.data = own.data
    return freed


def load_partitioned(model: Transformer, directory: str | Path) -> int:
    """Fill the ZeRO-3 partitions of `model` (built under zero.Init) from safetensors; returns the
    number of elements this rank read (about a 1/N share of the model)."""
    import deepspeed.comm as ds_dist
    files = tensor_files(directory)
    read = 0
    for name, p in model.named_parameters():
        hf = herd_to_hf_name(name)
        if not hasattr(p, "ds_tensor"):
            raise RuntimeError(f"{name} was not partitioned by zero.Init")
        part = p.ds_tensor
        size = part.ds_numel
        start = size * ds_dist.get_rank(group=p.ds_process_group)
        end = min(start + size, p.ds_numel)
        with torch.no_grad():
            if getattr(p, "ds_persist", False) or p.data.numel() == p.ds_numel:
                # Small tensors (norms) stay whole on every rank; fill both copies.
                full = read_flat_range(files[hf], hf, 0, p.ds_numel)
                p.data.copy_(full.view(p.ds_shape).to(p.dtype))
                read += p.ds_numel
            if start < end:
                part.data[: end - start].copy_(read_flat_range(files[hf], hf, start, end).to(part.dtype))
                read += end - start
    return read


def zero_init(ds_config: dict):
    """`deepspeed.zero.Init` for this job. The dtype comes from the config (bf16 on GPUs, else fp32):
    DeepSpeed 0.19 ignores an explicit `dtype=` on accelerators without fp16 (the CPU's gets bf16)."""
    import deepspeed
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def build_model(directory: str | Path, zero: int, ds_config: dict, dtype: torch.dtype,
                device: torch.device) -> Transformer:
    """The base model for training: partitioned from the start under ZeRO-3, else loaded in `dtype`."""
    if zero != 3:
        return load_model_streamed(directory, dtype=dtype, device=device)
    import deepspeed
    cfg = check_model_dir(directory)
    with zero_init(ds_config):
        model = Transformer(cfg)
    load_partitioned(model, directory)
    return model.eval()
