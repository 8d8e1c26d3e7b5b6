"""channel_ablate, channel_masks and group_outcomes: every backend against the PyTorch reference."""
import pytest
import torch

from conftest import FAST_BACKENDS
from shortcut_fast.backends import BackendUnavailable, backend_status
from shortcut_fast.ops.ablation import (channel_ablate, channel_ablate_reference, channel_masks, group_outcomes,
                                        group_outcomes_reference)

ALL_BACKENDS = [pytest.param("torch", "cpu", id="torch"), *FAST_BACKENDS]


def _check_backend(backend, device):
    status = backend_status(backend, device)
    if not status:  # a missing build is a failure, not a skip
        pytest.fail(f"{backend} on {device} is unavailable: {status.reason}")


def _randn(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _random_mask(V, C, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(V, C, generator=g) < p
    mask[0] = False  # a baseline row
    return mask


def _naive_ablate(act, mask, replacement, axis):
    """Loop over variants and channels with index assignment: independent of the kernels."""
    outs = []
    for v in range(mask.shape[0]):
        out = act.clone()
        for c in torch.nonzero(mask[v]).flatten().tolist():
            idx = [slice(None)] * act.dim()
            idx[axis] = c
            if isinstance(replacement, float):
                out[tuple(idx)] = replacement
            elif replacement.dim() == 1:
                out[tuple(idx)] = replacement[c]
            else:
                out[tuple(idx)] = replacement[tuple(idx)]
        outs.append(out)
    return torch.stack(outs)


# --------------------------------------------------------------------------- channel_masks


def test_channel_masks_one_hot_and_sets():
    mask = channel_masks(5, [0, 4, [1, 3], [], (2,)])
    want = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]],
                        dtype=torch.bool)
    assert torch.equal(mask, want)
    assert torch.equal(channel_masks(3, torch.arange(3)), torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"channels\[1\].*outside \[0, 3\)"):
        channel_masks(3, [0, 3])
    with pytest.raises(ValueError, match="channels"):
        channel_masks(3, [[0, -1]])
    with pytest.raises(TypeError, match="channels"):
        channel_masks(3, [0.5])


# --------------------------------------------------------------------------- channel_ablate

CASES = [
    # (shape, channel_axis)
    ((3, 5, 7, 9), 1),  # (B, C, H, W), odd sizes
    ((2, 6, 4, 4), 1),  # S a multiple of the vector width
    ((2, 9, 5), -1),  # ViT tokens (B, T, C), channels last
    ((4, 7), 1),  # (B, C) features, S = 1
    ((1, 1), 1),  # one element
    ((2, 3, 1100), 1),  # S longer than one kernel block
]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("shape,axis", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("rep_kind", ["scalar", "channel", "full"])
def test_channel_ablate_bit_identical(backend, device, shape, axis, rep_kind):
    _check_backend(backend, device)
    act = _randn(shape, seed=len(shape) + shape[0])
    C = shape[axis]
    mask = _random_mask(5, C, seed=C)
    if C > 1:
        mask[-1, : C // 2 + 1] = True  # a channel set
    else:
        mask[-1] = True
    replacement = {"scalar": 0.0, "channel": _randn((C,), seed=1), "full": _randn(shape, seed=2)}[rep_kind]
    want = _naive_ablate(act, mask, replacement, axis % len(shape))
    got = channel_ablate(act.to(device), mask.to(device), replacement if rep_kind == "scalar" else
                         replacement.to(device), channel_axis=axis, backend=backend)
    assert got.shape == (5, *shape) and got.dtype == act.dtype
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got[0].cpu(), act)  # the baseline row is the unmodified activation


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_channel_ablate_dtypes(backend, device, dtype):
    _check_backend(backend, device)
    act = _randn((2, 4, 3, 5), dtype=dtype, seed=7)
    act[0, 0, 0, 0] = float("nan")  # values are copied: NaN and -0.0 pass through unchanged
    act[0, 1, 0, 0] = -0.0
    mask = channel_masks(4, [[], 1, [0, 2]])
    rep = _randn((4,), seed=8)  # float32: cast to act's dtype
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(BackendUnavailable, match="float64"):
            channel_ablate(act.to(device), mask.to(device), rep.to(device), backend=backend)
        return
    got = channel_ablate(act.to(device), mask.to(device), rep.to(device), backend=backend).cpu()
    want = _naive_ablate(act, mask, rep.to(dtype), 1)
    assert got.dtype == dtype
    # bit-identical, NaN included
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    assert torch.equal(got.view(bits), want.view(bits))
    assert torch.signbit(got[0, 0, 1, 0, 0])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_channel_ablate_noncontiguous_and_single_variant(backend, device):
    _check_backend(backend, device)
    act = _randn((3, 4, 6, 5), seed=3).to(device).permute(0, 2, 3, 1)  # (B, H, W, C), not contiguous
    rep = _randn((3, 6, 5, 4), seed=4).to(device)
    mask = channel_masks(4, [2], device=device)  # V = 1
    got = channel_ablate(act, mask, rep, channel_axis=3, backend=backend)
    assert got.shape == (1, 3, 6, 5, 4)
    assert torch.equal(got.cpu(), _naive_ablate(act.cpu(), mask.cpu(), rep.cpu(), 3))
    # a (C,) mask means V = 1, a 0-d tensor replacement means one value for every channel
    got1 = channel_ablate(act, mask[0], torch.tensor(2.5), channel_axis=-1, backend=backend)
    assert torch.equal(got1.cpu(), _naive_ablate(act.cpu(), mask.cpu(), 2.5, 3))


def test_channel_ablate_triton_variant_groups(monkeypatch):
    """The GPU grid splits variants over programs; force such a split (with a partial last
    group) in the interpreter."""
    _check_backend("triton", "cpu")
    from shortcut_fast.kernels import ablation as kernels

    # 3 groups of 2 variants for V = 5
    monkeypatch.setattr(kernels, "channel_ablate_grid", lambda P, C, S, V: (triton_cdiv(P * C * S, 1024), 3))
    act = _randn((2, 3, 5), seed=6)
    mask = _random_mask(5, 3, seed=6, p=0.5)
    for rep in (_randn((3,), seed=7), _randn((2, 3, 5), seed=8)):
        got = kernels.channel_ablate_op(act, mask, rep)
        assert torch.equal(got, _naive_ablate(act, mask, rep, 1))


def triton_cdiv(a, b):
    return -(-a // b)


def test_channel_ablate_reference_layout():
    act = _randn((2, 3, 4))
    mask = torch.tensor([[True, False, False], [False, False, False]])
    out = channel_ablate_reference(act, mask, torch.full((3,), 9.0))
    assert out.shape == (2, 2, 3, 4)
    assert (out[0, :, 0] == 9).all() and torch.equal(out[0, :, 1:], act[:, 1:]) and torch.equal(out[1], act)


def test_channel_ablate_bad_inputs():
    act = _randn((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(V, C\) with C = 3"):
        channel_ablate(act, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype"):
        channel_ablate(act, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="replacement must have shape"):
        channel_ablate(act, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="channel_axis"):
        channel_ablate(act, torch.zeros(2, 3, dtype=torch.bool), channel_axis=4)
    with pytest.raises(ValueError, match="act must have at least 2"):
        channel_ablate(torch.zeros(3), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="act must have dtype"):
        channel_ablate(act.long(), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="replacement"):
        channel_ablate(act, torch.zeros(2, 3, dtype=torch.bool), "zero")


# --------------------------------------------------------------------------- group_outcomes


def _outcome_inputs(V, B, L, G, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(V, B, L, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, L, (B,), generator=g)
    groups = torch.randint(0, G, (B,), generator=g)
    return logits, labels, groups


def _naive_outcomes(logits, labels, groups, G):
    """Per-sample Python loop in float64 with the first maximum: independent of the kernels."""
    V, B, L = logits.shape
    correct = torch.zeros(V, G, dtype=torch.int64)
    loss = torch.zeros(V, G, dtype=torch.float64)
    lf = logits.double()
    for v in range(V):
        for b in range(B):
            row = lf[v, b].tolist()
            first = row.index(max(row))
            correct[v, groups[b]] += int(first == labels[b])
            loss[v, groups[b]] += float(torch.logsumexp(lf[v, b], 0) - lf[v, b, labels[b]])
    return correct, loss


OUTCOME_CASES = [
    # (V, B, L, G)
    (3, 37, 5, 4),
    (1, 1, 1, 1),  # one element, L = 1
    (2, 300, 2, 3),  # more samples than one CUDA block
    (2, 20, 150, 40),  # L over several triton chunks; many groups (per-sample atomics)
    (2, 50, 3, 3000),  # more groups than the CUDA kernel keeps in shared memory
]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("case", OUTCOME_CASES, ids=lambda c: "x".join(map(str, c)))
def test_group_outcomes_matches_naive(backend, device, case):
    _check_backend(backend, device)
    V, B, L, G = case
    logits, labels, groups = _outcome_inputs(V, B, L, G, seed=B + L)
    correct, loss = group_outcomes(logits.to(device), labels.to(device), groups.to(device), G, backend=backend)
    want_c, want_l = _naive_outcomes(logits, labels, groups, G)
    assert correct.shape == (V, G) and correct.dtype == torch.int64 and loss.dtype == torch.float32
    assert torch.equal(correct.cpu(), want_c)
    torch.testing.assert_close(loss.cpu().double(), want_l, rtol=1e-5, atol=1e-4)
    ref_c, ref_l = group_outcomes_reference(logits, labels, groups, G)
    assert torch.equal(ref_c, want_c)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_group_outcomes_ties_empty_groups_and_2d(backend, device):
    _check_backend(backend, device)
    L = 70  # ties across triton chunks and CUDA lanes
    logits = torch.zeros(2, 6, L)
    logits[0, 0] = 1.0  # all equal: argmax is 0
    logits[0, 1, [3, 65]] = 5.0  # tie between CUDA lanes 3 (first round) and 1 (third round): 3
    logits[0, 2, [64, 66]] = 5.0  # tie inside the second chunk only: 64
    logits[0, 3, [1, 33]] = 2.0  # same lane position in two warp rounds: 1
    logits[1] = _randn((6, L), seed=5)
    labels = torch.tensor([0, 65, 64, 1, 2, 3])
    groups = torch.tensor([0, 0, 2, 2, 0, 2])  # group 1 and 3 have no samples
    correct, loss = group_outcomes(logits.to(device), labels.to(device), groups.to(device), 4, backend=backend)
    want_c, want_l = _naive_outcomes(logits, labels, groups, 4)
    assert torch.equal(correct.cpu(), want_c)
    assert correct[0, 0] == 1 and correct[0, 2] == 2  # label 65 loses the tie; 64 and 1 win theirs
    assert (correct[:, [1, 3]] == 0).all() and (loss[:, [1, 3]] == 0).all()
    torch.testing.assert_close(loss.cpu().double(), want_l, rtol=1e-5, atol=1e-4)
    c1, l1 = group_outcomes(logits[1].to(device), labels.to(device), groups.to(device), 4, backend=backend)
    assert c1.shape == (1, 4) and torch.equal(c1.cpu(), correct[1:].cpu())
    torch.testing.assert_close(l1.cpu(), loss[1:].cpu(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_group_outcomes_large_logits_stable(backend, device):
    _check_backend(backend, device)
    logits, labels, groups = _outcome_inputs(2, 40, 6, 3, seed=9, scale=1e4)
    logits[0, 0] = torch.tensor([3e4, 3e4 - 1, -3e4, 0, 1, 2])
    correct, loss = group_outcomes(logits.to(device), labels.to(device), groups.to(device), 3, backend=backend)
    assert torch.isfinite(loss).all()
    want_c, want_l = _naive_outcomes(logits, labels, groups, 3)
    assert torch.equal(correct.cpu(), want_c)
    torch.testing.assert_close(loss.cpu().double(), want_l, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_group_outcomes_dtypes(backend, device, dtype):
    _check_backend(backend, device)
    logits, labels, groups = _outcome_inputs(2, 30, 7, 3, seed=11, dtype=dtype)
    args = (logits.to(device), labels.to(device), groups.to(device), 3)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(BackendUnavailable, match="float64"):
            group_outcomes(*args, backend=backend)
        return
    correct, loss = group_outcomes(*args, backend=backend)
    want_c, want_l = _naive_outcomes(logits, labels, groups, 3)  # on the rounded values
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(correct.cpu(), want_c)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.cpu().double(), want_l, **tol)


def test_group_outcomes_bad_inputs():
    logits, labels, groups = _outcome_inputs(2, 5, 3, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        group_outcomes(logits, labels + 3, groups, 2)
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 2\).*num_groups=2"):
        group_outcomes(logits, labels, groups + 2, 2)
    with pytest.raises(ValueError, match=r"groups must have shape \(5,\)"):
        group_outcomes(logits, labels, groups[:4], 2)
    with pytest.raises(TypeError, match="groups must have dtype"):
        group_outcomes(logits, labels, groups.int(), 2)
    with pytest.raises(ValueError, match="logits must have shape"):
        group_outcomes(logits[0, 0], labels, groups, 2)
    with pytest.raises(ValueError, match="num_groups"):
        group_outcomes(logits, labels, groups, 0)
    bad = logits.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits contains 1 NaN"):
        group_outcomes(bad, labels, groups, 2)
    with pytest.raises(BackendUnavailable, match="group_outcomes"):
        group_outcomes(logits, labels, groups, 2, backend="cuda")


# --------------------------------------------------------------------------- torch.compile


def _compile_case(backend, device, compile_backend):
    act = _randn((4, 6, 5, 5), seed=12).to(device)
    mask = channel_masks(6, [[], 0, [1, 2]], device=device)
    rep = _randn((6,), seed=13).to(device)
    logits, labels, groups = (t.to(device) for t in _outcome_inputs(3, 9, 10, 2, seed=14))

    def f(act, logits):
        expanded = channel_ablate(act, mask, rep, backend=backend)
        correct, loss = group_outcomes(logits, labels, groups, 2, backend=backend, allow_nonfinite=True)
        return expanded * 1, correct, loss * 2

    got = torch.compile(f, backend=compile_backend, fullgraph=True)(act, logits)
    assert torch.equal(got[0].cpu(), channel_ablate_reference(act.cpu().reshape(4, 6, 25), mask.cpu(),
                                                              rep.cpu()).reshape(3, 4, 6, 5, 5))
    want_c, want_l = group_outcomes_reference(logits.cpu(), labels.cpu(), groups.cpu(), 2)
    assert torch.equal(got[1].cpu(), want_c)
    torch.testing.assert_close(got[2].cpu(), 2 * want_l, rtol=1e-5, atol=1e-4)


def test_compiles_with_torch_compile():
    """The fake registrations let the compiled ops trace into one graph (no graph breaks)."""
    _check_backend("cpp", "cpu")
    _compile_case("cpp", "cpu", "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compiles_on_gpu(backend):
    _check_backend(backend, "cuda")
    _compile_case(backend, "cuda", "inductor")


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_empty_batch(backend, device, dtype):
    """B = 0 on every backend: channel_ablate gives (V, 0, ...), group_outcomes zeros."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels support float16/bfloat16/float32 only")
    _check_backend(backend, device)
    act = torch.zeros(0, 3, 4, 5, dtype=dtype, device=device)
    out = channel_ablate(act, _random_mask(6, 3), 0.5, backend=backend)
    assert out.shape == (6, 0, 3, 4, 5) and out.dtype == dtype and out.device.type == device
    out = channel_ablate(act, _random_mask(2, 3), torch.zeros_like(act), backend=backend)
    assert out.shape == (2, 0, 3, 4, 5)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    correct, loss = group_outcomes(torch.zeros(2, 0, 4, dtype=dtype, device=device), empty, empty, 3,
                                   backend=backend)
    assert correct.shape == (2, 3) and correct.dtype == torch.int64 and not correct.any()
    assert loss.shape == (2, 3) and loss.dtype == dtype and not loss.any()


def test_output_that_cannot_fit_fails_before_allocating():
    """2^14 variants of a (1024, 64, 32, 32) float32 activation: 4 TiB. act and mask are
    expanded views (no memory), so only building the output could allocate."""
    act = torch.zeros(1, 64, 32, 32).expand(1024, 64, 32, 32)
    mask = torch.ones(1, 64, dtype=torch.bool).expand(1 << 14, 64)
    for backend in ("torch", "cpp") if backend_status("cpp", "cpu") else ("torch",):
        with pytest.raises(ValueError, match=r"channel_ablate would return a \(16384, 1024, 64, 32, 32\) float32 "
                                             r"tensor of 4,398\.0 GB, more than the .* GB available on cpu; "
                                             r"pass fewer mask rows per call"):
            channel_ablate(act, mask, 0.0, backend=backend)
