"""Feature directions: NMF, non-negative codes, PCA and directions loaded from files."""
import numpy as np
import pytest
import torch

from shortcut_fast.ops.directions import Directions, fit_directions, load_directions, nmf, nnls_codes, pca


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest)


def _planted(N=300, k=5, D=40, seed=123):
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(N, k, generator=g)
    # Sparse-ish non-negative atoms, so the factorization is (nearly) identifiable.
    dictionary = torch.rand(k, D, generator=g) * (torch.rand(k, D, generator=g) < 0.5)
    return codes, dictionary, codes @ dictionary


@pytest.mark.parametrize("init", ["nndsvd", "random"])
def test_nmf_reconstructs_planted_low_rank(init):
    codes, dictionary, A = _planted()
    r = nmf(A, 5, iters=400, tol=0, init=init, seed=7)
    assert r.codes.shape == (300, 5) and r.dictionary.shape == (5, 40) and r.iters == 400
    assert bool((r.codes >= 0).all()) and bool((r.dictionary >= 0).all())
    rel = float((A - r.codes @ r.dictionary).norm() / A.norm())
    assert rel < 0.03
    # Multiplicative updates never increase the loss (up to float32 rounding).
    h = r.history
    assert bool((h[1:] <= h[:-1] * (1 + 1e-5) + 1e-9).all())
    assert r.loss == pytest.approx(float(((A - r.codes @ r.dictionary) ** 2).mean()), rel=1e-3)
    torch.testing.assert_close(r.dictionary.norm(dim=1), torch.ones(5))  # unit-norm atoms


def test_nmf_recovers_the_planted_atoms():
    codes, dictionary, A = _planted()
    r = nmf(A, 5, iters=1000, tol=0)
    unit = dictionary / dictionary.norm(dim=1, keepdim=True)
    cosine = r.dictionary @ unit.T  # (5, 5): each planted atom matched by one learned atom
    assert float(cosine.max(0).values.min()) > 0.95


def test_nmf_tol_stops_early_and_overcomplete_and_zero():
    _, _, A = _planted(N=60, D=12)
    r = nmf(A, 3, iters=1000, tol=1e-3)
    assert r.iters < 1000 and len(r.history) == r.iters
    over = nmf(A, 20, iters=50)  # more atoms than dimensions: allowed (overcomplete dictionary)
    assert over.dictionary.shape == (20, 12) and bool((over.codes >= 0).all())
    assert over.loss < nmf(A, 2, iters=50).loss
    zero = nmf(torch.zeros(4, 3), 2)
    assert zero.loss == 0 and not zero.codes.any()


def test_nnls_codes_recover_planted_codes():
    codes, dictionary, A = _planted()
    torch.testing.assert_close(nnls_codes(A, dictionary), codes, rtol=0, atol=1e-4)
    # With noise the constraint binds: compare with scipy's active-set NNLS.
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(1)
    noisy = (A[:40] + 0.3 * torch.randn(40, 40, generator=g)).clamp_min(0)
    got = nnls_codes(noisy, dictionary, iters=500)
    want = np.stack([optimize.nnls(dictionary.double().numpy().T, a)[0] for a in noisy.double().numpy()])
    assert bool((got >= 0).all()) and bool((got == 0).any())
    np.testing.assert_allclose(got.numpy(), want, atol=2e-3)


def test_nnls_codes_overcomplete_dictionary_is_a_valid_minimizer():
    g = torch.Generator().manual_seed(2)
    dictionary = torch.rand(8, 5, generator=g)
    A = torch.rand(20, 5, generator=g)
    Z = nnls_codes(A, dictionary, iters=2000)
    grad = (Z @ dictionary - A) @ dictionary.T  # KKT: grad >= 0, and grad = 0 where Z > 0
    assert bool((Z >= 0).all())
    assert float(grad.min()) > -1e-3
    assert float((grad * Z).abs().max()) < 1e-3


def test_pca_matches_svd_and_sklearn():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(200, 10, generator=g) @ torch.randn(10, 10, generator=g) + 3
    comps, mean, var = pca(A, 4)
    assert comps.shape == (4, 10) and mean.shape == (10,) and var.shape == (4,)
    torch.testing.assert_close(comps @ comps.T, torch.eye(4), rtol=0, atol=1e-5)
    _, S, Vh = torch.linalg.svd((A - A.mean(0)).double(), full_matrices=False)
    torch.testing.assert_close((comps.double() * Vh[:4]).sum(1).abs(), torch.ones(4, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    decomposition = pytest.importorskip("sklearn.decomposition")
    ref = decomposition.PCA(4).fit(A.numpy())
    signs = np.sign((comps.numpy() * ref.components_).sum(1, keepdims=True))
    np.testing.assert_allclose(comps.numpy(), signs * ref.components_, atol=1e-4)
    np.testing.assert_allclose(var.numpy(), ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(mean.numpy(), ref.mean_, rtol=1e-5, atol=1e-5)


def _components(k=3, D=6):
    return torch.randn(k, D, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("ext", [".pt", ".pth", ".npy", ".npz", ".csv"])
def test_load_directions_round_trips(tmp_path, ext):
    comps = _components()
    path = tmp_path / f"dirs{ext}"
    if ext in (".pt", ".pth"):
        torch.save(comps, path)
    elif ext == ".npy":
        np.save(path, comps.numpy())
    elif ext == ".npz":
        np.savez(path, components=comps.numpy(), other=np.zeros(2))
    else:
        np.savetxt(path, comps.numpy(), delimiter=",", fmt="%.9g")
    got = load_directions(path, 6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, comps)
    d = fit_directions(str(path), torch.randn(5, 6))
    assert d.kind == "file"
    A = torch.randn(5, 6)
    torch.testing.assert_close(d.encode(A), A @ comps.T)


def test_load_directions_single_vector_and_state_dict_file(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(6.0))
    assert load_directions(tmp_path / "v.npy", 6).shape == (1, 6)
    d = Directions("pca", _components(), mean=torch.zeros(6))
    torch.save(d.state_dict(), tmp_path / "d.pt")
    torch.testing.assert_close(load_directions(tmp_path / "d.pt", 6), d.components)


def test_directions_encode_and_state_dict_round_trip():
    codes, dictionary, A_pos = _planted(N=50, k=4, D=16)
    nmf_dirs = fit_directions("nmf:4", A_pos, seed=0, iters=300)
    fitted = nmf(A_pos, 4, iters=300, seed=0)
    assert nmf_dirs.kind == "nmf" and nmf_dirs.components.shape == (4, 16)
    torch.testing.assert_close(nmf_dirs.components, fitted.dictionary)
    z = nmf_dirs.encode(A_pos)
    assert z.shape == (50, 4) and bool((z >= 0).all())
    # The NNLS codes are optimal for the fixed dictionary: no worse than NMF's own codes.
    err = float(((A_pos - z @ nmf_dirs.components) ** 2).mean())
    assert err <= fitted.loss * (1 + 1e-4) and err < 0.01 * float((A_pos ** 2).mean())
    pca_dirs = fit_directions("pca:3", A_pos)
    comps, mean, _ = pca(A_pos, 3)
    torch.testing.assert_close(pca_dirs.encode(A_pos), (A_pos - mean) @ comps.T)
    for d in (nmf_dirs, pca_dirs):
        back = Directions.from_state_dict(d.state_dict())
        assert back.kind == d.kind
        torch.testing.assert_close(back.encode(A_pos), d.encode(A_pos))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: nmf(-torch.ones(3, 2), 2), ValueError, "A must be non-negative"),
    (lambda: nmf(torch.ones(3), 2), ValueError, r"A must have shape \(N, D\)"),
    (lambda: nmf(torch.ones(3, 2), 0), ValueError, "k must be an int >= 1"),
    (lambda: nmf(torch.ones(3, 2), 2, init="svd"), ValueError, "init must be"),
    (lambda: nmf(torch.full((3, 2), float("nan")), 2), ValueError, "A contains 6 NaN"),
    (lambda: nmf(torch.ones(3, 2), 2, solver="als"), ValueError, "solver must be one of"),
    (lambda: nmf(torch.ones(3, 2), 2, chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (lambda: nnls_codes(torch.ones(3, 4), torch.ones(2, 5)), ValueError, r"dictionary must have shape \(k, 4\)"),
    (lambda: nnls_codes(torch.ones(3, 4), torch.ones(2, 4), solver="mu"), ValueError, "solver must be one of"),
    (lambda: pca(torch.ones(3, 4), 5), ValueError, r"k must be <= min\(N, D\) = 3"),
    (lambda: load_directions("/nonexistent/d.npy", 4), FileNotFoundError, "does not exist"),
    (lambda: fit_directions("nmf:x", torch.ones(3, 4)), ValueError, "count after ':' must be an int >= 1"),
    (lambda: fit_directions("pca:0", torch.ones(3, 4)), ValueError, "count after ':' must be an int >= 1"),
    (lambda: fit_directions("ica:3", torch.ones(3, 4)), ValueError, "directions spec must be 'nmf:K'"),
    (lambda: fit_directions(3, torch.ones(3, 4)), TypeError, "spec must be"),
    (lambda: Directions("sae", torch.ones(2, 3)), ValueError, "kind must be one of"),
    (lambda: Directions("pca", torch.ones(2, 3)), ValueError, "mean is required"),
    (lambda: Directions("file", torch.ones(2, 3)).encode(torch.ones(4, 5)), ValueError, "A must have 3 columns"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_load_directions_wrong_shape_or_format(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"must have shape \(k, 6\).*got shape \(3, 5\)"):
        load_directions(tmp_path / "d.npy", 6)
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 6)), b=np.zeros((2, 6)))
    with pytest.raises(ValueError, match="name one 'components'"):
        load_directions(tmp_path / "two.npz", 6)
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(ValueError, match=r"must end in .pt"):
        load_directions(tmp_path / "d.txt", 2)
    torch.save({"weights": torch.zeros(2, 6)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="without a 'components' entry"):
        load_directions(tmp_path / "bad.pt", 6)


def test_large_dictionary_step_size_bounds_the_spectrum():
    """Above 1024 atoms the Lipschitz constant comes from a power iteration: it must stay an
    upper bound of lambda_max (else FISTA diverges) and be close to it (else it crawls)."""
    from shortcut_fast.ops.directions import _largest_eigenvalue

    g = torch.Generator().manual_seed(5)
    dictionary = torch.rand(1100, 16, generator=g) * (torch.rand(1100, 16, generator=g) < 0.3)
    G = dictionary @ dictionary.T
    exact = float(torch.linalg.eigvalsh(G.double()).max())
    assert exact * (1 - 1e-4) <= _largest_eigenvalue(G) <= 1.1 * exact * (1 + 1e-4)
    A = torch.rand(30, 16, generator=g)
    Z = nnls_codes(A, dictionary, iters=300)
    assert bool(torch.isfinite(Z).all()) and bool((Z >= 0).all())
    loss = float(((Z @ dictionary - A) ** 2).mean())
    assert loss < float(((nnls_codes(A, dictionary, iters=5) @ dictionary - A) ** 2).mean())


# ---------------------------------------------------------------------------------------
# HALS (the default NMF solver) and overcomplete dictionaries


@pytest.mark.parametrize("block", [1, 2])
def test_hals_sweep_is_exact_coordinate_descent_by_hand(block):
    """min_x ||r - x B||^2 with r = (3, 1), atoms b1 = (1, 0), b2 = (1, 1), from x = 0.
    Coordinate 1 alone: x1 = <r, b1> / |b1|^2 = 3. Then the residual is (0, 1) and
    coordinate 2 alone: x2 = <(0, 1), b2> / |b2|^2 = 1/2. In the sweep's terms
    P = r B^T = (3, 4), G = B B^T = [[1, 1], [1, 2]]; a block of both columns must give the
    same numbers as one column at a time (the within-block coupling is sequential)."""
    from shortcut_fast.ops.directions import _hals_sweep

    X = torch.zeros(1, 2)
    _hals_sweep(X, torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0], [1.0, 2.0]]), block=block)
    assert X.tolist() == [[3.0, 0.5]]
    # A negative step is clipped at 0: with r = (-1, 0) coordinate 1 wants -1.
    X = torch.zeros(1, 2)
    _hals_sweep(X, torch.tensor([[-1.0, -1.0]]), torch.tensor([[1.0, 1.0], [1.0, 2.0]]), block=block)
    assert X.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("N,k,D", [(300, 5, 40), (200, 30, 20)], ids=["undercomplete", "overcomplete"])
def test_hals_reaches_a_lower_error_than_multiplicative_updates_in_the_same_iterations(N, k, D):
    _, _, A = _planted(N=N, k=k, D=D)
    for iters in (10, 30):
        hals = nmf(A, k, iters=iters, tol=0, solver="hals")
        mu = nmf(A, k, iters=iters, tol=0, solver="mu")
        assert hals.iters == mu.iters == iters and hals.solver == "hals" and mu.solver == "mu"
        assert hals.loss < 0.5 * mu.loss, (iters, hals.loss, mu.loss)
        # History is the exact reconstruction error, and never increases (exact coordinate descent).
        assert hals.loss == pytest.approx(float(((A - hals.codes @ hals.dictionary) ** 2).mean()), rel=1e-3)
        assert bool((hals.history[1:] <= hals.history[:-1] * (1 + 1e-5) + 1e-9).all())


def test_nmf_streams_rows_in_chunks():
    """Rows are independent in the codes' sweep: chunks of 7 rows give the factorization of
    one chunk (up to float summation order in the Gram matrices)."""
    _, _, A = _planted(N=50, k=4, D=16)
    whole = nmf(A, 6, iters=3, tol=0)
    chunked = nmf(A, 6, iters=3, tol=0, chunk_size=7)
    torch.testing.assert_close(chunked.codes, whole.codes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.dictionary, whole.dictionary, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.history, whole.history, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("solver", ["fista", "hals"])
def test_nnls_solvers_match_scipy_and_chunks(solver):
    optimize = pytest.importorskip("scipy.optimize")
    _, dictionary, A = _planted()
    g = torch.Generator().manual_seed(1)
    noisy = (A[:40] + 0.3 * torch.randn(40, 40, generator=g)).clamp_min(0)
    got = nnls_codes(noisy, dictionary, iters=500, solver=solver)
    want = np.stack([optimize.nnls(dictionary.double().numpy().T, a)[0] for a in noisy.double().numpy()])
    np.testing.assert_allclose(got.numpy(), want, atol=2e-3)
    torch.testing.assert_close(nnls_codes(noisy, dictionary, iters=500, solver=solver, chunk_size=7), got,
                               rtol=1e-4, atol=1e-5)


def test_nnls_hals_overcomplete_is_a_valid_minimizer():
    g = torch.Generator().manual_seed(2)
    dictionary = torch.rand(8, 5, generator=g)
    A = torch.rand(20, 5, generator=g)
    Z = nnls_codes(A, dictionary, iters=500, solver="hals")
    grad = (Z @ dictionary - A) @ dictionary.T  # KKT: grad >= 0, and grad = 0 where Z > 0
    assert bool((Z >= 0).all())
    assert float(grad.min()) > -1e-3
    assert float((grad * Z).abs().max()) < 1e-3
