"""The adapter registry: versioned, immutable LoRA adapters in the storage root.

    adapters/<name>/<version>/   adapter_config.json, adapter_model.safetensors, herd.json
    adapters/<name>/current      the version served by default

Versions `v1, v2, ...` are claimed atomically (`put_if_absent` of `<version>/.claim`), so two
concurrent pushes never share a number. A publish writes the files first and `herd.json` last;
`herd.json` lists every file with its size and sha256, and a version whose `herd.json` is
missing, unreadable or does not match its files does not exist for any reader.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cluster.models import load_config, model_exists
from cluster.names import check_name, check_version, split_ref
from cluster.storage import NotFound, Storage, StorageError
from llama.config import LlamaConfig
from llama.lora import CONFIG_FILE, WEIGHTS_FILE, AdapterError, apply_lora, load_adapter, read_adapter_config

ADAPTERS = "adapters"
META_FILE = "herd.json"
CLAIM_FILE = ".claim"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
# A version without herd.json is a push in progress (never deleted) until this old: then abandoned.
ABANDONED_PUSH_S = 3600.0


class RegistryError(StorageError):
    """A registry rule refused the request (unknown adapter/version, base model mismatch, ...)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_number(v: str) -> int:
    return int(v[1:]) if v.startswith("v") and v[1:].isdigit() else 0


class AdapterRegistry:
    def __init__(self, storage: Storage):
        self.storage = storage

    # ---- reading ------------------------------------------------------------------------------

    def _prefix(self, name: str, version: str | None = None) -> str:
        check_name(name, "adapter name")
        return f"{ADAPTERS}/{name}" + (f"/{check_version(version)}" if version else "")

    def _meta(self, name: str, version: str) -> dict | None:
        """herd.json of a complete version (files present with the recorded sizes), else None."""
        prefix = self._prefix(name, version)
        try:
            meta = json.loads(self.storage.read_text(f"{prefix}/{META_FILE}"))
        except (NotFound, json.JSONDecodeError, UnicodeDecodeError):
            return None
        files = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(files, dict) or set(files) != set(FILES):
            return None
        present = set(self.storage.list_children(prefix))
        if not set(files) <= present:
            return None
        return meta

    def versions(self, name: str) -> list[str]:
        """Published versions of an adapter, oldest first."""
        candidates = [v for v in self.storage.list_children(self._prefix(name)) if _version_number(v)]
        return sorted((v for v in candidates if self._meta(name, v) is not None), key=_version_number)

    def current(self, name: str) -> str | None:
        try:
            version = self.storage.read_text(f"{self._prefix(name)}/current").strip()
        except NotFound:
            return None
        return version or None

    def resolve(self, ref: str) -> tuple[str, str, dict]:
        """`NAME` (the current version) or `NAME@VERSION` -> (name, version, herd.json)."""
        name, version = split_ref(ref)
        if version is None:
            version = self.current(name)
            if version is None:
                if not self.versions(name):
                    raise RegistryError(f"adapter {name!r} not found in {self.storage.url}; "
                                        "see `herd adapters list`")
                raise RegistryError(f"adapter {name!r} has no current version; "
                                    f"run `herd adapters promote {name}@VERSION`")
        meta = self._meta(name, version)
        if meta is None:
            raise RegistryError(f"adapter {name}@{version} not found in {self.storage.url}; "
                                f"versions: {', '.join(self.versions(name)) or 'none'}")
        return name, version, meta

    def show(self, ref: str) -> dict:
        name, version, meta = self.resolve(ref)
        return {**meta, "current": self.current(name) == version, "versions": self.versions(name)}

    def list(self) -> list[dict]:
        rows = []
        for name in self.storage.list_children(ADAPTERS):
            versions = self.versions(name)
            if not versions:
                continue  # nothing published (yet): not an adapter for any reader
            current = self.current(name)
            meta = self._meta(name, current) if current else None
            meta = meta or self._meta(name, versions[-1])
            rows.append({"name": name, "current": current, "versions": versions,
                         "base_model": meta["base_model"], "r": meta.get("r"), "created": meta.get("created")})
        return rows

    def pull(self, ref: str, directory: str | Path) -> tuple[str, str, Path]:
        """Download a version and verify every file against the sha256 in its herd.json."""
        name, version, meta = self.resolve(ref)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        prefix = self._prefix(name, version)
        for fname, info in meta["files"].items():
            self.storage.download_file(f"{prefix}/{fname}", directory / fname)
            if _sha256(directory / fname) != info["sha256"]:
                (directory / fname).unlink()
                raise RegistryError(f"{self.storage.describe(f'{prefix}/{fname}')}: checksum does not match "
                                    f"herd.json; the stored version is corrupt")
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return name, version, directory

    def load(self, ref: str, cfg: LlamaConfig | None = None):
        """(name, version, herd.json, LoraSpec, peft state dict) of a stored version, checksums verified."""
        with tempfile.TemporaryDirectory() as tmp:
            name, version, directory = self.pull(ref, tmp)
            meta = json.loads((directory / META_FILE).read_text())
            spec, state = load_adapter(directory, cfg)
        return name, version, meta, spec, state

    def apply_to(self, model, base_model: str, ref: str):
        """Apply a stored adapter (unmerged) to a loaded base model, after checking it belongs to it."""
        name, version, meta, spec, state = self.load(ref, model.cfg)
        if meta["base_model"] != base_model:
            raise RegistryError(f"adapter {name}@{version} was trained for base model {meta['base_model']!r}, "
                                f"not {base_model!r}")
        apply_lora(model, spec, state)
        return name, version

    # ---- writing ------------------------------------------------------------------------------

    def _claim_version(self, name: str) -> str:
        """Claim the next free version number atomically (retrying past concurrent claims)."""
        existing = [_version_number(v) for v in self.storage.list_children(self._prefix(name))]
        n = max(existing, default=0) + 1
        token = f"{os.getpid()}-{uuid.uuid4().hex}".encode()
        for _ in range(1000):
            if self.storage.put_if_absent(f"{self._prefix(name, f'v{n}')}/{CLAIM_FILE}", token):
                return f"v{n}"
            n += 1
        raise RegistryError(f"could not claim a version for adapter {name!r}")

    def _base_of(self, name: str) -> str | None:
        versions = self.versions(name)
        return self._meta(name, versions[-1])["base_model"] if versions else None

    def push(self, directory: str | Path, name: str, base_model: str | None = None, job_id: str | None = None,
             metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
             promote: bool = False) -> str:
        """Validate a peft LoRA dir against its base model and publish it as the next version."""
        check_name(name, "adapter name")
        directory = Path(directory)
        if not directory.is_dir():
            raise AdapterError(f"{directory}: not a directory")
        spec = read_adapter_config(directory)
        base_model = base_model or spec.base_model_name_or_path
        if not base_model:
            raise AdapterError(f"{directory / CONFIG_FILE}: base_model_name_or_path is empty; pass --base MODEL")
        check_name(base_model, "base model name")
        if not model_exists(self.storage, base_model):
            raise AdapterError(f"base model {base_model!r} is not in {self.storage.url}; import it first "
                               "(`herd models import`) or pass --base MODEL")
        cfg = load_config(self.storage, base_model)
        spec, _ = load_adapter(directory, cfg)  # validates every tensor against the base model
        owner = self._base_of(name)
        if owner is not None and owner != base_model:
            raise AdapterError(f"adapter name {name!r} already belongs to base model {owner!r}; "
                               f"choose another --name for an adapter of {base_model!r}")

        version = self._claim_version(name)
        prefix = self._prefix(name, version)
        files = {}
        with tempfile.TemporaryDirectory() as tmp:
            # Store peft's config with the registry's base model name, so peft users see it.
            spec.base_model_name_or_path = base_model
            staged = Path(tmp)
            (staged / CONFIG_FILE).write_text(json.dumps(spec.to_peft_json(), indent=2) + "\n")
            (staged / WEIGHTS_FILE).write_bytes((directory / WEIGHTS_FILE).read_bytes())
            for fname in FILES:
                files[fname] = {"sha256": _sha256(staged / fname), "size": (staged / fname).stat().st_size}
            meta = {"name": name, "version": version, "base_model": base_model, "job_id": job_id,
                    "metrics": metrics or {}, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "r": spec.r, "lora_alpha": spec.lora_alpha, "target_modules": spec.target_modules,
                    "use_rslora": spec.use_rslora, "files": files, **(extra or {})}
            try:
                self.storage.upload_dir(staged, prefix, list(FILES))
                self.storage.write_text(f"{prefix}/{META_FILE}", json.dumps(meta, indent=2) + "\n")
            except BaseException:
                self._discard(prefix)
                raise
        if promote or self.current(name) is None:
            self.promote(f"{name}@{version}")
        return version

    def _discard(self, prefix: str) -> None:
        """Best effort: remove a half-published version (it is invisible either way)."""
        try:
            for fname in (META_FILE, *FILES):
                self.storage.delete(f"{prefix}/{fname}")
        except Exception:  # noqa: BLE001 - storage may be the thing that failed
            pass

    def promote(self, ref: str) -> str:
        name, version = split_ref(ref)
        if version is None:
            raise RegistryError(f"promote needs NAME@VERSION, got {ref!r}")
        if self._meta(name, version) is None:
            raise RegistryError(f"adapter {name}@{version} not found; versions: "
                                f"{', '.join(self.versions(name)) or 'none'}")
        self.storage.write_text(f"{self._prefix(name)}/current", version + "\n")
        return version

    def _in_flight(self, name: str, complete: list[str]) -> tuple[list[str], list[str]]:
        """Version folders without a published herd.json: (pushes in progress, abandoned ones).

        A push claims its folder, uploads its files and writes herd.json last; one whose newest
        file is older than ABANDONED_PUSH_S died midway and may go."""
        live, abandoned = [], []
        for v in self.storage.list_children(self._prefix(name)):
            if not _version_number(v) or v in complete:
                continue
            times = [self.storage.modified(k) for k in self.storage.list_keys(self._prefix(name, v))]
            newest = max((t for t in times if t is not None), default=None)
            if newest is not None and time.time() - newest > ABANDONED_PUSH_S:
                abandoned.append(v)
            else:
                live.append(v)
        return live, abandoned

    def _delete_version(self, name: str, version: str) -> None:
        prefix = self._prefix(name, version)
        self.storage.delete(f"{prefix}/{META_FILE}")  # first: the version vanishes atomically for readers
        for fname in (*FILES, CLAIM_FILE):
            self.storage.delete(f"{prefix}/{fname}")
        self.storage.delete_prefix(prefix)

    def delete(self, ref: str, all_versions: bool = False) -> list[str]:
        """Delete one version (`NAME@VERSION`, not the current one while others exist) or, with
        `all_versions`, every published version of `NAME`. A push still in progress is never
        deleted; one abandoned for over an hour goes with the whole adapter."""
        name, version = split_ref(ref)
        if version is None and not all_versions:
            raise ValueError(f"deleting every version of adapter {name!r} needs --all; "
                             f"to delete one version: `herd adapters delete {name}@VERSION`")
        if version is not None and all_versions:
            raise ValueError(f"--all deletes every version; pass the name only ({name!r}), not {ref!r}")
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"adapter {name!r} not found in {self.storage.url}")
        if version is None:
            deleted = list(versions)
            for v in versions:
                self._delete_version(name, v)
            live, abandoned = self._in_flight(name, [])
            for v in abandoned:
                self._delete_version(name, v)
        else:
            if version not in versions:
                raise RegistryError(f"adapter {name}@{version} not found; versions: {', '.join(versions)}")
            if self.current(name) == version and len(versions) > 1:
                raise RegistryError(f"{name}@{version} is the current version; promote another version first")
            self._delete_version(name, version)
            deleted = [version]
            live, _ = self._in_flight(name, versions)
        if deleted == versions:  # nothing published is left
            self.storage.delete(f"{self._prefix(name)}/current")
            if not live:
                self.storage.delete_prefix(self._prefix(name))
        return deleted
