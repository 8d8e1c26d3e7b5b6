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


def test_flop_counts_match_a_training_step_counted_by_torch():
    # the per-step FLOPs of the bench row (from the layer sizes) against torch's own count of
    # one training step of each stage's plain module: the images need no gradient, the frozen
    # stage-2 branches none either
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from shortcut_fast.experiments import denetdm as dn

    cfg = dn.DeNetDMConfig(ratios=(0.1,), seeds=1, width=8, batch_size=4)
    want = bench.flop_counts(cfg, (3, 16, 16), 10, {"train": 8, "val": 4, "test": 4})["train_flops_per_member_step"]
    factory = dn._Factory(cfg, 3, 16, 10)
    poe = dn.ProductOfExperts(factory.branch("deep", 5), factory.branch("shallow", 3), 10)
    student = dn.DistilledTarget(poe, factory.target())
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for stage, model, loss in (("stage1", poe, bench._stage1_loss), ("stage2", student, bench._stage2_loss)):
        if stage == "stage2":  # the stage-1 modules, now frozen inside the student
            for n, p in student.named_parameters():
                p.requires_grad_(n not in set(student.frozen()))
        with FlopCounterMode(display=False) as counter:
            loss(model(x), y, cfg).backward()
        assert counter.get_total_flops() == want[stage], stage
