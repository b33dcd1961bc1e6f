"""`python -m jobs.warmup`: compile DeepSpeed's CPU ops once per machine (called by `make`).

DeepSpeed JIT-compiles C++ ops on first use: the shared-memory communication op that every CPU
`deepspeed.initialize` loads (about a minute) and CPU Adam for `--offload` (about two). With a
persistent TORCH_EXTENSIONS_DIR (one per virtual environment, jobs/extensions.py) this happens
once, not in every job or test.
"""

from __future__ import annotations

import time

from jobs.accelerator import use_accelerator


def main() -> None:
    use_accelerator(use_gpu=False)  # these are the CPU ops, whatever the machine has
    from jobs.extensions import prepare
    prepare()
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):
        t0 = time.time()
        builder.load(verbose=False)
        print(f"[herd] DeepSpeed op {builder.name} ready ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
