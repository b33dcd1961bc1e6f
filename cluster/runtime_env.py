"""The runtime environment a fine-tuning job's entrypoint and workers run in, declared at submit.

A job on the local head runs with this machine's interpreter. On a cluster Herd did not start, the
entrypoint is `python -m jobs.run` in the environment the submission declares: Herd's variables
(storage root, DeepSpeed settings) plus what the user declares in HERD_RUNTIME_ENV, a JSON object
or the path of a JSON/YAML file in Ray's runtime_env format, e.g. {"image_uri": "ghcr.io/herd/herd-gpu:latest"},
{"pip": ["llama-herd==0.1.0"]} or {"env_vars": {"PATH": "/opt/venv/bin:/usr/bin"}}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def declared_runtime_env(env_vars: dict[str, str]) -> dict:
    """{'env_vars': Herd's variables + the declared ones, ...the rest of HERD_RUNTIME_ENV}."""
    raw = os.environ.get("HERD_RUNTIME_ENV", "").strip()
    declared: dict = {}
    if raw.startswith("{"):
        declared = json.loads(raw)
    elif raw:
        text = Path(raw).read_text()
        if raw.endswith((".yaml", ".yml")):
            import yaml
            declared = yaml.safe_load(text) or {}
        else:
            declared = json.loads(text)
    if not isinstance(declared, dict):
        raise ValueError(f"HERD_RUNTIME_ENV must be a JSON/YAML object (Ray's runtime_env), got {raw!r}")
    return {**declared, "env_vars": {**env_vars, **declared.get("env_vars", {})}}
