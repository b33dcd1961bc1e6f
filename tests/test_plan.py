"""`herd plan` against values computed by hand for Llama 2 7B and 70B."""

import pytest

from clirun import herd, herd_json
from cluster.memory_formula import zero_model_state
from cluster.plan import PlanInput, plan

# 7B: 32 layers * (4 * 4096^2 + 3 * 4096 * 11008) = 6,476,005,376 in the layers' linears,
# + 2 * 32000 * 4096 (embeddings, head) + 65 * 4096 (norms) = 6,738,415,616 parameters.
P7 = 6_738_415_616
# 70B: 80 * (2 * 8192^2 + 2 * 8192 * 1024 + 3 * 8192 * 28672) = 68,451,041,280 in the linears,
# + 2 * 32000 * 8192 + 161 * 8192 = 525,606,912 replicated -> 68,976,648,192 parameters.
P70, P70_LINEAR, P70_REPLICATED = 68_976_648_192, 68_451_041_280, 525_606_912


def test_serving_7b_and_70b():
    p7 = plan(PlanInput(model="7b"))["serving"]
    assert p7["weights_gb"] == pytest.approx(2 * P7 / 1e9)  # 13.48 GB
    assert p7["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2 == 524_288  # 0.5 MiB
    # 32 x 4096 tokens of KV = 68.7 GB: TP=1 (13.5 + 68.7) > 0.9 * 80 GiB = 77.3 GB; TP=2: 6.9+0.26 + 34.4 fits
    assert [r["fits"] for r in p7["options"]][:2] == [False, True] and p7["tp"] == 2
    assert p7["replicas_per_node"] == 4

    p70 = plan(PlanInput(model="70b", max_concurrent=16, context=4096))["serving"]
    assert p70["weights_gb"] == pytest.approx(137.95, abs=0.01)  # the 137.9 GB
    assert p70["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327_680
    assert p70["kv_mib_per_token"] == pytest.approx(0.3125)
    by_tp = {r["tp"]: r for r in p70["options"]}
    assert sorted(by_tp) == [1, 2, 4, 8]  # divisors of 64 heads and 8 KV heads within one 8-GPU node
    # TP=8: 1/8 of the linears (17.1 GB) + embeddings, head and norms whole (1.05 GB) = 18.16 GB
    assert by_tp[8]["shard_gb"] == pytest.approx(2 * (P70_LINEAR / 8 + P70_REPLICATED) / 1e9) == \
        pytest.approx(18.16, abs=0.01)
    assert 2 * P70 / 8 / 1e9 == pytest.approx(17.24, abs=0.01)  # the naive 1/8 the issue compares with
    # 16 x 4096 x 327,680 B = 21.47 GB of KV; TP=2: 69.5 + 10.7 > 77.3 GB; TP=4: 35.3 + 5.4 fits
    assert by_tp[4]["kv_gb"] == pytest.approx(16 * 4096 * 327_680 / 4 / 1e9)
    assert (p70["tp"], p70["replicas_per_node"]) == (4, 2)
    assert p70["command"].startswith("herd serve deploy --model 70b --tp 4 --device cuda --max-batch 16 "
                                     "--max-seq-len 4096")


def test_finetune_70b_full_zero3_needs_offload_or_16_gpus():
    p = plan(PlanInput(model="70b", method="full", zero=3, gpus=8))["finetune"]
    z3 = next(r for r in p["stages"] if r["zero"] == 3 and not r["offload"])
    assert z3["model_state_gb"] == pytest.approx(16 * P70 / 8 / 1e9) == pytest.approx(137.95, abs=0.01)
    assert not z3["fits"]
    z3_off = next(r for r in p["stages"] if r["zero"] == 3 and r["offload"])
    assert z3_off["model_state_gb"] == pytest.approx(4 * P70 / 8 / 1e9)  # bf16 weights + grads stay
    assert z3_off["host_gb"] == pytest.approx(12 * P70 / 8 / 1e9) and z3_off["fits"]
    # 16 GPUs: 69.0 GB of state + 0.87 GB of activations (512 tokens, checkpointed) < 77.3 GB
    assert p["smallest_gpus"] == 16 and "--workers 16" in p["command"] and "--zero 3" in p["command"]
    z0 = next(r for r in p["stages"] if r["zero"] == 0 and not r["offload"])
    assert z0["model_state_gb"] == pytest.approx(16 * P70 / 1e9)
    z1 = next(r for r in p["stages"] if r["zero"] == 1 and not r["offload"])
    assert z1["model_state_gb"] == pytest.approx((4 * P70 + 12 * P70 / 8) / 1e9)
    z2 = next(r for r in p["stages"] if r["zero"] == 2 and not r["offload"])
    assert z2["model_state_gb"] == pytest.approx((2 * P70 + 14 * P70 / 8) / 1e9)
    # the same function the fine-tuning bench uses
    assert z2["model_state_gb"] == pytest.approx(zero_model_state(P70, 2, 8, mixed_precision=True).device_bytes / 1e9)


def test_finetune_7b_lora_and_activations():
    p = plan(PlanInput(model="7b", method="lora", zero=2, gpus=2, context=512))["finetune"]
    # rank 8 on q, k, v, o: 32 layers * 4 * 8 * (4096 + 4096) = 8,388,608 adapter parameters
    assert p["lora_params"] == 8_388_608
    z2 = next(r for r in p["stages"] if r["zero"] == 2 and not r["offload"])
    assert z2["frozen_base_gb"] == pytest.approx(2 * P7 / 1e9)  # bf16 base on every GPU below ZeRO-3
    assert z2["model_state_gb"] == pytest.approx((2 * 8_388_608 + 14 * 8_388_608 / 2) / 1e9)
    # activations at 512 tokens, micro-batch 1: checkpointed 32 * 2 * 512 * 4096 + 34 * 512 * 4096 + 4 * 512 * 32000
    assert p["activations_gb"]["checkpointing"] == pytest.approx(
        (32 * 2 * 512 * 4096 + 34 * 512 * 4096 + 4 * 512 * 32000) / 1e9)
    assert p["activations_gb"]["no_checkpointing"] == pytest.approx((32 * 34 * 512 * 4096 + 4 * 512 * 32000) / 1e9)
    assert p["smallest_gpus"] == 1


def test_cli_tables_and_json(tmp_path):
    out = herd_json("plan", "--model", "70b", "--method", "full", "--zero", "3", "--offload", storage=tmp_path)
    # offloaded: bf16 weights + grads 4 * P70 / N on the GPU: N = 4 gives 69.0 + 0.87 GB < 77.3 GB, N = 2 does not
    assert out["finetune"]["smallest_gpus"] == 4 and "--offload" in out["finetune"]["command"]
    text = herd("plan", "--model", "13b", storage=tmp_path).stdout
    assert "Serving" in text and "Fine-tuning" in text and "herd serve deploy --model 13b" in text
    r = herd("plan", "--model", "nope", storage=tmp_path, expect=None)
    assert r.exit_code == 1 and "model 'nope' not found" in r.output
