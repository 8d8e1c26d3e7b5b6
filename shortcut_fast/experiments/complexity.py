"""Feature complexity by V-information (docs/experiments.md#feature-complexity; Fel et al., NeurIPS 2024).

Features are directions in the penultimate layer (default: an NMF dictionary of the
post-ReLU penultimate activations, fit on a sample of probe-train images); a sample's
feature values z are its codes. For every feature and every layer l (block outputs,
spatially average-pooled):

- V-information I_V(f_l(x) -> z): with the linear-Gaussian family and z standardized by
  its probe-train mean and std, the held-out R^2 of the best ridge predictor, clipped at 0
  (ops.probe_stats: one streaming pass of sufficient statistics per layer, every feature and
  every ridge alpha solved at once, alpha chosen per feature). That is the fixed-variance
  form (`v_information="r2"`, default), which the paper's definition matches as far as it
  can be told (docs/experiments.md#published-definitions-and-ours);
  `v_information="gaussian-nats"` learns the variance too: -1/2 log(1 - R^2) nats, unbounded
  above.
- complexity K(z) = 1 - mean over layers of I_V: near 0 simple (decodable at the first
  block already), near 1 complex. With "gaussian-nats" the same formula is reported, but
  it is no longer confined to [0, 1] (a feature decodable beyond 1 nat goes negative).
- decodability of a layer = mean I_V over features.
- importance Gamma_i = E_x |z_i(x) <d_i, w_c(x)>|, where w_c is the head's row for the
  class the model PREDICTS for x (our choice: it is what the model actually uses for its
  decision and needs no label; the paper leaves c unspecified), measured on the held-out
  images; the signed version E_x z_i <d_i, w_c> marks inhibiting features (< 0). The head
  is linear, so no backward pass is needed.

Dynamics (a folder of epoch_NNN.pt checkpoints): for every checkpoint t,
(a) temporal decoding: the FINAL model's features decoded from checkpoint t's layers
    (mean I_V over layers); a feature is "decodable from" the first checkpoint whose value
    reaches `decodable_fraction` (default 90 %) of its value in the final model (our choice
    of threshold), and its temporal decoding score is 1 - mean over checkpoints of
    min(value_t / final value, 1): 0 = fully decodable from the first checkpoint on, near 1
    = decodable only at the end (our definition: the fraction of training during which the
    feature was not yet decodable, averaged over the checkpoints);
(b) the checkpoint's own features (directions refit on its penultimate activations): their
    mean complexity, and the Spearman correlation of importance vs complexity.
Both use one pass over the checkpoint's layers with the two target sets concatenated.

Resume: with a run-folder store, the fitted directions, the final model's per-layer probe
statistics (ProbeStats state dicts) and every finished checkpoint are saved in it; a resuming
run reuses them (a pass interrupted in the middle is redone from its start).

Distribution (`dist=` a distributed.DistContext with world_size > 1, under torchrun): the
directions are fit on rank 0 and broadcast; every pass streams each rank's contiguous share
of the probe-train and held-out images, and the sufficient statistics (ProbeStats moments,
taken around rank 0's shift, and the importance / accuracy sums) are all-reduced before any
probe is fit, so every rank fits the probes of all the images. Only the summation order
differs from one process: in float64 (the CPU default) results agree to ~1e-12 when the
shards fall on the same chunks, and to float32 rounding of the activations (~1e-6)
otherwise. Each rank keeps its partial results in its own store sub-folder (rank{r}/); a
finished pass is reused only when every rank has it.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from shortcut_fast.distributed import DistContext, all_reduce_sum_, broadcast, check_same, gather, is_main, shard
from shortcut_fast.experiments._api import ApiResult
from shortcut_fast.experiments.stats import spearman
from shortcut_fast.models import features_and_head, get_submodule, model_blocks
from shortcut_fast.models.introspect import pool_block_output
from shortcut_fast.ops._checks import nonfinite_count, raise_nonfinite
from shortcut_fast.ops.directions import NMF_SOLVERS, Directions, fit_directions
from shortcut_fast.ops.precision import check_precision
from shortcut_fast.ops.probe_stats import V_INFORMATION_FORMS, ProbeStats, fit_linear_probes
from shortcut_fast.report import Progress, pyplot, save_figure, write_csv, write_json
from shortcut_fast.run_folder import Store, file_digest, fingerprint, load_state_file, tensor_digest

HELDOUT_SPLITS = ("val", "test")
_SPEC = re.compile(r"^(nmf|pca):([0-9]+)$")


@dataclass
class ComplexityConfig:
    layers: list[str] | None = None  # None: every block of the model (model_blocks)
    directions: str = "nmf:64"  # "nmf:K" | "pca:K" | a file saved by ops.directions (the paper: nmf:10000)
    nmf_solver: str = "hals"  # ops.directions.nmf solver: "hals" | "mu" (multiplicative updates)
    v_information: str = "r2"  # ops.probe_stats form: "r2" (fixed variance, the paper's) | "gaussian-nats"
    max_images: int | None = 2000  # probe-train images drawn from splits.train (None: all)
    heldout_split: str = "val"  # where V-information and importance are measured
    max_heldout: int | None = 1000  # held-out images (None: the whole split)
    direction_images: int = 2000  # probe-train images whose penultimate activations fit the directions
    alphas: list[float] | None = None  # ridge grid (None: the ops.probe_stats default)
    batch_size: int = 256  # images per forward chunk (bounds memory with the probe statistics)
    dtype: str | None = None  # probe statistics: None = float64 on the CPU, float32 on a GPU
    backend: str = "auto"
    precision: str = "auto"  # of the probe statistics' products (ops.precision; float32 statistics only)
    max_bytes: int | None = None  # workspace of the probe solve (None: the ops.probe_stats default)
    decodable_fraction: float = 0.9
    top_fraction: float = 0.1  # "most important features": this fraction, by importance
    seed: int = 0

    def __post_init__(self):
        spec = self.directions
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"directions must be 'nmf:K', 'pca:K' or a file path, got {spec!r}")
        m = _SPEC.match(spec)
        if m is None and re.match(r"^[A-Za-z]+:", spec) and not Path(spec).exists():
            raise ValueError(f"directions must be 'nmf:K', 'pca:K' (K >= 1) or an existing file, got {spec!r}")
        if m is not None and int(m.group(2)) < 1:
            raise ValueError(f"directions: K must be >= 1, got {spec!r}")
        if m is None and not Path(spec).is_file():
            raise ValueError(f"directions must be 'nmf:K', 'pca:K' or an existing file, got {spec!r} "
                             f"(no such file)")
        if self.nmf_solver not in NMF_SOLVERS:
            raise ValueError(f"nmf_solver must be one of {NMF_SOLVERS}, got {self.nmf_solver!r}")
        if self.v_information not in V_INFORMATION_FORMS:
            raise ValueError(f"v_information must be one of {V_INFORMATION_FORMS}, got {self.v_information!r}")
        if self.heldout_split not in HELDOUT_SPLITS:
            raise ValueError(f"heldout_split must be one of {HELDOUT_SPLITS}, got {self.heldout_split!r}")
        for name in ("max_images", "max_heldout"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ValueError(f"{name} must be None or an int >= 2, got {v!r}")
        for name in ("direction_images", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        check_precision(self.precision)
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        if self.alphas is not None and (len(self.alphas) == 0 or any(not a > 0 for a in self.alphas)):
            raise ValueError(f"alphas must be a non-empty list of positive floats, got {self.alphas!r}")
        if not 0 < self.decodable_fraction <= 1:
            raise ValueError(f"decodable_fraction must be in (0, 1], got {self.decodable_fraction!r}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction!r}")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"layers must be None or a non-empty list of distinct names, got {self.layers!r}")


@dataclass
class ComplexityResult(ApiResult):
    """What run_complexity / run return; summary() and write(folder) as in the module's `run`."""

    config: dict
    layers: list[str]
    layer_dims: list[int]
    directions: dict  # spec, kind, num_features, dim
    n_train: int
    n_heldout: int
    heldout_accuracy: float
    v_information: list[list[float]]  # [feature][layer], held-out, clipped at 0 (form: config["v_information"])
    complexity: list[float]  # per feature: 1 - mean over layers of V-information
    decodability: dict[str, float]  # layer -> mean V-information over features
    importance: list[float]  # E |z_i <d_i, w_c>|, c = predicted class
    importance_signed: list[float]  # E z_i <d_i, w_c>
    feature_std: list[float]  # probe-train std of each feature's code (0: a dead feature)
    spearman_importance_complexity: float
    mean_complexity_top_importance: float  # over the top_fraction most important features
    mean_complexity_rest: float
    dead_features: int = 0  # features with no variance on the probe-train sample (complexity NaN)
    dynamics: dict | None = None
    factors: dict | None = None  # label vs spurious attribute (factor_probes), where the data has one
    seconds: float = 0.0

    _command = "complexity"

    def _summary(self, data: str, out: Path | None) -> str:
        return summary(self, data, out)

    def _write(self, out: Path, record: dict) -> None:
        write_outputs(self, out, {"trained": None, **record})  # trained: the CLI's training summary, if any

    def feature_rows(self) -> list[dict]:
        """One row per feature: complexity, importance, V-information per layer (and dynamics)."""
        rows = []
        dyn = self.dynamics or {}
        for i in range(len(self.complexity)):
            row = {"feature": i, "complexity": self.complexity[i], "importance": self.importance[i],
                   "importance_signed": self.importance_signed[i], "std": self.feature_std[i]}
            if dyn:
                row["decodable_from_epoch"] = dyn["decodable_from"][i]
                row["temporal_decoding_score"] = dyn["temporal_score"][i]
            for layer, v in zip(self.layers, self.v_information[i]):
                row[f"vinfo:{layer}"] = v
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------
# Extraction


def capture(model: nn.Module, x: torch.Tensor, layers: Sequence[str],
            features_fn: Callable | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled outputs of `layers` and the penultimate activations, from ONE forward pass."""
    if features_fn is None:
        features_fn, _ = features_and_head(model)
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_m, _a, out):
            if name not in captured:
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"output of {name!r} is a {type(out).__name__}, not a tensor")
                captured[name] = pool_block_output(out)
        return hook

    handles = [get_submodule(model, n).register_forward_hook(make_hook(n)) for n in layers]
    try:
        feats = features_fn(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in captured]
    if missing:
        raise RuntimeError(f"these modules were not called when computing the features: {missing}")
    return {n: captured[n] for n in layers}, feats


def _get_images(dataset, index: torch.Tensor, device) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        return dataset[index].to(device).float()
    x, _, _ = dataset.get_batch(index, device=device)  # in-memory and file-backed datasets alike
    return x


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _sample(n: int, limit: int | None, seed: int, salt: int) -> torch.Tensor:
    if limit is None or n <= limit:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return torch.randperm(n, generator=g)[:limit].sort().values


def _stats_dtype(cfg: ComplexityConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype is not None:
        return getattr(torch, cfg.dtype)
    # float32 sums of uncentred activations lose digits on the CPU path; the GPU wants tf32 GEMMs.
    return torch.float32 if device.type == "cuda" else torch.float64


def layer_v_information(model: nn.Module, train_images, heldout_images,
                        targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                        layers: Sequence[str] | None = None, batch_size: int = 256, alphas=None,
                        dtype: torch.dtype = torch.float64, backend: str = "auto", precision: str = "auto",
                        device="cpu", max_bytes: int | None = None, v_information_form: str = "r2",
                        dist: DistContext | None = None) -> torch.Tensor:
    """Held-out V-information (K, L) of arbitrary targets from each layer's pooled output
    (in v_information_form: "r2" or "gaussian-nats", ops.probe_stats).

    train_images / heldout_images: (N, C, H, W) tensors or datasets; targets(x, penultimate)
    -> (n, K) gives the target values of a chunk. The basic measurement behind
    run_complexity, usable with targets of known complexity (see the tests). dist: each rank
    streams its share of each split; the statistics are all-reduced before the fit.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    layers = list(model_blocks(model) if layers is None else layers)
    features_fn, _ = features_and_head(model)
    banks = {}
    for split, images in (("train", train_images), ("heldout", heldout_images)):
        mine = shard(len(images), dist, f"the {split} images")
        bank = None
        with torch.no_grad():
            for sl in _chunks(len(mine), batch_size):
                x = _get_images(images, torch.arange(mine.start + sl.start, mine.start + sl.stop), device)
                outs, feats = capture(model, x, layers, features_fn)
                z = targets(x, feats)
                if bank is None:
                    bank = {name: ProbeStats(o.shape[1], z.shape[1], dtype=dtype, device=device, backend=backend,
                                             precision=precision)
                            for name, o in outs.items()}
                for name, o in outs.items():
                    bank[name].update(o.to(dtype), z.to(dtype))
        for name in layers:
            _all_reduce_stats(bank[name], dist)  # a no-op in one process
        banks[split] = bank
    kw = {"v_information_form": v_information_form} if max_bytes is None else {
        "max_bytes": max_bytes, "v_information_form": v_information_form}
    cols = [fit_linear_probes(banks["train"][n], banks["heldout"][n], alphas, **kw).v_information.float().cpu()
            for n in layers]
    return torch.stack(cols, dim=1)


# ---------------------------------------------------------------------------------------
# One analysis pass of a model (final model or checkpoint)


def _penultimate(model, dataset, index, batch_size, device) -> torch.Tensor:
    features_fn, _ = features_and_head(model)
    out = []
    with torch.no_grad():
        for sl in _chunks(len(index), batch_size):
            out.append(features_fn(_get_images(dataset, index[sl], device)).float())
    return torch.cat(out)


def _fit_directions(model, dataset, index, cfg, device) -> tuple[Directions, torch.Tensor, torch.Tensor]:
    """Directions fit on the penultimate activations of `index`, with the codes' mean and std."""
    acts = _penultimate(model, dataset, index, cfg.batch_size, device)
    directions = fit_directions(cfg.directions, acts, seed=cfg.seed, nmf_solver=cfg.nmf_solver)
    codes = directions.encode(acts).float()
    return directions, codes.mean(0).cpu(), codes.std(0).cpu()


def _shared_directions(model, dataset, index, cfg, device, dist) -> tuple[Directions, torch.Tensor, torch.Tensor]:
    """_fit_directions in one process; distributed: fit on rank 0 and broadcast (CPU tensors),
    so every rank encodes with the very same directions."""
    if dist is None or dist.world_size == 1:
        return _fit_directions(model, dataset, index, cfg, device)
    fitted = None
    if dist.rank == 0:
        directions, mean, std = _fit_directions(model, dataset, index, cfg, device)
        fitted = (directions.state_dict(), mean.cpu(), std.cpu())
    state, mean, std = broadcast(fitted, dist)
    return Directions.from_state_dict(state), mean, std


def _all_reduce_stats(stats: ProbeStats, dist: DistContext | None) -> None:
    """Sum a ProbeStats over ranks in place: each rank's moments are taken around rank 0's
    shift (in float64), summed, and stored back around that shift. No-op in one process."""
    if dist is None or dist.world_size == 1:
        return
    f64 = dict(dtype=torch.float64, device=stats.device)
    D, K = stats.dim, stats.num_targets
    center = torch.cat([stats.shift_x.to(**f64), stats.shift_z.to(**f64)])
    if dist.rank != 0:
        center.zero_()
    all_reduce_sum_(center, dist)  # rank 0's shift on every rank
    cx, cz = center[:D], center[D:]
    xx, xz, sx, sz, sq = stats.moments(cx, cz)
    flat = torch.cat([xx.reshape(-1), xz.reshape(-1), sx, sz, sq, torch.tensor([float(stats.n)], **f64)])
    all_reduce_sum_(flat, dist)
    parts = flat.split([D * D, D * K, D, K, K, 1])
    cast = dict(dtype=stats.dtype, device=stats.device)
    stats.shift_x, stats.shift_z = cx.to(**cast), cz.to(**cast)
    stats.xx, stats.xz = parts[0].reshape(D, D).to(**cast), parts[1].reshape(D, K).to(**cast)
    stats.sum_x, stats.sum_z, stats.sumsq_z = parts[2].to(**cast), parts[3].to(**cast), parts[4].to(**cast)
    stats.n = int(round(float(parts[5])))


def _standardize(codes, mean, std):
    # Dead features (std 0) stay constant (0): ops.probe_stats gives constant targets V-information 0.
    return (codes - mean.to(codes.device)) / torch.where(std > 0, std, torch.ones_like(std)).to(codes.device)


class _Pass:
    """Streams images through a model; per layer one ProbeStats per split (train, heldout);
    on held-out images also the importance sums and the correct count of the model's own head."""

    def __init__(self, model, layers, target_sets, dtype, device, backend, precision="auto"):
        self.model, self.layers, self.dtype, self.device, self.backend = model, layers, dtype, device, backend
        self.precision = precision
        self.target_sets = target_sets  # list of (directions, mean, std, source) where source is "self" or a model
        self.features_fn, self.head = features_and_head(model)
        self.stats: dict[str, dict[str, ProbeStats]] = {"train": {}, "heldout": {}}
        k = target_sets[0][0].components.shape[0]
        self.importance = torch.zeros(k, dtype=torch.float64)
        self.importance_signed = torch.zeros(k, dtype=torch.float64)
        self.correct = 0
        self.count = 0
        # Per-batch sums stay on the device (no host sync per batch); finish() reads them once.
        self._sums = torch.zeros(2 * k + 1, dtype=torch.float64, device=device)  # importance, signed, correct
        self._nonfinite = torch.zeros(2, dtype=torch.int64, device=device)  # NaN/Inf in activations, targets
        self.dims: dict[str, int] = {}
        self.labels: torch.Tensor | None = None  # labels of the current held-out chunk

    def _targets(self, x, feats):
        """Standardized codes of every target set, concatenated; raw codes of the first (own) set."""
        zs, own_raw = [], None
        for j, (directions, mean, std, source) in enumerate(self.target_sets):
            if source is None:
                f = feats
            else:
                f = source["features_fn"](x)
            raw = directions._encode(f)  # NaN/Inf reach z, which update() counts
            if j == 0:
                own_raw = raw
            zs.append(_standardize(raw.float(), mean, std))
        return torch.cat(zs, dim=1), own_raw

    def update(self, split: str, x: torch.Tensor) -> None:
        outs, feats = capture(self.model, x, self.layers, self.features_fn)
        z, raw = self._targets(x, feats)
        bank = self.stats[split]
        self._nonfinite[1] += nonfinite_count(z).to(self.device)
        for name, o in outs.items():
            if name not in bank:
                self.dims[name] = int(o.shape[1])
                bank[name] = ProbeStats(o.shape[1], z.shape[1], dtype=self.dtype, device=self.device,
                                        backend=self.backend, precision=self.precision)
            self._nonfinite[0] += nonfinite_count(o).to(self.device)
            bank[name]._add(o.to(self.dtype), z.to(self.dtype))  # shapes right by construction
        if split == "heldout":
            directions = self.target_sets[0][0]
            logits = self.head(feats)
            pred = logits.argmax(1)
            d = directions.components.to(feats.device, torch.float32)  # (k, F)
            proj = self.head.weight.float()[pred] @ d.T  # (n, k): <d_i, w_c(x)>
            contribution = (raw.float() * proj).double()
            k = self.importance.numel()
            self._sums[:k] += contribution.abs().sum(0).to(self.device)
            self._sums[k:2 * k] += contribution.sum(0).to(self.device)
            self.count += x.shape[0]
            if self.labels is not None:
                self._sums[2 * k] += (pred == self.labels).sum().to(self.device)

    def finish(self) -> None:
        """After the last batch: the device-side sums to the host, and NaN/Inf activations or
        targets refused as ProbeStats.update refuses them, once for the whole pass."""
        raise_nonfinite("x", int(self._nonfinite[0]))
        raise_nonfinite("z", int(self._nonfinite[1]))
        k = self.importance.numel()
        sums = self._sums.cpu()
        self.importance += sums[:k]
        self.importance_signed += sums[k:2 * k]
        self.correct += int(sums[2 * k])
        self._sums.zero_()

    def all_reduce(self, dist: DistContext | None) -> None:
        """Sum every rank's statistics (each streamed its share of the images): afterwards every
        rank holds those of all the images. No-op in one process."""
        if dist is None or dist.world_size == 1:
            return
        for split in ("train", "heldout"):
            for name in self.layers:
                _all_reduce_stats(self.stats[split][name], dist)
        k = self.importance.numel()
        sums = torch.cat([self.importance, self.importance_signed,
                          torch.tensor([self.correct, self.count], dtype=torch.float64)])
        all_reduce_sum_(sums, dist)
        self.importance, self.importance_signed = sums[:k].clone(), sums[k:2 * k].clone()
        self.correct, self.count = int(round(float(sums[2 * k]))), int(round(float(sums[2 * k + 1])))

    def state_dict(self) -> dict:
        return {"stats": {s: {n: p.state_dict() for n, p in bank.items()} for s, bank in self.stats.items()},
                "importance": self.importance, "importance_signed": self.importance_signed,
                "correct": self.correct, "count": self.count, "dims": self.dims}


def _stream(p: _Pass, splits_data, batch_size, device, progress, desc, dist: DistContext | None = None):
    """Feed (split, dataset, index) triples through the pass, in chunks; distributed, each
    rank feeds its contiguous share of every index (then p.all_reduce sums the ranks)."""
    splits_data = [(split, dataset, index[mine.start:mine.stop]) for split, dataset, index in splits_data
                   for mine in [shard(len(index), dist, f"the {split} images")]]
    bar = Progress(sum(len(index) for _, _, index in splits_data), desc, progress)
    with torch.no_grad():
        for split, dataset, index in splits_data:
            for sl in _chunks(len(index), batch_size):
                idx = index[sl]
                if split == "heldout":
                    x, y = _images_and_labels(dataset, idx, device)
                    p.labels = y
                else:
                    x, p.labels = _get_images(dataset, idx, device), None
                p.update(split, x)
                bar.update(len(idx))
    bar.close()
    p.finish()


def _images_and_labels(dataset, index, device):
    x, y, _ = dataset.get_batch(index, device=device)
    return x, y


def _v_information(stats: dict, layers, alphas, max_bytes, form: str = "r2") -> torch.Tensor:
    """(K_total, L) held-out V-information (in `form`) from saved or live per-layer statistics."""
    kw = {"v_information_form": form} if max_bytes is None else {"max_bytes": max_bytes, "v_information_form": form}
    cols = []
    for name in layers:
        train, heldout = stats["train"][name], stats["heldout"][name]
        if isinstance(train, dict):
            train, heldout = ProbeStats.from_state_dict(train), ProbeStats.from_state_dict(heldout)
        cols.append(fit_linear_probes(train, heldout, alphas, **kw).v_information.double().cpu())
    return torch.stack(cols, dim=1)


def _summaries(v_info: torch.Tensor, importance: torch.Tensor, alive: torch.Tensor, top_fraction: float) -> dict:
    """Complexity per feature (NaN for dead features: no variance on the probe-train sample,
    so nothing to decode) and the importance-complexity summaries over the live ones."""
    complexity = torch.where(alive, 1 - v_info.mean(1), torch.full_like(v_info[:, 0], float("nan")))
    idx = alive.nonzero().flatten()
    if idx.numel() == 0:
        return {"complexity": complexity, "spearman": float("nan"), "top": float("nan"), "rest": float("nan")}
    c, imp = complexity[idx], importance[idx].double()
    top = torch.argsort(imp, descending=True)[:max(1, round(top_fraction * idx.numel()))]
    rest = torch.ones(idx.numel(), dtype=torch.bool)
    rest[top] = False
    return {"complexity": complexity,
            "spearman": spearman(imp, c),
            "top": float(c[top].mean()),
            "rest": float(c[rest].mean()) if bool(rest.any()) else float("nan")}


# ---------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(epoch, path) of every epoch_NNN.pt in `folder`, by epoch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoints folder {folder} does not exist")
    found = []
    for path in folder.glob("epoch_*.pt"):
        m = re.fullmatch(r"epoch_([0-9]+)\.pt", path.name)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise FileNotFoundError(f"no epoch_NNN.pt checkpoints in {folder} "
                                f"(train with `shortcut-fast train --keep-every 1`)")
    return sorted(found)


def _load_like(model: nn.Module, path: Path, device) -> nn.Module:
    state = load_state_file(path, what="checkpoint")
    weights = state["model"] if isinstance(state, dict) and "model" in state else state
    other = copy.deepcopy(model)
    try:
        other.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not fit the analysed model's architecture: {exc}") from exc
    return other.to(device).eval()


# ---------------------------------------------------------------------------------------
# The experiment


def run_complexity(model: nn.Module, splits, cfg: ComplexityConfig | None = None, *,
                   store: Store | None = None, checkpoints: str | Path | None = None,
                   device="cpu", progress: bool = True, dist: DistContext | None = None) -> ComplexityResult:
    """Feature complexity, per-layer decodability, importance and (with checkpoints) dynamics.

    splits: DatasetSplits (probe-train = splits.train capped at cfg.max_images, held-out =
    splits.<cfg.heldout_split> capped at cfg.max_heldout). checkpoints: a folder of
    epoch_NNN.pt files of the same architecture (from `train(..., keep_every=k)`).
    With a store (e.g. `run.partial` of a RunFolder): the final model's pass and every
    finished checkpoint are saved there, and a resuming run reuses them. Nothing else is
    written: `write_outputs` writes result.json, features.csv and the figures.
    dist (a distributed.DistContext): with world_size > 1 the images of every pass are split
    over the ranks and the statistics all-reduced (module docstring); the settings (config,
    model weights, data sizes, checkpoints) are compared across ranks first; each rank keeps
    its partial results in store.sub("rank{r}"); every rank returns the whole result.
    """
    t0 = time.perf_counter()
    cfg = cfg or ComplexityConfig()
    device = torch.device(device)
    model = model.to(device).eval()
    layers = list(cfg.layers) if cfg.layers is not None else model_blocks(model)
    for name in layers:
        get_submodule(model, name)  # clear error for a bad layer name, before any work
    ckpts = list_checkpoints(checkpoints) if checkpoints is not None else []
    heldout_set = getattr(splits, cfg.heldout_split)
    train_index = _sample(len(splits.train), cfg.max_images, cfg.seed, 1)
    heldout_index = _sample(len(heldout_set), cfg.max_heldout, cfg.seed, 2)
    if len(train_index) < 2 or len(heldout_index) < 2:
        raise ValueError(f"need at least 2 probe-train and 2 held-out images, got {len(train_index)} and "
                         f"{len(heldout_index)}")
    direction_index = train_index[:cfg.direction_images]
    dtype = _stats_dtype(cfg, device)
    distributed = dist is not None and dist.world_size > 1
    progress = progress and is_main(dist)
    if distributed:
        check_same({"config": dataclasses.asdict(cfg), "model": _weights_digest(model), "layers": layers,
                    "data": splits.name, "n_train": len(splits.train), "n_heldout": len(heldout_set),
                    "checkpoints": [[e, file_digest(p)] for e, p in ckpts], "dtype": str(dtype)},
                   dist, "complexity settings")
        if store is not None:
            store = store.sub(f"rank{dist.rank}")  # each rank's own partial results

    # 1. directions of the final model, and the standardization of their codes
    saved = store.load_state("final.pt") if store is not None else None
    if distributed and not all(gather(saved is not None, dist)):
        saved = None  # resumed only when every rank finished the pass (their saved states are equal)
    if saved is not None:
        directions = Directions.from_state_dict(saved["directions"])
        mean, std = saved["mean"], saved["std"]
        pass_state = saved["pass"]
    else:
        directions, mean, std = _shared_directions(model, splits.train, direction_index, cfg, device, dist)
        p = _Pass(model, layers, [(directions, mean, std, None)], dtype, device, cfg.backend, cfg.precision)
        _stream(p, [("train", splits.train, train_index), ("heldout", heldout_set, heldout_index)],
                cfg.batch_size, device, progress, "complexity: final model", dist)
        p.all_reduce(dist)
        pass_state = p.state_dict()
        if store is not None:
            store.save_state("final.pt", {"directions": directions.state_dict(), "mean": mean, "std": std,
                                          "pass": pass_state})

    k = directions.components.shape[0]
    v_info = _v_information(pass_state["stats"], layers, cfg.alphas, cfg.max_bytes, cfg.v_information)  # (k, L)
    count = max(pass_state["count"], 1)
    importance = pass_state["importance"] / count
    importance_signed = pass_state["importance_signed"] / count
    alive = std > 0
    summary = _summaries(v_info, importance, alive, cfg.top_fraction)
    layer_dims = [pass_state["dims"][n] for n in layers]
    factor_set = _factor_split(splits)

    def factors_of(m):
        if factor_set is None:
            return None
        return factor_probes(m, factor_set, layers, batch_size=cfg.batch_size, device=device, dtype=dtype,
                             backend=cfg.backend, precision=cfg.precision, alphas=cfg.alphas, max_bytes=cfg.max_bytes,
                             form=cfg.v_information)

    factors = factors_of(model)

    # 2. dynamics
    dynamics = None
    if ckpts:
        final_features_fn, _ = features_and_head(model)
        per_ckpt = []
        for epoch, path in ckpts:
            done = f"checkpoint_{epoch:03d}.json"
            stamp = file_digest(path)
            entry = store.load_json(done) if store is not None else None
            if entry is not None and entry.get("stamp") != stamp:
                entry = None  # another checkpoint file than the one analysed: redo it
            if distributed and not all(gather(entry is not None, dist)):
                entry = None
            if entry is not None:
                per_ckpt.append(entry)
                continue
            other = _load_like(model, path, device)
            own_dirs, own_mean, own_std = _shared_directions(other, splits.train, direction_index, cfg, device, dist)
            p = _Pass(other, layers, [(own_dirs, own_mean, own_std, None),
                                      (directions, mean, std, {"features_fn": final_features_fn})],
                      dtype, device, cfg.backend, cfg.precision)
            _stream(p, [("train", splits.train, train_index), ("heldout", heldout_set, heldout_index)],
                    cfg.batch_size, device, progress, f"complexity: epoch {epoch}", dist)
            p.all_reduce(dist)
            vi = _v_information(p.stats, layers, cfg.alphas, cfg.max_bytes, cfg.v_information)  # (k_own + k, L)
            k_own = own_dirs.components.shape[0]
            own_importance = p.importance / max(p.count, 1)
            s = _summaries(vi[:k_own], own_importance, own_std > 0, cfg.top_fraction)
            entry = {"epoch": epoch, "checkpoint": str(path), "stamp": stamp,
                     "heldout_accuracy": p.correct / max(p.count, 1),
                     "temporal_v_information": vi[k_own:].mean(1).tolist(),  # final features from these layers
                     "mean_complexity": float(s["complexity"].nanmean()),
                     "dead_features": int((own_std <= 0).sum()),
                     "spearman_importance_complexity": s["spearman"],
                     "mean_complexity_top_importance": s["top"], "mean_complexity_rest": s["rest"],
                     "decodability": dict(zip(layers, vi[:k_own].mean(0).tolist())),
                     "factors": factors_of(other)}
            if store is not None:
                store.save_json(done, entry)
            per_ckpt.append(entry)
            del other
        dynamics = _dynamics(per_ckpt, (1 - summary["complexity"]).nan_to_num(0.0), cfg.decodable_fraction)

    # Features that never vary on the probe-train sample carry no information: reported, not dropped.
    result = ComplexityResult(
        config=dataclasses.asdict(cfg), layers=layers, layer_dims=layer_dims,
        directions={"spec": cfg.directions, "kind": directions.kind, "num_features": k,
                    "dim": int(directions.components.shape[1])},
        n_train=len(train_index), n_heldout=len(heldout_index),
        heldout_accuracy=pass_state["correct"] / count,
        v_information=v_info.tolist(), complexity=summary["complexity"].tolist(),
        decodability=dict(zip(layers, v_info.mean(0).tolist())),
        importance=importance.tolist(), importance_signed=importance_signed.tolist(),
        feature_std=std.tolist(), spearman_importance_complexity=summary["spearman"],
        mean_complexity_top_importance=summary["top"], mean_complexity_rest=summary["rest"],
        dead_features=int((~alive).sum()), dynamics=dynamics, factors=factors, seconds=time.perf_counter() - t0)
    return result


def _factor_split(splits):
    """The split where label and attribute are independent (colored-*: the test split, uniform
    colours), or None when the data has no attribute for every sample."""
    test = splits.test
    if (not splits.bias_aligned_attribute or splits.num_attributes != splits.num_classes or len(test) < 8
            or bool((test.attributes < 0).any()) or int(test.attributes.unique().numel()) < 2):
        return None  # no attribute naming a class (or a constant one): the two factors cannot be compared
    return test


@torch.no_grad()
def factor_probes(model: nn.Module, dataset, layers: Sequence[str], *, batch_size: int = 256, device="cpu",
                  dtype=torch.float64, backend: str = "auto", precision: str = "auto", alphas=None, max_bytes=None,
                  form: str = "r2") -> dict:
    """The two named factors of a biased dataset, label (the core feature) and attribute (the
    spurious one, e.g. colour), measured in one model.

    decodability: per layer, the V-information of each factor's standardized one-hot code,
    averaged over its values. Linear-Gaussian ridge probes are fitted on the even-indexed
    images of `dataset` and scored on the odd-indexed ones; `dataset` must be a split where
    label and attribute are independent, or the probes could not tell the two apart.
    complexity: 1 - the mean of decodability over layers, as for a feature.
    decision: on the images whose attribute names another class than their label, the share
    the model's own prediction gives to the label and to the attribute.
    """
    model = model.to(device).eval()
    features_fn, head = features_and_head(model)
    y, a = dataset.labels.cpu(), dataset.attributes.cpu()
    k_y, k_a = int(dataset.num_classes), int(dataset.num_attributes)

    def onehot(v, k):
        z = torch.nn.functional.one_hot(v, k).double()
        p = z[0::2].mean(0)  # the probe-train half's frequencies
        return (z - p) / (p * (1 - p)).clamp(min=1e-12).sqrt()

    targets = torch.cat([onehot(y, k_y), onehot(a, k_a)], dim=1)
    stats = {"train": {}, "heldout": {}}
    follows = torch.zeros(2, dtype=torch.float64)
    disagree = 0
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        x, _, _ = dataset.get_batch(idx, device=device)
        outs, feats = capture(model, x, layers, features_fn)
        pred = head(feats).argmax(1).cpu()
        other = a[idx] != y[idx]
        disagree += int(other.sum())
        follows[0] += float((pred == y[idx])[other].sum())
        follows[1] += float((pred == a[idx])[other].sum())
        for half, sel in (("train", idx % 2 == 0), ("heldout", idx % 2 == 1)):
            for name, o in outs.items():
                if name not in stats[half]:
                    stats[half][name] = ProbeStats(o.shape[1], targets.shape[1], dtype=dtype, device=device,
                                                   backend=backend, precision=precision)
                stats[half][name].update(o[sel.to(o.device)].to(dtype), targets[idx][sel].to(device, dtype))
    vi = _v_information(stats, list(layers), alphas, max_bytes, form)  # (k_y + k_a, L)
    decod = {"label": vi[:k_y].mean(0), "attribute": vi[k_y:].mean(0)}
    return {"split_size": len(dataset),
            "decodability": {f: dict(zip(layers, v.tolist())) for f, v in decod.items()},
            "complexity": {f: float(1 - v.mean()) for f, v in decod.items()},
            "decision": {"images": disagree, "follows_label": float(follows[0]) / max(disagree, 1),
                         "follows_attribute": float(follows[1]) / max(disagree, 1)}}


def _weights_digest(model: nn.Module) -> str:
    """Digest of a model's parameter and buffer names and values (ranks must analyse the same model)."""
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return fingerprint({"keys": list(state), "weights": tensor_digest(*(v.reshape(-1) for v in state.values()))})


def _dynamics(per_ckpt: list[dict], final_v: torch.Tensor, fraction: float) -> dict:
    """Temporal decoding summary: decodable-from epoch and temporal score per final feature."""
    epochs = [e["epoch"] for e in per_ckpt]
    temporal = torch.tensor([e["temporal_v_information"] for e in per_ckpt], dtype=torch.float64)  # (T, k)
    final_v = final_v.double()
    decodable_from, score = [], []
    for i in range(final_v.numel()):
        f = float(final_v[i])
        if f <= 0:  # never decodable in the final model: no onset to speak of
            decodable_from.append(None)
            score.append(float("nan"))
            continue
        reached = (temporal[:, i] >= fraction * f).nonzero().flatten()
        decodable_from.append(epochs[int(reached[0])] if reached.numel() else None)
        score.append(float(1 - (temporal[:, i] / f).clamp(max=1).mean()))
    reached = torch.tensor([d is not None for d in decodable_from])
    return {
        "epochs": epochs,
        "checkpoints": [e["checkpoint"] for e in per_ckpt],
        "heldout_accuracy": [e["heldout_accuracy"] for e in per_ckpt],
        "temporal_v_information": temporal.tolist(),  # [checkpoint][final feature], mean over layers
        "decodable_from": decodable_from,
        "temporal_score": score,
        "fraction_decodable": [sum(1 for d in decodable_from if d is not None and d <= ep) / max(len(decodable_from), 1)
                               for ep in epochs],
        "never_decodable": int((~reached).sum()),
        "mean_complexity": [e["mean_complexity"] for e in per_ckpt],
        "spearman_importance_complexity": [e["spearman_importance_complexity"] for e in per_ckpt],
        "mean_complexity_top_importance": [e["mean_complexity_top_importance"] for e in per_ckpt],
        "mean_complexity_rest": [e["mean_complexity_rest"] for e in per_ckpt],
        "decodability": [e["decodability"] for e in per_ckpt],
        "factors": [e.get("factors") for e in per_ckpt],
        "decodable_fraction": fraction,
    }


# ---------------------------------------------------------------------------------------
# Outputs


def summary(result: ComplexityResult, data: str, out: Path | None = None, top: int = 5) -> str:
    """The terminal report: per-layer decodability, least/most complex features, dynamics (and,
    with `out`, where the files were written)."""
    from shortcut_fast.report import format_table

    lines = []
    k = len(result.complexity)
    lines.append(f"\ncomplexity on {data}: {k} features ({result.directions['kind']}, from a "
               f"{result.directions['dim']}-d penultimate layer), {result.n_train} probe-train / "
               f"{result.n_heldout} held-out images, held-out accuracy {result.heldout_accuracy:.4f}, "
               f"{result.seconds:.1f} s")
    rows = [[name, dim, result.decodability[name]] for name, dim in zip(result.layers, result.layer_dims)]
    unit = "nats" if result.config.get("v_information") == "gaussian-nats" else "R^2"
    lines.append(format_table(rows, ["layer", "dim", f"mean V-information ({unit})"]))
    order = sorted((i for i in range(k) if result.complexity[i] == result.complexity[i]),
                   key=lambda i: result.complexity[i])  # dead features (NaN) left out
    pick = order[:top] + [i for i in order[-top:] if i not in order[:top]]
    rows = [[i, result.complexity[i], result.importance[i], result.importance_signed[i],
             result.v_information[i][0], result.v_information[i][-1]] for i in pick]
    lines.append(f"\nleast and most complex features (of {k}):")
    lines.append(format_table(rows, ["feature", "complexity", "importance", "signed", "V-info first", "V-info last"]))
    mean_c = sum(result.complexity[i] for i in order) / max(len(order), 1)
    dead = f" ({result.dead_features} dead features left out)" if result.dead_features else ""
    lines.append(f"\nmean complexity {mean_c:.4f}{dead}; most important {100 * result.config['top_fraction']:.0f}%: "
               f"{result.mean_complexity_top_importance:.4f}, rest {result.mean_complexity_rest:.4f}; "
               f"Spearman(importance, complexity) {result.spearman_importance_complexity:.4f}")
    d = result.dynamics
    if d:
        rows = [[e, acc, frac, mc, top_c, rho] for e, acc, frac, mc, top_c, rho in zip(
            d["epochs"], d["heldout_accuracy"], d["fraction_decodable"], d["mean_complexity"],
            d["mean_complexity_top_importance"], d["spearman_importance_complexity"])]
        lines.append("\ndynamics (final features decodable; the checkpoint's own features):")
        lines.append(format_table(rows, ["epoch", "held-out acc", "final decodable", "mean complexity",
                                       "top-importance complexity", "Spearman(imp, cx)"]))
    f = result.factors
    if f:
        lines.append(f"\nlabel vs spurious attribute (probes on halves of the {f['split_size']}-image test split):")
        rows = [[name, *(f["decodability"][k][name] for k in ("label", "attribute"))] for name in result.layers]
        rows.append(["complexity", f["complexity"]["label"], f["complexity"]["attribute"]])
        lines.append(format_table(rows, ["layer", "label V-info", "attribute V-info"]))
        dec = f["decision"]
        lines.append(f"on the {dec['images']} test images whose attribute names another class, the model predicts the "
                     f"label for {dec['follows_label']:.3f}, the attribute's class for {dec['follows_attribute']:.3f}")
    if out is not None:
        out = Path(out)
        lines.append(f"\nwrote {out / 'result.json'}, {out / 'features.csv'} and figures in {out}")
    return "\n".join(lines)


def write_outputs(result: ComplexityResult, out_dir, record: dict | None = None) -> None:
    """result.json (the result inside `record` when given), features.csv and the figures."""
    out = Path(out_dir)
    write_json(result if record is None else {**record, "result": result}, out / "result.json")
    write_csv(result.feature_rows(), out / "features.csv")
    write_figures(result, out)


def write_figures(result: ComplexityResult, out_dir) -> list[Path]:
    """complexity_hist.png, importance_vs_complexity.png, decodability.png, dynamics.png."""
    plt = pyplot()
    out = Path(out_dir)
    paths = []
    complexity = [c for c in result.complexity if c == c]  # dead features (NaN) left out
    fig, ax = plt.subplots(figsize=(5, 3.4))
    nats = result.config.get("v_information") == "gaussian-nats"  # unbounded: no fixed axis range
    ax.hist(complexity, bins=20, range=None if nats else (0, 1), color="tab:blue", edgecolor="white")
    ax.set_xlabel("complexity K(z) = 1 - mean V-information" + (" (nats)" if nats else ""))
    ax.set_ylabel("features")
    ax.set_title(f"{len(complexity)} features ({result.directions['kind']})")
    save_figure(fig, out / "complexity_hist.png", tight=True)
    paths.append(out / "complexity_hist.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    m = max([abs(v) for v in result.importance_signed] + [1e-12])
    sc = ax.scatter(result.complexity, result.importance, c=result.importance_signed, cmap="RdBu_r", s=14,
                    vmin=-m, vmax=m)  # white = no net effect, blue = inhibiting
    ax.set_xlabel("complexity")
    ax.set_ylabel("importance E|z <d, w_c>|")
    rho = result.spearman_importance_complexity
    ax.set_title(f"Spearman {rho:.2f}" if rho == rho else "importance vs complexity")
    fig.colorbar(sc, ax=ax, label="signed importance")
    save_figure(fig, out / "importance_vs_complexity.png", tight=True)
    paths.append(out / "importance_vs_complexity.png")

    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(result.layers) + 2), 3.4))
    ax.plot(range(len(result.layers)), list(result.decodability.values()), marker="o", label="final")
    if result.dynamics:
        for epoch, dec in zip(result.dynamics["epochs"], result.dynamics["decodability"]):
            ax.plot(range(len(result.layers)), [dec[n] for n in result.layers], alpha=0.5, lw=1,
                    label=f"epoch {epoch} (own features)")
    ax.set_xticks(range(len(result.layers)))
    ax.set_xticklabels(result.layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean V-information" + (" (nats)" if nats else ""))
    if not nats:
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / "decodability.png", tight=True)
    paths.append(out / "decodability.png")

    if result.dynamics:
        d = result.dynamics
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        axes[0].plot(d["epochs"], d["fraction_decodable"], marker=".")
        axes[0].set_title("final features decodable (fraction)")
        axes[1].plot(d["epochs"], d["mean_complexity"], marker=".", label="all")
        axes[1].plot(d["epochs"], d["mean_complexity_top_importance"], marker=".", label="most important")
        axes[1].set_title("mean complexity (own features)")
        axes[1].legend(fontsize=8)
        axes[2].plot(d["epochs"], d["spearman_importance_complexity"], marker=".")
        axes[2].axhline(0, color="gray", lw=0.5)
        axes[2].set_title("Spearman(importance, complexity)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        save_figure(fig, out / "dynamics.png", tight=True)
        paths.append(out / "dynamics.png")
    return paths


# ---------------------------------------------------------------------------------------
# The Python API (docs/api.md): Config, Result, run

Config = ComplexityConfig
Result = ComplexityResult


def run(model: nn.Module, data, config: ComplexityConfig | None = None, *, progress: bool = False,
        **kw) -> ComplexityResult:
    """Feature complexity of a trained classifier: per-layer decodability, importance, complexity.

    model: an nn.Module whose last nn.Linear is its head (the penultimate features are that
    layer's input) and whose blocks can be named (config.layers, default: its blocks, e.g.
    a torchvision ResNet's layer1.0 ...). data: anything shortcut_fast.data.as_splits
    accepts; probes train on its train split, are measured on config.heldout_split.
    kw: run_complexity's own options (device, checkpoints, store). Returns a Result:
    summary(), write(folder) (result.json, features.csv and the figures, as the command line).
    """
    from shortcut_fast.experiments import _api

    cfg, splits, name = _api.model_inputs(model, data, config, ComplexityConfig, "complexity", kw)
    result = run_complexity(model, splits, cfg, progress=progress, **kw)
    _api.attach(result, "complexity", name, splits, model)
    return result
