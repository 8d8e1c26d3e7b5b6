"""Host syncs do not grow with the work: input checks run once per public call, and the hot
loops (chunks of a channel-ablation sweep, batches of a DeNetDM evaluation, of a memorization
report and of a probe-statistics pass) count NaN/Inf on the device and read the count once.

On a GPU every value moved to the host waits for the device to finish its queue. torch's own
detector (torch.cuda.set_sync_debug_mode) needs CUDA, so the CPU runs here count the same
events: the aten ops that read device memory into a Python value or size an output by the
data (item / bool / int / float all reach _local_scalar_dense; nonzero, masked_select,
unique, equal; boolean-mask indexing), and the Tensor methods that copy to host memory
without an aten op (tolist, numpy, cpu). Each path runs with N and with 2N chunks or batches;
the counts must be equal.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shortcut_fast.data.core import ImageDataset
from shortcut_fast.experiments import complexity as cx
from shortcut_fast.experiments import denetdm as dn
from shortcut_fast.experiments.memorization import group_outcomes_of
from shortcut_fast.models import build_model
from shortcut_fast.ops import ProbeStats, accumulate_probe_stats, group_outcomes
from shortcut_fast.surgery import channel_ablation_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest)

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
             aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
             aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_HOST_COPIES = ("tolist", "numpy", "cpu")


class HostSyncs(TorchDispatchMode):
    """Counts host syncs (module docstring) by kind while active."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            self.calls[func.__name__] += 1
        elif func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                        for i in args[1] if i is not None):
            self.calls[f"{func.__name__} with a mask"] += 1  # the mask's nonzero, inside the kernel
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def syncs(monkeypatch):
    """count(fn) -> the HostSyncs of one call of fn."""
    def count(fn):
        mode = HostSyncs()
        with monkeypatch.context() as m:
            for name in _HOST_COPIES:
                def copy(self, *args, _orig=getattr(torch.Tensor, name), _name=name, **kwargs):
                    mode.calls[_name] += 1
                    return _orig(self, *args, **kwargs)
                m.setattr(torch.Tensor, name, copy)
            with mode:
                fn()
        return mode
    return count


def _same(counts: list[HostSyncs]):
    assert len({c.total for c in counts}) == 1, [dict(c.calls) for c in counts]


# ---- one public call: one sync for all of its value checks

def test_group_outcomes_checks_its_inputs_in_one_sync(syncs):
    g = torch.Generator().manual_seed(0)
    logits, labels, groups = torch.randn(3, 20, 5, generator=g), torch.randint(0, 5, (20,)), torch.arange(20) % 3
    assert syncs(lambda: group_outcomes(logits, labels, groups, 3, backend="torch")).total == 1
    assert syncs(lambda: group_outcomes(logits, labels, groups, 3, backend="torch", allow_nonfinite=True)).total == 1


def test_probe_stats_update_checks_x_and_z_in_one_sync(syncs):
    x, z = torch.randn(10, 4), torch.randn(10, 3)
    stats = ProbeStats(4, 3)
    assert syncs(lambda: stats.update(x, z)).total == 1


# ---- loops: the count does not grow with the chunks or batches

_RESNET = build_model("resnet18", num_classes=4, width=4).eval()


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g),
            torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("layer, where", [("layer1.0", "output"), ("layer1.0.conv1", "post-activation")])
def test_sweep_syncs_do_not_grow_with_batches_or_chunks(syncs, layer, where):
    kw = dict(where=where, backend="torch", channels=list(range(4)))
    sweep = lambda n, max_bytes: channel_ablation_sweep(_RESNET, layer, _images(n), batch_size=4,  # noqa: E731
                                                        max_bytes=max_bytes, **kw)
    sweep(8, 1)  # first-call work (tracing, dispatch tables) out of the counts
    # 2 and 4 batches of 4 images; 4 chunks of one variant and 2 of two
    counts = [syncs(lambda: sweep(8, 1)), syncs(lambda: sweep(16, 1)), syncs(lambda: sweep(8, 1 << 30))]
    _same(counts)


def _denetdm_parts(n, batch):
    cfg = dn.DeNetDMConfig(ratios=(0.02, 0.1), seeds=1, width=8, batch_size=8, eval_batch_size=batch)
    g = torch.Generator().manual_seed(0)
    M, k = 2, 10
    y, a = torch.randint(0, k, (M, n), generator=g), torch.randint(0, k, (M, n), generator=g)
    split = dn._Split(torch.randint(0, 256, (M, n, 3, 8, 8), dtype=torch.uint8, generator=g), y, a)
    data = dn._MemberData([0.02, 0.1], [0, 0], split, split, split, k, k, (3, 8, 8))
    branch = lambda depth: dn.FeatureBranch(build_model("mlp", num_classes=k, in_channels=3,  # noqa: E731
                                                        image_size=8, depth=depth, width=8))
    stack = dn._stack_of(lambda i: dn.ProductOfExperts(branch(3), branch(2), k), [0, 1], 1, "cpu")
    return stack, dn._Pipeline(cfg, data, "cpu"), split


def test_denetdm_evaluation_syncs_do_not_grow_with_batches(syncs):
    def evaluate(n):
        stack, pipe, split = _denetdm_parts(n, 8)
        return lambda: dn._evaluate(stack, pipe, split, 3, 10, 8)
    evaluate(16)()
    _same([syncs(evaluate(16)), syncs(evaluate(32))])


def test_denetdm_evaluation_refuses_nonfinite_logits_once():
    stack, pipe, split = _denetdm_parts(16, 8)
    name = next(iter(stack.params))
    assert name.startswith("deep.")
    stack.params[name].data.fill_(float("nan"))
    # counted over both batches: the two heads that read the deep branch, 2 members x 2 x 16 x 10
    with pytest.raises(ValueError, match="logits contains 640 NaN/Inf values"):
        dn._evaluate(stack, pipe, split, 3, 10, 8)


def test_memorization_report_syncs_do_not_grow_with_batches(syncs):
    model = build_model("small-cnn", num_classes=4, image_size=8, width=4, padding=2).eval()

    def outcomes(n):
        x, y, g = _images(n)
        return lambda: group_outcomes_of(model, x, y, g, 3, batch_size=4)
    outcomes(8)()
    _same([syncs(outcomes(8)), syncs(outcomes(16))])


def test_accumulate_probe_stats_syncs_do_not_grow_with_chunks(syncs):
    x, z = torch.randn(64, 5), torch.randn(64, 3)
    _same([syncs(lambda: accumulate_probe_stats(x, z, chunk_size=c)) for c in (16, 8)])


def _complexity_pass(n, directions="pca:3"):
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=3, image_size=8, width=4, padding=2).eval()
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g), num_classes=3)
    cfg = cx.ComplexityConfig(directions=directions, batch_size=8)
    index = torch.arange(n)
    directions, mean, std = cx._fit_directions(model, data, index, cfg, "cpu")
    layers = list(cx.model_blocks(model))
    p = cx._Pass(model, layers, [(directions, mean, std, None)], torch.float64, torch.device("cpu"), "auto")
    return p, lambda: cx._stream(p, [("train", data, index), ("heldout", data, index)], 8, "cpu", False, "")


@pytest.mark.parametrize("directions", ["pca:3", "nmf:3"])
def test_probe_statistics_pass_syncs_do_not_grow_with_batches(syncs, directions):
    _complexity_pass(16, directions)[1]()
    _same([syncs(_complexity_pass(16, directions)[1]), syncs(_complexity_pass(32, directions)[1])])


def test_probe_statistics_pass_refuses_nonfinite_activations_once():
    p, run = _complexity_pass(16)
    with torch.no_grad():
        next(p.model.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match=r"x contains \d+ NaN/Inf values"):
        run()
