"""V-information of 10,000 targets from one layer: fused statistics + closed-form ridge vs
scikit-learn.

Task (docs/experiments.md#feature-complexity): for every target k, ridge probes x -> z_k with intercept for
every alpha of one grid, alpha chosen per target by held-out error, held-out R^2 reported.
- fast path: ops.probe_stats.accumulate_probe_stats on the train and held-out splits (one GEMM
  pass each) + fit_linear_probes (one eigendecomposition for every alpha and target).
- baseline (a): a Python loop of sklearn Ridge, one fit per (target, alpha), scored on the
  held-out split; timed on a subset of targets and scaled linearly to all of them (each
  target is independent work; the row records from how many it was extrapolated).
- baseline (b): sklearn RidgeCV(alphas, alpha_per_target=True) on all targets at once, which
  picks alpha by leave-one-out on the train split; its held-out R^2 is computed from its
  predictions. Equality: our R^2 at the alpha sklearn chose equals sklearn's held-out R^2
  (max difference recorded, checked <= 1e-4 before timing).
- baseline (c), the peer a user would pick for thousands of targets: himalaya's
  RidgeCV(alphas, fit_intercept=True, cv=PredefinedSplit(train | held-out)), per-target
  alpha chosen on the SAME held-out split, scored by R^2, on its torch backend (torch_cuda on
  a GPU). Checked first: its chosen alpha per target is ours (or a tie within 1e-4 of R^2)
  and its held-out R^2 at that alpha equals ours (<= 1e-4). Its fit also refits every target
  on train + held-out at the chosen alpha (its API always does), work we do not do: the
  row says so. Skipped with a note in the other rows when himalaya is not installed
  (`pip install himalaya`; the GPU machines have no registry).
GPU extra: TFLOP/s of the statistics phase (2 N D (D + K) flops per split) against the tf32
tensor-core peak of the GPU (bench/roofline.py PEAKS; None for an unknown one); float32 data, torch's default matmul
precision unless the row says tf32.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from shortcut_fast.bench.common import BenchRow, record, time_cpu, time_cuda
from shortcut_fast.bench.roofline import peak_flops
from shortcut_fast.ops.probe_stats import accumulate_probe_stats, fit_linear_probes

ALPHA_FACTORS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times N: one grid for every method
CHUNK = 8192  # rows per statistics call (bench/occupancy.py reads it too)


def _data(n_train: int, n_heldout: int, D: int, K: int, device: str, seed: int = 0):
    """Correlated, offset features and targets with R^2 spread over (0, 1) and some dead ones."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = n_train + n_heldout
    mixing = torch.randn(D, D, generator=g, device=device) / D ** 0.5
    x = torch.randn(n, D, generator=g, device=device) @ mixing + 0.5  # not centred
    w = torch.randn(D, K, generator=g, device=device) / D ** 0.5
    snr = torch.logspace(-1.5, 1.5, K, device=device)[torch.randperm(K, generator=g, device=device)]
    z = x @ w * snr + torch.randn(n, K, generator=g, device=device) + 3.0
    return x[:n_train], z[:n_train], x[n_train:], z[n_train:]


def _fast(x_tr, z_tr, x_he, z_he, alphas, chunk):
    train = accumulate_probe_stats(x_tr, z_tr, chunk_size=chunk, dtype=torch.float32)
    heldout = accumulate_probe_stats(x_he, z_he, chunk_size=chunk, dtype=torch.float32)
    return fit_linear_probes(train, heldout, alphas)


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    y, pred = y.astype(np.float64), pred.astype(np.float64)
    sst = ((y - y.mean(0)) ** 2).sum(0)
    return 1 - ((y - pred) ** 2).sum(0) / sst


def _ridge_loop(x_tr, z_tr, x_he, z_he, alphas, targets):
    """Per target, per alpha: Ridge fit, held-out R^2; the best alpha's R^2 per target."""
    from sklearn.linear_model import Ridge

    best = np.full(len(targets), -np.inf)
    for j, k in enumerate(targets):
        for alpha in alphas:
            model = Ridge(alpha=float(alpha)).fit(x_tr, z_tr[:, k])
            best[j] = max(best[j], float(_r2(z_he[:, k:k + 1], model.predict(x_he)[:, None])[0]))
    return best


def _himalaya(x_tr, z_tr, x_he, z_he, alphas: np.ndarray, device: str):
    """himalaya RidgeCV with per-target alpha on the predefined (train | held-out) split:
    (fit function, its chosen alphas (K,), its held-out R^2 at them (K,)), or None when
    himalaya is not installed."""
    try:
        from himalaya.backend import get_backend, set_backend
        from himalaya.ridge import RidgeCV as HimalayaRidgeCV
        from himalaya.scoring import r2_score as himalaya_r2
    except ImportError:
        return None
    from sklearn.model_selection import PredefinedSplit

    previous = get_backend().name
    set_backend("torch_cuda" if device == "cuda" else "torch", on_error="raise")
    x_all, z_all = torch.cat([x_tr, x_he]), torch.cat([z_tr, z_he])
    split = PredefinedSplit(np.r_[np.full(len(x_tr), -1), np.zeros(len(x_he), dtype=int)])
    model = HimalayaRidgeCV(alphas=alphas, fit_intercept=True, cv=split,
                            solver_params=dict(score_func=himalaya_r2))

    def fit():
        model.fit(x_all, z_all)
        if device == "cuda":
            torch.cuda.synchronize()
        return model

    try:
        fit()
        chosen = np.asarray(torch.as_tensor(model.best_alphas_).cpu(), dtype=np.float64)
        scores = np.asarray(torch.as_tensor(model.cv_scores_).cpu(), dtype=np.float64)
    finally:
        set_backend(previous)

    def timed():
        set_backend("torch_cuda" if device == "cuda" else "torch")
        try:
            return fit()
        finally:
            set_backend(previous)

    return timed, chosen, scores


def settings(device: str, quick: bool) -> tuple[int, int, int, int, int]:
    """(n_train, n_heldout, D, K, loop_targets) (bench/roofline.py reads them too)."""
    if quick:
        return 2000, 1000, 64, 500, 20
    if device == "cuda":
        return 50_000, 10_000, 2048, 10_000, 4
    # CPU sizes scaled down from the GPU's (N = 50,000, D = 2048); RidgeCV keeps several
    # float64 (N, K) arrays alive (about 5 GB here), which bounds N on a 24 GB machine.
    return 10_000, 2_500, 512, 10_000, 25


def run(device: str = "cpu", quick: bool = False):
    from sklearn.linear_model import RidgeCV

    n_train, n_heldout, D, K, loop_targets = settings(device, quick)
    chunk = CHUNK
    x_tr, z_tr, x_he, z_he = _data(n_train, n_heldout, D, K, device)
    alphas = torch.tensor(ALPHA_FACTORS, dtype=torch.float64) * n_train
    sizes = dict(n_train=n_train, n_heldout=n_heldout, D=D, K=K, alphas=len(alphas))

    probes = _fast(x_tr, z_tr, x_he, z_he, alphas, chunk)  # warm-up and the answer
    X_tr, Z_tr, X_he, Z_he = (t.cpu().numpy() for t in (x_tr, z_tr, x_he, z_he))

    # (b) RidgeCV multi-target, one run (minutes at full size).
    t = time.perf_counter()
    cv = RidgeCV(alphas=alphas.numpy(), alpha_per_target=True).fit(X_tr, Z_tr)
    cv_r2 = _r2(Z_he, cv.predict(X_he))
    cv_ms = (time.perf_counter() - t) * 1e3
    chosen = np.searchsorted(alphas.numpy(), np.asarray(cv.alpha_).reshape(-1))
    ours_at_cv = probes.r2_grid.cpu().numpy()[np.arange(K), chosen]
    cv_diff = float(np.abs(ours_at_cv - cv_r2).max())

    # (a) the per-target loop on a subset, the same alpha grid, best held-out R^2.
    subset = np.linspace(0, K - 1, loop_targets).astype(int)
    t = time.perf_counter()
    loop_r2 = _ridge_loop(X_tr, Z_tr, X_he, Z_he, alphas.numpy(), subset)
    loop_ms = (time.perf_counter() - t) * 1e3 * K / loop_targets
    loop_diff = float(np.abs(probes.r2.cpu().numpy()[subset] - loop_r2).max())
    # (c) himalaya RidgeCV on the same held-out split and alphas.
    peer = _himalaya(x_tr, z_tr, x_he, z_he, alphas.numpy(), device)
    him_diff = him_alpha_mismatch = None
    if peer is not None:
        him_fit, him_alphas, him_r2 = peer
        grid = probes.r2_grid.cpu().numpy()
        idx = np.abs(np.log(him_alphas[:, None]) - np.log(alphas.numpy()[None, :])).argmin(1)
        # Same alpha, or a tie: our R^2 at their alpha within 1e-4 of our best.
        him_alpha_mismatch = int((np.abs(grid[np.arange(K), idx] - probes.r2.cpu().numpy()) > 1e-4).sum())
        him_diff = float(np.abs(grid[np.arange(K), idx] - him_r2).max())
        if him_alpha_mismatch:
            raise AssertionError(f"himalaya RidgeCV chose another alpha than ours for {him_alpha_mismatch} targets")
    for name, diff in (("RidgeCV", cv_diff), ("Ridge loop", loop_diff), ("himalaya RidgeCV", him_diff)):
        if diff is None:
            continue
        if not diff <= 1e-4:
            raise AssertionError(f"held-out R^2 differs from sklearn {name} by {diff:.3g} (> 1e-4)")

    fn = lambda: _fast(x_tr, z_tr, x_he, z_he, alphas, chunk)  # noqa: E731
    timing = time_cuda(fn) if device == "cuda" else time_cpu(fn, min_runs=3, min_seconds=0.0)
    achieved = {"max_r2_diff_vs_RidgeCV": cv_diff, "max_r2_diff_vs_loop": loop_diff,
                "r2_range": [float(probes.r2.min()), float(probes.r2.max())]}
    if peer is None:
        achieved["himalaya"] = "skipped: not installed (pip install himalaya)"
    else:
        achieved["max_r2_diff_vs_himalaya"] = him_diff
    if device == "cuda":
        flops = 2 * (n_train + n_heldout) * D * (D + K)
        peak = peak_flops(torch.cuda.get_device_name(), "tf32")
        for tf32 in (False, True):
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                stats = time_cuda(lambda: (accumulate_probe_stats(x_tr, z_tr, chunk_size=chunk),
                                           accumulate_probe_stats(x_he, z_he, chunk_size=chunk)))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            key = "tf32" if tf32 else "fp32"
            achieved[f"stats_ms_{key}"] = stats.median_ms
            achieved[f"stats_TFLOP/s_{key}"] = flops / stats.median_ms / 1e9
            achieved[f"stats_fraction_of_tf32_peak_{key}"] = (flops / (stats.median_ms * 1e-3) / peak
                                                                  if peak else None)
    common = dict(workload="vinfo_probes", sizes=sizes, dtype="float32", backend="auto",
                  median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, quick=quick)
    rows = [
        record(BenchRow(baseline=f"sklearn Ridge per (target, alpha), held-out selection; extrapolated "
                                 f"linearly from {loop_targets} of {K} targets",
                        baseline_ms=loop_ms, ratio=loop_ms / timing.median_ms,
                        achieved={**achieved, "loop_targets_timed": loop_targets}, **common), device),
        record(BenchRow(baseline="sklearn RidgeCV(alphas, alpha_per_target=True), all targets",
                        baseline_ms=cv_ms, ratio=cv_ms / timing.median_ms, achieved=achieved, **common), device),
    ]
    if peer is not None:
        import himalaya

        him = time_cpu(peer[0], min_runs=3, min_seconds=0.0) if device != "cuda" else time_cuda(peer[0])
        rows.append(record(BenchRow(
            baseline=f"himalaya {himalaya.__version__} RidgeCV(alphas, fit_intercept=True, cv=PredefinedSplit), "
                     f"per-target alpha on the same held-out split, torch backend (its fit also refits "
                     f"on train + held-out)",
            baseline_ms=him.median_ms, ratio=him.median_ms / timing.median_ms, achieved=achieved, **common), device))
    return rows
