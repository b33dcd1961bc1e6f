"""Tiny Llama-shaped models for tests and the demo, with a tokenizer Herd trains itself.

No weights can be downloaded, so Herd makes its own: a sentencepiece BPE tokenizer trained on
the King James Bible (public domain, shipped gzipped in `llama/data/`) with Llama 2's special
ids and byte fallback, and a randomly initialised model of a tiny preset shape.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Callable

import sentencepiece as spm
import torch

from llama.config import LlamaConfig, preset
from llama.model import Transformer, init_weights
from llama.weights import save_model

CORPUS = Path(__file__).parent / "data" / "kjv.txt.gz"


def corpus_lines(max_chars: int | None = None) -> list[str]:
    """Lines of the shipped text (the first `max_chars` characters if given)."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        text = f.read(max_chars) if max_chars else f.read()
    return [line for line in text.splitlines() if line.strip()]


def cache_dir() -> Path:
    return Path(os.environ.get("HERD_CACHE_DIR", Path.home() / ".cache" / "herd"))


def train_tokenizer(out_path: str | Path, vocab_size: int = 1000, corpus_chars: int = 1_500_000) -> Path:
    """Train (or reuse from the cache) a Llama-2-style sentencepiece model; copy it to `out_path`.

    Llama 2's tokenizer settings: BPE, unk=0 bos=1 eos=2 no pad, byte fallback, split digits,
    identity normalisation, whitespace kept as is.
    """
    key = hashlib.sha256(f"{vocab_size}:{corpus_chars}:{CORPUS.stat().st_size}:v1".encode()).hexdigest()[:16]
    cached = cache_dir() / f"tokenizer-{key}.model"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus_lines(corpus_chars)), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            character_coverage=1.0, max_sentence_length=4096, num_threads=2,
            shuffle_input_sentence=False, minloglevel=2,
        )
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(model.getvalue())
        tmp.replace(cached)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out_path)
    return out_path


def create_tiny(directory: str | Path, preset_name: str = "tiny", seed: int = 0,
                cfg: LlamaConfig | None = None, train_steps: int = 0,
                progress: Callable[[int, float], None] | None = None) -> Path:
    """Write a tiny model in HF layout (config.json, model.safetensors, tokenizer.model).

    Random weights by default (tests); with `train_steps` it is first trained briefly as a
    language model on the shipped text, so that its output reads like scripture (the demo).
    """
    directory = Path(directory)
    cfg = cfg or preset(preset_name)
    tok_path = train_tokenizer(directory / "tokenizer.model", vocab_size=cfg.vocab_size)
    torch.manual_seed(seed)
    model = init_weights(Transformer(cfg), seed=seed)
    if train_steps:
        _pretrained(model, tok_path, train_steps, seed, progress)
    save_model(model, directory)
    return directory


def _pretrained(model: Transformer, tok_path: Path, steps: int, seed: int,
                progress: Callable[[int, float], None] | None) -> None:
    """Pre-train, or reuse the weights of the same pre-training from the cache (it is deterministic;
    minutes of CPU that the demo and its test would otherwise pay on every run)."""
    from safetensors.torch import load_file, save_file
    tok_sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    recipe = f"{model.cfg.model_dump_json()}:{steps}:{seed}:{CORPUS.stat().st_size}:{tok_sha}:v2"
    cached = cache_dir() / f"pretrained-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.safetensors"
    if cached.is_file():
        model.load_state_dict(load_file(cached))
        model.eval()
        return
    pretrain(model, tok_path, steps, seed=seed, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(cached)


def pretrain(model: Transformer, tokenizer_path: Path, steps: int, seq_len: int = 128, batch: int = 16,
             lr: float = 3e-3, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Next-token training on the shipped text (plain AdamW; a minute of CPU for the tiny shape).

    Runs on one torch thread (the caller's setting is restored after): the tiny shape's matmuls
    are too small to gain from a second OpenMP thread, and when another process holds the other
    core (a Ray cluster, a test suite) the second thread's spin-waits made each step ~10x slower
    (40 steps: 3.4 s on one thread, 28-48 s on two, with one core busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(model, tokenizer_path, steps, seq_len, batch, lr, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model: Transformer, tokenizer_path: Path, steps: int, seq_len: int, batch: int, lr: float,
              seed: int, progress: Callable[[int, float], None] | None) -> list[float]:
    import random

    from llama.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    ids = torch.tensor(tok.encode(" ".join(corpus_lines(600_000))), dtype=torch.long)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    for step in range(steps):
        starts = [rng.randrange(0, len(ids) - seq_len - 1) for _ in range(batch)]
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, model.cfg.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    model.eval()
    return losses


def demo_dataset(n: int = 64, seed: int = 0) -> list[dict]:
    """A small instruction set a tiny model learns in a few dozen steps (for the demo and tests).

    Prompts are verse openings from the shipped text; the answer is always the same line, so a
    LoRA adapter that learned it is easy to tell from the base model. Every third example uses
    the chat `messages` shape with a system prompt.
    """
    import random
    lines = [line for line in corpus_lines(200_000) if len(line.split()) > 8]
    rng = random.Random(seed)
    answer = "Let there be light: and there was light."
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(lines).split()[:6])
        if i % 3 == 2:
            out.append({"messages": [{"role": "system", "content": "Answer as the scripture does."},
                                     {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer}]})
        else:
            out.append({"prompt": prompt, "completion": answer})
    return out
