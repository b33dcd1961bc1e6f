"""`make demo`: the Herd story on this machine, step by step, through the `herd` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()
HERD = str(Path(sys.executable).parent / "herd")
STORAGE = os.environ.get("HERD_STORAGE", str(Path(".herd/demo-storage").resolve()))


def step(title: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    console.rule(f"[bold cyan]{title}")
    console.print(f"$ herd {' '.join(args)}", style="dim")
    t0 = time.time()
    proc = subprocess.run([HERD, *args], env={**os.environ, "HERD_STORAGE": STORAGE})
    console.print(f"[dim]({time.time() - t0:.1f}s)[/]")
    if check and proc.returncode != 0:
        console.print(f"[red]step failed with exit code {proc.returncode}[/]")
        sys.exit(proc.returncode)
    return proc


def main() -> None:
    console.print(f"[bold]Herd demo[/] - storage root {STORAGE}")
    models = subprocess.run([HERD, "models", "list", "--json"], env={**os.environ, "HERD_STORAGE": STORAGE},
                            capture_output=True, text=True)
    if '"demo"' not in models.stdout:
        step("1. Create a tiny Llama-shaped model (tokenizer trained on the KJV Bible)",
             "models", "create-tiny", "--name", "demo")
    step("2. List base models", "models", "list")
    step("3. Generate from the base model (local, no Ray)", "generate", "--model", "demo",
         "--max-tokens", "24", "In the beginning God created")


if __name__ == "__main__":
    main()
