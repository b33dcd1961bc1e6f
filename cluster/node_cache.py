"""The node-local model cache: each node downloads a stored model once, however many replicas,
TP workers or training workers it hosts.

A model's files are listed with their sizes and sha256 in `manifest.json`, written when the
model is imported. The cache folder of a model is named after that manifest's hash, so:
- two processes on one node that want the same model wait on one lock file and one download;
- a model re-imported under the same name with other weights gets a new folder (the old key, by
  file names alone, would have served stale weights);
- a download is checked against the sizes and checksums before it is used, and an interrupted one
  is never mistaken for a finished one (the folder is renamed into place only when complete).

The cache lives under `$HERD_CACHE_DIR/models` (default ~/.cache/herd/models) on each node;
`downloads.log` there has one line per download, which is how a test (or an operator) can see
that a node fetched a model once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llama.tiny import cache_dir

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class CacheError(RuntimeError):
    """A download that does not match the model's manifest."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(directory: Path, files: list[str]) -> dict:
    """{"files": {name: {"size", "sha256"}}} for the files of a model folder (written at import)."""
    return {"files": {name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
                      for name in sorted(files)}}


def manifest_key(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def models_cache_dir() -> Path:
    return cache_dir() / "models"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of one node (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def verify(directory: Path, manifest: dict) -> None:
    """Every file the manifest lists, with its size and checksum (entries without them: presence)."""
    for name, want in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CacheError(f"{path}: missing from the download")
        if "size" in want and path.stat().st_size != want["size"]:
            raise CacheError(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        if "sha256" in want and file_sha256(path) != want["sha256"]:
            raise CacheError(f"{path}: checksum differs from the manifest (a changed or corrupt upload)")


def _progress(message: str) -> None:
    """To stderr: a replica's log shows it; a CLI's --json output on stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def ensure_cached(storage, prefix: str, name: str, manifest: dict, say=_progress) -> Path:
    """The local folder of the model at `prefix`, downloading it once per node under a lock."""
    root = models_cache_dir()
    target = root / f"{name}-{manifest_key(manifest)}"
    if target.is_dir():
        return target
    with _locked(root / f".{target.name}.lock"):
        if target.is_dir():  # another process of this node finished it while we waited
            return target
        total = sum(f.get("size", 0) for f in manifest["files"].values())
        say(f"[herd] downloading model {name!r} ({len(manifest['files'])} files, {total / 1e9:.2f} GB) "
            f"into {target}")
        start = time.time()
        staging = root / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for i, file in enumerate(sorted(manifest["files"]), start=1):
                storage.download_file(f"{prefix}/{file}", staging / file)
                say(f"[herd] {name}: {i}/{len(manifest['files'])} files")
            verify(staging, manifest)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with open(root / "downloads.log", "a") as log:
            log.write(json.dumps({"model": name, "key": target.name, "pid": os.getpid(), "host": socket.gethostname(),
                                  "bytes": total, "seconds": round(time.time() - start, 3)}) + "\n")
    return target
