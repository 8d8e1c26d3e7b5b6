"""probe_stats (every backend vs the reference), ProbeStats streaming, and fit_linear_probes
against scikit-learn Ridge scored on the held-out split."""
import io

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from conftest import FAST_BACKENDS, TOLERANCES
from shortcut_fast.backends import BackendUnavailable, backend_status
from shortcut_fast.ops.probe_stats import (DEFAULT_ALPHA_FACTORS, LinearProbes, ProbeStats, accumulate_probe_stats,
                                      fit_linear_probes, fit_probes, probe_stats, probe_stats_reference)

SHAPES = [
    (1, 1, 1),  # one sample, one feature, one target
    (37, 5, 3),  # odd sizes
    (70, 66, 130),  # several kernel tiles each way, none a multiple of a block
    (0, 3, 2),  # empty chunk
]


def _check_backend(backend, device):
    status = backend_status(backend, device)
    if not status:  # a missing build is a failure, not a skip
        pytest.fail(f"{backend} on {device} is unavailable: {status.reason}")


def _data(N, D, K, dtype=torch.float64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) + offset
    z = torch.randn(N, K, generator=g, dtype=torch.float64) + offset
    return x.to(dtype), z.to(dtype)


def _assert_stats_close(got, want, **tol):
    names = ("xx", "xz", "sum_x", "sum_z", "sumsq_z")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.cpu().to(b.dtype), b, msg=lambda m: f"{name}: {m}", **tol)


# --------------------------------------------------------------------------- probe_stats


@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_probe_stats_matches_reference(backend, device, shape):
    _check_backend(backend, device)
    x, z = _data(*shape, dtype=torch.float32, seed=sum(shape))
    got = probe_stats(x.to(device), z.to(device), backend=backend)
    assert all(t.dtype == torch.float32 for t in got)
    want = probe_stats_reference(x.double(), z.double())
    # float32 sums of N products
    _assert_stats_close(got, want, rtol=1e-5, atol=TOLERANCES[torch.float32]["atol"] * max(1, shape[0]) ** 0.5)


@pytest.mark.parametrize("backend,device", [p for p in FAST_BACKENDS if p.values[0] == "triton"])
def test_probe_stats_split_over_samples_matches_reference(backend, device, monkeypatch):
    """Few features and targets: the GPU launch splits the samples (probe_stats_grid); here
    the interpreter runs those GPU launch sizes."""
    _check_backend(backend, device)
    from shortcut_fast.kernels import probe_stats as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    N, D, K = 300, 70, 5
    assert kernels.probe_stats_grid(N, D, K)[2] > 1
    x, z = _data(N, D, K, dtype=torch.float32, seed=3, offset=1.0)
    got = probe_stats(x.to(device), z.to(device), backend=backend)
    want = probe_stats_reference(x.double(), z.double())
    _assert_stats_close(got, want, rtol=1e-5, atol=TOLERANCES[torch.float32]["atol"] * N ** 0.5)


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch")] + FAST_BACKENDS)
def test_probe_stats_float64(backend, device):
    if backend != "torch":
        _check_backend(backend, device)
    x, z = _data(53, 19, 7, seed=3)
    if backend == "triton":
        with pytest.raises(BackendUnavailable, match="float64"):
            probe_stats(x.to(device), z.to(device), backend=backend)
        return
    got = probe_stats(x.to(device), z.to(device), backend=backend)
    assert all(t.dtype == torch.float64 for t in got)
    want = (x.T @ x, x.T @ z, x.sum(0), z.sum(0), (z ** 2).sum(0))
    _assert_stats_close(got, want, **TOLERANCES[torch.float64])


def test_probe_stats_promotes_mixed_dtypes():
    x, z = _data(9, 4, 2, seed=1)
    got = probe_stats(x.half(), z.float())
    assert all(t.dtype == torch.float32 for t in got)
    assert all(t.dtype == torch.float64 for t in probe_stats(x.float(), z))


def test_probe_stats_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not backend_status("cpp", "cpu"):
        pytest.fail("the compiled extension is unavailable")
    with FakeTensorMode():
        out = torch.ops.shortcut_fast.probe_stats(torch.empty(6, 4), torch.empty(6, 3))
    assert [tuple(t.shape) for t in out] == [(4, 4), (4, 3), (4,), (3,), (3,)]


@pytest.mark.parametrize(
    "x,z,match",
    [
        (torch.zeros(5), torch.zeros(5, 2), "x must have shape"),
        (torch.zeros(5, 3), torch.zeros(4, 2), "z must have as many rows as x"),
        (torch.zeros(5, 3, dtype=torch.int64), torch.zeros(5, 2), "x must have dtype"),
        (torch.zeros(5, 3), torch.full((5, 2), float("nan")), "z contains 10 NaN"),
    ],
)
def test_probe_stats_bad_inputs(x, z, match):
    with pytest.raises((ValueError, TypeError), match=match):
        probe_stats(x, z)


def test_probe_stats_bad_options():
    x, z = _data(4, 2, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        probe_stats(x, z, backend="numpy")
    with pytest.raises(ValueError, match="precision must be one of"):
        probe_stats(x, z, precision="fp8")


# --------------------------------------------------------------------------- ProbeStats


def _uncentered(stats: ProbeStats):
    D, K = stats.dim, stats.num_targets
    return stats.moments(torch.zeros(D), torch.zeros(K))


def test_probe_stats_chunked_equals_one_shot():
    x, z = _data(101, 6, 4, seed=5, offset=3.0)
    one = ProbeStats(6, 4, dtype=torch.float64).update(x, z)
    chunked = accumulate_probe_stats(x, z, chunk_size=7)
    assert one.n == chunked.n == 101
    want = probe_stats_reference(x, z)
    _assert_stats_close(_uncentered(one), want, **TOLERANCES[torch.float64])
    _assert_stats_close(_uncentered(chunked), want, **TOLERANCES[torch.float64])
    # the shift is the first chunk's mean
    torch.testing.assert_close(chunked.shift_x, x[:7].mean(0))
    torch.testing.assert_close(chunked.sum_x, (x - x[:7].mean(0)).sum(0))


def test_probe_stats_shift_keeps_float32_accurate():
    """Data with a mean 1e4 times its spread: naive float32 x^T x loses the covariance."""
    x, z = _data(400, 3, 2, seed=6)
    x, z = x + 1e4, z * 1e-2 + 1e4
    stats = accumulate_probe_stats(x.float(), z.float(), chunk_size=64)
    assert stats.dtype == torch.float32
    xx, xz, sx, sz, sq = stats.moments(x.mean(0), z.mean(0))  # centered
    xc, zc = x - x.mean(0), z - z.mean(0)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    # x, z are rounded to float32 on input (1e4 * 6e-8 = 6e-4 per value, ~ 1e-3 of a 1e-2 spread)
    assert rel(xx, xc.T @ xc) < 1e-4
    assert rel(sq, (zc ** 2).sum(0)) < 1e-2
    naive = probe_stats_reference(x.float(), z.float())
    naive_cxx = naive[0].double() - torch.outer(naive[2].double(), naive[2].double()) / 400
    assert rel(naive_cxx, xc.T @ xc) > 1e-2  # what the shift protects against


def test_probe_stats_merge_and_state_dict():
    x, z = _data(90, 5, 3, seed=7, offset=-2.0)
    full = probe_stats_reference(x, z)
    a = accumulate_probe_stats(x[:40], z[:40], chunk_size=16)
    b = accumulate_probe_stats(x[40:] * 1.0, z[40:], chunk_size=9)
    assert not torch.equal(a.shift_x, b.shift_x)
    merged = ProbeStats(5, 3, dtype=torch.float64).merge(a).merge(b)
    assert merged.n == 90
    _assert_stats_close(_uncentered(merged), full, **TOLERANCES[torch.float64])
    # a float32 accumulator can merge a float64 one
    a32 = ProbeStats(5, 3).update(x[:40], z[:40]).merge(b)
    _assert_stats_close(_uncentered(a32), full, rtol=1e-5, atol=1e-3)

    # save half-way, resume, finish: same as one pass
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    resumed = ProbeStats.from_state_dict(torch.load(buf))
    assert (resumed.n, resumed.dtype, resumed.dim, resumed.num_targets) == (40, torch.float64, 5, 3)
    resumed.update(x[40:], z[40:])
    _assert_stats_close(_uncentered(resumed), full, **TOLERANCES[torch.float64])

    with pytest.raises(ValueError, match="other must have dim=5, num_targets=3"):
        merged.merge(ProbeStats(5, 4))
    with pytest.raises(ValueError, match="missing the entries"):
        ProbeStats.from_state_dict({"dim": 5})


def test_probe_stats_update_checks():
    stats = ProbeStats(5, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 5\)"):
        stats.update(torch.zeros(4, 6), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"z must have shape \(n, 3\)"):
        stats.update(torch.zeros(4, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        stats.update(torch.tensor([[float("inf"), 0, 0, 0, 0]]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="num_targets must be an int >= 1"):
        ProbeStats(5, 0)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        ProbeStats(5, 3, dtype=torch.float16)
    assert stats.update(torch.zeros(0, 5), torch.zeros(0, 3)).n == 0


# --------------------------------------------------------------------------- fit_linear_probes

ALPHAS = [1e-3, 1e-1, 1.0, 10.0, 100.0, 1000.0]


def _problem(N=60, Nh=45, D=8, seed=0):
    """Targets from perfectly linear to pure noise, plus a constant one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N + Nh, D, generator=g, dtype=torch.float64) * 2 + 3
    w = torch.randn(D, 5, generator=g, dtype=torch.float64)
    noise = torch.tensor([0.0, 0.3, 3.0, 1.0, 0.0], dtype=torch.float64)
    z = x @ w + 1.5 + torch.randn(N + Nh, 5, generator=g, dtype=torch.float64) * noise
    z[:, 3] = torch.randn(N + Nh, generator=g, dtype=torch.float64)  # pure noise
    z[:, 4] = -4.0  # constant
    return x[:N], z[:N], x[N:], z[N:]


def _sklearn_r2(xt, zt, xh, zh, alphas):
    """(K, L) held-out r2_score of sklearn Ridge(alpha) fit on the train split, per target."""
    out = np.empty((zt.shape[1], len(alphas)))
    for k in range(zt.shape[1]):
        for j, a in enumerate(alphas):
            model = Ridge(alpha=a).fit(xt.numpy(), zt[:, k].numpy())
            out[k, j] = r2_score(zh[:, k].numpy(), model.predict(xh.numpy()))
    return out


def _assert_choice_matches(probes: LinearProbes, ref: np.ndarray, alphas, tie=1e-7):
    """Per target, the chosen alpha is sklearn's argmax of held-out r2, except on near-ties."""
    for k in range(ref.shape[0]):
        j = int(np.argmax(ref[k]))
        chosen = alphas.index(float(probes.alpha[k]))
        assert chosen == j or ref[k, j] - ref[k, chosen] <= tie, (k, chosen, j, ref[k])


STATS_BACKENDS = [pytest.param("torch", "cpu", id="torch")] + FAST_BACKENDS


@pytest.mark.parametrize("backend,device", STATS_BACKENDS)
def test_fit_matches_sklearn(backend, device):
    if backend != "torch":
        _check_backend(backend, device)
    xt, zt, xh, zh = _problem()
    dtype = torch.float32 if backend == "triton" else torch.float64
    probes = fit_probes(xt.to(device), zt.to(device), xh.to(device), zh.to(device), ALPHAS, dtype=dtype,
                        backend=backend, chunk_size=23)
    ref = _sklearn_r2(xt, zt, xh, zh, ALPHAS)
    np.testing.assert_allclose(probes.r2_grid.cpu().numpy(), ref, atol=1e-4, rtol=0)
    _assert_choice_matches(probes, ref, ALPHAS, tie=1e-7 if dtype == torch.float64 else 1e-4)
    best = ref.max(1)
    np.testing.assert_allclose(probes.r2.cpu().numpy(), best, atol=1e-4, rtol=0)
    assert probes.r2[0] > 1 - 1e-6  # perfectly linear
    assert float(probes.r2[4]) == 1.0 and float(probes.v_information[4]) == 0.0  # constant
    assert abs(float(probes.v_information[3])) < 0.1  # pure noise
    assert torch.isfinite(probes.r2_grid).all() and torch.isfinite(probes.weight).all()
    # the weights are sklearn's at the chosen alpha
    for k in (0, 2):
        model = Ridge(alpha=float(probes.alpha[k])).fit(xt.numpy(), zt[:, k].numpy())
        np.testing.assert_allclose(probes.weight[:, k].cpu().numpy(), model.coef_, atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(float(probes.bias[k]), model.intercept_, atol=5e-3, rtol=1e-3)
    pred = probes.predict(xh.to(device))
    torch.testing.assert_close(pred.cpu(), xh @ probes.weight.cpu() + probes.bias.cpu())


def test_alpha_choice_matches_ridgecv_on_heldout_split():
    """scikit-learn's RidgeCV picks alpha per target only by leave-one-out; on a held-out
    split (PredefinedSplit) it picks one alpha per fit, so it is run once per target."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import PredefinedSplit

    xt, zt, xh, zh = _problem(seed=3)
    probes = fit_probes(xt, zt, xh, zh, ALPHAS, dtype=torch.float64)
    ref = _sklearn_r2(xt, zt, xh, zh, ALPHAS)
    split = PredefinedSplit(np.r_[np.full(len(xt), -1), np.zeros(len(xh))])
    x_all = torch.cat([xt, xh]).numpy()
    for k in range(4):  # the constant target has no best alpha
        cv = RidgeCV(alphas=ALPHAS, cv=split).fit(x_all, torch.cat([zt[:, k], zh[:, k]]).numpy())
        theirs, ours = ALPHAS.index(float(cv.alpha_)), ALPHAS.index(float(probes.alpha[k]))
        assert ours == theirs or abs(ref[k, ours] - ref[k, theirs]) <= 1e-7, (k, ours, theirs, ref[k])


def test_fit_k1_and_d_greater_than_n():
    g = torch.Generator().manual_seed(11)
    xt, xh = torch.randn(12, 30, generator=g, dtype=torch.float64), torch.randn(20, 30, generator=g,
                                                                                 dtype=torch.float64)
    w = torch.randn(30, 1, generator=g, dtype=torch.float64)
    zt, zh = xt @ w, xh @ w
    alphas = [1e-2, 1.0, 30.0]
    probes = fit_probes(xt, zt, xh, zh, alphas)
    assert probes.weight.shape == (30, 1) and probes.r2.shape == (1,) and probes.r2_grid.shape == (1, 3)
    ref = _sklearn_r2(xt, zt, xh, zh, alphas)
    np.testing.assert_allclose(probes.r2_grid.numpy(), ref, atol=1e-6, rtol=0)
    _assert_choice_matches(probes, ref, alphas)


def test_fit_train_constant_target_and_grouping():
    """A target constant on train only: weight 0, sklearn's (non-positive) r2, no NaN; and
    tiny max_bytes (one (alpha, target) pair per group) gives the same numbers."""
    xt, zt, xh, zh = _problem(seed=2)
    zt = zt.clone()
    zt[:, 1] = 2.0
    train, held = accumulate_probe_stats(xt, zt), accumulate_probe_stats(xh, zh)
    probes = fit_linear_probes(train, held, ALPHAS)
    assert float(probes.weight[:, 1].abs().max()) == 0.0 and float(probes.bias[1]) == 2.0
    ref = _sklearn_r2(xt, zt, xh, zh, ALPHAS)
    np.testing.assert_allclose(probes.r2_grid.numpy(), ref, atol=1e-6, rtol=0)
    assert float(probes.v_information[1]) == 0.0
    small = fit_linear_probes(train, held, ALPHAS, max_bytes=1)
    torch.testing.assert_close(small.r2_grid, probes.r2_grid)
    torch.testing.assert_close(small.weight, probes.weight)


def test_fit_constant_heldout_convention():
    """Held-out SST == 0: r2 is 1.0 when the predictions are exact, else 0.0 (sklearn force_finite)."""
    g = torch.Generator().manual_seed(4)
    xt, xh = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g,
                                                                                dtype=torch.float64)
    zt = torch.stack([torch.full((30,), 3.0), torch.randn(30, generator=g, dtype=torch.float64)], 1)
    zh = torch.full((10, 2), 3.0, dtype=torch.float64)
    probes = fit_probes(xt.float(), zt.float(), xh.float(), zh.float(), [1.0])
    assert probes.r2.tolist() == [1.0, 0.0] and probes.v_information.tolist() == [0.0, 0.0]
    ref = [r2_score(zh[:, k].numpy(), Ridge(alpha=1.0).fit(xt.numpy(), zt[:, k].numpy()).predict(xh.numpy()))
           for k in range(2)]
    assert ref == [1.0, 0.0]


def test_fit_default_alphas_and_shift_invariance():
    xt, zt, xh, zh = _problem(seed=3)
    probes = fit_probes(xt, zt, xh, zh)
    xc = xt - xt.mean(0)
    want = DEFAULT_ALPHA_FACTORS * float((xc ** 2).sum()) / xt.shape[1]
    torch.testing.assert_close(probes.alphas, want)
    assert set(probes.alpha.tolist()) <= set(probes.alphas.tolist())
    # translating x and z (train and held-out alike) changes only the intercept
    moved = fit_probes(xt + 50, zt - 20, xh + 50, zh - 20, probes.alphas)
    torch.testing.assert_close(moved.r2_grid, probes.r2_grid, atol=1e-8, rtol=0)
    torch.testing.assert_close(moved.weight, probes.weight, atol=1e-8, rtol=1e-8)


def test_fit_bad_inputs():
    xt, zt, xh, zh = _problem()
    train, held = accumulate_probe_stats(xt, zt), accumulate_probe_stats(xh, zh)
    with pytest.raises(ValueError, match="alphas must be finite and > 0"):
        fit_linear_probes(train, held, [1.0, 0.0])
    with pytest.raises(ValueError, match="alphas must hold at least one value"):
        fit_linear_probes(train, held, [])
    with pytest.raises(TypeError, match="heldout must be a ProbeStats"):
        fit_linear_probes(train, xh)
    with pytest.raises(ValueError, match="heldout must have dim=8, num_targets=5"):
        fit_linear_probes(train, ProbeStats(8, 4))
    with pytest.raises(ValueError, match="train must hold at least one sample"):
        fit_linear_probes(ProbeStats(8, 5), held)
    with pytest.raises(ValueError, match=r"x_heldout must have shape \(N, 8\)"):
        fit_probes(xt, zt, xh[:, :3], zh)
    with pytest.raises(ValueError, match="z_train must have as many rows as x_train"):
        fit_probes(xt, zt[:5], xh, zh)
    probes = fit_linear_probes(train, held, [1.0])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8\)"):
        probes.predict(xh[:, :2])
    with pytest.raises(ValueError, match="v_information_form must be one of"):
        fit_linear_probes(train, held, [1.0], v_information_form="bits")


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch")] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_probe_stats_of_an_empty_chunk_are_zeros(backend, device, dtype):
    """N = 0 on every backend: zero statistics of the right shapes and dtype."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernel computes in float32")
    _check_backend(backend, device)
    x, z = torch.zeros(0, 5, dtype=dtype, device=device), torch.zeros(0, 3, dtype=dtype, device=device)
    got = probe_stats(x, z, backend=backend)
    assert [tuple(t.shape) for t in got] == [(5, 5), (5, 3), (5,), (3,), (3,)]
    assert all(t.dtype == dtype and t.device.type == device and not t.any() for t in got)


# --------------------------------------------------------------------------- V-information forms


def test_v_information_forms_by_hand():
    """One feature x = 0, 1, 2, 3 on both splits; on train z = x, so a (nearly) unpenalized
    probe predicts z = x. Held-out targets:
      a: z = 0, 2, 1, 3  SSE = 0 + 1 + 1 + 0 = 2, SST around its mean 1.5 = 5, R^2 = 0.6;
      b: z = 3, 2, 1, 0  SSE = 9 + 1 + 1 + 9 = 20, R^2 = 1 - 20/5 = -3 (worse than a constant);
      c: z = x           R^2 = 1 (perfectly decodable).
    Fixed-variance Gaussian family (the paper's form): I_V = Var(z) R^2 clipped at 0, reported
    in units of Var z: a 0.6, b 0. Learned variance: the best variance is the MSE, so
    I_V = 1/2 log(Var z / MSE) = -1/2 log(1 - R^2) nats: a -1/2 log 0.4 = 0.458145 nats,
    b 0 (clipped), c finite (1 - R^2 floored at float64 eps: at most 1/2 log(1/eps) = 18.0)."""
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    zt = x.repeat(1, 3)
    zh = torch.tensor([[0.0, 3.0, 0.0], [2.0, 2.0, 1.0], [1.0, 1.0, 2.0], [3.0, 0.0, 3.0]], dtype=torch.float64)
    r2 = fit_probes(x, zt, x, zh, [1e-10])
    nats = fit_probes(x, zt, x, zh, [1e-10], v_information_form="gaussian-nats")
    assert r2.v_information_form == "r2" and nats.v_information_form == "gaussian-nats"
    torch.testing.assert_close(r2.r2[:2], torch.tensor([0.6, -3.0], dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(nats.r2, r2.r2)  # same probes, only the V-information differs
    torch.testing.assert_close(r2.v_information[:2], torch.tensor([0.6, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-8)
    assert float(nats.v_information[0]) == pytest.approx(0.4581453659, abs=1e-8)
    assert float(nats.v_information[1]) == 0.0
    assert 10.0 < float(nats.v_information[2]) <= 0.5 * np.log(1 / np.finfo(np.float64).eps) + 1e-9


def test_v_information_from_r2_is_monotone_and_agrees_at_small_r2():
    from shortcut_fast.ops.probe_stats import v_information_from_r2

    r2 = torch.tensor([-0.5, 0.0, 0.01, 0.5, 0.75, 0.99, 1.0], dtype=torch.float64)
    nats = v_information_from_r2(r2, "gaussian-nats")
    assert bool((nats[1:] >= nats[:-1]).all()) and float(nats[0]) == 0.0 == float(nats[1])
    assert float(nats[4]) == pytest.approx(np.log(2))  # R^2 = 3/4: MSE = Var/4, 1/2 log 4 nats
    assert float(nats[2]) == pytest.approx(0.005, rel=0.01)  # -1/2 log(1 - r) ~ r/2 for small r
    torch.testing.assert_close(v_information_from_r2(r2, "r2"), r2.clamp_min(0))
