"""CPU inference: oneDNN-packed linears (bf16 and fp32), the `--dtype` choice, and the engine thread's torch threads."""

import json
import queue
import threading

import pytest
import torch
from adapters import random_adapter
from conftest import make_model
from llama.config import preset
from llama.generation import SamplingParams
from llama.lora import load_adapter
from llama.packed_linear import PackedLinear, pack_linears, packing_supported, weight_numel
from llama.tokenizer import Tokenizer
from llama.weights import inference_dtype
from serving.engine import Engine, FinishEvent, Request
from serving.runner import LocalRunner

CFG = preset("tiny")
needs_bf16 = pytest.mark.skipif(not packing_supported(torch.bfloat16, "cpu"),
                                reason="this CPU has no native bf16 support for oneDNN")


@needs_bf16
@pytest.mark.parametrize("shape", [(1376, 512), (512, 1376), (1000, 64)])
def test_packed_linear_equals_plain_bf16_linear(shape):
    out_f, in_f = shape
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    packed = PackedLinear(lin)
    x = torch.randn(2, 20, in_f, dtype=torch.bfloat16)
    full = packed(x)
    assert full.shape == (2, 20, out_f) and full.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.float(), lin.weight.float())
    # the same bf16 product as PyTorch's own kernel, up to accumulation order
    assert (full.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    # a row's result does not depend on how many rows share the call (batching invariance)
    for m in (1, 5, 8):
        assert torch.allclose(packed(x[0, :m]).float(), full[0, :m].float(), atol=1e-5, rtol=1e-2)


@needs_bf16
def test_pack_linears_replaces_every_linear_of_bf16_and_fp32_models():
    for dtype in (torch.bfloat16, torch.float32):
        model = make_model(CFG, seed=1).to(dtype)
        numel = weight_numel(model)
        assert pack_linears(model) == 7 * CFG.n_layers + 1
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert weight_numel(model) == numel
    assert pack_linears(make_model(CFG, seed=1).to(torch.float16)) == 0  # no packed fp16 path: plain linear


@pytest.mark.skipif(not packing_supported(torch.float32, "cpu"), reason="PyTorch built without oneDNN")
def test_packed_fp32_linear_equals_plain_to_rounding():
    """fp32 stays fp32 math when packed (oneDNN's blocked layout, not a lower precision)."""
    lin = torch.nn.Linear(512, 1376, bias=False)
    packed = PackedLinear(lin)
    x = torch.randn(3, 9, 512)
    ref = torch.nn.functional.linear(x, lin.weight)
    assert (packed(x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.allclose(packed(x[0, :1]), ref[0, :1], atol=1e-5)


@needs_bf16
def test_bf16_runner_with_adapters_tracks_fp32(tmp_path):
    """The packed bf16 forward (base + two adapters in one batch) stays within bf16 rounding of fp32."""
    adapters = [load_adapter(random_adapter(tmp_path / f"a{i}", CFG, r=4, alpha=8,
                                            targets=("q_proj", "v_proj", "down_proj"), seed=i), CFG)
                for i in range(2)]
    tokens = torch.randint(3, CFG.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7).expand(3, 7)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = LocalRunner(make_model(CFG, seed=1).to(dtype), slots=3, max_loras=2, max_lora_rank=8)
        for slot, (spec, state) in enumerate(adapters, start=1):
            runner.load_adapter(slot, spec, state)
        tables = torch.arange(1, 4)[:, None] * 2 + torch.arange(2)[None] - 1  # rows own blocks 1-2, 3-4, 5-6
        logits[dtype] = runner.forward(tokens, positions, tables, torch.tensor([0, 1, 2]), {1, 2}, span=7)
    ref, got = logits[torch.float32], logits[torch.bfloat16]
    assert got.dtype == torch.float32 and got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 5e-2 * scale
    # the adapters really acted in bf16 too: rows 1 and 2 differ from the base row as in fp32
    for row in (1, 2):
        delta_ref = (ref[row] - ref[0]).abs().max().item()
        assert delta_ref > 0 and (got[row] - got[0]).abs().max().item() > 0.5 * delta_ref


@pytest.mark.parametrize("native_bf16", ["1", "0"])
def test_inference_dtype_auto_follows_the_checkpoint(tmp_path, monkeypatch, caplog, native_bf16):
    monkeypatch.setenv("HERD_CPU_BF16", native_bf16)
    fp16_on_cpu = torch.bfloat16 if native_bf16 == "1" else torch.float32  # emulated bf16 is slower than fp32
    for stored, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                             ("float16", fp16_on_cpu), (None, torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": stored} if stored else {}))
        assert inference_dtype("auto", tmp_path) == expected
    assert f"runs in {str(fp16_on_cpu)[6:]} on this CPU" in caplog.text  # it says which it chose
    assert inference_dtype("float16", tmp_path) == torch.float16  # an explicit choice is kept
    assert inference_dtype("bfloat16", tmp_path) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        inference_dtype("fp8", tmp_path)


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    from llama.weights import cpu_has_native_bf16
    monkeypatch.delenv("HERD_CPU_BF16", raising=False)
    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n")
    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm (Graviton 3)
    assert not cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n")


def test_engine_runs_the_model_with_its_own_thread_count(tokenizer_path):
    """The engine thread sizes its own OpenMP team; the caller's thread count is left alone."""
    seen = []

    class Recording(LocalRunner):
        def forward(self, *args, **kwargs):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return super().forward(*args, **kwargs)

    before = torch.get_num_threads()
    runner = Recording(make_model(CFG, seed=1), slots=2, max_loras=0, max_lora_rank=8)
    want = 1 if before != 1 else 2
    engine = Engine(runner, Tokenizer(tokenizer_path), slots=2, threads=want)
    q = queue.Queue()
    engine.submit(Request([1, 5, 6], SamplingParams(max_tokens=3), q.put))
    while not isinstance(q.get(timeout=60), FinishEvent):
        pass
    engine.shutdown()
    assert seen and all(name == "herd-engine" and n == want for name, n in seen)
    assert torch.get_num_threads() == before
