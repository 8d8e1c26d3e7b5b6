"""Feature directions in a layer's activation space (docs/experiments.md#feature-complexity).

A feature is a direction d_i in the (penultimate) activation space and a sample's feature
value z_i its coefficient along it:
  nmf   A ~ Z D with Z, D >= 0 (post-ReLU activations are non-negative); new samples are
        encoded by non-negative least squares against the fixed dictionary D.
  pca   the top principal directions; z = (a - mean) @ components.T.
  file  directions given by the user; z = a @ components.T.
Everything is dense matrix algebra in float32 on the activations' device (GPU-friendly,
no Python loops over samples). An overcomplete dictionary (the paper's 10,000 atoms on a
2048-d layer) stays within memory: NMF and NNLS stream the rows of A in chunks, so beyond
A, the codes and the dictionary they hold two (k, k) Gram matrices and (chunk, k) blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from shortcut_fast.ops._checks import FLOAT_DTYPES, check_finite, check_int, check_tensor

_EPS = 1e-12
KINDS = ("nmf", "pca", "file")


def _activations(name: str, A, *, nonneg: bool = False) -> torch.Tensor:
    check_tensor(name, A, ndim=2, shape_doc="(N, D)", dtypes=FLOAT_DTYPES)
    if A.shape[0] < 1 or A.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(A.shape)}")
    check_finite(name, A)
    A = A.float()
    if nonneg and not torch.compiler.is_compiling():
        lo = float(A.min())
        if lo < 0:
            raise ValueError(f"{name} must be non-negative for NMF (e.g. post-ReLU activations), "
                             f"got a minimum of {lo:.4g}; use pca or shift the data")
    return A


# ---------------------------------------------------------------------------------------
# NMF

NMF_SOLVERS = ("hals", "mu")
NNLS_SOLVERS = ("fista", "hals")
_HALS_BLOCK = 128  # components per GEMM block of a HALS sweep


@dataclass
class NMFResult:
    """A ~ codes @ dictionary. loss: final mean squared reconstruction error per entry;
    history: that error after each iteration (non-increasing: both solvers are descent methods)."""

    codes: torch.Tensor  # (N, k) >= 0
    dictionary: torch.Tensor  # (k, D) >= 0
    loss: float
    history: torch.Tensor = field(repr=False)
    iters: int = 0
    solver: str = "hals"


def _nndsvd(A: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD initialization (Boutsidis & Gallopoulos 2008), zeros filled with the mean of A
    ("nndsvda": multiplicative updates can never move an exact zero). Components beyond the
    rank of the SVD (an overcomplete dictionary, k > min(N, D)) start random."""
    N, D = A.shape
    r = min(k, N, D)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    W = torch.empty(N, k, device=A.device)
    H = torch.empty(k, D, device=A.device)
    W[:, 0] = S[0].sqrt() * U[:, 0].abs()
    H[0] = S[0].sqrt() * Vh[0].abs()
    if r > 1:
        u, v = U[:, 1:], Vh[1:].T  # (N, r-1), (D, r-1)
        up, un, vp, vn = u.clamp_min(0), (-u).clamp_min(0), v.clamp_min(0), (-v).clamp_min(0)
        pos = up.norm(dim=0) * vp.norm(dim=0)
        neg = un.norm(dim=0) * vn.norm(dim=0)
        use_pos = pos >= neg
        uu = torch.where(use_pos, up, un) / torch.where(use_pos, up.norm(dim=0), un.norm(dim=0)).clamp_min(_EPS)
        vv = torch.where(use_pos, vp, vn) / torch.where(use_pos, vp.norm(dim=0), vn.norm(dim=0)).clamp_min(_EPS)
        scale = (S[1:] * torch.where(use_pos, pos, neg)).sqrt()
        W[:, 1:r] = uu * scale
        H[1:r] = (vv * scale).T
    del U, Vh
    if k > r:
        W[:, r:], H[r:] = _random_init(A, k - r, generator)
    fill = A.mean()
    W[W < _EPS] = fill
    H[H < _EPS] = fill
    return W, H


def _random_init(A: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Scaled so that W @ H has the mean of A (as scikit-learn does).
    scale = (A.mean() / k).sqrt().item()
    W = torch.rand(A.shape[0], k, generator=generator).to(A.device) * scale
    H = torch.rand(k, A.shape[1], generator=generator).to(A.device) * scale
    return W, H


def _hals_sweep(X: torch.Tensor, P: torch.Tensor, G: torch.Tensor, block: int = _HALS_BLOCK) -> None:
    """One exact coordinate-descent (HALS) sweep, in place, over the K columns of X (M, K) >= 0
    for min_X ||R - X B||^2, given only P = R B^T (M, K) and G = B B^T (K, K): column j becomes
        X[:, j] = max(0, X[:, j] + (P[:, j] - X @ G[:, j]) / G[j, j]).
    The same sweep serves the codes (X = W, B = H), the dictionary (X = H^T, B = W^T) and the
    NNLS codes of new rows; rows of X are independent, so callers may pass row chunks.
    Columns are visited in blocks: what the rest of X contributes to a block is one GEMM
    (X @ G[:, blk] - X_blk @ G[blk, blk]); only the within-block b x b coupling is resolved
    column by column (on the block's transpose, so every update reads contiguous rows)."""
    K = X.shape[1]
    # A dead component (G[j, j] = 0) has P[:, j] = 0 and G[:, j] = 0: its step is 0, it stays.
    diag = torch.diagonal(G).clamp_min(_EPS)
    for b0 in range(0, K, block):
        blk = slice(b0, min(b0 + block, K))
        G_bb = G[blk, blk]
        Xt = X[:, blk].T.contiguous()  # (b, M)
        # Gradient target of the block with every column outside it held at its current value.
        Rt = (P[:, blk] - X @ G[:, blk]).T + G_bb.T @ Xt  # (b, M)
        d = diag[blk]
        for j in range(Xt.shape[0]):
            Xt[j] = (Xt[j] + (Rt[j] - G_bb[:, j] @ Xt) / d[j]).clamp_min_(0)
        X[:, blk] = Xt.T


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _nmf_hals(A, W, H, iters, tol, chunk_size):
    """HALS (Cichocki & Phan 2009; scikit-learn's 'cd' solver is the same coordinate descent)
    with the rows of A streamed in chunks: per iteration one sweep over the dictionary's
    components, then one over the codes chunk by chunk, accumulating W^T W and A^T W for the
    next dictionary sweep and the exact residual for the history. Peak extra memory beyond
    A, W, H: two (k, k) Gram matrices, one (k, D) and a (chunk_size, k) block."""
    N, D = A.shape
    WtW = torch.zeros(W.shape[1], W.shape[1], device=A.device)
    AtW = torch.zeros(D, W.shape[1], device=A.device)
    for rows in _chunks(N, chunk_size):
        WtW.addmm_(W[rows].T, W[rows])
        AtW.addmm_(A[rows].T, W[rows])
    history, prev, done = [], None, 0
    for done in range(1, iters + 1):
        Ht = H.T.contiguous()
        _hals_sweep(Ht, AtW, WtW)
        H = Ht.T.contiguous()
        del Ht
        HHt = H @ H.T
        WtW.zero_()
        AtW.zero_()
        sse = torch.zeros((), dtype=torch.float64, device=A.device)
        for rows in _chunks(N, chunk_size):
            Wc = W[rows]  # a view: the sweep writes W in place
            _hals_sweep(Wc, A[rows] @ H.T, HHt)
            WtW.addmm_(Wc.T, Wc)
            AtW.addmm_(A[rows].T, Wc)
            sse += ((A[rows] - Wc @ H) ** 2).sum(dtype=torch.float64)
        del HHt
        loss = (sse / (N * D)).float()
        history.append(loss)
        if prev is not None and (prev - loss) <= tol * prev:
            break
        prev = loss
    return W, H, history, done


def _nmf_mu(A, W, H, iters, tol):
    """Lee & Seung multiplicative updates (all components at once; slow to converge)."""
    history, prev, done = [], None, 0
    for done in range(1, iters + 1):
        H = H * (W.T @ A) / ((W.T @ W) @ H).clamp_min(_EPS)
        W = W * (A @ H.T) / (W @ (H @ H.T)).clamp_min(_EPS)
        loss = ((A - W @ H) ** 2).mean()
        history.append(loss)
        if prev is not None and (prev - loss) <= tol * prev:
            break
        prev = loss
    return W, H, history, done


def nmf(A: torch.Tensor, k: int, *, iters: int = 200, tol: float = 1e-4, seed: int = 0,
        init: str = "nndsvd", solver: str = "hals", chunk_size: int = 4096) -> NMFResult:
    """Non-negative matrix factorization A (N, D) >= 0 ~ codes (N, k) @ dictionary (k, D),
    Frobenius loss, on A's device (a GPU runs every GEMM of it).

    solver "hals" (default): exact block coordinate descent, one component at a time with
    the rest fixed (a closed-form, clipped step per component), GEMM-blocked, rows of A
    streamed chunk_size at a time; it reaches a much lower error than "mu" in the same
    number of iterations. "mu": Lee & Seung multiplicative updates
        D <- D * (Z^T A) / (Z^T Z D),   Z <- Z * (A D^T) / (Z D D^T)
    (dense, unchunked; kept for comparison). Stops after `iters` iterations or when the
    relative decrease of the loss in one iteration falls below tol. k may exceed D (an
    overcomplete dictionary, e.g. 10,000 atoms on a 2048-d layer). Rows of the dictionary
    are rescaled to unit norm at the end (codes take the scale), so feature values are
    comparable across directions.
    """
    A = _activations("A", A, nonneg=True)
    check_int("k", k, minimum=1)
    check_int("iters", iters, minimum=1)
    check_int("chunk_size", chunk_size, minimum=1)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if init not in ("nndsvd", "random"):
        raise ValueError(f"init must be 'nndsvd' or 'random', got {init!r}")
    if solver not in NMF_SOLVERS:
        raise ValueError(f"solver must be one of {NMF_SOLVERS}, got {solver!r}")
    generator = torch.Generator().manual_seed(seed)
    if float(A.max()) == 0:  # nothing to factor: the zero factorization is exact
        W = A.new_zeros(A.shape[0], k)
        return NMFResult(W, A.new_zeros(k, A.shape[1]), 0.0, A.new_zeros(1), 0, solver)
    W, H = _nndsvd(A, k, generator) if init == "nndsvd" else _random_init(A, k, generator)
    if solver == "hals":
        W, H, history, done = _nmf_hals(A, W, H, iters, tol, chunk_size)
    else:
        W, H, history, done = _nmf_mu(A, W, H, iters, tol)
    norms = H.norm(dim=1, keepdim=True)
    alive = norms[:, 0] > _EPS
    H = torch.where(alive[:, None], H / norms.clamp_min(_EPS), H)
    W.mul_(torch.where(alive, norms[:, 0], torch.ones_like(norms[:, 0])))  # in place: W can be N x 10,000
    hist = torch.stack(history)
    return NMFResult(W, H, float(hist[-1]), hist, done, solver)


def _largest_eigenvalue(G: torch.Tensor) -> float:
    """lambda_max of the symmetric PSD Gram matrix G: exact for small k; for large k a power
    iteration estimate (from the all-ones vector, which for a non-negative dictionary
    overlaps the Perron vector) with a 10% margin, never above the guaranteed bounds
    min(||G||_F, max row sum of |G|)."""
    k = G.shape[0]
    if k <= 1024:
        return float(torch.linalg.eigvalsh(G.double()).max())
    bound = min(float(torch.linalg.matrix_norm(G)), float(G.abs().sum(1).max()))
    v = torch.ones(k, device=G.device, dtype=G.dtype) / k ** 0.5
    estimate = 0.0
    for _ in range(50):
        w = G @ v
        estimate = float(w.norm())
        if estimate == 0:
            return 0.0
        v = w / estimate
    return min(bound, 1.1 * estimate)


def nnls_codes(A: torch.Tensor, dictionary: torch.Tensor, *, iters: int = 200, solver: str = "fista",
               chunk_size: int = 4096) -> torch.Tensor:
    """Non-negative least-squares codes of A (N, D) against a fixed dictionary (k, D):
    argmin_{Z >= 0} ||A - Z dictionary||^2, every row at once (rows are independent, so they
    are solved chunk_size at a time: memory O(chunk_size * k) beyond the (k, k) Gram matrix).

    solver "fista": accelerated projected gradient with step 1 / ||dictionary dictionary^T||_2;
    when k <= D it is warm-started from the clamped unconstrained solution (exact when that
    one is already non-negative, e.g. activations generated by the dictionary).
    solver "hals": `iters` exact coordinate-descent sweeps (the codes half of nmf's HALS),
    from the same start; monotone, and fewer sweeps are needed for an overcomplete k.
    """
    A = _activations("A", A)
    check_tensor("dictionary", dictionary, ndim=2, shape_doc=f"(k, {A.shape[1]})", dtypes=FLOAT_DTYPES)
    if dictionary.shape[1] != A.shape[1] or dictionary.shape[0] < 1:
        raise ValueError(f"dictionary must have shape (k, {A.shape[1]}) to match A's {A.shape[1]} columns, "
                         f"got shape {tuple(dictionary.shape)}")
    check_int("iters", iters, minimum=0)
    check_int("chunk_size", chunk_size, minimum=1)
    if solver not in NNLS_SOLVERS:
        raise ValueError(f"solver must be one of {NNLS_SOLVERS}, got {solver!r}")
    return _nnls_solve(A, _nnls_setup(dictionary, A.device), iters=iters, solver=solver, chunk_size=chunk_size)


def _nnls_setup(dictionary: torch.Tensor, device) -> tuple:
    """What nnls_codes derives from the dictionary alone: (float32 dictionary, Gram matrix,
    step bound, Cholesky factor or None). Its step bound is a host sync, so callers encoding
    many batches with one dictionary (Directions) compute it once."""
    Dm = dictionary.to(device=device, dtype=torch.float32)
    G = Dm @ Dm.T  # (k, k)
    lipschitz = _largest_eigenvalue(G)
    k, D = Dm.shape
    solve = None
    if lipschitz > 0 and k <= D:  # (barely ridge-regularized) normal equations, factored once for every chunk
        eye = torch.eye(k, device=G.device, dtype=torch.float64)
        solve = torch.linalg.cholesky(G.double() + 1e-6 * lipschitz * eye)
    return Dm, G, lipschitz, solve


def _nnls_solve(A: torch.Tensor, setup: tuple, *, iters: int, solver: str = "fista",
                chunk_size: int = 4096) -> torch.Tensor:
    """nnls_codes of float32 A (N, D) on an _nnls_setup, without checks."""
    Dm, G, lipschitz, solve = setup
    if lipschitz <= 0:
        return A.new_zeros(A.shape[0], Dm.shape[0])
    k = Dm.shape[0]
    out = A.new_empty(A.shape[0], k)
    step = 1.0 / lipschitz
    for rows in _chunks(A.shape[0], chunk_size):
        B = A[rows] @ Dm.T  # (n, k)
        if solve is not None:  # warm start: the unconstrained solution, clamped
            Z = torch.cholesky_solve(B.double().T, solve).T.float().clamp_min(0)
        else:  # overcomplete: G is singular and the unconstrained solution says little
            Z = B.new_zeros(B.shape)
        if solver == "hals":
            for _ in range(iters):
                _hals_sweep(Z, B, G)
        else:
            Y, t = Z, 1.0
            for _ in range(iters):
                Z_next = (Y - step * (Y @ G - B)).clamp_min(0)
                t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
                Y = Z_next + ((t - 1) / t_next) * (Z_next - Z)
                Z, t = Z_next, t_next
            del Y
        out[rows] = Z
    return out


# ---------------------------------------------------------------------------------------
# PCA


def pca(A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k principal directions of A (N, D): (components (k, D) orthonormal rows, mean (D,),
    explained_variance (k,) with the N - 1 denominator, like scikit-learn). Each
    component's sign makes its largest-magnitude entry positive (deterministic)."""
    A = _activations("A", A)
    check_int("k", k, minimum=1)
    N, D = A.shape
    if k > min(N, D):
        raise ValueError(f"k must be <= min(N, D) = {min(N, D)} for A of shape {tuple(A.shape)}, got {k}")
    mean = A.mean(0)
    _, S, Vh = torch.linalg.svd((A - mean).double(), full_matrices=False)
    comps = Vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = S[:k] ** 2 / max(N - 1, 1)
    return comps.float(), mean, var.float()


# ---------------------------------------------------------------------------------------
# Directions from a file


def load_directions(path: str | os.PathLike, dim: int) -> torch.Tensor:
    """Directions (k, dim) float32 from .pt/.pth (a tensor, or a dict with "components"),
    .npy, .npz (its only array, or the one named "components") or .csv (one direction per
    row, comma-separated). A single vector of length dim is one direction."""
    import numpy as np

    check_int("dim", dim, minimum=1)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"directions file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "components" not in obj:
                    raise ValueError(f"directions file {path!r} holds a dict without a 'components' entry "
                                     f"(keys: {sorted(obj)})")
                obj = obj["components"]
            if not isinstance(obj, torch.Tensor):
                raise ValueError(f"directions file {path!r} must hold a tensor, got {type(obj).__name__}")
            data = obj
        elif ext == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.keys())
                if "components" in names:
                    data = torch.from_numpy(archive["components"])
                elif len(names) == 1:
                    data = torch.from_numpy(archive[names[0]])
                else:
                    raise ValueError(f"directions file {path!r} holds arrays {names}: name one 'components'")
        elif ext == ".csv":
            data = torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2))
        else:
            raise ValueError(f"directions file {path!r} must end in .pt, .pth, .npy, .npz or .csv, got {ext!r}")
    except Exception as exc:  # unpickling refusals, zip/format/parse errors: not a directions file
        if isinstance(exc, ValueError) and path in str(exc):
            raise
        raise ValueError(f"directions file {path!r} could not be read as {ext}: "
                         f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}") from None
    if data.dim() == 1:
        data = data[None]
    if data.dim() != 2 or data.shape[1] != dim or data.shape[0] < 1:
        raise ValueError(f"directions in {path!r} must have shape (k, {dim}) to match the activations' "
                         f"{dim} dimensions, got shape {tuple(data.shape)}")
    if not (data.is_floating_point() or data.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"directions in {path!r} must be numeric, got dtype {data.dtype}")
    data = data.float()
    if not bool(torch.isfinite(data).all()):
        raise ValueError(f"directions in {path!r} contain NaN/Inf values")
    return data


# ---------------------------------------------------------------------------------------
# Directions


@dataclass
class Directions:
    """k feature directions (components (k, D)) and how to read feature values off them."""

    kind: str
    components: torch.Tensor  # (k, D)
    mean: torch.Tensor | None = None  # (D,) for pca
    explained_variance: torch.Tensor | None = None  # (k,) for pca
    nnls_iters: int = 200
    # nmf: _nnls_setup per device, so encoding batch after batch costs no host sync
    _nnls: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        check_tensor("components", self.components, ndim=2, shape_doc="(k, D)", dtypes=FLOAT_DTYPES)
        if self.kind == "pca" and self.mean is None:
            raise ValueError("mean is required for kind 'pca'")
        if self.mean is not None and tuple(self.mean.shape) != (self.components.shape[1],):
            raise ValueError(f"mean must have shape ({self.components.shape[1]},), got {tuple(self.mean.shape)}")

    @property
    def k(self) -> int:
        return self.components.shape[0]

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def to(self, device) -> "Directions":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Directions(self.kind, move(self.components), move(self.mean), move(self.explained_variance),
                          self.nnls_iters)

    def encode(self, A: torch.Tensor) -> torch.Tensor:
        """Feature values (N, k) of activations A (N, D)."""
        A = _activations("A", A)
        if A.shape[1] != self.dim:
            raise ValueError(f"A must have {self.dim} columns to match the directions, got shape {tuple(A.shape)}")
        return self._encode(A)

    def _encode(self, A: torch.Tensor) -> torch.Tensor:
        """encode without its checks (no host sync for pca and file directions), for passes over
        many batches that count NaN/Inf on the device and read the count once at the end."""
        A = A.float()
        if self.kind == "nmf":
            key = str(A.device)
            if key not in self._nnls:
                self._nnls[key] = _nnls_setup(self.components, A.device)
            return _nnls_solve(A, self._nnls[key], iters=self.nnls_iters)
        comps = self.components.to(A.device, torch.float32)
        if self.kind == "pca":
            return (A - self.mean.to(A.device, torch.float32)) @ comps.T
        return A @ comps.T

    def state_dict(self) -> dict:
        return {"kind": self.kind, "components": self.components.cpu(),
                "mean": None if self.mean is None else self.mean.cpu(),
                "explained_variance": None if self.explained_variance is None else self.explained_variance.cpu(),
                "nnls_iters": self.nnls_iters}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Directions":
        if not isinstance(state, dict) or "kind" not in state or "components" not in state:
            raise ValueError("state must be a dict from Directions.state_dict() with 'kind' and 'components'")
        return cls(state["kind"], state["components"], state.get("mean"), state.get("explained_variance"),
                   int(state.get("nnls_iters", 200)))


def _parse_count(spec: str, text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"directions spec {spec!r}: the count after ':' must be an int >= 1, got {text!r}")
    return k


def fit_directions(spec: str, A: torch.Tensor, *, seed: int = 0, iters: int = 200,
                   nmf_solver: str = "hals") -> Directions:
    """Directions from a spec: "nmf:K" (NMF dictionary of K atoms fitted on A with nmf_solver),
    "pca:K" (top K principal directions of A) or a path to a directions file (load_directions)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be 'nmf:K', 'pca:K' or a file path, got {type(spec).__name__}")
    spec_s = os.fspath(spec)
    A = _activations("A", A)
    head, sep, tail = spec_s.partition(":")
    if sep and head in ("nmf", "pca"):
        k = _parse_count(spec_s, tail)
        if head == "nmf":
            result = nmf(A, k, iters=iters, seed=seed, solver=nmf_solver)
            return Directions("nmf", result.dictionary, nnls_iters=iters)
        comps, mean, var = pca(A, k)
        return Directions("pca", comps, mean, var)
    if head in ("nmf", "pca") or not os.path.splitext(spec_s)[1]:
        raise ValueError(f"directions spec must be 'nmf:K', 'pca:K' or a file path (.pt/.npy/.npz/.csv), "
                         f"got {spec_s!r}")
    return Directions("file", load_directions(spec_s, A.shape[1]).to(A.device))
