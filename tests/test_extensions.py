"""DeepSpeed's op build folder: one per virtual environment, and a killed build's lock recovered."""

import os
import subprocess
import sys
import time

from jobs import extensions


def _lock(root, name, age_s):
    lock = root / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_stale_build_lock_is_removed_and_a_held_one_kept(tmp_path):
    stale = _lock(tmp_path, "shm_comm", age_s=600)  # its builder was killed: nobody holds it
    fresh = _lock(tmp_path, "cpu_adam", age_s=0)  # a build just starting
    held = _lock(tmp_path, "fused_adam", age_s=600)  # a long build, still running
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); print('open', flush=True); "
                                                     "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert extensions.recover_stale_locks(tmp_path) == [stale]
        assert not stale.exists() and fresh.exists() and held.exists()
    finally:
        holder.kill()
        holder.wait()
    assert extensions.recover_stale_locks(tmp_path) == [held]  # its builder is gone now


def test_build_folder_is_per_virtual_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert extensions.prepare() == extensions.default_dir() == type(tmp_path)(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(extensions.default_dir())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an explicit choice wins
    assert extensions.prepare() == tmp_path
