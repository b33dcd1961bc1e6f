"""The ZeRO model-state formula that bench/train.py and `herd plan` share, against hand-computed values."""

import pytest

from cluster.memory_formula import zero_model_state

GB = 1e9


def test_fp32_and_mixed_precision_stages_match_the_paper():
    psi, n = 1e9, 4
    fp32 = [zero_model_state(psi, s, n, mixed_precision=False).device_bytes for s in range(4)]
    assert fp32 == [16 * psi, 8 * psi + 8 * psi / n, 4 * psi + 12 * psi / n, 16 * psi / n]
    mixed = [zero_model_state(psi, s, n, mixed_precision=True).device_bytes for s in range(4)]
    assert mixed == [16 * psi, 4 * psi + 12 * psi / n, 2 * psi + 14 * psi / n, 16 * psi / n]


def test_70b_zero3_on_8_gpus_needs_offload_to_fit_80gb():
    psi = 68.98e9  # Llama-2-70B
    plain = zero_model_state(psi, 3, 8, mixed_precision=True)
    assert plain.device_bytes / GB == pytest.approx(138, rel=0.01) and plain.host_bytes == 0
    off = zero_model_state(psi, 3, 8, mixed_precision=True, offload_optimizer=True)
    assert off.device_bytes / GB == pytest.approx(34.5, rel=0.01)  # fits 80 GB
    assert 8 * off.host_bytes / GB == pytest.approx(828, rel=0.01)  # the node's host memory
    assert zero_model_state(psi, 3, 16, mixed_precision=True).device_bytes / GB < 80


def test_bad_stage_or_workers_is_refused():
    with pytest.raises(ValueError, match="stage"):
        zero_model_state(1e9, 4, 2, mixed_precision=True)
    with pytest.raises(ValueError, match="workers"):
        zero_model_state(1e9, 3, 0, mixed_precision=True)
