"""Local generation for `herd generate`: a stored base model (plus adapter), no Ray."""

from __future__ import annotations

from llama.generation import SamplingParams, generate
from llama.packed_linear import pack_linears

from cluster.models import load_base
from cluster.storage import open_storage


def generate_text(storage_url: str | None, model: str, prompt: str, adapter: str | None = None,
                  max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None, dtype: str = "auto") -> dict:
    storage = open_storage(storage_url)
    net, tok = load_base(storage, model, dtype=dtype)
    if adapter:
        from cluster.registry import AdapterRegistry
        AdapterRegistry(storage).apply_to(net, model, adapter)
    pack_linears(net)  # the same kernels as the server, so both give the same tokens
    ids = tok.encode(prompt, bos=True)
    out = generate(net, ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed), eos_id=tok.eos_id)
    return {"text": tok.decode(out.token_ids), "token_ids": out.token_ids,
            "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens}
