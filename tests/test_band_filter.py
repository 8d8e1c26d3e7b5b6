"""band_filter and remove_frequencies: every backend against the PyTorch reference."""
import pytest
import torch

from conftest import FAST_BACKENDS, TOLERANCES
from shortcut_fast.backends import BackendUnavailable, backend_status
from shortcut_fast.ops import freq
from shortcut_fast.ops.band_filter import (band_filter, band_filter_chunks, band_filter_reference, prepare_masks,
                                         remove_frequencies, remove_frequencies_chunks,
                                         remove_frequencies_reference)

SHAPES = [
    (3, 3, 32, 32),  # CIFAR-like
    (2, 2, 31, 17),  # odd sizes, not a multiple of any block
    (1, 1, 1, 1),  # one element
    (2, 1, 1, 7),  # a single row
    (2, 1, 70, 66),  # several kernel tiles in both directions
]


def _images(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _random_masks(K, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return freq.symmetrize(torch.rand(K, H, W, generator=g) < 0.3)


def _check_backend(backend, device):
    status = backend_status(backend, device)
    if not status:  # a missing build is a failure, not a skip
        pytest.fail(f"{backend} on {device} is unavailable: {status.reason}")


def _tol(dtype, H, W):
    # float32 DFT sums grow with the number of terms
    t = dict(TOLERANCES[dtype])
    if dtype != torch.float64:
        t["atol"] = max(t["atol"], 2e-6 * (H + W))
    return t


# --------------------------------------------------------------------------- band_filter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_bytes", [1, 20000, 1 << 30], ids=["one-mask", "few-masks", "all-masks"])
def test_reference_in_mask_chunks_equals_one_fft_round_trip_per_mask(monkeypatch, dtype, chunk_bytes):
    import shortcut_fast.ops.band_filter as bf

    monkeypatch.setattr(bf, "REFERENCE_CHUNK_BYTES", chunk_bytes)
    x = _images((2, 3, 9, 7), dtype, seed=3)
    weights = _random_masks(11, 9, 7, seed=4).to(dtype)
    got = band_filter_reference(x, weights)
    want = torch.stack([torch.fft.ifft2(torch.fft.fft2(x) * weights[k]).real for k in range(11)])
    assert got.dtype == dtype and got.shape == (11, 2, 3, 9, 7)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["pass", "stop"])
def test_band_filter_matches_reference(backend, device, shape, mode):
    _check_backend(backend, device)
    H, W = shape[-2:]
    x = _images(shape, device=device, seed=sum(shape))
    masks = _random_masks(3, H, W, seed=len(shape))
    got = band_filter(x, masks, mode, backend=backend)
    want = band_filter_reference(x.cpu(), prepare_masks(masks, H, W, mode))
    assert got.shape == (3, *shape) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32, H, W))


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_band_filter_dtypes(backend, device, dtype):
    _check_backend(backend, device)
    x = _images((2, 3, 12, 10), dtype=dtype, device=device, seed=4)
    masks = freq.band_masks(12, 10)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(BackendUnavailable, match="float64"):
            band_filter(x, masks, backend=backend)
        return
    got = band_filter(x, masks, backend=backend)
    want = band_filter_reference(x.cpu(), masks.to(torch.float64 if dtype == torch.float64 else torch.float32))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.cpu(), want, **_tol(dtype, 12, 10))


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_band_filter_many_masks_and_weights(backend, device):
    """Large K (every conjugate pair of a 16x16 grid) and soft (float) weights."""
    _check_backend(backend, device)
    x = _images((2, 1, 16, 16), device=device, seed=8)
    pairs = freq.conjugate_pairs(16, 16)
    masks = freq.pair_masks(16, 16, pairs)
    got = band_filter(x, masks, "stop", backend=backend)
    assert got.shape == (pairs.shape[0], 2, 1, 16, 16)
    torch.testing.assert_close(got.cpu(), band_filter_reference(x.cpu(), (~masks).float()), **_tol(torch.float32, 16, 16))
    weights = freq.symmetrize(torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(band_filter(x, weights, backend=backend).cpu(), band_filter_reference(x.cpu(), weights),
                               **_tol(torch.float32, 16, 16))


@pytest.mark.parametrize("backend", ["torch"] + [p.values[0] for p in FAST_BACKENDS])
def test_pass_and_stop_sum_to_input(backend):
    device = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = _images((3, 2, 15, 20), device=device, seed=2)
    masks = _random_masks(4, 15, 20, seed=9)
    total = band_filter(x, masks, "pass", backend=backend) + band_filter(x, masks, "stop", backend=backend)
    torch.testing.assert_close(total.cpu(), x.cpu().expand_as(total), rtol=1e-5, atol=1e-4)


def test_bands_partition_the_image():
    x = _images((2, 3, 32, 32))
    parts = band_filter(x, freq.band_masks(32, 32))
    torch.testing.assert_close(parts.sum(0), x, rtol=1e-5, atol=1e-4)


def test_asymmetric_masks_rejected_or_symmetrized():
    x = _images((1, 1, 8, 8))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1, 2] = True  # its partner (7, 6) is missing
    with pytest.raises(ValueError, match="conjugate-symmetric"):
        band_filter(x, mask)
    got = band_filter(x, mask, symmetrize=True)
    torch.testing.assert_close(got, band_filter(x, freq.pair_masks(8, 8, [[1, 2]])))


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: band_filter(x[0], torch.ones(8, 8, dtype=torch.bool)), ValueError, r"x must have shape \(B, C, H, W\)"),
    (lambda x: band_filter(x, torch.ones(3, 8, 9, dtype=torch.bool)), ValueError, r"masks must have shape \(K, 8, 8\)"),
    (lambda x: band_filter(x, torch.ones(8, 8, dtype=torch.int64)), TypeError, "masks must be bool or float"),
    (lambda x: band_filter(x, torch.ones(8, 8, dtype=torch.bool), "notch"), ValueError, "mode must be one of"),
    (lambda x: remove_frequencies(x, [[8, 0]]), ValueError, r"u in \[0, 8\)"),
    (lambda x: remove_frequencies(x, torch.zeros(3)), ValueError, r"freqs must have shape \(K, 2\)"),
    (lambda x: remove_frequencies(x, torch.zeros(1, 2)), TypeError, "freqs must hold integer"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_images((2, 1, 8, 8)))


# --------------------------------------------------------------------------- remove_frequencies


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_remove_frequencies_matches_reference(backend, device, shape):
    _check_backend(backend, device)
    H, W = shape[-2:]
    x = _images(shape, device=device, seed=sum(shape) + 1)
    g = torch.Generator().manual_seed(3)
    freqs = torch.stack([torch.randint(0, H, (6,), generator=g), torch.randint(0, W, (6,), generator=g)], 1)
    freqs[0] = torch.tensor([0, 0])  # DC: self-conjugate, a single term
    if H % 2 == 0:
        freqs[1] = torch.tensor([H // 2, 0])  # Nyquist row: self-conjugate too
    got = remove_frequencies(x, freqs, backend=backend)
    want = remove_frequencies_reference(x.cpu(), freqs)
    assert got.shape == (6, *shape)
    torch.testing.assert_close(got.cpu(), want, **_tol(torch.float32, H, W))


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_remove_every_pair_large_k(backend, device):
    _check_backend(backend, device)
    x = _images((3, 2, 12, 9), device=device, seed=12)
    pairs = freq.conjugate_pairs(12, 9)
    got = remove_frequencies(x, pairs, backend=backend)
    torch.testing.assert_close(got.cpu(), remove_frequencies_reference(x.cpu(), pairs), **_tol(torch.float32, 12, 9))
    # Removing every pair one at a time removes each frequency once: the removed parts sum to x.
    torch.testing.assert_close((x.cpu() - got.cpu()).sum(0), x.cpu(), rtol=1e-4, atol=1e-3)


def test_remove_frequencies_is_a_band_stop():
    x = _images((2, 3, 10, 12), seed=5)
    freqs = torch.tensor([[1, 2], [9, 11], [5, 6], [0, 6]])
    torch.testing.assert_close(remove_frequencies(x, freqs, backend="torch"),
                               band_filter(x, freq.pair_masks(10, 12, freqs), "stop", backend="torch"))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("max_bytes", [10**9, 3 * 2 * 3 * 8 * 8 * 4, 2 * 3 * 8 * 8 * 4 - 1, 3 * 8 * 8 * 4])
def test_chunks_cover_the_result_within_budget(max_bytes):
    x = _images((5, 3, 8, 8), seed=6)
    masks = _random_masks(7, 8, 8)
    full = band_filter(x, masks, "stop")
    seen = torch.zeros(7, 5, dtype=torch.int64)
    for chunk in band_filter_chunks(x, masks, "stop", max_bytes=max_bytes):
        assert chunk.images.numel() * 4 <= max_bytes
        torch.testing.assert_close(chunk.images, full[chunk.k_slice, chunk.b_slice])
        seen[chunk.k_slice, chunk.b_slice] += 1
    assert (seen == 1).all()
    freqs = freq.conjugate_pairs(8, 8)[:9]
    full = remove_frequencies(x, freqs)
    pieces = list(remove_frequencies_chunks(x, freqs, max_bytes=max_bytes))
    for chunk in pieces:
        torch.testing.assert_close(chunk.images, full[chunk.k_slice, chunk.b_slice])
    with pytest.raises(ValueError, match="max_bytes must hold at least one filtered image"):
        next(band_filter_chunks(x, masks, max_bytes=100))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch"), *FAST_BACKENDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty_batch_gives_an_empty_result(backend, device, dtype):
    """B = 0 on every backend: (K, 0, C, H, W), also through the streaming forms."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels compute in float32")
    _check_backend(backend, device)
    x = torch.zeros(0, 3, 8, 6, dtype=dtype, device=device)
    masks = _random_masks(4, 8, 6)
    got = band_filter(x, masks, "stop", backend=backend)
    assert got.shape == (4, 0, 3, 8, 6) and got.dtype == dtype and got.device.type == device
    got = remove_frequencies(x, [[1, 2], [0, 0]], backend=backend)
    assert got.shape == (2, 0, 3, 8, 6) and got.dtype == dtype
    chunks = list(band_filter_chunks(x, masks, backend=backend, max_bytes=3 * 8 * 6 * 8))
    assert [c.images.shape for c in chunks] == [(4, 0, 3, 8, 6)]
    chunks = list(remove_frequencies_chunks(x, [[1, 2]], backend=backend))
    assert [c.images.shape for c in chunks] == [(1, 0, 3, 8, 6)]


# 2^10 images x 2^20 masks of 32 x 32 float32: 4 TiB. Expanded views cost no memory, so
# the inputs are free and only an attempt to build the output could allocate.
HUGE_B, HUGE_K, HUGE_HW = 1 << 10, 1 << 20, 32


def test_output_that_cannot_fit_fails_before_allocating():
    x = torch.zeros(1, 1, HUGE_HW, HUGE_HW).expand(HUGE_B, 1, HUGE_HW, HUGE_HW)
    masks = torch.ones(1, HUGE_HW, HUGE_HW, dtype=torch.bool).expand(HUGE_K, HUGE_HW, HUGE_HW)
    with pytest.raises(ValueError, match=r"band_filter would return a \(1048576, 1024, 1, 32, 32\) float32 "
                                         r"tensor of 4,398\.0 GB, more than the .* GB available on cpu; "
                                         r"use band_filter_chunks\(\.\.\., max_bytes=\.\.\.\)"):
        band_filter(x, masks, backend="torch")
    freqs = torch.zeros(1, 2, dtype=torch.int64).expand(HUGE_K, 2)
    with pytest.raises(ValueError, match=r"4,398\.0 GB.*use remove_frequencies_chunks"):
        remove_frequencies(x, freqs, backend="cpp" if backend_status("cpp", "cpu") else "torch")


def test_output_limit_is_the_available_memory(monkeypatch):
    """Just over the available memory fails; exactly that much passes the check (it is not
    a fixed cap); the streaming form stays within max_bytes and never trips it."""
    from shortcut_fast.ops import _checks

    x = _images((4, 1, 64, 64), seed=2)
    masks = torch.ones(1, 64, 64, dtype=torch.bool).expand(8192, 64, 64)
    need = 8192 * 4 * 64 * 64 * 4  # 537 MB of float32 output
    monkeypatch.setattr(_checks, "available_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"0\.5 GB, more than the 0\.5 GB available on cpu"):
        band_filter(x, masks, backend="torch")
    chunk = next(band_filter_chunks(x, masks, max_bytes=1 << 20, backend="torch"))
    assert chunk.images.numel() * 4 <= 1 << 20
    monkeypatch.setattr(_checks, "available_bytes", lambda device: need)
    _checks.check_output_fits("band_filter", (8192, 4, 1, 64, 64), torch.float32, x.device, "")
