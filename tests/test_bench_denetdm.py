"""bench/denetdm.py: the published-style loop (one member at a time, DataLoader, host-side
evaluation per head) gives exactly run_denetdm's result in float64, and the comparison would
notice a different batch order. Correctness only: no timings, nothing recorded."""
import pytest

from shortcut_fast.bench import denetdm as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_published_loop_equals_the_stacked_run_in_float64():
    got = bench.check(ratios=(0.02, 0.1), seeds=1, epochs=(3, 3), width=32, image_size=16)
    assert got["best_epoch_mismatches"] == 0
    assert got["max_metric_diff"] == 0.0 and got["max_val_curve_diff"] == 0.0
    assert got["max_train_loss_diff"] <= bench.LOSS_TOLERANCE
    assert got["members"] == 2
    # an epoch before the last was selected: the selection rule and the restored stage-1
    # teacher of stage 2 are part of what agrees
    assert any(e < 3 for e in got["best_epochs"]["stage1"])


def test_the_check_notices_another_batch_order(monkeypatch):
    class OtherOrder(bench.EpochOrder):
        def set_epoch(self, epoch):
            self.epoch = epoch + 1

    monkeypatch.setattr(bench, "EpochOrder", OtherOrder)
    with pytest.raises(RuntimeError, match="train losses differ"):
        bench.check(ratios=(0.1,), seeds=1, epochs=(1, 1), width=8, image_size=16)
