"""`herd models ...` and `herd generate`: base models in the storage root, local generation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cluster.cli import Dtype, DtypeOpt, JsonOpt, StorageOpt, emit, out_console, run_guarded

models_app = typer.Typer(help="Base models in the storage root.", no_args_is_help=True)


@models_app.command("list")
def models_list(storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """List the base models in the storage root."""
    from cluster.models import list_models
    from cluster.storage import open_storage

    def body():
        st = open_storage(storage)
        rows = list_models(st)
        if json_:
            emit(rows, True)
            return
        table = Table("name", "dim", "layers", "heads", "kv heads", "vocab", "params", title=f"models in {st.url}")
        for r in rows:
            table.add_row(r["name"], str(r["dim"]), str(r["layers"]), str(r["heads"]), str(r["kv_heads"]),
                          str(r["vocab_size"]), f"{r['parameters'] / 1e6:.2f}M")
        out_console.print(table)
    run_guarded(body)


@models_app.command("import")
def models_import(directory: Annotated[Path, typer.Argument(help="HF layout or Meta layout (params.json)")],
                  name: Annotated[str, typer.Option("--name", help="model name in the registry")],
                  storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Import a Hugging Face or Meta checkpoint folder as a base model."""
    from cluster.models import import_model
    from cluster.storage import open_storage

    def body():
        st = open_storage(storage)
        cfg = import_model(st, directory, name)
        emit({"name": name, "storage": st.url, "parameters": cfg.num_parameters()}, json_,
             f"imported {directory} as model {name!r} ({cfg.num_parameters() / 1e6:.2f}M parameters) into {st.url}")
    run_guarded(body)


@models_app.command("create-tiny")
def models_create_tiny(name: Annotated[str, typer.Option("--name", help="model name")],
                       preset: Annotated[str, typer.Option(help="tiny, tiny-mha or small")] = "tiny",
                       seed: Annotated[int, typer.Option(help="weight init seed")] = 0,
                       train_steps: Annotated[int, typer.Option("--train-steps", min=0,
                                                                help="pre-train briefly on the shipped text")] = 0,
                       storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Write a small Llama-shaped model (with a trained tokenizer) for demos and tests."""
    from rich.progress import Progress

    from cluster.models import create_tiny_model
    from cluster.storage import open_storage

    def body():
        st = open_storage(storage)
        with Progress(transient=True, disable=json_ or not train_steps) as bar:
            task = bar.add_task("pre-training", total=train_steps or 1)

            def progress(step: int, loss: float) -> None:
                bar.update(task, completed=step, description=f"pre-training (loss {loss:.2f})")
            cfg = create_tiny_model(st, name, preset, seed, train_steps=train_steps, progress=progress)
        emit({"name": name, "storage": st.url, "parameters": cfg.num_parameters()}, json_,
             f"created tiny model {name!r} ({cfg.num_parameters() / 1e6:.2f}M parameters) in {st.url}")
    run_guarded(body)


def generate(prompt: Annotated[str, typer.Argument(help="text to continue")],
             model: Annotated[str, typer.Option("--model", help="base model name")],
             adapter: Annotated[str | None, typer.Option("--adapter", help="NAME or NAME@VERSION")] = None,
             max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 64,
             temperature: Annotated[float, typer.Option("--temperature", min=0.0)] = 0.0,
             top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
             seed: Annotated[int | None, typer.Option("--seed")] = None,
             dtype: DtypeOpt = Dtype.auto,
             storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """Generate text locally (no Ray): BOS + prompt, like Meta's text_completion."""
    from cluster.local_inference import generate_text

    def body():
        result = generate_text(storage, model, prompt, adapter=adapter, max_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, dtype=dtype.value)
        emit(result, json_, result["text"])
    run_guarded(body)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("generate")(generate)
