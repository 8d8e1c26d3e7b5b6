"""The shared trainer: learning, evaluation, checkpoints, resume, determinism."""
import copy
import dataclasses
import json
import warnings

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


@pytest.mark.parametrize("kind", ["crop", "flip-crop"])
def test_augment_draws_and_pixels_are_those_of_the_per_image_transform(kind):
    # the same draws in the same order (row offsets, column offsets, then flips) and the same
    # pixels as cropping and flipping image by image: trained weights stay those of the seed
    x = torch.randn(16, 3, 8, 10)
    out = augment_batch(x, kind, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5 if kind == "flip-crop" else torch.zeros(16, dtype=torch.bool)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(16):
        want = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 10]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want), i
    assert kind == "crop" or 0 < int(flip.sum()) < 16  # both branches of the flip were exercised


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


# ---- speed settings: channels_last, torch.compile, device-dependent defaults


def _convnet(splits, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=splits.num_classes, width=4)


def _losses(result):
    return [h["train_loss"] for h in result.history]


def test_default_config_resolves_to_the_old_cpu_behaviour(digits):
    # On the CPU the automatic settings are what the trainer always did: NCHW, evaluation
    # batches of 512, no compile; the explicit old settings give bit-identical training.
    cfg = dict(epochs=2, batch_size=64, max_steps_per_epoch=3, seed=1, device="cpu")
    auto, explicit = _convnet(digits), _convnet(digits)
    r_auto = train(auto, digits, TrainConfig(**cfg), progress=False)
    r_explicit = train(explicit, digits, TrainConfig(**cfg, channels_last=False, eval_batch_size=512), progress=False)
    assert r_auto.config["channels_last"] is False and r_auto.config["eval_batch_size"] == 512
    assert r_auto.config["compile"] is False
    assert _losses(r_auto) == _losses(r_explicit)
    for (name, a), b in zip(auto.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv-bn"])
def test_channels_last_gives_the_same_training(digits, bn):
    # Without BatchNorm to float32 rounding. PyTorch's CPU BatchNorm kernel for channels_last
    # float32 input sums in plain float32 (measured here: 3e-3 relative error on a BN weight
    # gradient against 4.5e-5 for NCHW, both against float64), so with BN the check is looser;
    # that is why channels_last stays off on the CPU by default.
    cfg = dict(epochs=2, batch_size=64, max_steps_per_epoch=3, seed=2, augment="flip-crop", device="cpu")
    torch.manual_seed(0)
    plain = _TinyConv(bn=bn)
    cl = copy.deepcopy(plain)
    r_plain = train(plain, digits, TrainConfig(**cfg, channels_last=False), progress=False)
    r_cl = train(cl, digits, TrainConfig(**cfg, channels_last=True), progress=False)
    assert r_cl.config["channels_last"] is True
    rel = 1e-4 if bn else 1e-5
    assert _losses(r_cl) == pytest.approx(_losses(r_plain), rel=rel)
    assert r_cl.final["test"].loss == pytest.approx(r_plain.final["test"].loss, rel=rel)
    for (name, a), b in zip(plain.state_dict().items(), cl.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=10 * rel, atol=10 * rel, msg=name)
        assert b.is_contiguous(), f"{name}: the model comes back in the default layout"


def test_resume_of_a_last_pt_written_before_the_new_settings(digits, tmp_path):
    # A last.pt whose config predates channels_last / compile / the automatic evaluation batch
    # (and any other setting added since) resumes; the settings it ran with are checked.
    cfg = TrainConfig(epochs=3, batch_size=128, max_steps_per_epoch=3, seed=4, device="cpu")
    straight = _convnet(digits)
    r_straight = train(straight, digits, cfg, progress=False)

    class Stop(Exception):
        pass

    def stop(epoch, model, record):
        if epoch == 0:
            raise Stop

    store = Store(tmp_path, resuming=False)
    with pytest.raises(Stop):
        train(_convnet(digits), digits, cfg, store=store, progress=False, on_epoch_end=stop)
    state = load_checkpoint(tmp_path / "last.pt")
    old = {k: v for k, v in state["config"].items()
           if k not in ("channels_last", "compile", "nesterov", "plateau_factor", "plateau_patience",
                        "plateau_monitor")}
    assert old["eval_batch_size"] == 512
    store.save_state("last.pt", {**state, "config": old})
    resumed = _convnet(digits, seed=5)
    r_resumed = train(resumed, digits, cfg, store=Store(tmp_path, resuming=True), progress=False)
    assert _losses(r_resumed) == pytest.approx(_losses(r_straight))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    # an old run trained without channels_last: asking for it explicitly is a changed setting
    store.save_state("last.pt", {**state, "config": old})
    with pytest.raises(ValueError, match="channels_last: false -> true"):
        train(_convnet(digits), digits, dataclasses.replace(cfg, channels_last=True),
              store=Store(tmp_path, resuming=True), progress=False)


class _TinyConv(torch.nn.Module):
    def __init__(self, bn: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8) if bn else torch.nn.Identity()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.bn(self.conv(x))))).mean(dim=(2, 3)))


@pytest.mark.slow
def test_compile_gives_the_same_training(digits):
    # torch.compile of a tiny model on the CPU (tens of seconds: the C++ code generation)
    cfg = dict(epochs=1, batch_size=64, max_steps_per_epoch=4, seed=3, augment="flip-crop", device="cpu")
    torch.manual_seed(0)
    eager = _TinyConv()
    compiled = copy.deepcopy(eager)
    r_eager = train(eager, digits, TrainConfig(**cfg), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r_compiled = train(compiled, digits, TrainConfig(**cfg, compile=True), progress=False)
    fell_back = [w for w in caught if "compile:" in str(w.message)]
    if fell_back:
        pytest.skip(f"torch.compile does not work here: {fell_back[0].message}")
    assert r_compiled.config["compile"] is True
    assert _losses(r_compiled) == pytest.approx(_losses(r_eager), rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_failure_falls_back_to_eager(digits, monkeypatch):
    # Where torch.compile fails at its first call, the trainer warns and trains eagerly: the
    # same result as compile=False.
    class FakeCompileError(Exception):
        pass

    FakeCompileError.__module__ = "torch._dynamo.exc"

    def broken_compile(model, *args, **kwargs):
        def fail(*a, **k):
            raise FakeCompileError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = dict(epochs=1, batch_size=64, max_steps_per_epoch=2, seed=3, device="cpu")
    torch.manual_seed(0)
    eager = _TinyConv()
    other = copy.deepcopy(eager)
    r_eager = train(eager, digits, TrainConfig(**cfg), progress=False)
    with pytest.warns(RuntimeWarning, match="compile: torch.compile failed here .*no C\\+\\+ compiler"):
        r_other = train(other, digits, TrainConfig(**cfg, compile=True), progress=False)
    assert _losses(r_other) == _losses(r_eager)


@pytest.mark.gpu
def test_no_host_sync_inside_a_step(digits):
    # Every step after the first runs under CUDA's sync debug mode "error": a .item(), a
    # blocking copy or a host read of a device tensor inside the step raises.
    steps = 4

    def watch(global_step, model):
        torch.cuda.set_sync_debug_mode("error" if global_step < steps else "default")

    cfg = TrainConfig(epochs=1, batch_size=64, max_steps_per_epoch=steps, augment="flip-crop", device="cuda")
    try:
        result = train(_convnet(digits), digits, cfg, progress=False, on_step_end=watch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.config["channels_last"] is True and result.config["eval_batch_size"] == 2048


# ---- recipe settings: Nesterov on/off, the plateau schedule's factor, patience and monitor, pad-flip-resized-crop


def test_nesterov_and_plateau_settings_default_to_the_old_behaviour():
    from shortcut_fast.train import _make_optimizer

    cfg = TrainConfig()
    assert (cfg.nesterov, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_monitor) == (True, 0.5, 1, "train_loss")
    net = torch.nn.Linear(2, 2)
    assert _make_optimizer(net, TrainConfig()).param_groups[0]["nesterov"] is True  # as before: Nesterov momentum
    assert _make_optimizer(net, TrainConfig(nesterov=False)).param_groups[0]["nesterov"] is False
    assert _make_optimizer(net, TrainConfig(momentum=0.0)).param_groups[0]["nesterov"] is False
    for bad in (dict(plateau_factor=1.0), dict(plateau_patience=-1), dict(plateau_monitor="val_accuracy")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


@pytest.mark.parametrize("monitor", ["train_loss", "val_loss"])
def test_plateau_scheduler_gets_its_factor_patience_and_monitored_loss(digits, monkeypatch, monitor):
    seen = []
    step = torch.optim.lr_scheduler.ReduceLROnPlateau.step

    def spy(self, metrics, *args, **kwargs):
        seen.append((self.factor, self.patience, float(metrics)))
        return step(self, metrics, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step", spy)
    cfg = TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=2, schedule="plateau", plateau_factor=0.1,
                      plateau_patience=10, plateau_monitor=monitor, select="last")
    model = _mlp(digits)
    result = train(model, digits, cfg, progress=False)
    assert [(f, p) for f, p, _ in seen] == [(0.1, 10)]
    expected = result.history[0]["train_loss"] if monitor == "train_loss" else evaluate(model, digits.val).loss
    assert seen[0][2] == pytest.approx(expected, rel=1e-6)


def test_pad_flip_resized_crop():
    import torch.nn.functional as F

    from shortcut_fast.train import _pad_flip_resized_crop

    x = torch.rand(256, 3, 32, 32)
    out = augment_batch(x, "pad-flip-resized-crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    again = augment_batch(x, "pad-flip-resized-crop", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # the zero padding shows in some crops (black borders), the crops differ in scale
    ones = augment_batch(torch.ones(256, 3, 32, 32), "pad-flip-resized-crop", torch.Generator().manual_seed(1))
    inside = ones.mean(dim=(1, 2, 3))
    assert float(inside.min()) < 0.9 and bool((inside == 1).any())
    # when no drawn box fits, the whole padded image is resized to the input size (torchvision's fallback)
    whole = _pad_flip_resized_crop(torch.ones(2, 3, 32, 32), torch.Generator().manual_seed(0), attempts=0)
    expected = F.interpolate(F.pad(torch.ones(2, 3, 32, 32), (4, 4, 4, 4)), size=(32, 32), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(whole, expected)
    # an upright crop at scale 1 of a ramp keeps the ramp's direction unless flipped: half the images flip
    ramp = torch.linspace(0, 1, 32).expand(512, 3, 32, 32).contiguous()
    out = augment_batch(ramp, "pad-flip-resized-crop", torch.Generator().manual_seed(2))
    rising = (out[..., 16, 20] > out[..., 16, 12])[:, 0].float().mean()
    assert 0.4 < float(rising) < 0.6
