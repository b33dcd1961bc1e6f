"""Where DeepSpeed's JIT-compiled ops are built: one folder per virtual environment, no stale lock.

torch builds each op under TORCH_EXTENSIONS_DIR and guards the build with a `lock` file that the
builder creates and holds open until it is done. Two things went wrong with one folder shared
by every clone on a machine: switching virtual environments (another torch or DeepSpeed) rebuilt
the ops, and a build killed midway left its `lock` behind, so every later DeepSpeed engine waited
on it forever. So the default folder lives in the virtual environment (`make`, the tests and jobs
agree on it), and a lock that no process holds open is removed before DeepSpeed starts.

DeepSpeed's CPU all-reduce (the `deepspeed_shm_comm` op) also leaves its shared-memory buffers
(`/dev/shm/deepspeed_allreduce_buffer_*`, 66 MiB a rank) behind when a job ends: it never
unlinks them. Being tmpfs, they hold RAM until the machine restarts (a day of test runs here
left 8 GB). So before DeepSpeed starts, the buffers that no process maps any more are removed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def default_dir() -> Path:
    """This virtual environment's build folder (its torch and DeepSpeed versions only)."""
    return Path(sys.prefix) / "torch_extensions"


def _open_files() -> set[str]:
    """Every file some process on this machine (that we may look at) holds open."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    held.add(os.readlink(fd))
                except OSError:
                    continue
        except OSError:
            continue  # gone, or not ours to inspect
    return held


def recover_stale_locks(root: str | Path, min_age_s: float = 10.0) -> list[Path]:
    """Remove build locks under `root` that no process holds open (their builder died); returns them.

    A lock younger than `min_age_s` is left alone (its builder may be starting up)."""
    root = Path(root)
    return _remove_unused([*root.glob("*/lock"), *root.glob("*/*/lock")], _open_files, min_age_s)


def _remove_unused(paths: list[Path], in_use, min_age_s: float) -> list[Path]:
    """Unlink the files of `paths` older than `min_age_s` that are not in `in_use()` (called only
    when there is something to check: it scans /proc)."""
    if not paths:
        return []
    used = in_use()
    removed = []
    for path in paths:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= min_age_s and str(path.resolve()) not in used:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


def _mapped_files() -> set[str]:
    """Every file some process on this machine (that we may look at) has mapped."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            for line in maps.read_text().splitlines():
                path = line.split(maxsplit=5)[5:] if line.count(" ") >= 5 else []
                if path and path[0].startswith("/"):
                    mapped.add(path[0].removesuffix(" (deleted)"))
        except OSError:
            continue  # gone, or not ours to inspect
    return mapped


def remove_orphaned_shm_buffers(shm: str | Path = "/dev/shm", min_age_s: float = 60.0) -> list[Path]:
    """Remove DeepSpeed all-reduce buffers that no process maps (their job ended); returns them.
    A buffer younger than `min_age_s` is left alone (its job may be starting up)."""
    return _remove_unused(list(Path(shm).glob(SHM_BUFFERS)), _mapped_files, min_age_s)


def prepare() -> Path:
    """Default TORCH_EXTENSIONS_DIR to this virtual environment's folder, clear stale locks and
    orphaned shared-memory buffers."""
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_dir())))
    for lock in recover_stale_locks(root):
        print(f"[herd] removed a stale DeepSpeed build lock (its build was killed): {lock}", flush=True)
    remove_orphaned_shm_buffers()
    return root
