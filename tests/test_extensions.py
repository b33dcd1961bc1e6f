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


def test_orphaned_shm_buffers_are_removed_and_mapped_ones_kept(tmp_path):
    """DeepSpeed never unlinks its all-reduce buffers: those no process maps (and not brand new) go."""
    import mmap
    import os
    import time

    from jobs.extensions import remove_orphaned_shm_buffers
    old = time.time() - 3600
    orphan, live, young = (tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_1_{i}" for i in range(3))
    for path in (orphan, live, young):
        path.write_bytes(b"\0" * 4096)
    os.utime(orphan, (old, old))
    os.utime(live, (old, old))
    other = tmp_path / "not_deepspeed"
    other.write_bytes(b"x")
    os.utime(other, (old, old))
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a running job maps its buffer
        removed = remove_orphaned_shm_buffers(tmp_path)
    assert removed == [orphan]
    assert live.exists() and young.exists() and other.exists() and not orphan.exists()
