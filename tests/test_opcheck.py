"""torch.library.opcheck on every op registered under torch.ops.shortcut_fast.

opcheck verifies, for sample inputs, the schema (no undeclared mutation or aliasing), the
autograd registration, that the fake (register_fake) gives the real output's shapes,
dtypes and strides, and that the op runs through AOTAutograd with dynamic shapes: what
torch.compile needs. Compiled ops run on every device _C has a kernel for; the triton ops
on CUDA, or on the CPU through TRITON_INTERPRET=1 (conftest). A new op without samples
here fails test_every_registered_op_has_samples.
"""
import pytest
import torch

import shortcut_fast  # noqa: F401  (defines the compiled ops' schemas)
from conftest import HAS_GPU
from shortcut_fast.backends import backend_status, compiled_has_kernel
from shortcut_fast.ops import freq


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _weights(K, H, W):
    g = torch.Generator().manual_seed(K * H * W)
    return freq.symmetrize(torch.rand(K, H, W, generator=g) < 0.4).float()


def _images_samples():
    return [
        (_rand(2, 3, 8, 6),),
        (_rand(1, 1, 7, 5),),  # odd sizes
        (_rand(0, 2, 8, 8),),  # empty batch
    ]


# op name (without namespace) -> list of argument tuples, built on the CPU.
def _band_filter(dtype=torch.float32):
    weights_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the compute dtype
    return [(x.to(dtype), _weights(3, *x.shape[-2:]).to(weights_dtype)) for (x,) in _images_samples()]


def _remove_frequencies():
    freqs = torch.tensor([[0, 0], [1, 2], [4, 3]])
    return [(x, freqs) for (x,) in _images_samples()]


def _class_spectrum_sum():
    return [(x, torch.arange(x.shape[0]) % 3, 3) for (x,) in _images_samples()]


def _probe_stats(dtype=torch.float32):
    return [(_rand(9, 4, dtype=dtype), _rand(9, 3, dtype=dtype, seed=1)),
            (_rand(0, 4, dtype=dtype), _rand(0, 2, dtype=dtype))]


def _channel_ablate():
    act = _rand(2, 3, 5)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    return [(act, mask, _rand(3, seed=2)), (act, mask, _rand(2, 3, 5, seed=3)),
            (_rand(0, 3, 5), mask, _rand(3, seed=2))]


def _group_outcomes(dtype=torch.float32):
    logits = _rand(2, 6, 4, dtype=dtype)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    return [(logits, labels, groups, 3), (_rand(2, 0, 4, dtype=dtype), labels[:0], groups[:0], 3)]


def _probe_step():
    x = _rand(10, 5)
    soft_targets = (torch.arange(20).view(10, 2) % 3).float()
    binary = (torch.arange(20).view(10, 2) % 2).float()
    return [
        (x, soft_targets, _rand(2, 5, 3, seed=4), _rand(2, 3, seed=5), torch.zeros(2), 0),  # softmax
        (x, binary, _rand(2, 5, 1, seed=4), _rand(2, 1, seed=5), torch.zeros(2), 1),  # logistic
        (x, _rand(10, 2, seed=6), _rand(2, 5, 1, seed=4), _rand(2, 1, seed=5), _rand(2, seed=7), 2),  # gaussian
    ]


COMPILED = {
    "band_filter": _band_filter() + _band_filter(torch.float64),
    "remove_frequencies": _remove_frequencies(),
    "class_spectrum_sum": _class_spectrum_sum(),
    "probe_stats": _probe_stats() + _probe_stats(torch.float64),
    "channel_ablate": _channel_ablate(),
    "group_outcomes": _group_outcomes() + _group_outcomes(torch.float64),
}
def _with_precision(samples, precision):
    """The first sample again with the trailing precision argument of the matmul-shaped ops."""
    return samples + [(*samples[0], precision)]


TRITON = {
    "band_filter_triton": _with_precision(_band_filter(), "bf16"),
    "remove_frequencies_triton": _remove_frequencies(),
    "class_spectrum_sum_triton": _with_precision(_class_spectrum_sum(), "tf32"),
    "probe_stats_triton": _with_precision(_probe_stats(), "tf32x3"),
    "channel_ablate_triton": _channel_ablate(),
    "group_outcomes_triton": _group_outcomes(),
    "probe_step_triton": _with_precision(_probe_step(), "bf16"),
}
# Triton kernel modules define their ops when imported.
TRITON_MODULES = ("band_filter", "class_spectrum", "probe_stats", "ablation", "probe_training")
TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _registered_ops():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("shortcut_fast::"))


def _import_triton_kernels(device):
    status = backend_status("triton", device)
    if not status:
        pytest.skip(f"triton on {device}: {status.reason}")
    import importlib

    for module in TRITON_MODULES:
        importlib.import_module(f"shortcut_fast.kernels.{module}")


def test_every_registered_op_has_samples():
    """Every op of the namespace is opchecked below (import the triton ones if possible)."""
    if backend_status("triton", TRITON_DEVICE):
        _import_triton_kernels(TRITON_DEVICE)
    missing = [op for op in _registered_ops() if op not in COMPILED and op not in TRITON]
    assert not missing, f"ops without opcheck samples in tests/test_opcheck.py: {missing}"
    # the compiled schemas exist without _C (declared in Python)
    assert set(COMPILED) <= set(_registered_ops())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", sorted(COMPILED))
def test_opcheck_compiled(op, device):
    backend = "cpp" if device == "cpu" else "cuda"
    if not backend_status(backend, device):
        pytest.skip(f"{backend}: {backend_status(backend, device).reason}")
    if not compiled_has_kernel(op, backend):
        pytest.fail(f"_C has no {device} kernel for {op}: rebuild the extension")
    for args in COMPILED[op]:
        torch.library.opcheck(getattr(torch.ops.shortcut_fast, op), _to(args, device))


# The triton interpreter reads real data pointers at launch, which AOT dispatch's functional
# tensors do not have: on the CPU every check but that one runs (all of them on a GPU).
TRITON_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if TRITON_DEVICE == "cuda" else ())


@pytest.mark.parametrize("op", sorted(TRITON))
def test_opcheck_triton(op):
    _import_triton_kernels(TRITON_DEVICE)
    for args in TRITON[op]:
        torch.library.opcheck(getattr(torch.ops.shortcut_fast, op), _to(args, TRITON_DEVICE), test_utils=TRITON_CHECKS)


def test_opcheck_fails_on_a_wrong_fake():
    """The check is not vacuous: a fake with the wrong output shape is caught."""
    lib = torch.library.Library("shortcut_fast_opcheck_test", "FRAGMENT")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("shortcut_fast_opcheck_test::twice", lambda x: x.new_empty((x.shape[0] + 1,)),
                                lib=lib)
    with pytest.raises(Exception, match="[Ss]hape|size"):
        torch.library.opcheck(torch.ops.shortcut_fast_opcheck_test.twice, (torch.ones(3),))
