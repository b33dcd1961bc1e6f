"""Which DeepSpeed accelerator a training worker uses: decided by the job, inside the worker.

DeepSpeed picks its accelerator once per process (from DS_ACCELERATOR, else by probing). A value
inherited from the submitting shell would force a `--gpu` job onto the CPU accelerator while the
recipe moves batches to `cuda:N`, so nothing forwards DS_ACCELERATOR any more: each worker sets
it from the spec before DeepSpeed is imported. CPU jobs get DeepSpeed's CPU accelerator (gloo,
fp32, glibc told to return freed memory); `--gpu` jobs CUDA with NCCL, one GPU per worker
process (bf16, fp32 master weights).
"""

from __future__ import annotations

import os

import torch


def accelerator_name(use_gpu: bool) -> str:
    return "cuda" if use_gpu else "cpu"


def process_group_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def training_dtype(use_gpu: bool) -> torch.dtype:
    """The dtype the module trains in: bf16 on GPUs (DeepSpeed keeps fp32 master weights), fp32 on CPUs."""
    return torch.bfloat16 if use_gpu else torch.float32


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def return_freed_host_memory(mmap_threshold: int = 128 << 10) -> bool:
    """Make glibc give freed tensors back to the OS instead of keeping them in the heap.

    glibc serves allocations below its mmap threshold from the heap, and raises that threshold
    (up to 32 MB) each time a larger mmapped block is freed. A CPU training step allocates and
    frees hundreds of MB in ~1 MB tensors (activations, gathered ZeRO-3 layers), so after the
    first step those land in the heap, which fragments and never shrinks: on the 208M-parameter
    benchmark it held ~600 MB of freed memory per worker under ZeRO-3 (bench/train.py). A fixed
    threshold (which also stops the adjustment) sends every tensor over 128 KB to its own
    mapping, unmapped when freed. Set with mallopt at run time, so it needs no environment
    variable at process start (where Ray spawns workers). Returns False where there is no glibc.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def use_accelerator(use_gpu: bool) -> torch.device:
    """Select DeepSpeed's accelerator for this process and return the worker's device.

    Called before the first `import deepspeed` of a worker; if DeepSpeed was already imported with
    another accelerator, it is replaced (DeepSpeed's own `set_accelerator`).
    """
    name = accelerator_name(use_gpu)
    os.environ["DS_ACCELERATOR"] = name
    import deepspeed.accelerator as ds_acc
    current = ds_acc.get_accelerator()
    if current.device_name() != name:
        if use_gpu:
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
            ds_acc.set_accelerator(CUDA_Accelerator())
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
            ds_acc.set_accelerator(CPU_Accelerator())
    if not use_gpu:
        return_freed_host_memory()
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("this --gpu job's worker sees no CUDA device (is Ray giving it a GPU?)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device
