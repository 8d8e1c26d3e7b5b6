"""class_spectrum_sum: every backend against the pure-PyTorch reference."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST_BACKENDS, TOLERANCES
from shortcut_fast import ClassSpectrum, adcs, class_spectrum_sum
from shortcut_fast.backends import BackendUnavailable, backend_status
from shortcut_fast.ops import class_spectrum_sum_reference

SHAPES = [
    (5, 3, 32, 32),  # CIFAR-like
    (3, 2, 31, 17),  # odd sizes, not a multiple of any block
    (1, 1, 1, 1),  # one element
    (2, 1, 1, 7),  # a single row
    (4, 2, 70, 65),  # several Triton tiles in both directions
]


def _inputs(shape, num_classes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, num_classes, (shape[0],), generator=g)
    return x.to(device), labels.to(device)


def _check_backend(backend, device):
    status = backend_status(backend, device)
    if not status:  # a missing build is a failure, not a skip
        pytest.fail(f"{backend} on {device} is unavailable: {status.reason}")


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, shape):
    _check_backend(backend, device)
    x, labels = _inputs(shape, num_classes=4, device=device, seed=sum(shape))
    got = class_spectrum_sum(x, labels, 4, backend=backend)
    want = class_spectrum_sum_reference(x.cpu(), labels.cpu(), 4)
    assert got.shape == (4, *shape[1:]) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes(backend, device, dtype):
    _check_backend(backend, device)
    x, labels = _inputs((6, 3, 16, 12), num_classes=3, dtype=dtype, device=device, seed=7)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(BackendUnavailable, match="float64"):
            class_spectrum_sum(x, labels, 3, backend=backend)
        return
    got = class_spectrum_sum(x, labels, 3, backend=backend)
    want = class_spectrum_sum_reference(x.cpu(), labels.cpu(), 3)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_large_num_classes_and_non_contiguous(backend, device):
    _check_backend(backend, device)
    x, labels = _inputs((7, 20, 12, 3), num_classes=1000, device=device, seed=3)
    x = x.permute(0, 3, 2, 1)  # (7, 3, 12, 20), non-contiguous
    got = class_spectrum_sum(x, labels, 1000, backend=backend)
    want = class_spectrum_sum_reference(x.cpu().contiguous(), labels.cpu(), 1000)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[labels.cpu()] = False
    assert got[untouched.to(got.device)].abs().max() == 0


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_empty_batch_and_single_class_runs(backend, device):
    _check_backend(backend, device)
    x = torch.zeros((0, 3, 8, 8), device=device)
    labels = torch.zeros((0,), dtype=torch.int64, device=device)
    assert class_spectrum_sum(x, labels, 2, backend=backend).abs().sum() == 0
    # One class only, long run of equal labels (the CUDA kernel's running-sum path).
    x, _ = _inputs((40, 1, 9, 10), num_classes=1, device=device, seed=11)
    labels = torch.zeros(40, dtype=torch.int64, device=device)
    got = class_spectrum_sum(x, labels, 1, backend=backend)
    torch.testing.assert_close(got.cpu(), class_spectrum_sum_reference(x.cpu(), labels.cpu(), 1), rtol=1e-5, atol=1e-3)


def test_reference_is_the_definition():
    """The reference really is sum of |fft2| per class (checked against a per-image loop)."""
    x, labels = _inputs((6, 2, 5, 6), num_classes=3, seed=5)
    want = torch.zeros(3, 2, 5, 6)
    for i in range(6):
        want[labels[i]] += torch.fft.fft2(x[i]).abs()
    torch.testing.assert_close(class_spectrum_sum_reference(x, labels, 3), want)


def test_auto_never_fails_and_matches():
    x, labels = _inputs((4, 3, 11, 13), num_classes=2, seed=1)
    torch.testing.assert_close(
        class_spectrum_sum(x, labels, 2), class_spectrum_sum_reference(x, labels, 2), **TOLERANCES[torch.float32]
    )


def test_compiles_with_torch_compile():
    """Fake registration lets the compiled op trace into a graph (no graph breaks)."""
    x, labels = _inputs((4, 3, 8, 8), num_classes=2, seed=2)

    def f(x, labels):
        return class_spectrum_sum(x, labels, 2, backend="cpp", allow_nonfinite=True) * 2

    _check_backend("cpp", "cpu")
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, labels), 2 * class_spectrum_sum_reference(x, labels, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compiles_on_gpu(backend):
    _check_backend(backend, "cuda")
    x, labels = _inputs((4, 3, 8, 8), num_classes=2, device="cuda", seed=2)

    def f(x, labels):
        return class_spectrum_sum(x, labels, 2, backend=backend, allow_nonfinite=True) * 2

    compiled = torch.compile(f, fullgraph=True)
    want = 2 * class_spectrum_sum_reference(x.cpu(), labels.cpu(), 2)
    torch.testing.assert_close(compiled(x, labels).cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: class_spectrum_sum(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long), 2), ValueError, r"x must have shape \(B, C, H, W\), got shape \(3, 8, 8\)"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.long), 2), TypeError, "x must have dtype"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.zeros(3, dtype=torch.long), 2), ValueError, r"labels must have shape \(2,\)"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int32), 2), TypeError, "labels must have dtype"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.tensor([0, 5]), 2), ValueError, r"labels must lie in \[0, 2\)"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 0), ValueError, "num_classes must be a positive int"),
        (lambda: class_spectrum_sum(torch.full((2, 1, 4, 4), float("nan")), torch.tensor([0, 1]), 2), ValueError, "x contains 32 NaN/Inf"),
        (lambda: class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 2, backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_explicit_cuda_without_gpu_says_why():
    with pytest.raises(BackendUnavailable, match="cuda needs CUDA tensors"):
        class_spectrum_sum(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 2, backend="cuda")


def test_streaming_accumulator_equals_one_shot():
    x, labels = _inputs((30, 3, 12, 12), num_classes=4, seed=9)
    acc = ClassSpectrum(5)  # class 4 never appears
    for chunk in range(0, 30, 8):
        acc.update(x[chunk:chunk + 8], labels[chunk:chunk + 8])
    counts = torch.bincount(labels, minlength=5)
    assert torch.equal(acc.counts, counts)
    mean = acc.mean()
    want = class_spectrum_sum_reference(x, labels, 5)[:4] / counts[:4].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean[:4], want, rtol=1e-5, atol=1e-5)
    assert torch.isnan(mean[4]).all()
    with pytest.raises(ValueError, match="per-image shape"):
        acc.update(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))


def test_adcs_definition_and_range():
    g = torch.Generator().manual_seed(0)
    means = torch.rand(5, 3, 6, 7, generator=g)
    scores = adcs(means)
    assert scores.shape == (5, 6, 7) and scores.dtype == torch.int64
    assert scores.min() >= -4 and scores.max() <= 4
    assert torch.equal(scores.sum(0), torch.zeros(6, 7, dtype=torch.int64))  # antisymmetric
    e = means.mean(1)
    c, u, v = 2, 3, 4
    assert scores[c, u, v] == sum(int(torch.sign(e[c, u, v] - e[j, u, v])) for j in range(5) if j != c)
    # A class with the most energy everywhere scores K - 1 everywhere.
    means[1] += 10
    assert (adcs(means)[1] == 4).all()


def test_runs_without_the_extension():
    """SHORTCUT_FAST_NO_EXT=1: imports, `auto` falls back to torch, `cpp` says why not."""
    code = (
        "import torch, shortcut_fast as sf\n"
        "from shortcut_fast.backends import BackendUnavailable\n"
        "x = torch.randn(2, 1, 4, 4); y = torch.tensor([0, 1])\n"
        "sf.class_spectrum_sum(x, y, 2)\n"
        "try:\n    sf.class_spectrum_sum(x, y, 2, backend='cpp')\nexcept BackendUnavailable as e:\n    print('REASON', e)\n"
    )
    env = dict(os.environ, SHORTCUT_FAST_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "REASON" in out and "SHORTCUT_FAST_NO_EXT" in out


def test_traces_without_the_extension():
    """The schema and fake are declared in Python: the op traces (here on meta tensors)
    even when _C is not loaded, and `cpp` names the reason it cannot run."""
    code = (
        "import torch, shortcut_fast\n"
        "f = lambda x, y: torch.ops.shortcut_fast.class_spectrum_sum(x, y, 3) + 1\n"
        "out = torch.compile(f, backend='aot_eager', fullgraph=True)(torch.randn(2, 1, 4, 5, device='meta'),\n"
        "    torch.zeros(2, dtype=torch.int64, device='meta'))\n"
        "print('SHAPE', tuple(out.shape), out.dtype)\n"
    )
    env = dict(os.environ, SHORTCUT_FAST_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SHAPE (3, 1, 4, 5) torch.float32" in out.stdout


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch"), *FAST_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty_batch_gives_zero_sums(backend, device, dtype):
    """B = 0 is a valid (empty) batch on every backend: zero sums of the right shape."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernel computes in float32")
    _check_backend(backend, device)
    x = torch.zeros(0, 3, 8, 7, dtype=dtype, device=device)
    got = class_spectrum_sum(x, torch.zeros(0, dtype=torch.int64, device=device), 4, backend=backend)
    assert got.shape == (4, 3, 8, 7) and got.dtype == dtype and got.device.type == device
    assert not got.any()
    acc = ClassSpectrum(2, backend=backend).update(x, torch.zeros(0, dtype=torch.int64, device=device))
    assert acc.counts.tolist() == [0, 0]


def test_adcs_names_the_absent_classes():
    """A class never seen has an all-NaN mean; ADCS refuses it by name instead of letting
    NaN comparisons (all false) shift every other class's map."""
    g = torch.Generator().manual_seed(3)
    acc = ClassSpectrum(4, backend="torch")
    acc.update(torch.randn(6, 2, 5, 5, generator=g), torch.tensor([0, 2, 0, 2, 0, 2]))
    with pytest.raises(ValueError, match=r"no data for class\(es\) \[1, 3\].*ClassSpectrum\.mean\(\)"):
        adcs(acc.mean())
    with pytest.raises(ValueError, match=r"no data for class\(es\) \[1, 3\]"):
        adcs(acc.mean().mean(1))  # the (K, H, W) form
    # the classes present still work on their own
    assert adcs(acc.mean()[[0, 2]]).shape == (2, 5, 5)


def test_adcs_rejects_a_stray_nan():
    means = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    means[1, 0, 2, 2] = float("nan")
    means[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN/Inf values \(in the rows of class\(es\) \[1, 2\]\)"):
        adcs(means)
