"""The fine-tuning recipe without Ray: data, batching, ZeRO stages, resume, LoRA-only training."""

import json
import math
import uuid

import pytest

from clirun import herd
from cluster.job_store import JobSpec
from cluster.registry import AdapterRegistry
from cluster.storage import open_storage
from jobs.recipe import epoch_batches, lr_lambda
from llama.sft_data import IGNORE, DataError, read_dataset, tokenize_dialog
from llama.tokenizer import Tokenizer
from train_helpers import CheckpointProbe, make_job, run_recipe, write_jsonl

GOOD = {"prompt": "Who made the light?", "completion": "God made it."}


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion"'], ":2: invalid JSON"),
    (['{"prompt": "a"}'], ":1: missing field 'completion'"),
    (['{"text": "a"}'], ":1: expected {'prompt', 'completion'} or {'messages'"),
    ([json.dumps(GOOD), json.dumps({"messages": [{"role": "assistant", "content": "x"}]})],
     ":2: turn 0: expected role 'user'"),
    ([json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})],
     ":1: message 1: role 'bot' is not system, user or assistant"),
    ([json.dumps({"messages": [{"role": "user", "content": "a"}]})], ":1: the last message must come from the assistant"),
    ([json.dumps({"prompt": "[INST] x", "completion": "y"})], ":1: message 0: special tags"),
    ([], ":1: the file has no examples"),
    (["", "   "], ":1: the file has no examples"),
])
def test_bad_data_reports_file_and_line(tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError) as err:
        read_dataset(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_bad_data_cli_exit_2_and_nothing_submitted(tmp_path, storage_dir):
    herd("models", "create-tiny", "--name", "base", storage=storage_dir)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"messages": "nope"}])
    r = herd("finetune", "submit", "--model", "base", "--data", str(bad), "--adapter", "a", storage=storage_dir,
             expect=2, env={"RAY_ADDRESS": "http://127.0.0.1:9"})  # a cluster that does not exist: never contacted
    assert f"{bad}:2: 'messages' must be a list" in r.output
    assert not (storage_dir / "jobs").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    r = herd("finetune", "submit", "--model", "ghost", "--data", str(good), "--adapter", "a", storage=storage_dir,
             expect=2, env={"RAY_ADDRESS": "http://127.0.0.1:9"})
    assert "unknown model 'ghost'" in r.output
    r = herd("finetune", "submit", "--model", "base", "--data", str(good), "--adapter", "a", "--zero", "0",
             "--offload", storage=storage_dir, expect=2, env={"RAY_ADDRESS": "http://127.0.0.1:9"})
    assert "--offload needs ZeRO stage 1, 2 or 3" in r.output
    assert not (storage_dir / "jobs").exists()


def test_adapter_name_of_another_base_refused(tmp_path, storage_dir):
    from adapters import random_adapter
    from cluster.models import load_config
    herd("models", "create-tiny", "--name", "base", storage=storage_dir)
    herd("models", "create-tiny", "--name", "other", "--seed", "1", storage=storage_dir)
    storage = open_storage(str(storage_dir))
    AdapterRegistry(storage).push(random_adapter(tmp_path / "a", load_config(storage, "base")), "taken")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    r = herd("finetune", "submit", "--model", "other", "--data", str(good), "--adapter", "taken",
             storage=storage_dir, expect=2, env={"RAY_ADDRESS": "http://127.0.0.1:9"})
    assert "adapter name 'taken' already belongs to base model 'base'" in r.output
    r = herd("finetune", "submit", "--model", "base", "--data", str(good), "--adapter", "other", "--method", "full",
             storage=storage_dir, expect=2, env={"RAY_ADDRESS": "http://127.0.0.1:9"})
    assert "model 'other' already exists" in r.output


def test_loss_only_on_assistant_tokens(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First question"},
              {"role": "assistant", "content": "First answer"}, {"role": "user", "content": "Second"},
              {"role": "assistant", "content": "Second answer"}]
    ex = tokenize_dialog(tok, dialog, 512)
    learned = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert tok.decode(learned).split() == ["First", "answer", "Second", "answer"]
    assert learned.count(tok.eos_id) == 2  # each turn's </s> is learned
    assert tokenize_dialog(tok, dialog, 10).input_ids == ex.input_ids[:10]  # truncation keeps the start


def test_batches_deterministic_cover_all_and_bucket_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 15  # length-bucketed: little padding


def test_cosine_schedule_with_warmup():
    f = lr_lambda(warmup=4, total=20)
    assert f(0) < f(1) < f(3) <= 1.0
    assert f(4) == pytest.approx(1.0)
    assert f(12) < f(8) and f(19) >= 0.1 and f(20) == pytest.approx(0.1)
    assert math.isclose(f(12), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_zero_stages_give_the_same_loss_curve(tmp_path):
    """Same seed, same data, 2 processes: ZeRO 0, 1, 2, 3 agree within 1e-4 over 5 steps."""
    url = str(tmp_path / "storage")
    curves = {}
    for zero in (0, 1, 2, 3):
        make_job(url, f"z{zero}", zero=zero, workers=2, max_steps=5, batch_size=2)
        curves[zero] = run_recipe(url, f"z{zero}", tmp_path, world=2)["losses"]
    assert len(curves[0]) == 5 and curves[0][-1] < curves[0][0]
    for zero in (1, 2, 3):
        assert max(abs(a - b) for a, b in zip(curves[0], curves[zero])) <= 1e-4, (zero, curves)


def test_resume_from_checkpoint_continues_the_curve(tmp_path):
    url = str(tmp_path / "storage")
    make_job(url, "r1", max_steps=6, checkpoint_every=3)
    full = run_recipe(url, "r1", tmp_path)
    resumed = run_recipe(url, "r1", tmp_path, restore=str(tmp_path / "ckpt-r1" / "step_000003"))
    assert resumed["first_step"] == 3 and len(resumed["losses"]) == 3
    assert max(abs(a - b) for a, b in zip(full["losses"][3:], resumed["losses"])) <= 1e-6


def test_each_rank_streams_its_checkpoint_files_to_s3_and_resume_continues(tmp_path, seaweed, monkeypatch):
    """ZeRO-3, 2 ranks, checkpoints on S3: every rank writes its own shard straight to the storage
    root (no torch.save to a path, nothing in its temp folder), the run keeps its last two
    checkpoints, and resuming from one continues the same loss curve."""
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    url = str(tmp_path / "storage")
    prefix = f"s3://herd/{uuid.uuid4().hex[:12]}"
    make_job(url, "s3c", zero=3, workers=2, max_steps=6, checkpoint_every=2, batch_size=2)
    full = run_recipe(url, "s3c", tmp_path, world=2, probe=CheckpointProbe, checkpoints=f"{prefix}/ckpt")

    from jobs.checkpoints import complete_checkpoints
    s3 = open_storage(prefix)
    assert [step for step, _ in complete_checkpoints(s3, "ckpt")] == [4, 6]  # step 2 deleted: the last two kept
    stored = set(s3.list_keys("ckpt/step_000006"))
    for rank, probe in enumerate(full["probes"]):
        assert probe["path_saves"] == [] and probe["temp_files"] == [], probe
        mine = {k for k in probe["saved_keys"] if k.startswith("ckpt/step_000006/")}
        assert f"ckpt/step_000006/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in mine
        assert f"ckpt/step_000006/state/zero_pp_rank_{1 - rank}_mp_rank_00_optim_states.pt" not in mine
        assert mine <= stored
    written = {k for p in full["probes"] for k in p["saved_keys"] if k.startswith("ckpt/step_000006/")}
    assert {k for k in stored if k.endswith(".pt")} == written

    resumed = run_recipe(url, "s3c", tmp_path, world=2, checkpoints=f"{prefix}/ckpt",
                         restore=f"{prefix}/ckpt/step_000004")
    assert resumed["first_step"] == 4 and len(resumed["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(full["losses"][4:], resumed["losses"])) <= 1e-6


def test_lora_job_publishes_a_version_with_metadata(tmp_path):
    url = str(tmp_path / "storage")
    spec = make_job(url, "pub", max_steps=4, promote=True, lora_targets=["q_proj", "v_proj"])
    result = run_recipe(url, "pub", tmp_path)
    assert result["published"] == {"kind": "adapter", "name": "tuned", "version": "v1"}
    meta = AdapterRegistry(open_storage(url)).show("tuned")
    assert meta["job_id"] == "pub" and meta["current"] and meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["metrics"]["train_loss"] == pytest.approx(result["losses"][-1])
    assert meta["metrics"]["eval_loss"] == pytest.approx(result["eval_loss"])
    assert meta["data_sha256"] == spec.data_sha256 and len(spec.data_sha256) == 64


def test_job_spec_validation():
    with pytest.raises(ValueError, match="invalid adapter name"):
        JobSpec(model="base", adapter="../x")
    with pytest.raises(ValueError):
        JobSpec(model="base", adapter="x", zero=4)


def test_offload_matches_plain_adam(tmp_path):
    """--offload (DeepSpeedCPUAdam holding the optimizer state) follows the same curve as AdamW."""
    url = str(tmp_path / "storage")
    make_job(url, "plain", zero=2, max_steps=3)
    make_job(url, "offload", zero=2, offload=True, max_steps=3)
    plain = run_recipe(url, "plain", tmp_path)["losses"]
    offload = run_recipe(url, "offload", tmp_path)["losses"]
    assert max(abs(a - b) for a, b in zip(plain, offload)) <= 1e-4, (plain, offload)
