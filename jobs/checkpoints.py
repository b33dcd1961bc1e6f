"""Training checkpoints written by every rank straight to the storage root, and read back from it.

A 70B full fine-tune's checkpoint with optimizer state is ~1.1 TB: it must not be staged whole on
one node's disk and then uploaded. DeepSpeed's `save_checkpoint` already has each rank save only
its own files (its ZeRO optimizer shard, and under ZeRO-3 its model partition; rank 0 also the
module states), through a pluggable checkpoint engine. `StorageCheckpointEngine` maps the paths
DeepSpeed asks for to keys of the storage root and streams each `torch.save` into
`Storage.open_write` (S3: a multipart upload fed part by part as torch.save writes; a local root:
the final file itself); loading reads one file at a time through `Storage.open_read` (S3: ranged
reads). Nothing of a checkpoint is written to a local temp folder.

A checkpoint is a folder `<prefix>/step_000123/` holding DeepSpeed's files under `state/` and
`herd_state.json`, which rank 0 writes last, once every rank has written its files: a folder
without it (a save cut short) is ignored. The last `KEEP` complete checkpoints of a run are kept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from cluster.storage import Storage

STATE_FILE = "herd_state.json"
DS_TAG = "state"
KEEP = 2


def join_key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


def split_url(url: str | Path) -> tuple[Storage, str]:
    """A checkpoint location given as one URL or folder (`/data/ckpt`, `s3://bucket/run/ckpt`) ->
    (the storage root above it, its key there)."""
    from cluster.storage import open_storage
    parent, _, name = str(url).rstrip("/").rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise ValueError(f"checkpoint location {url!r}: expected a folder or s3://bucket/some/prefix")
    return open_storage(parent), name


def step_folder(prefix: str, step: int) -> str:
    return join_key(prefix, f"step_{step:06d}")


class StorageCheckpointEngine:
    """A DeepSpeed checkpoint engine whose files are keys of a storage root.

    DeepSpeed builds file paths from the directory it is given (`local_base`); each path below it
    is the key below `key_base`. DeepSpeed's own engine interface
    (deepspeed/runtime/checkpoint_engine/checkpoint_engine.py) is subclassed at first use, so that
    importing this module does not import DeepSpeed.
    """

    def __init__(self, storage: Storage, local_base: str, key_base: str):
        self.storage, self.local_base, self.key_base = storage, local_base, key_base
        self.name = "HerdStorageCheckpointEngine"
        self.saved: list[str] = []  # keys this rank wrote (tests check who wrote what)

    def key(self, path: str) -> str:
        rel = os.path.relpath(path, self.local_base)
        if rel.startswith(".."):
            raise ValueError(f"checkpoint path {path} is outside {self.local_base}")
        return join_key(self.key_base, rel.replace(os.sep, "/"))

    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        pass  # keys need no folders

    def save(self, state_dict, path: str) -> None:
        key = self.key(path)
        with self.storage.open_write(key) as f:
            torch.save(state_dict, f)
        self.saved.append(key)

    def load(self, path: str, map_location=None):
        with self.storage.open_read(self.key(path)) as f:
            return torch.load(f, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True


@functools.cache
def _engine_class():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class Engine(StorageCheckpointEngine, CheckpointEngine):
        pass
    return Engine


def _use_storage(engine, storage: Storage, local_base: str, key_base: str) -> StorageCheckpointEngine:
    ckpt = _engine_class()(storage, local_base, key_base)
    engine.checkpoint_engine = ckpt
    # DeepSpeed copies its zero_to_fp32 scripts into the save folder with shutil (rank 0): upload them.
    engine._copy_recovery_script = functools.partial(_upload_recovery_scripts, ckpt)
    return ckpt


def _upload_recovery_scripts(ckpt: StorageCheckpointEngine, save_path: str) -> None:
    import deepspeed.utils
    scripts = Path(deepspeed.utils.__file__).parent
    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        if (scripts / name).is_file():
            ckpt.storage.upload_file(scripts / name, ckpt.key(os.path.join(save_path, name)))


def _base(storage: Storage, key: str) -> str:
    """The directory name DeepSpeed is given for `key`: the folder itself for a local root, else a
    path that is never created (the engine writes keys; DeepSpeed only joins names onto it)."""
    local = storage.local_path(key)
    return str(local) if local is not None else os.path.join(tempfile.gettempdir(), "herd-s3-never-written", key)


def save(engine, storage: Storage, folder: str, step: int, exclude_frozen_parameters: bool) -> StorageCheckpointEngine:
    """Every rank calls it (collective). Each writes its own files under `folder`; then rank 0
    writes the state file that marks the checkpoint complete."""
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        storage.delete(join_key(folder, STATE_FILE))  # a folder being rewritten is not complete
    base = _base(storage, folder)
    ckpt = _use_storage(engine, storage, base, folder)
    engine.save_checkpoint(base, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=exclude_frozen_parameters)
    if rank == 0:  # save_checkpoint ends with a barrier: every rank's files are stored
        world = dist.get_world_size() if dist.is_initialized() else 1
        storage.write_text(join_key(folder, STATE_FILE),
                           json.dumps({"step": step, "world": world, "zero": engine.zero_optimization_stage()}))
    if dist.is_initialized():
        dist.barrier()  # no rank trains on before the checkpoint is complete
    return ckpt


@contextlib.contextmanager
def _listing(storage: Storage, folder: str) -> Iterator[str]:
    """A directory DeepSpeed can glob for the files of `folder`: the folder itself on a local
    root; for S3 a temp folder of empty placeholder files with the same names (no bytes: the
    engine reads every file from storage)."""
    local = storage.local_path(folder)
    if local is not None:
        yield str(local)
        return
    with tempfile.TemporaryDirectory(prefix="herd-ckpt-names-") as d:
        for key in storage.list_keys(folder):
            placeholder = Path(d) / key[len(folder.rstrip("/")) + 1:]
            placeholder.parent.mkdir(parents=True, exist_ok=True)
            placeholder.touch()
        yield d


def load(engine, storage: Storage, folder: str, load_module_strict: bool) -> int:
    """Restore `engine` from the checkpoint in `folder` (each rank reads its own files, one at a
    time); returns the step it was written at."""
    with _listing(storage, folder) as base:
        _use_storage(engine, storage, base, folder)
        path, _ = engine.load_checkpoint(base, tag=DS_TAG, load_module_strict=load_module_strict)
    if path is None:
        raise FileNotFoundError(f"{storage.describe(folder)}: no DeepSpeed checkpoint there")
    return json.loads(storage.read_text(join_key(folder, STATE_FILE)))["step"]


def complete_checkpoints(storage: Storage, prefix: str) -> list[tuple[int, str]]:
    """(step, folder key) for every complete checkpoint under `prefix` (recursively), oldest first.

    A folder counts only when rank 0's state file is there and, under ZeRO, every rank's
    optimizer shard.
    """
    keys = storage.list_keys(prefix)
    out = []
    for key in keys:
        if key.endswith("/" + STATE_FILE):
            folder = key.rsplit("/", 1)[0]
            state = json.loads(storage.read_text(key))
            shards = sum(1 for k in keys if k.startswith(folder + "/") and k.endswith("optim_states.pt"))
            if state.get("zero", 0) == 0 or shards >= state.get("world", 1):
                out.append((state["step"], folder))
    return sorted(out)


def keep_latest(storage: Storage, prefix: str, keep: int = KEEP) -> list[str]:
    """Delete the checkpoint folders of a run (`prefix/step_*`) older than its newest `keep`
    complete ones, unfinished ones included. Returns the deleted folder keys."""
    complete = complete_checkpoints(storage, prefix)
    if len(complete) < keep:
        return []
    oldest_kept = complete[-keep][0]
    deleted = []
    for name in storage.list_children(prefix):
        if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) < oldest_kept:
            storage.delete_prefix(join_key(prefix, name))
            deleted.append(join_key(prefix, name))
    return deleted
