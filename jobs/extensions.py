"""Where DeepSpeed's JIT-compiled ops are built: one folder per virtual environment, no stale lock.

torch builds each op under TORCH_EXTENSIONS_DIR and guards the build with a `lock` file that the
builder creates and holds open until it is done. Two things went wrong with one folder shared
by every clone on a machine: switching virtual environments (another torch or DeepSpeed) rebuilt
the ops, and a build killed midway left its `lock` behind, so every later DeepSpeed engine waited
on it forever. So the default folder lives in the virtual environment (`make`, the tests and jobs
agree on it), and a lock that no process holds open is removed before DeepSpeed starts.
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
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    if not locks:
        return []
    held = _open_files()
    removed = []
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= min_age_s and str(lock.resolve()) not in held:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def prepare() -> Path:
    """Default TORCH_EXTENSIONS_DIR to this virtual environment's folder and clear stale locks."""
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_dir())))
    for lock in recover_stale_locks(root):
        print(f"[herd] removed a stale DeepSpeed build lock (its build was killed): {lock}", flush=True)
    return root
