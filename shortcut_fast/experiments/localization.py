"""Layer-wise shortcut localization by counterfactual training (docs/experiments.md#layer-wise-localization).

Tsoy & Konstantinov ("On Measuring Localization of Shortcuts in Deep Networks", arXiv
2510.26560) publish no code and no protocol beyond their abstract; the protocol here is ours.

Units. The model's blocks (`models.model_blocks`), or with granularity "stage" groups of
consecutive blocks that share a name prefix (layer1.0, layer1.1 -> layer1; a model whose
blocks all share one prefix is cut into three consecutive thirds when it has more than 4,
e.g. vit blocks.0..5, and keeps its blocks as units otherwise, e.g. timm ConvNeXt's 4 stages),
plus the "head": every parameter in no block (linear head, final norm, embeddings).

Data. The clean training set and the skewed one hold the same images in the same order; the
skewed copy carries the planted shortcut (data.shortcuts.inject_shortcut: in each class a
fraction rho of the images, chosen per sample with the seed, carries its class's shortcut).
Test sets: clean, aligned (own class's shortcut), conflicting (another class's).

Variants (trained together by shortcut_fast.ensemble, same init and batch order; each unit keeps
the BatchNorm running statistics of the pass whose batch trains it, see that module):
  clean        every unit trains on the clean batch
  skew         every unit trains on the skewed batch
  skew@u       unit u gets the gradient of the skewed batch, every other unit the clean one
  clean@u      the converse
  skew lr*0.1@u  (interventions) skewed training, unit u at 0.1 x the learning rate
  skew lr*0@u    (interventions) skewed training, unit u frozen (learning rate 0)

Metrics per unit u, on the clean and on the conflicting test set (acc = accuracy):
  drop(u)      = acc(clean) - acc(skew@u)     what skewed training of u alone costs
  recovery(u)  = acc(clean@u) - acc(skew)     what clean training of u alone restores
  *_share      = the value / (acc(clean) - acc(skew)), the total drop (NaN when it is 0)
  spurious encoding(u) = I_V(attribute <- u) under skew - the same under clean training
  core forgetting(u)   = I_V(label <- u) under clean - the same under skew training
I_V: ridge probes (ops.probe_stats.fit_probes) from u's pooled output (the logits for the
head) to the one-hot target, trained on one half of the conflicting test images and scored
on the other half (fixed-variance form: held-out R^2 clipped at 0, averaged over the one-hot
columns). On conflicting images the shortcut attribute is drawn independently of the label,
so either target can be decoded only from its own evidence.
Interventions: gain(u) = acc_conflicting(intervention at u) - acc_conflicting(skew), and the
Spearman correlation over units between each localization score and each gain.

The dataset's own attribute (shortcut "none": Waterbirds' place, CelebA's Male): the skewed
training set is the (group-imbalanced) training set, the clean one its group-balanced
subsample (min group count images of every (label, attribute) group); the two hold different
images, so each skewed batch gets a clean partner batch of the same labels, drawn per label
from the clean subsample. Aligned test images carry the attribute most frequent with their
label in training, conflicting ones any other; the clean test set is a group-balanced test
subsample, which is also the attribute probes' data (attribute independent of the label).

Seeds: seed, seed+1, ... change the initialization and the batch order (data and shortcut
stay those of `seed`); every number is reported as mean and standard deviation over seeds.

Distribution (`run_localization(..., dist=)`, a distributed.DistContext with world_size W > 1,
under torchrun): with at least W seeds the seeds are split over the ranks (contiguous,
balanced shares; each rank trains its seeds' full stacked ensembles, so every number equals
the one-process run exactly); with fewer seeds the (seed, variant) pairs, seed-major, are:
each rank trains, for every seed it has a share of, its contiguous run of variants as its own
stacked ensemble (same initialization and batches; a variant's training does not depend on
which variants share its stack, up to float rounding of the differently grouped convolutions,
see shortcut_fast.ensemble), and the V-information probes run where "clean" / "skew" are
trained. The per-seed / per-variant records are gathered in seed and variant order on every
rank, and every rank returns the whole result. Each rank keeps its partial results in
store.sub("rank<r>") (seed_<s>.json with its variants, the ensemble's epochs), resumed after
an elastic restart with the same world size.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from shortcut_fast.distributed import DistContext, check_same, gather, is_main, shard
from shortcut_fast.ensemble import HEAD  # the group of parameters in no block
from shortcut_fast.experiments._api import ApiResult
from shortcut_fast.report import pyplot, save_figure

GRANULARITIES = ("stage", "block")
SHORTCUT_KINDS = ("patch", "tint", "freq", "none")  # none: the dataset's own attribute
TEST_SETS = ("clean", "aligned", "conflicting")
# (label, learning-rate factor of the unit) of the interventions during skewed training.
INTERVENTIONS = (("lr0.1", 0.1), ("frozen", 0.0))
SCORES = ("drop_conflicting", "recovery_conflicting", "spurious_encoding", "core_forgetting")


@dataclass
class LocalizationConfig:
    shortcut: str = "patch"
    rho: float = 0.9
    shortcut_strength: float | None = None
    granularity: str = "stage"
    units: list[str] | None = None  # units to localize (default all, head included)
    epochs: int = 8
    seeds: int = 3
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    interventions: bool = False
    stacked: bool = True
    probe_images: int | None = None  # conflicting test images used by the probes (None: all)

    def __post_init__(self):
        if self.shortcut not in SHORTCUT_KINDS:
            raise ValueError(f"shortcut must be one of {', '.join(SHORTCUT_KINDS)}, got {self.shortcut!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 < self.rho <= 1:
            raise ValueError(f"rho must be a number in (0, 1] (the fraction of each class's training images "
                             f"that carry the shortcut), got {self.rho!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        for name in ("epochs", "seeds", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.probe_images is not None and (not isinstance(self.probe_images, int) or self.probe_images < 4):
            raise ValueError(f"probe_images must be None or an int >= 4, got {self.probe_images!r}")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class LocalizationResult(ApiResult):
    """What run_localization / run return; summary() and write(folder) as in the module's `run`."""

    units: list[str]  # from the stem to the head
    unit_blocks: dict[str, list[str]]  # unit -> model blocks in it ([] for the head)
    localized: list[str]  # the units with skew@u / clean@u variants
    variants: list[str]
    seeds: list[int]
    accuracy: dict  # variant -> test set -> {"mean", "std", "values"}
    total_drop: dict  # test set -> {"mean", "std", "values"}
    per_unit: dict  # metric -> unit -> {"mean", "std", "values"}
    correlations: dict  # "score vs gain" -> {"mean", "std", "values"} (interventions only)
    config: dict
    seconds: float
    per_seed: list[dict] = field(default_factory=list)
    data: str = ""  # what the skewed and the clean training sets are

    _command = "localize"

    def _summary(self, data: str, out: Path | None) -> str:
        return summary(self, data, out)

    def _write(self, out: Path, record: dict) -> None:
        write_outputs(self, out, {k: v for k, v in record.items() if k not in ("recipe", "model_cache")})


# ---------------------------------------------------------------------------------------
# Units and variants


def stage_of(block: str) -> str:
    """The stage a block belongs to: its name without a trailing ".<index>" (layer1.0 -> layer1)."""
    head, _, last = block.rpartition(".")
    return head if head and last.isdigit() else block


def model_units(model: nn.Module, granularity: str = "stage") -> dict[str, list[str]]:
    """Unit name -> the model blocks it groups, in forward order (the head is not included)."""
    from shortcut_fast.models import list_models, model_blocks

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    try:
        blocks = model_blocks(model)
    except (TypeError, ValueError, AttributeError) as exc:
        blocks, why = [], f" ({exc})"
    else:
        why = ""
    if not blocks:
        raise ValueError(f"model: the blocks of {type(model).__name__} cannot be listed{why}; choose a model "
                         f"that declares them: {', '.join(n for n in list_models() if ':' not in n)} "
                         f"(or timm:NAME / tv:NAME with blocks=[...])")
    if granularity == "block":
        return {b: [b] for b in blocks}
    units: dict[str, list[str]] = {}
    for b in blocks:
        units.setdefault(stage_of(b), []).append(b)
    if len(units) == 1 and 1 < len(blocks) <= 4:  # already stages (timm ConvNeXt's net.stages.0..3)
        return {b: [b] for b in blocks}
    if len(units) == 1 and len(blocks) > 4:  # one shared prefix (a ViT): three consecutive thirds
        units = {}
        cuts = [round(i * len(blocks) / 3) for i in range(4)]
        for lo, hi in zip(cuts, cuts[1:]):
            part = blocks[lo:hi]
            name = part[0] if len(part) == 1 else f"{part[0]}-{part[-1].rpartition('.')[2]}"
            units[name] = part
    return units


def intervention_name(scale: float, unit: str) -> str:
    """The variant name of skewed training with `unit`'s learning rate times `scale` (ensemble's naming)."""
    return f"skew lr*{scale:g}@{unit}"


def make_variants(units: list[str], localized: list[str], interventions: bool):
    """The Variants of the experiment over `units` (head last): clean, skew, then per localized
    unit u skew@u and clean@u, and with interventions "skew lr*0.1@u" and "skew lr*0@u" (frozen)."""
    from shortcut_fast.ensemble import Variants

    L = len(units)
    names, skewed, scale = ["clean", "skew"], [[False] * L, [True] * L], [[1.0] * L, [1.0] * L]
    for u in localized:
        i = units.index(u)
        names += [f"skew@{u}", f"clean@{u}"]
        skewed += [[j == i for j in range(L)], [j != i for j in range(L)]]
        scale += [[1.0] * L, [1.0] * L]
    for _, s in INTERVENTIONS if interventions else ():
        for u in localized:
            i = units.index(u)
            names.append(intervention_name(s, u))
            skewed.append([True] * L)
            scale.append([s if j == i else 1.0 for j in range(L)])
    return Variants(names=names, skewed=torch.tensor(skewed, dtype=torch.bool),
                    lr_scale=torch.tensor(scale, dtype=torch.float64))


def unit_parameter_groups(model: nn.Module, unit_blocks: dict[str, list[str]]) -> list[list[str]]:
    """Parameter names per unit (in unit order), the head group (every other parameter) last."""
    from shortcut_fast.ensemble import block_parameter_groups

    blocks = [b for bs in unit_blocks.values() for b in bs]
    groups = block_parameter_groups(model, blocks)
    per_block = dict(zip(blocks, groups[:len(blocks)]))
    return [[p for b in bs for p in per_block[b]] for bs in unit_blocks.values()] + [list(groups[-1])]


def check_units(requested: list[str] | None, units: list[str], granularity: str) -> list[str]:
    """The units to localize: all by default; unknown names fail naming the valid ones."""
    if requested is None:
        return list(units)
    unknown = [u for u in requested if u not in units]
    if unknown:
        raise ValueError(f"blocks: unknown {granularity} name(s) {', '.join(map(repr, unknown))}; valid "
                         f"{granularity} names of this model: {', '.join(units)}")
    return [u for u in units if u in requested]  # forward order, no duplicates


# ---------------------------------------------------------------------------------------
# Metrics (pure functions of accuracies and V-information)


def _share(value: float, total: float) -> float:
    return value / total if total != 0 and math.isfinite(total) else math.nan


def localization_scores(acc: dict[str, dict[str, float]], localized: list[str],
                        test_sets=("clean", "conflicting")) -> dict[str, dict[str, float]]:
    """Per-unit drop, recovery and their shares of the total drop (module docstring).

    acc: variant name -> test set -> accuracy, holding "clean", "skew", "skew@u", "clean@u".
    Returns metric -> unit -> value, metrics drop_<set>, recovery_<set>, drop_share_<set>,
    recovery_share_<set>, and total_drop_<set> under the unit key "all".
    """
    out: dict[str, dict[str, float]] = {}
    for t in test_sets:
        total = acc["clean"][t] - acc["skew"][t]
        out[f"total_drop_{t}"] = {"all": total}
        out[f"drop_{t}"] = {u: acc["clean"][t] - acc[f"skew@{u}"][t] for u in localized}
        out[f"recovery_{t}"] = {u: acc[f"clean@{u}"][t] - acc["skew"][t] for u in localized}
        out[f"drop_share_{t}"] = {u: _share(v, total) for u, v in out[f"drop_{t}"].items()}
        out[f"recovery_share_{t}"] = {u: _share(v, total) for u, v in out[f"recovery_{t}"].items()}
    return out


def intervention_gains(acc: dict[str, dict[str, float]], localized: list[str],
                       test_set: str = "conflicting") -> dict[str, dict[str, float]]:
    """gain_<kind> -> unit -> acc(kind@u) - acc(skew) on `test_set`."""
    return {f"gain_{label}": {u: acc[intervention_name(s, u)][test_set] - acc["skew"][test_set] for u in localized}
            for label, s in INTERVENTIONS}


def score_gain_correlations(metrics: dict[str, dict[str, float]], localized: list[str]) -> dict[str, float]:
    """Spearman correlation over units between each localization score and each intervention gain."""
    from shortcut_fast.experiments.stats import spearman

    out = {}
    for score in SCORES:
        for prefix, _ in INTERVENTIONS:
            gain = f"gain_{prefix}"
            if score in metrics and gain in metrics:
                out[f"{score} vs {gain}"] = spearman([metrics[score][u] for u in localized],
                                                     [metrics[gain][u] for u in localized])
    return out


def one_hot(values: torch.Tensor) -> torch.Tensor:
    """(N,) integer categories -> (N, K) float64 one-hot over the K distinct values present."""
    levels = torch.unique(values)
    return (values[:, None] == levels[None, :].to(values.device)).double()


def categorical_v_information(x_train: torch.Tensor, c_train: torch.Tensor, x_heldout: torch.Tensor,
                              c_heldout: torch.Tensor, *, backend: str = "auto") -> float:
    """V-information of a category from features: ridge probes to its one-hot columns
    (ops.probe_stats.fit_probes, alpha chosen on the held-out half), the fixed-variance form
    max(held-out R^2, 0) averaged over the columns (0 for a category with one value)."""
    from shortcut_fast.ops.probe_stats import fit_probes

    c_train, c_heldout = c_train.to(x_train.device), c_heldout.to(x_train.device)  # probes run where x is
    levels = torch.unique(torch.cat([c_train, c_heldout]))
    if levels.numel() < 2:
        return 0.0
    z_train = (c_train[:, None] == levels[None, :]).double()
    z_held = (c_heldout[:, None] == levels[None, :]).double()
    probes = fit_probes(x_train.double(), z_train, x_heldout.double(), z_held, backend=backend)
    return float(probes.v_information.mean())


# ---------------------------------------------------------------------------------------
# The experiment


def _aggregate(values: list[float]) -> dict:
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    std = (math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1
           else (0.0 if finite else math.nan))
    return {"mean": mean, "std": std, "values": vals}


def _split_half(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 11))
    return perm[: n // 2], perm[n // 2:]


@torch.no_grad()
def _unit_features(model: nn.Module, x: torch.Tensor, unit_blocks: dict[str, list[str]],
                   batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Pooled output of each unit's last block, and the logits for the head (eval mode), on x's device."""
    from shortcut_fast.models import block_outputs

    was = model.training
    model.eval()
    last = {u: bs[-1] for u, bs in unit_blocks.items()}
    parts: dict[str, list[torch.Tensor]] = {u: [] for u in [*last, HEAD]}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        outs = block_outputs(model, xb, list(last.values()))
        for u, b in last.items():
            parts[u].append(outs[b].flatten(1).float())
        parts[HEAD].append(model(xb).float())
    model.train(was)
    return {u: torch.cat(p) for u, p in parts.items()}


@torch.no_grad()
def variant_accuracies(model: nn.Module, states: list[dict], names: list[str], tests: dict, device,
                       batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """variant -> test set -> accuracy, every variant evaluated in one vmap pass per chunk of
    images (ensemble.predict_variants, eval mode), as exact ratios of integer counts."""
    from shortcut_fast.ensemble import predict_variants

    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for t, ds in tests.items():
        correct = torch.zeros(len(states), dtype=torch.int64)
        for start in range(0, len(ds), batch_size):
            x, y, _ = ds.get_batch(torch.arange(start, min(start + batch_size, len(ds))), device=device)
            logits = predict_variants(model, states, x, batch_size=batch_size)
            correct += (logits.argmax(-1) == y[None]).sum(1).cpu()
        for name, c in zip(names, correct.tolist()):
            out[name][t] = c / len(ds) if len(ds) else math.nan
    return out


def skewed_splits(splits, cfg: LocalizationConfig):
    """The shortcut-planted copy of clean `splits` (same training images in the same order)."""
    from shortcut_fast.data.shortcuts import inject_shortcut

    if splits.num_attributes and splits.meta.get("shortcut"):
        raise ValueError("splits: the data already carries a planted shortcut; pass the clean dataset "
                         "and choose the shortcut with shortcut=patch|tint|freq")
    return inject_shortcut(splits, kind=cfg.shortcut, rho=cfg.rho, seed=cfg.seed, strength=cfg.shortcut_strength)


@dataclass
class LocalizationData:
    """What the experiment trains and tests on.

    skew_train: the skewed training set (its order defines an epoch). clean_train: the clean one;
    clean_pools None means it holds the same images as skew_train (a planted shortcut), else
    clean_pools[c] indexes its images of label c, from which each skewed batch's clean partner
    is drawn label by label. tests: clean, aligned, conflicting. attribute_probe: images whose
    attribute is independent of the label; label_probe: the conflicting images.
    """

    skew_train: object
    clean_train: object
    clean_pools: list | None
    tests: dict
    attribute_probe: object
    label_probe: object
    description: str


def _group_balanced(ds, num_classes: int, num_attributes: int, seed: int, what: str) -> torch.Tensor:
    """Indices of a group-balanced subsample: min group count images of every (label, attribute) group."""
    labels, attrs = ds.labels.cpu(), ds.attributes.cpu()
    if bool((attrs < 0).any()):
        raise ValueError(f"data: the {what} split has images without an attribute (-1); the dataset's own "
                         f"attribute needs one for every image")
    group = labels * num_attributes + attrs
    counts = torch.bincount(group, minlength=num_classes * num_attributes)
    if int(counts.min()) == 0:
        g = int(torch.argmin(counts))
        raise ValueError(f"data: the {what} split has no image of group (label {g // num_attributes}, attribute "
                         f"{g % num_attributes}), so it has no group-balanced subsample; plant a shortcut "
                         f"instead (shortcut=patch|tint|freq)")
    n = int(counts.min())
    perm = torch.randperm(len(group), generator=torch.Generator().manual_seed(seed * 31 + 7))
    rank = torch.empty_like(perm)
    # rank of each image within its group, in the random order
    sorted_group, order = torch.sort(group[perm], stable=True)
    starts = torch.cumsum(torch.bincount(sorted_group, minlength=len(counts)), 0) - torch.bincount(
        sorted_group, minlength=len(counts))
    rank[perm[order]] = torch.arange(len(group)) - starts[sorted_group]
    return torch.nonzero(rank < n).flatten()


def localization_data(splits, cfg: LocalizationConfig) -> LocalizationData:
    """The training and test sets of the experiment (module docstring; shortcut "none": the
    dataset's own attribute, e.g. Waterbirds' place or CelebA's Male)."""
    if cfg.shortcut != "none":
        skew = skewed_splits(splits, cfg)
        conf = skew.extra["conflicting"]
        return LocalizationData(skew_train=skew.train, clean_train=splits.train, clean_pools=None,
                                tests={t: skew.extra[t] for t in TEST_SETS}, attribute_probe=conf, label_probe=conf,
                                description=f"planted {cfg.shortcut} shortcut in {cfg.rho:g} of each class's "
                                            f"training images; clean = the same images without it")
    C, A = splits.num_classes, splits.num_attributes
    if A < 2:
        raise ValueError(f"shortcut: {splits.name!r} has no attributes of its own; choose shortcut=patch, tint "
                         f"or freq")
    train, test = splits.train, splits.test
    keep = _group_balanced(train, C, A, cfg.seed, "train")
    clean = train.subset(keep)
    pools = [torch.nonzero(clean.labels.cpu() == c).flatten() for c in range(C)]
    # Aligned = the attribute most frequent with the image's label in training (attribute == label
    # for Waterbirds; for CelebA's Blond_Hair / Male: female for both labels).
    counts = torch.bincount(train.labels.cpu() * A + train.attributes.cpu(), minlength=C * A).view(C, A)
    majority = counts.argmax(1)
    y, a = test.labels.cpu(), test.attributes.cpu()
    aligned = a == majority[y]
    balanced_test = test.subset(_group_balanced(test, C, A, cfg.seed + 1, "test"))
    conflicting = test.subset(torch.nonzero(~aligned).flatten())
    return LocalizationData(skew_train=train, clean_train=clean, clean_pools=pools,
                            tests={"clean": balanced_test, "aligned": test.subset(torch.nonzero(aligned).flatten()),
                                   "conflicting": conflicting},
                            attribute_probe=balanced_test, label_probe=conflicting,
                            description=f"the dataset's own attribute: skewed = the training set "
                                        f"({len(train)} images), clean = its group-balanced subsample ({len(clean)}); "
                                        f"clean test = group-balanced test subsample")


class _Epoch:
    """One epoch's batches: iterable, with a length (the ensemble's progress shows it)."""

    def __init__(self, make, steps: int):
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return self.make()


def _batches(data: LocalizationData, cfg: LocalizationConfig, seed: int, device):
    """batches(epoch) for train_variants: one order per (seed, epoch), shared by every variant."""
    steps = math.ceil(len(data.skew_train) / cfg.batch_size)

    def batches(epoch):
        return _Epoch(lambda: _epoch(epoch), steps)

    def _epoch(epoch):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(data.skew_train), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x_skew, y, _ = data.skew_train.get_batch(idx, device=device)
            if data.clean_pools is None:  # the same images, without the shortcut
                cidx = idx
            else:  # a clean partner of the same label for every skewed image (drawn with replacement)
                yc = y.cpu()
                cidx = torch.empty_like(idx)
                for c, pool in enumerate(data.clean_pools):
                    sel = torch.nonzero(yc == c).flatten()
                    if sel.numel():
                        cidx[sel] = pool[torch.randint(len(pool), (sel.numel(),), generator=gen)]
            x_clean, _, _ = data.clean_train.get_batch(cidx, device=device)
            yield x_clean, x_skew, y

    return batches


def _probe_split(ds, limit, seed, device):
    n = len(ds) if limit is None else min(limit, len(ds))
    x, y, a = ds.get_batch(torch.arange(n), device=device)
    tr, ho = _split_half(n, seed)
    return x, y.cpu(), a.cpu(), tr, ho


def run_localization(model_fn: Callable[[int], nn.Module], splits, cfg: LocalizationConfig, *, store=None,
                     device: torch.device | str = "cpu", backend: str = "auto",
                     progress: bool = True, dist: DistContext | None = None) -> LocalizationResult:
    """Counterfactual localization over cfg.seeds seeds (module docstring).

    model_fn(seed) returns a freshly initialized model (on the CPU; moved to `device` here).
    splits: the CLEAN dataset; the skewed copy is planted here (in-memory splits), or with
    shortcut "none" splits' own attribute is used (localization_data). store: a run folder
    Store; each finished seed is saved there (seed_<s>.json) and reused when it is resuming,
    and the ensemble's per-epoch state goes to its sub-store seed_<s>/. backend: of the probes' op.

    dist (a distributed.DistContext with world_size > 1, under torchrun): seeds, or with fewer
    seeds than ranks (seed, variant) pairs, are split over the ranks (module docstring); the
    settings are compared across ranks first, each rank's partial results go to
    store.sub("rank<r>"), and every rank returns the whole result. A world size larger than
    the (seed, variant) pairs is refused.
    """
    from shortcut_fast.ensemble import train_variants

    if not isinstance(cfg, LocalizationConfig):
        raise TypeError(f"cfg must be a LocalizationConfig, got {type(cfg).__name__}")
    device = torch.device(device)
    t0 = time.perf_counter()
    distributed = dist is not None and dist.world_size > 1
    if distributed:
        check_same({"config": dict(cfg.__dict__), "device": device.type, "backend": backend,
                    "dtype": str(torch.get_default_dtype())}, dist, "localization settings")
        if store is not None:
            store = store.sub(f"rank{dist.rank}")
    progress = progress and is_main(dist)
    data = localization_data(splits, cfg)
    tests = data.tests
    probes = {"attribute": _probe_split(data.attribute_probe, cfg.probe_images, cfg.seed, device),
              "label": _probe_split(data.label_probe, cfg.probe_images, cfg.seed, device)}

    per_seed, units, unit_blocks, localized, names = [], None, None, None, None
    share = None  # this rank's range of seed indices, or of seed-major (seed, variant) pairs
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        model = model_fn(seed)  # on every rank, for every seed: model_fn is called as in one process
        unit_blocks = model_units(model, cfg.granularity)
        units = [*unit_blocks, HEAD]
        localized = check_units(cfg.units, units, cfg.granularity)
        variants = make_variants(units, localized, cfg.interventions)
        names = variants.names
        V = len(names)
        if not distributed:
            mine = range(V)
        elif cfg.seeds >= dist.world_size:  # whole seeds
            if share is None:
                share = shard(cfg.seeds, dist, "the seeds of the localization")
            mine = range(V) if i in share else range(0)
        else:  # runs of variants of each seed
            if share is None:
                share = shard(cfg.seeds * V, dist, f"the (seed, variant) pairs of the localization ({cfg.seeds} "
                                                   f"seed(s) x {V} variants)")
            mine = range(max(share.start, i * V) - i * V, min(share.stop, (i + 1) * V) - i * V)
        if len(mine) == 0:
            continue
        if len(mine) < V:
            variants = variants.subset(list(mine))
        mine_names = variants.names
        key = f"seed_{seed}.json"
        record = store.load_json(key) if store is not None else None
        if record is not None and record.get("variants") == mine_names:
            per_seed.append(record)
            continue
        model = model.to(device)
        groups = unit_parameter_groups(model, unit_blocks)

        batches = _batches(data, cfg, seed, device)
        states = train_variants(model, variants, groups, batches, epochs=cfg.epochs, lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay, stacked=cfg.stacked,
                                store=store.sub(f"seed_{seed}") if store is not None else None, progress=progress)
        acc = variant_accuracies(model, states, mine_names, tests, device)
        vinfo = {"attribute": {}, "label": {}}
        for name, state in zip(mine_names, states):
            if name in ("clean", "skew"):
                model.load_state_dict(state)
                for which, (x, y, a, tr, ho) in probes.items():
                    target = a if which == "attribute" else y
                    feats = _unit_features(model, x, unit_blocks)
                    vinfo[which][name] = {u: categorical_v_information(f[tr], target[tr], f[ho], target[ho],
                                                                       backend=backend) for u, f in feats.items()}
        record = {"seed": seed, "variants": mine_names, "accuracy": acc, "v_information": vinfo}
        if store is not None:
            store.save_json(key, record)
        per_seed.append(record)
    if distributed:  # every rank's records, in rank order = seed, then variant order; one record a seed
        merged: dict[int, dict] = {}
        for part in gather(per_seed, dist):
            for rec in part:
                m = merged.setdefault(rec["seed"], {"seed": rec["seed"], "variants": [], "accuracy": {},
                                                    "v_information": {"attribute": {}, "label": {}}})
                m["variants"] += rec["variants"]
                m["accuracy"].update(rec["accuracy"])
                for which, by_name in rec["v_information"].items():
                    m["v_information"][which].update(by_name)
        per_seed = [merged[s] for s in sorted(merged)]

    # Per-seed metrics, then mean and spread over seeds.
    metric_runs, corr_runs = [], []
    for rec in per_seed:
        acc, vi = rec["accuracy"], rec["v_information"]
        m = {k: v for k, v in localization_scores(acc, localized).items() if not k.startswith("total_drop")}
        m["spurious_encoding"] = {u: vi["attribute"]["skew"][u] - vi["attribute"]["clean"][u] for u in units}
        m["core_forgetting"] = {u: vi["label"]["clean"][u] - vi["label"]["skew"][u] for u in units}
        for which in ("attribute", "label"):
            for arm in ("clean", "skew"):
                m[f"v_information_{which}_{arm}"] = dict(vi[which][arm])
        if cfg.interventions:
            m.update(intervention_gains(acc, localized))
            corr_runs.append(score_gain_correlations(m, localized))
        metric_runs.append(m)
    per_unit = {k: {u: _aggregate([m[k][u] for m in metric_runs]) for u in metric_runs[0][k]}
                for k in metric_runs[0]}
    correlations = {k: _aggregate([c[k] for c in corr_runs]) for k in (corr_runs[0] if corr_runs else {})}
    accuracy = {v: {t: _aggregate([r["accuracy"][v][t] for r in per_seed]) for t in TEST_SETS} for v in names}
    total = {t: _aggregate([r["accuracy"]["clean"][t] - r["accuracy"]["skew"][t] for r in per_seed])
             for t in TEST_SETS}
    return LocalizationResult(units=units, unit_blocks={**unit_blocks, HEAD: []}, localized=localized,
                              variants=names, seeds=[r["seed"] for r in per_seed], accuracy=accuracy,
                              total_drop=total, per_unit=per_unit, correlations=correlations,
                              config=dict(cfg.__dict__), seconds=time.perf_counter() - t0, per_seed=per_seed,
                              data=data.description)


# ---------------------------------------------------------------------------------------
# Summary and figures


def _ms(stat: dict, digits: int = 3) -> str:
    m, s = stat["mean"], stat["std"]
    if not math.isfinite(m):
        return "-"
    return f"{m:+.{digits}f}" + (f" ± {s:.{digits}f}" if len(stat["values"]) > 1 and math.isfinite(s) else "")


def summary_table(result: LocalizationResult) -> tuple[list[list], list[str]]:
    """Rows from the head down to the stem: drops, recoveries (shares), encoding, forgetting."""
    pu = result.per_unit
    headers = ["unit", "drop clean", "drop conf", "drop conf share", "recovery conf", "recovery conf share",
               "spurious enc", "core forget"]
    if "gain_frozen" in pu:
        headers += ["gain lr0.1", "gain frozen"]
    rows = []
    for u in reversed(result.units):
        row = [u]
        for k in ("drop_clean", "drop_conflicting", "drop_share_conflicting", "recovery_conflicting",
                  "recovery_share_conflicting"):
            row.append(_ms(pu[k][u]) if u in pu[k] else "")
        row += [_ms(pu["spurious_encoding"][u]), _ms(pu["core_forgetting"][u])]
        if "gain_frozen" in pu:
            row += [_ms(pu["gain_lr0.1"][u]) if u in pu["gain_lr0.1"] else "",
                    _ms(pu["gain_frozen"][u]) if u in pu["gain_frozen"] else ""]
        rows.append(row)
    return rows, headers


def summary(result: LocalizationResult, data: str, out: Path | None = None) -> str:
    from shortcut_fast.report import format_table

    acc = result.accuracy
    lines = [f"\nlocalize on {data}: {len(result.units)} units, {len(result.variants)} variants x "
             f"{len(result.seeds)} seed(s), {result.seconds:.1f} s",
             f"skew: {result.data}",
             "accuracy (clean / aligned / conflicting test): "
             + "; ".join(f"theta_{v} {acc[v]['clean']['mean']:.3f} / {acc[v]['aligned']['mean']:.3f} / "
                         f"{acc[v]['conflicting']['mean']:.3f}" for v in ("clean", "skew")),
             f"total drop acc(clean) - acc(skew): clean test {_ms(result.total_drop['clean'])}, "
             f"conflicting test {_ms(result.total_drop['conflicting'])}\n"]
    rows, headers = summary_table(result)
    lines.append(format_table(rows, headers))
    if result.correlations:
        lines.append("\nSpearman over units, localization score vs intervention gain (conflicting test):")
        lines += [f"  {k}: {_ms(v, 2)}" for k, v in result.correlations.items()]
    if out is not None:
        lines.append(f"\nwrote {Path(out) / 'result.json'} and figures in {out}")
    return "\n".join(lines)


def _bars(ax, units, series: dict[str, dict], title: str, ylabel: str) -> None:
    import numpy as np

    xs = np.arange(len(units))
    width = 0.8 / max(len(series), 1)
    for i, (label, stats) in enumerate(series.items()):
        means = [stats[u]["mean"] if u in stats else np.nan for u in units]
        stds = [stats[u]["std"] if u in stats else 0.0 for u in units]
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(xs, units, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def write_figures(result: LocalizationResult, out_dir) -> list[Path]:
    """contributions.png, representation.png and (interventions) interventions.png."""
    import numpy as np

    plt = pyplot()
    out, pu, units, loc = Path(out_dir), result.per_unit, result.units, result.localized
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, t in zip(axes, ("clean", "conflicting")):
        _bars(ax, loc, {"drop (skew@u)": pu[f"drop_share_{t}"], "recovery (clean@u)": pu[f"recovery_share_{t}"]},
              f"{t} test: share of total drop {result.total_drop[t]['mean']:+.3f}", "share of acc(clean) - acc(skew)")
    paths.append(save_figure(fig, out / "contributions.png", tight=True))

    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = np.arange(len(units))
    for key, label in (("spurious_encoding", "spurious encoding (attribute, skew - clean)"),
                       ("core_forgetting", "core forgetting (label on conflicting, clean - skew)")):
        m = np.array([pu[key][u]["mean"] for u in units])
        s = np.array([pu[key][u]["std"] for u in units])
        ax.plot(xs, m, marker="o", label=label)
        ax.fill_between(xs, m - s, m + s, alpha=0.2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(xs, units, rotation=30, ha="right")
    ax.set_xlabel("depth (unit)")
    ax.set_ylabel("V-information difference (R^2)")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "representation.png", tight=True))

    if "gain_frozen" in pu:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        _bars(ax, loc, {f"{p} at u": pu[f"gain_{p}"] for p, _ in INTERVENTIONS},
              "interventions during skewed training", "conflicting acc - acc(skew)")
        paths.append(save_figure(fig, out / "interventions.png", tight=True))
    return paths


def write_outputs(result: LocalizationResult, out_dir, record: dict | None = None) -> list[Path]:
    """result.json (the result inside `record` when given) and the figures."""
    from shortcut_fast.report import write_json

    out = Path(out_dir)
    write_json(result if record is None else {**record, "result": result}, out / "result.json")
    return [out / "result.json", *write_figures(result, out)]


# ---------------------------------------------------------------------------------------
# The Python API (docs/api.md): Config, Result, run

Config = LocalizationConfig
Result = LocalizationResult


def fresh_copies(template: nn.Module) -> Callable[[int], nn.Module]:
    """seed -> a deep copy of `template` re-initialized under torch.manual_seed(seed) (every
    submodule's reset_parameters(); BatchNorm statistics too), without touching the global
    random state. A parameter of a module without reset_parameters could not be
    re-initialized, so such a template is refused."""
    import copy

    fixed = [name or type(template).__name__ for name, m in template.named_modules()
             if any(True for _ in m.parameters(recurse=False)) and not callable(getattr(m, "reset_parameters", None))]
    if fixed:
        raise ValueError(f"model: {', '.join(fixed[:5])} {'has' if len(fixed) == 1 else 'have'} parameters but no "
                         f"reset_parameters(), so copies of the model cannot be re-initialized per seed; pass a "
                         f"function seed -> freshly initialized model instead")

    def build(seed: int) -> nn.Module:
        net = copy.deepcopy(template)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in net.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        return net

    return build


def run(model, data, config: LocalizationConfig | None = None, *, progress: bool = False,
        **kw) -> LocalizationResult:
    """Where in the network is a shortcut learned? Counterfactual training of every unit.

    model: an nn.Module used as a template (every training run of every seed gets a fresh,
    re-initialized copy: fresh_copies) or a function seed -> freshly initialized nn.Module.
    Its blocks must be discoverable (a torchvision ResNet's layer1.0 ..., a `features`
    container, or a `block_names` attribute). data: the CLEAN data (anything
    shortcut_fast.data.as_splits accepts); config.shortcut plants the shortcut (or "none":
    the data's own attribute). kw: run_localization's own options (device, backend, store).
    Returns a Result: summary(), write(folder) (result.json and the figures).
    """
    from shortcut_fast.experiments import _api

    if isinstance(model, nn.Module):
        model_fn = fresh_copies(model)
    elif callable(model):
        model_fn = model
    else:
        raise TypeError(f"model must be an nn.Module (a template, copied and re-initialized per seed) or a function "
                        f"seed -> nn.Module, got {type(model).__name__}")
    cfg = _api.check_config(config, LocalizationConfig, "localization.Config")
    splits, name = _api.splits_of(data)
    kw.setdefault("device", _api.default_device(model))
    result = run_localization(model_fn, splits, cfg, progress=progress, **kw)
    _api.attach(result, "localize", name, splits, model)
    return result
