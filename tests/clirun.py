"""Run `herd` in-process (fast) with a given storage root; parse --json output."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cluster.cli import app


def herd(*args: str, storage=None, expect: int | None = 0, env: dict | None = None):
    argv = list(args)
    if storage is not None:
        argv += ["--storage", str(storage)]
    result = CliRunner().invoke(app, argv, env=env, catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"herd {' '.join(argv)} -> {result.exit_code}\n{result.output}"
    return result


def herd_json(*args: str, storage=None, env: dict | None = None):
    return json.loads(herd(*args, "--json", storage=storage, env=env).stdout)
