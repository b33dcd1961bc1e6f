"""The `herd` command line: the entry point, shared options, output and exit codes.

Exit codes (SPEC section 3): 0 ok, 1 failure (storage, cluster, runtime), 2 bad usage (bad
arguments, names or data files). Command groups live in `cluster/commands_*.py`.
"""

from __future__ import annotations

import enum
import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

err_console = Console(stderr=True)
out_console = Console()

StorageOpt = Annotated[str | None, typer.Option("--storage", envvar="HERD_STORAGE",
                                                help="storage root: a folder or s3://bucket/prefix "
                                                     "(default ./.herd/storage)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


class Dtype(str, enum.Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DtypeOpt = Annotated[Dtype, typer.Option(
    "--dtype", help="weights/activations dtype; auto = the checkpoint's (float16 becomes bfloat16 on a CPU "
             "with native bf16, else float32)")]


class UsageProblem(Exception):
    """Bad input from the user: printed with its fix, exit code 2."""


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print `data` as JSON with --json, else the human text (or a compact rendering)."""
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    elif human is not None:
        out_console.print(human, highlight=False, soft_wrap=True)
    else:
        out_console.print(data)


def _usage_errors() -> tuple[type[BaseException], ...]:
    from cluster.names import BadName
    from llama.config import ConfigError
    from llama.tokenizer import DialogError, TokenizerError
    from llama.weights import WeightsError
    return (UsageProblem, BadName, ConfigError, WeightsError, TokenizerError, DialogError,
            FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def run_guarded(fn, *args, **kwargs):
    """Call fn, turning known errors into a one-line message and the SPEC's exit code."""
    from cluster.ray_cluster import ClusterError
    from cluster.storage import StorageError
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except (StorageError, ClusterError) as e:
        fail(str(e), 1)
    except _usage_errors() as e:
        fail(str(e), 2)


app = typer.Typer(name="herd", help="Fine-tune and serve Llama 2 models on a Ray cluster.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _register() -> None:
    from cluster import commands_adapters, commands_finetune, commands_models, commands_plan, commands_serve
    commands_models.register(app)
    commands_adapters.register(app)
    commands_finetune.register(app)
    commands_serve.register(app)
    commands_plan.register(app)


_register()


def main() -> None:
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
