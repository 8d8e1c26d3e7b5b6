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
