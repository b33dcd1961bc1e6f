"""The shared-memory channel that carries TP steps from a replica to its workers (no Ray here)."""

import threading

import pytest

from serving.step_channel import StepChannel, serve_steps


def _execute(rank):
    def execute(step):
        if step == "boom":
            raise ValueError("bad step")
        return {"rank": rank, "doubled": [2 * x for x in step]}
    return execute


def test_steps_reach_every_worker_and_rank_0_answers():
    """Two workers (threads here; Ray actor processes in tests/test_tensor_parallel.py) attach to the
    channel's files and FIFOs by path, as a worker process does."""
    channel = StepChannel(workers=2)
    lock = threading.Lock()
    workers = [serve_steps(channel.spec(), r, _execute(r), lock) for r in range(2)]
    try:
        channel.connect(timeout_s=30)
        for i in range(50):
            assert channel.send(list(range(i)), timeout_s=30) == {"rank": 0, "doubled": [2 * x for x in range(i)]}
        with pytest.raises(RuntimeError, match="TP rank 0: ValueError: bad step"):
            channel.send("boom", timeout_s=30)
        assert channel.send([7], timeout_s=30)["doubled"] == [14]  # still serving after an error
    finally:
        channel.close()  # the workers read end-of-file and stop
        for w in workers:
            w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)


def test_a_worker_that_never_attaches_or_answers_times_out():
    channel = StepChannel(workers=1)
    try:
        with pytest.raises(TimeoutError, match="did not attach"):
            channel.connect(timeout_s=0.2)
    finally:
        channel.close()
