"""The shared trainer: learning, evaluation, checkpoints, resume, determinism."""
import json

import pytest
import torch

from shortcut_fast.data import load_dataset
from shortcut_fast.models import build_model
from shortcut_fast.run_folder import Store
from shortcut_fast.train import TrainConfig, augment_batch, evaluate, load_checkpoint, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _mlp(splits, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=splits.num_classes, in_channels=3, image_size=32, width=64)


def test_learns_digits(digits):
    cfg = TrainConfig(epochs=4, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0, seed=0)
    result = train(_mlp(digits), digits, cfg, progress=False)
    assert result.final["test"].accuracy > 0.85  # chance is 0.1
    assert result.final["test"].n == len(digits.test)
    assert len(result.history) == 4 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_resume_continues_exactly(digits, tmp_path):
    cfg4 = TrainConfig(epochs=4, batch_size=128, optimizer="sgd", lr=0.05, seed=3, max_steps_per_epoch=5)
    straight = _mlp(digits)
    r_straight = train(straight, digits, cfg4, store=Store(tmp_path / "straight", resuming=False), progress=False)

    # Same run, interrupted after epoch 2 (simulated by training a 4-epoch config with a
    # callback that stops), then resumed.
    class Stop(Exception):
        pass

    def stop_after_two(epoch, model, record):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(_mlp(digits), digits, cfg4, store=Store(tmp_path / "resumed", resuming=False), progress=False,
              on_epoch_end=stop_after_two)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = _mlp(digits, seed=99)  # different init: everything must come from the checkpoint
    r_resumed = train(resumed, digits, cfg4, store=Store(tmp_path / "resumed", resuming=True), progress=False)
    assert [h["train_loss"] for h in r_resumed.history] == pytest.approx([h["train_loss"] for h in r_straight.history])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert json.loads((tmp_path / "resumed" / "history.json").read_text())[-1]["epoch"] == 4


def test_checkpoints_written(digits, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=256, keep_every=1, max_steps_per_epoch=2)
    train(_mlp(digits), digits, cfg, store=Store(tmp_path, resuming=False), progress=False)
    for name in ("last.pt", "best.pt", "epoch_001.pt", "epoch_002.pt", "history.json"):
        assert (tmp_path / name).exists(), name
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and state["config"]["epochs"] == 2


def test_resume_errors(digits, tmp_path):
    # A resuming store without last.pt starts from scratch; one whose last.pt has another
    # config is refused naming the setting (the run folder refuses it first in the CLI).
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=1)
    assert train(_mlp(digits), digits, cfg, store=Store(tmp_path, resuming=True), progress=False).epochs_run == 1
    with pytest.raises(ValueError, match=r"training config differs .*lr: null -> 0.3"):
        train(_mlp(digits), digits, TrainConfig(epochs=1, lr=0.3, max_steps_per_epoch=1),
              store=Store(tmp_path, resuming=True), progress=False)


def test_negative_sizes_are_refused():
    for bad in (dict(max_steps_per_epoch=-3), dict(max_steps_per_epoch=0), dict(batch_size=0),
                dict(keep_every=-1), dict(eval_batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_evaluate_group_accounting():
    splits = load_dataset("colored-digits", seed=0, conflict_ratio=0.2)
    model = _mlp(splits)
    result = evaluate(model, splits.test, batch_size=100, bias_aligned_attribute=True)
    with torch.no_grad():
        x, y, a = splits.test.get_batch(torch.arange(len(splits.test)))
        hit = model.eval()(x).argmax(1) == y
    groups = y * 10 + a
    for g, acc in result.group_accuracy.items():
        assert acc == pytest.approx(float(hit[groups == g].float().mean()))
        assert result.group_counts[g] == int((groups == g).sum())
    assert result.worst_group_accuracy == min(result.group_accuracy.values())
    assert result.accuracy == pytest.approx(float(hit.float().mean()))
    assert result.aligned_accuracy == pytest.approx(float(hit[a == y].float().mean()))
    assert result.conflicting_accuracy == pytest.approx(float(hit[a != y].float().mean()))


def test_augment_crop_is_a_shifted_window():
    x = torch.randn(6, 3, 8, 8)
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(6):  # every output is some 8x8 window of the padded image
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # (C, 9, 9, 8, 8)
        assert any(torch.equal(windows[:, r, c], out[i]) for r in range(9) for c in range(9))
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(optimizer="lbfgs"), "optimizer must be one of"),
    (dict(schedule="linear"), "schedule must be one of"),
    (dict(lr=-1.0), "lr must be a positive float"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cuda_device_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        train(torch.nn.Linear(1, 1), None, TrainConfig(device="cuda"), progress=False)
