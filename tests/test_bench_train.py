"""bench/train.py: the trainer's step path and the plain DataLoader loop (PIL images, host
transforms) train alike from the same initialization and batch order, and the check would
notice a different batch order. Correctness only: no timings, nothing recorded."""
import pytest

from shortcut_fast.bench import train as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_trainer_and_plain_loop_give_the_same_losses():
    got = bench.check("cpu", width=4, batch=16, steps=3)
    assert got["steps"] == 3 and len(got["losses"]) == 3
    assert got["max_abs_loss_diff"] <= bench.LOSS_TOLERANCE["cpu"]
    assert got["losses"][0] != got["losses"][2]  # the weights moved: later steps compare trained models


def test_the_check_notices_another_batch_order(monkeypatch):
    class OtherOrder(bench.EpochOrder):
        def set_epoch(self, epoch):
            self.epoch = epoch + 1

    monkeypatch.setattr(bench, "EpochOrder", OtherOrder)
    with pytest.raises(RuntimeError, match="losses differ"):
        bench.check("cpu", width=4, batch=16, steps=2)


def test_the_loops_data_time_is_measured_inside_each_timed_step():
    # the ceiling of the trainer's ratio comes from this share: the data time of a step lies
    # within that step (from the previous optimizer step's end to the batch on the device)
    step_ms, data_ms = bench._time_loop(4, 8, 32, "cpu", 0)
    assert len(step_ms) == len(data_ms) == 3  # 4 steps per epoch: 3 intervals between step ends
    assert all(0 < d <= s for d, s in zip(data_ms, step_ms))
    assert len(bench._trainer_data_ms(8, 32, "cpu")) == 4
