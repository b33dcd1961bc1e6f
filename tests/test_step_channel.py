"""The shared-memory channel that carries TP steps from a replica to its workers (no Ray here)."""

import multiprocessing
import threading

import pytest

from serving.step_channel import StepChannel, serve_steps


def _worker(spec, rank):
    def execute(step):
        if step == "boom":
            raise ValueError("bad step")
        return {"rank": rank, "doubled": [2 * x for x in step]}
    serve_steps(spec, rank, execute, threading.Lock()).join()


def test_steps_reach_every_worker_and_rank_0_answers():
    ctx = multiprocessing.get_context("spawn")  # fresh processes, as Ray workers are
    channel = StepChannel(workers=2)
    procs = [ctx.Process(target=_worker, args=(channel.spec(), r), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        channel.connect(timeout_s=30)
        for i in range(50):
            assert channel.send(list(range(i)), timeout_s=30) == {"rank": 0, "doubled": [2 * x for x in range(i)]}
        with pytest.raises(RuntimeError, match="TP rank 0: ValueError: bad step"):
            channel.send("boom", timeout_s=30)
        assert channel.send([7], timeout_s=30)["doubled"] == [14]  # still serving after an error
    finally:
        channel.close()  # the workers read end-of-file and stop
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)


def test_a_worker_that_never_attaches_or_answers_times_out():
    channel = StepChannel(workers=1)
    try:
        with pytest.raises(TimeoutError, match="did not attach"):
            channel.connect(timeout_s=0.2)
    finally:
        channel.close()
