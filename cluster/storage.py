"""The storage root: one interface over a local folder and an S3 bucket.

Everything Herd keeps (base models, job checkpoints, adapters) lives under one root named by
`--storage`/`HERD_STORAGE`. Keys are `/`-separated paths relative to the root. Both backends
offer `put_if_absent`, the one atomic primitive the adapter registry builds versioning on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator

DEFAULT_ROOT = "./.herd/storage"


class StorageError(RuntimeError):
    """A storage operation that failed for a reason the user can act on (said in the message)."""


class NotFound(StorageError):
    pass


def check_key(key: str) -> str:
    parts = key.strip("/").split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return "/".join(parts)


class Storage(ABC):
    url: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if nothing is there; True if this call created it (atomic)."""

    @abstractmethod
    def upload_file(self, local: str | Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local: str | Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix/`, recursively, relative to the root, sorted."""

    @abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate children (files or folders) of `prefix/`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list_keys(prefix):
            self.delete(key)

    @abstractmethod
    def open_write(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A writable binary stream that becomes `key` when the block exits without error (nothing
        is left at `key` otherwise). Written as it goes: never buffered whole, locally or in memory."""

    @abstractmethod
    def open_read(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A readable, seekable binary stream of `key`, fetched as it is read."""

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def upload_dir(self, local_dir: str | Path, prefix: str, files: list[str] | None = None) -> None:
        local_dir = Path(local_dir)
        names = files if files is not None else sorted(
            str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
        for name in names:
            self.upload_file(local_dir / name, f"{prefix}/{name}")

    def download_dir(self, prefix: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        keys = self.list_keys(prefix)
        if not keys:
            raise NotFound(f"{self.describe(prefix)}: nothing stored there")
        for key in keys:
            self.download_file(key, local_dir / key[len(prefix.rstrip('/')) + 1:])
        return local_dir

    def modified(self, key: str) -> float | None:
        """When `key` was last written (seconds since the epoch), None if unknown or missing."""
        return None

    @abstractmethod
    def local_path(self, prefix: str) -> Path | None:
        """The folder itself for a local root (no copy needed); None for remote roots."""

    def describe(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.describe(key)}: not found") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.open_write(key) as f:
            f.write(data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def upload_file(self, local: str | Path, key: str) -> None:
        with open(local, "rb") as src, self.open_write(key) as f:
            shutil.copyfileobj(src, f)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        # The final folder, a temp name, then a rename: a reader never sees half a file.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.describe(key)}: not found") from None
        with f:
            yield f

    def download_file(self, key: str, local: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"{self.describe(key)}: not found")
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def _walk(self, prefix: str) -> Iterator[Path]:
        base = self._path(prefix)
        if base.is_dir():
            yield from (p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self._walk(prefix))

    def list_children(self, prefix: str) -> list[str]:
        base = self.root if prefix in ("", "/") else self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".tmp-"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def local_path(self, prefix: str) -> Path | None:
        return self._path(prefix)


def open_storage(url: str | None = None, fail_fast: bool = False) -> Storage:
    """`--storage` / `HERD_STORAGE` / the default local folder -> a backend (`fail_fast`: S3 gives up
    in seconds instead of riding out an outage, for a server that must answer its callers)."""
    url = url or os.environ.get("HERD_STORAGE") or DEFAULT_ROOT
    if url.startswith("s3://"):
        from cluster.s3_storage import S3Storage
        return S3Storage(url, fail_fast=fail_fast)
    if "://" in url:
        raise StorageError(f"storage root {url!r}: only local folders and s3://bucket/prefix are supported")
    return LocalStorage(url)
