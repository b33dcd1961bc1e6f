"""`herd adapters ...`: the versioned LoRA adapter registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cluster.cli import JsonOpt, StorageOpt, emit, out_console, run_guarded

adapters_app = typer.Typer(help="Versioned LoRA adapters (PEFT format) in the storage root.",
                           no_args_is_help=True)


def _registry(storage: str | None):
    from cluster.registry import AdapterRegistry
    from cluster.storage import open_storage
    return AdapterRegistry(open_storage(storage))


@adapters_app.command("list")
def adapters_list(storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """List adapters with their versions and the current one."""
    def body():
        reg = _registry(storage)
        rows = reg.list()
        if json_:
            emit(rows, True)
            return
        table = Table("name", "base model", "current", "versions", "r", title=f"adapters in {reg.storage.url}")
        for r in rows:
            table.add_row(r["name"], r["base_model"], r["current"] or "-", " ".join(r["versions"]), str(r["r"]))
        out_console.print(table)
    run_guarded(body)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")],
                  storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Show one version's metadata (herd.json): base model, rank, job, metrics, checksums."""
    def body():
        meta = _registry(storage).show(ref)
        lines = [f"{meta['name']}@{meta['version']}" + ("  (current)" if meta["current"] else ""),
                 f"  base model:  {meta['base_model']}",
                 f"  rank/alpha:  r={meta['r']} alpha={meta['lora_alpha']}" + (" rslora" if meta["use_rslora"] else ""),
                 f"  targets:     {', '.join(meta['target_modules'])}",
                 f"  job:         {meta.get('job_id') or '-'}",
                 f"  metrics:     {meta.get('metrics') or '-'}",
                 f"  created:     {meta['created']}",
                 f"  versions:    {' '.join(meta['versions'])}"]
        lines += [f"  {f}: sha256 {i['sha256'][:16]}... ({i['size']} bytes)" for f, i in meta["files"].items()]
        emit(meta, json_, "\n".join(lines))
    run_guarded(body)


@adapters_app.command("push")
def adapters_push(directory: Annotated[Path, typer.Argument(help="a peft LoRA dir (adapter_config.json + "
                                                                 "adapter_model.safetensors)")],
                  name: Annotated[str, typer.Option("--name", help="adapter name")],
                  base: Annotated[str | None, typer.Option("--base", help="base model (default: the adapter "
                                                                          "config's base_model_name_or_path)")] = None,
                  promote: Annotated[bool, typer.Option("--promote", help="make it the current version")] = False,
                  storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Validate and publish an adapter as the next version."""
    def body():
        reg = _registry(storage)
        version = reg.push(directory, name, base_model=base, promote=promote)
        current = reg.current(name)
        emit({"name": name, "version": version, "current": current}, json_,
             f"pushed {name}@{version} (current: {current})")
    run_guarded(body)


@adapters_app.command("pull")
def adapters_pull(ref: Annotated[str, typer.Argument(metavar="NAME[@VERSION]")],
                  directory: Annotated[Path, typer.Argument(help="where to write the peft files")],
                  storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Download a version (checksums verified) as a peft LoRA dir."""
    def body():
        name, version, out = _registry(storage).pull(ref, directory)
        emit({"name": name, "version": version, "directory": str(out)}, json_,
             f"pulled {name}@{version} into {out}")
    run_guarded(body)


@adapters_app.command("promote")
def adapters_promote(ref: Annotated[str, typer.Argument(metavar="NAME@VERSION")],
                     storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Make a version the one served by default (also how you roll back)."""
    def body():
        reg = _registry(storage)
        version = reg.promote(ref)
        name = ref.partition("@")[0]
        emit({"name": name, "current": version}, json_, f"{name}: current version is now {version}")
    run_guarded(body)


@adapters_app.command("delete")
def adapters_delete(ref: Annotated[str, typer.Argument(metavar="NAME@VERSION | NAME --all")],
                    all_versions: Annotated[bool, typer.Option("--all", help="delete every version of NAME")] = False,
                    storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Delete one version, or every version of an adapter with --all (pushes in progress are kept)."""
    def body():
        deleted = _registry(storage).delete(ref, all_versions=all_versions)
        name = ref.partition("@")[0]
        emit({"name": name, "deleted": deleted}, json_, f"deleted {name} versions {', '.join(deleted)}")
    run_guarded(body)


def register(app: typer.Typer) -> None:
    app.add_typer(adapters_app, name="adapters")
