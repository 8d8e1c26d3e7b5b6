"""Exact channel-ablation sweeps with per-group outcomes (docs/experiments.md#spurious-memorization).

For each layer and each channel (or channel set), modify that channel at the ablation point
and count per-group correct predictions and summed cross-entropy over a data set.

Fast path (`channel_ablation_sweep`): the model is cut at the ablation point
(surgery.split): the prefix runs once per image batch, the cached activation is expanded into
many masked copies in one op (ops.ablation.channel_ablate) or, when the next layer is a conv
or Linear, through linearity (one grouped conv for all channels), the rest of the model
runs on the V*B stacked variants in chunks sized by `max_bytes`, and one reduction
(ops.ablation.group_outcomes) gives per-(variant, group) counts.

Ground truth (`channel_ablation_reference`): one full forward per channel and batch with a
forward hook that modifies the layer output; it is also the benchmark baseline.

Modes: "zero"; "mean" (per-channel mean over the data and positions, from a first pass);
"activation-noise" (ours: the channel's activation replaced by Gaussian noise with the
channel's mean and std, fresh per sample, `repeats` seeded draws, averaged);
"weight-noise" (the published "noise" of You et al.'s code, utils.modify_weights modes
random_init / random_noise: the output channel's filter weights of the conv are replaced by
(noise_kind="replace") or added (noise_kind="add") N(0, noise_std^2) draws, one draw of the
weights per repeat shared by every sample, `repeats` averaged; the conv's bias is kept);
"rewind" (the ablation point recomputed with the weights of `rewind_to` for the chain that
produces it: the named module for "output", the conv for "pre-bn", conv and BN for
"post-activation"). "noise" alone is refused as ambiguous. The model is evaluated in eval
mode (its mode is restored afterwards).

Persistence: with `store=` (a run_folder.Store) the sweep saves its accumulators after every
batch and layer, and a store that is resuming continues from them. The saved state carries a
compact record of the sweep's arguments (and digests of the model and the data's labels and
groups); a store holding another sweep's state is refused, never silently mixed in.

Distribution (`dist=` a distributed.DistContext with world_size > 1, one process per rank
under torchrun): the image batches (the one-process batches of batch_size) are split over
the ranks in contiguous, balanced shares; each rank runs the prefix once per batch of its
own and sweeps every variant on it, so no rank recomputes a prefix another ran (splitting
the variants instead had every rank run every batch's prefix). The batches left over after
an even split are shared by variants (each rank sweeps its share of their variants). The
per-channel statistics of modes "mean" / "activation-noise" come per batch from the rank
that owns it and are added in batch order, as in one process. Each rank keeps its partial
state in its own store file (sweep.rank{r}.pt: an elastic restart resumes each rank from it,
the ranks agreeing first on the layers to redo); at the end of every layer the per-(variant,
group) counts, losses and outputs are all-reduced (the ranks filled disjoint cells). Every
batch is computed as in one process (noise draws are seeded per layer, repeat and batch,
never per variant or rank), so the counts equal one process's exactly; summed losses agree
to float rounding. The sweep's arguments and the digests of the model and data are compared
across ranks first (distributed.check_same).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.data import FileImageDataset, ImageDataset
from shortcut_fast.distributed import DistContext, all_reduce_sum_, check_same, gather, is_main, rank_suffix, shard
from shortcut_fast.models.introspect import get_submodule
from shortcut_fast.validate import check_int
from shortcut_fast.ops._checks import check_labels, nonfinite_count, raise_nonfinite
from shortcut_fast.ops.ablation import _group_outcomes_unchecked, channel_masks, group_outcomes_reference
from shortcut_fast.report import Progress
from shortcut_fast.run_folder import fingerprint, load_state_file, settings_diff, tensor_digest
from shortcut_fast.surgery.split import (
    WHERE,
    _load_rewound,
    _resolve_conv,
    default_channel_axis,
    eval_mode,
    no_inplace,
    split_model,
)

if TYPE_CHECKING:
    from shortcut_fast.run_folder import Store

MODES = ("zero", "mean", "activation-noise", "weight-noise", "rewind")
NOISE_MODES = ("activation-noise", "weight-noise")
NOISE_KINDS = ("replace", "add")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
VERIFY_IMAGES = 8  # images of the first batch the split is verified on (SplitModel.verify)

__all__ = [
    "MODES",
    "NOISE_KINDS",
    "LayerSweep",
    "SweepResult",
    "channel_ablation_sweep",
    "channel_ablation_reference",
    "weight_norm_scores",
    "gradient_norm_scores",
    "conv_names",
    "channel_conv",
    "global_top",
    "weight_noise",
]


# ---------------------------------------------------------------------------------------
# Results


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    den = den.double()
    return torch.where(den > 0, num.double() / den.clamp_min(1), torch.full_like(den, float("nan")))


@dataclass
class LayerSweep:
    """One layer's sweep. V variants (rows), G groups (columns).

    correct: (V, G) correct predictions (int64; with repeats > 1 the float mean over the
    draws); loss: (V, G) summed cross-entropy (mean over draws); group_counts: (G,) samples
    per group; baseline_*: the unmodified model; outputs: per-sample logits (V, N, L)
    ((R, V, N, L) with repeats R > 1) when asked for; channels: each variant's channel set.
    """
    layer: str
    where: str
    mode: str
    channel_axis: int
    num_channels: int
    channels: list
    correct: torch.Tensor
    loss: torch.Tensor
    group_counts: torch.Tensor
    baseline_correct: torch.Tensor
    baseline_loss: torch.Tensor
    repeats: int = 1
    method: str = "fx"
    linearity: bool = False
    outputs: Optional[torch.Tensor] = None
    baseline_outputs: Optional[torch.Tensor] = None

    def accuracy(self) -> torch.Tensor:
        """(V, G) accuracy per variant and group (NaN for empty groups)."""
        return _safe_div(self.correct, self.group_counts[None].expand_as(self.correct))

    def baseline_accuracy(self) -> torch.Tensor:
        return _safe_div(self.baseline_correct, self.group_counts)

    def drop(self) -> torch.Tensor:
        """(V, G) baseline accuracy minus ablated accuracy."""
        return self.baseline_accuracy()[None] - self.accuracy()

    def mean_loss(self) -> torch.Tensor:
        return _safe_div(self.loss, self.group_counts[None].expand_as(self.loss))

    def score(self, minority: Sequence[int], majority: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(V,) pooled accuracy drop on the `minority` groups minus that on `majority` (default:
        every other non-empty group): large = the variant hurts the minority selectively."""
        G = self.group_counts.numel()
        minority = list(minority)
        if majority is None:
            majority = [g for g in range(G) if g not in minority and int(self.group_counts[g]) > 0]

        def pooled_drop(groups):
            idx = torch.tensor(list(groups), dtype=torch.long)
            n = self.group_counts[idx].double().sum().clamp_min(1)
            return (self.baseline_correct[idx].double().sum() - self.correct[:, idx].double().sum(1)) / n
        return pooled_drop(minority) - pooled_drop(majority)


@dataclass
class SweepResult:
    """Per-layer sweeps (`layers[name]`, or `result[name]`) and the sweep's settings."""
    layers: dict
    mode: str
    where: str
    num_groups: int
    num_samples: int
    repeats: int = 1
    seed: int = 0

    def __getitem__(self, layer: str) -> LayerSweep:
        return self._one(layer)

    def _one(self, layer: Optional[str]) -> LayerSweep:
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"name a layer: this sweep has {list(self.layers)}")
            return next(iter(self.layers.values()))
        if layer not in self.layers:
            raise KeyError(f"no layer {layer!r} in this sweep; layers: {list(self.layers)}")
        return self.layers[layer]

    def accuracy(self, layer: Optional[str] = None) -> torch.Tensor:
        return self._one(layer).accuracy()

    def baseline_accuracy(self, layer: Optional[str] = None) -> torch.Tensor:
        return self._one(layer).baseline_accuracy()

    def drop(self, layer: Optional[str] = None) -> torch.Tensor:
        return self._one(layer).drop()


# ---------------------------------------------------------------------------------------
# Inputs


@dataclass
class _Data:
    n: int
    labels: torch.Tensor
    groups: torch.Tensor
    num_groups: int
    source: Any
    checked: bool = False  # check_images ran: batches are not checked one by one

    def images(self, index: torch.Tensor, device) -> torch.Tensor:
        """Float images of `index` on `device`, from a dataset or a tensor of images."""
        if isinstance(self.source, torch.Tensor):
            x = self.source[index.to(self.source.device)].to(device)
            if not x.is_floating_point():
                x = x.float().div_(255)
        else:
            x, _, _ = self.source.get_batch(index, device=device)
        if not self.checked:
            _check_finite(x, index)
        return x

    def check_images(self, batch_size: int) -> None:
        """NaN/Inf images, checked once for the whole data set (one host sync, not one per
        batch); on failure the first bad batch of `batch_size` is named as images() names it.
        Integer images (uint8 tensors, decoded files) cannot hold NaN/Inf."""
        stored = self.source.images if isinstance(self.source, ImageDataset) else self.source
        if isinstance(stored, torch.Tensor) and stored.is_floating_point():
            bad = torch.cat([~torch.isfinite(stored[s:s + batch_size].flatten(1)).all(1)
                             for s in range(0, self.n, batch_size)])
            if bool(bad.any()):
                start = int(bad.nonzero()[0, 0]) // batch_size * batch_size
                index = torch.arange(start, min(start + batch_size, self.n))
                _check_finite(self.images(index, stored.device), index)
        self.checked = True

    def batch(self, start: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stop = min(start + size, self.n)
        x = self.images(torch.arange(start, stop), device)
        return x, self.labels[start:stop].to(device), self.groups[start:stop].to(device)


def _check_finite(x: torch.Tensor, index: torch.Tensor) -> None:
    """NaN/Inf images would make every variant's prediction garbage (or fail the split check
    with a misleading message): name the input and the first bad sample instead."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bool(bad.any()):
        first = int(index[int(bad.nonzero()[0, 0])])
        raise ValueError(f"data: the images contain NaN or Inf ({int(bad.sum())} bad samples among "
                         f"{int(index[0])}..{int(index[-1])}, the first is sample {first}); clean or drop them "
                         f"before the sweep")


def _as_data(data, num_groups: Optional[int]) -> _Data:
    if isinstance(data, (ImageDataset, FileImageDataset)):
        labels, groups = data.labels.cpu().long(), data.groups.cpu().long()
        if num_groups is None:
            num_groups = int(data.num_groups)
        if num_groups == 0:  # no attribute: one group holding every sample
            groups, num_groups = torch.zeros_like(labels), 1
        source, n = data, len(data)
    elif isinstance(data, (tuple, list)) and len(data) == 3:
        x, labels, groups = data
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"data[0] (images) must be a tensor (N, ...), got {type(x).__name__}")
        labels = torch.as_tensor(labels).cpu().long().flatten()
        groups = torch.as_tensor(groups).cpu().long().flatten()
        n = x.shape[0]
        if labels.numel() != n or groups.numel() != n:
            raise ValueError(f"data: images ({n}), labels ({labels.numel()}) and groups "
                             f"({groups.numel()}) must have the same length")
        if num_groups is None:
            num_groups = int(groups.max()) + 1 if n else 1
        source = x
    else:
        raise TypeError("data must be an ImageDataset or a tuple (images, labels, groups), got "
                        f"{type(data).__name__}")
    if n == 0:
        raise ValueError("data is empty")
    if int(groups.min()) < 0 or int(groups.max()) >= num_groups:
        raise ValueError(f"groups must lie in [0, {num_groups}) (num_groups={num_groups}), got values in "
                         f"[{int(groups.min())}, {int(groups.max())}]")
    return _Data(n, labels, groups, int(num_groups), source)


def _variants(C: int, channels, channel_sets) -> list[list[int]]:
    if channels is None and channel_sets is None:
        return [[c] for c in range(C)]
    out: list[list[int]] = []
    if channels is not None:
        out += [[int(c)] for c in (channels.tolist() if isinstance(channels, torch.Tensor) else channels)]
    if channel_sets is not None:
        out += [sorted(int(c) for c in s) for s in channel_sets]
    if not out:
        raise ValueError("no variants: channels and channel_sets are both empty")
    return out


def _rewind_weights(rewind_to) -> dict:
    """A state dict from a state dict, a model, or a checkpoint path (the project's
    checkpoints keep the weights under "model"; files are read with weights_only=True)."""
    if isinstance(rewind_to, nn.Module):
        return rewind_to.state_dict()
    if isinstance(rewind_to, (str, os.PathLike)):
        state = load_state_file(rewind_to, what="rewind_to")
        where = f"rewind_to {str(rewind_to)!r}"
    elif isinstance(rewind_to, dict):
        state, where = rewind_to, "rewind_to"
    else:
        raise TypeError(f"rewind_to must be a state dict, a checkpoint path or a model, got "
                        f"{type(rewind_to).__name__}")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        got = type(state).__name__ if not isinstance(state, dict) else f"a dict of {sorted(state)[:5]}"
        raise ValueError(f"{where} is not a model checkpoint: expected a state dict (name -> tensor) or "
                         f"{{'model': state dict}}, got {got}")
    return state


def _check_args(mode, where, repeats, rewind_to, batch_size, noise_kind="replace", noise_std=None):
    if mode == "noise":  # two published-vs-ours meanings: make the caller say which
        raise ValueError("mode 'noise' is ambiguous: use 'activation-noise' (ours: the channel's activation "
                         "replaced by Gaussian noise with its mean and std) or 'weight-noise' (the published "
                         "one: the channel's conv weights replaced by / added N(0, noise_std^2))")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if noise_kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {noise_kind!r}")
    if mode == "weight-noise":
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0 \
                or not np.isfinite(noise_std):
            raise ValueError(f"mode 'weight-noise' needs noise_std, a finite float > 0, got {noise_std!r}")
    elif noise_std is not None:
        raise ValueError(f"noise_std only applies to mode 'weight-noise', got noise_std={noise_std!r} with "
                         f"mode {mode!r}")
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if repeats > 1 and mode not in NOISE_MODES:
        raise ValueError(f"repeats > 1 only makes sense for the modes {NOISE_MODES}, got mode {mode!r}")
    if mode == "rewind" and rewind_to is None:
        raise ValueError("mode 'rewind' needs rewind_to (a state dict, checkpoint path or model)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_layers(model, layers) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}")
    for name in layers:
        get_submodule(model, name)  # lists the valid names
    return layers


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Replacements shared by the fast path and the reference


def _channel_stats(total: torch.Tensor, total_sq: torch.Tensor, count: int):
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean, std


def _accumulate_stats(act: torch.Tensor, axis: int, acc: list) -> None:
    flat = act.detach().movedim(axis, -1).reshape(-1, act.shape[axis]).double()
    acc[0] = acc[0] + flat.sum(0)
    acc[1] = acc[1] + (flat * flat).sum(0)
    acc[2] += flat.shape[0]


def _noise_seed(seed: int, layer_index: int, repeat: int, start: int) -> int:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, layer_index, repeat, start]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def _noise(act: torch.Tensor, axis: int, mean: torch.Tensor, std: torch.Tensor, seed: int, layer_index: int,
           repeat: int, start: int) -> torch.Tensor:
    """Gaussian replacement (act's shape) with per-channel mean/std, seeded by (seed, layer,
    repeat, first sample of the batch) so every path draws the same values."""
    gen = torch.Generator(device=act.device).manual_seed(_noise_seed(seed, layer_index, repeat, start))
    z = torch.randn(act.shape, generator=gen, device=act.device, dtype=torch.float32)
    shape = [1] * act.dim()
    shape[axis] = -1
    out = mean.float().reshape(shape).to(act.device) + std.float().reshape(shape).to(act.device) * z
    return out.to(act.dtype)


def weight_noise(weight: torch.Tensor, kind: str, std: float, seed: int, layer_index: int,
                 repeat: int) -> torch.Tensor:
    """The perturbed weight tensor of mode "weight-noise": every output channel gets its own
    N(0, std^2) draw (replacing or added to its weights), seeded by (seed, layer, repeat) only,
    so one draw serves every batch, as a changed model would. A variant uses only its own
    channels' rows of it."""
    gen = torch.Generator(device="cpu").manual_seed(_noise_seed(seed, layer_index, repeat, -1 & 0xFFFFFFFF))
    z = (torch.randn(weight.shape, generator=gen, dtype=torch.float64) * std).to(weight.device, weight.dtype)
    return z if kind == "replace" else weight.detach() + z


# ---------------------------------------------------------------------------------------
# Partial results (through a run_folder.Store: nothing here writes files itself)

STATE = "sweep.pt"  # the one file a sweep keeps in its store (sweep.rank{r}.pt per rank when distributed)


def _state_file(dist: Optional[DistContext]) -> str:
    return f"sweep{rank_suffix(dist)}.pt"


def _record(model, d: "_Data", rewind: Optional[dict], **args) -> dict:
    """A compact record of what makes a sweep's results: its arguments, and digests of the
    model's weights, the data's labels, groups and first images, and the rewind weights."""
    rec = dict(args)
    rec["model"] = weights_digest(model.state_dict())
    rec["data"] = tensor_digest(d.labels, d.groups, d.batch(0, 8, "cpu")[0])
    rec["rewind_to"] = None if rewind is None else weights_digest(rewind)
    return rec


def weights_digest(state: dict) -> str:
    """Digest of a state dict's names and tensors (0-d buffers such as num_batches_tracked included)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # reshape(-1): tensor_digest cannot view a 0-d tensor as bytes
    return fingerprint({"keys": list(tensors), "weights": tensor_digest(*(v.reshape(-1) for v in tensors.values()))})


def _load_sweep_state(store: "Store", record: dict, name: str = STATE) -> Optional[dict]:
    state = store.load_state(name)
    if state is None:
        return None
    old = state.get("args") if isinstance(state, dict) else None
    if old != record:
        diff = settings_diff(old or {}, record) or ["format"]
        raise ValueError(f"store {str(store.root)!r}: {name} holds the partial state of a different sweep "
                         f"({'; '.join(diff)}); give each sweep its own store (e.g. store.sub(name)), "
                         f"or start the run afresh instead of resuming")
    return state


def _layer_to_state(layer: LayerSweep) -> dict:
    return dataclasses.asdict(layer)  # plain dict of tensors and lists: loadable with weights_only=True


def _to_cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, tuple):
        return tuple(_to_cpu(t) for t in v)
    return v


def _restore_current(cur: dict, device) -> dict:
    """Accumulators of a half-done layer, back on the sweep's device (outputs stay on the CPU)."""
    acc = dict(cur)
    acc.setdefault("nonfinite", torch.zeros((), dtype=torch.int64))  # states saved before it was kept
    for k in ("correct", "loss", "base_correct", "base_loss", "nonfinite"):
        acc[k] = acc[k].to(device)
    if acc.get("stats") is not None:
        acc["stats"] = tuple(s.to(device) for s in acc["stats"])
    return acc


# ---------------------------------------------------------------------------------------
# Fast path


def channel_ablation_sweep(model: nn.Module, layers, data, *, channels=None, channel_sets=None, mode: str = "zero",
                           where: str = "output", repeats: int = 1, rewind_to=None, noise_kind: str = "replace",
                           noise_std: Optional[float] = None, num_groups: Optional[int] = None,
                           return_outputs: bool = False, batch_size: int = 256, max_bytes: Optional[int] = None,
                           backend: str = "auto", seed: int = 0, progress: bool = False,
                           store: "Store | None" = None, channel_axis: Optional[int] = None,
                           linearity: bool = True, split: str = "auto",
                           dist: Optional[DistContext] = None) -> SweepResult:
    """Per-(variant, group) outcomes of ablating each channel (or channel set) of each layer.

    layers: module names (a str for one). data: an ImageDataset or (images, labels, groups).
    channels: channel indices (one variant each; default every channel); channel_sets: lists
    of channels ablated together (appended after `channels`). batch_size images per prefix
    run; variants run in chunks whose stacked suffix activations stay under max_bytes
    (default: 16 MB on the CPU, where cache-sized chunks ran 1.7x faster than 1 GB ones
    on a ResNet-18 stage, and 1 GB on a GPU).
    store (a run_folder.Store, e.g. RunFolder(...).partial.sub("sweep")): the accumulators are
    saved there (sweep.pt) after every batch and layer; when the store is resuming, the sweep
    continues from them. A store holding another sweep's state (other arguments, model or
    data) is refused with a ValueError. linearity=False turns off the next-layer linearity shortcut;
    split="hook" forces the (slow) full-forward fallback. backend goes to channel_ablate and
    group_outcomes. noise_kind / noise_std: mode "weight-noise" (see the module docstring).
    dist (a distributed.DistContext): with world_size > 1 each rank sweeps every variant on its
    share of the image batches and the outcomes are all-reduced (module docstring); every rank
    returns the whole result. Progress is shown on rank 0 only.
    """
    _check_args(mode, where, repeats, rewind_to, batch_size, noise_kind, noise_std)
    layers = _check_layers(model, layers)
    d = _as_data(data, num_groups)
    d.check_images(batch_size)
    device = _device(model)
    if max_bytes is None:
        max_bytes = default_max_bytes(device)
    check_int("max_bytes", max_bytes, 1)
    rewind_state = _rewind_weights(rewind_to) if mode == "rewind" else None
    G, R = d.num_groups, repeats
    distributed = dist is not None and dist.world_size > 1
    progress = progress and is_main(dist)
    state_file = _state_file(dist)
    state = {"args": None, "done": {}, "current": None}
    if store is not None or distributed:
        record = _record(
            model, d, rewind_state, layers=layers, where=where, mode=mode, repeats=R, seed=seed, n=d.n,
            noise_kind=noise_kind if mode == "weight-noise" else None, noise_std=noise_std,
            num_groups=G, channels=None if channels is None else [int(c) for c in channels],
            channel_sets=None if channel_sets is None else [sorted(map(int, s)) for s in channel_sets],
            return_outputs=return_outputs, batch_size=batch_size, channel_axis=channel_axis)
        check_same(record, dist, "channel-ablation sweep settings")  # a no-op in one process
        # "batches": the work split of _work_plan (a state saved under another split is refused)
        state["args"] = dict(record, shard=[dist.rank, dist.world_size, "batches"]) if distributed else record
    if store is not None:
        state = _load_sweep_state(store, state["args"], state_file) or state
        if distributed:
            state = _agree_on_resume(state, dist)
    counts = torch.bincount(d.groups, minlength=G)
    results: dict[str, LayerSweep] = {}
    with eval_mode(model), torch.no_grad():
        for li, layer in enumerate(layers):
            if layer in state["done"]:
                results[layer] = LayerSweep(**state["done"][layer])
                continue
            results[layer] = _sweep_layer(model, layer, li, d, device, state, store, counts, channels=channels,
                                          channel_sets=channel_sets, mode=mode, where=where, repeats=R,
                                          rewind_state=rewind_state, return_outputs=return_outputs,
                                          noise_kind=noise_kind, noise_std=noise_std,
                                          batch_size=batch_size, max_bytes=max_bytes, backend=backend,
                                          seed=seed, progress=progress, channel_axis=channel_axis,
                                          linearity=linearity, split=split, dist=dist, state_file=state_file)
            if store is not None:
                state["done"][layer] = _layer_to_state(results[layer])
                state["current"] = None
                store.save_state(state_file, state)
    return SweepResult(layers=results, mode=mode, where=where, num_groups=G, num_samples=d.n, repeats=R, seed=seed)


def default_max_bytes(device: torch.device) -> int:
    """The sweep's default max_bytes (see channel_ablation_sweep)."""
    return (16 << 20) if device.type == "cpu" else (1 << 30)


def variants_per_chunk(sm, num_variants: int, batch: int, max_bytes: int) -> int:
    """Variants the sweep stacks per suffix run: as many as fit max_bytes (at least one)."""
    return max(1, min(num_variants, int(max_bytes // sm.per_variant_bytes(batch))))


def _agree_on_resume(state: dict, dist: DistContext) -> dict:
    """The resume point every rank takes: each layer ends in collectives all ranks must enter,
    so a layer counts as done only where every rank saved it done, and a half-done layer is
    continued only where every rank saved its partial state of it (each from its own items);
    the rest is redone."""
    cur = state.get("current")
    views = gather((sorted(state["done"]), cur["layer"] if cur else None), dist)
    done = set.intersection(*(set(v[0]) for v in views))
    same_layer = len({v[1] for v in views}) == 1
    current = cur if cur is not None and same_layer and cur["layer"] not in done else None
    return dict(state, done={k: v for k, v in state["done"].items() if k in done}, current=current)


def _weight_noise_conv(model, layer, where) -> str:
    """The conv/Linear whose filter weights mode "weight-noise" perturbs for this ablation point."""
    name = layer if where == "output" else _resolve_conv(model, layer)
    if not isinstance(get_submodule(model, name), (*_CONVS, nn.Linear)):
        raise ValueError(f"mode 'weight-noise' perturbs a conv's filter weights, but layer {layer!r} with "
                         f"where='output' is a {type(get_submodule(model, name)).__name__}; use where='pre-bn' "
                         f"(or 'post-activation'), or name a conv")
    return name


def _work_plan(n_batches: int, n_variants: int, dist: Optional[DistContext], layer: str) -> list[tuple[int, range]]:
    """This rank's share of one layer's sweep: (batch index, range of variants) items in batch
    order. One process: every batch with every variant. Distributed: contiguous, balanced
    shares of the batches, each swept with every variant, so a batch's prefix runs on one
    rank only; the n_batches % W batches left over are split by variants over all ranks
    (each of them runs those prefixes) or, with fewer variants than ranks, go whole to the
    first ranks. Refused (on every rank alike) when neither the batches nor the variants
    give every rank work."""
    every = range(n_variants)
    if dist is None or dist.world_size == 1:
        return [(b, every) for b in range(n_batches)]
    w, r = dist.world_size, dist.rank
    if w > n_batches and w > n_variants:
        raise ValueError(f"world size {w} is larger than both the {n_batches} image batches and the {n_variants} "
                         f"variants of the sweep of layer {layer!r}; run at most {max(n_batches, n_variants)} "
                         f"processes (torchrun --nproc-per-node / --nnodes) or use a smaller batch_size")
    whole = n_batches // w
    plan = [(b, every) for b in range(r * whole, (r + 1) * whole)]
    leftover = range(whole * w, n_batches)
    if n_variants >= w:
        plan += [(b, shard(n_variants, dist)) for b in leftover]
    elif r < len(leftover):
        plan.append((leftover[r], every))
    return plan


def _stats_sums(sm, d: _Data, starts, plan, batch_size, device, axis, C, dist) -> list:
    """[sum, sum of squares, count] of the ablation point's channels over all the data. With
    distribution each batch's sums come from the one rank that counts its baseline, and are
    added in batch order as one process adds them: the statistics are bitwise the same."""
    def zeros():
        return [torch.zeros(C, dtype=torch.float64, device=device), torch.zeros(C, dtype=torch.float64, device=device), 0]

    if dist is None or dist.world_size == 1:
        sums = zeros()
        for start in starts:
            x, _, _ = d.batch(start, batch_size, device)
            _accumulate_stats(sm.prefix(x).act, axis, sums)
        return sums
    mine = {}
    for bi, vr in plan:
        if vr.start == 0:
            part = zeros()
            x, _, _ = d.batch(starts[bi], batch_size, device)
            _accumulate_stats(sm.prefix(x).act, axis, part)
            mine[bi] = (part[0].cpu(), part[1].cpu(), part[2])
    parts = {bi: part for every in gather(mine, dist) for bi, part in every.items()}
    sums = zeros()
    for bi in range(len(starts)):
        total, total_sq, count = parts[bi]
        sums[0] = sums[0] + total.to(device)
        sums[1] = sums[1] + total_sq.to(device)
        sums[2] += count
    return sums


def _sweep_layer(model, layer, li, d: _Data, device, state, store, counts, *, channels, channel_sets, mode, where,
                 repeats, rewind_state, return_outputs, batch_size, max_bytes, backend, seed, progress,
                 channel_axis, linearity, split, noise_kind="replace", noise_std=None, dist=None,
                 state_file=STATE) -> LayerSweep:
    R, G = repeats, d.num_groups
    x0, _, _ = d.batch(0, batch_size, device)
    noised = None
    if mode == "weight-noise":
        # The rewind machinery recomputes the ablation chain with copies of its modules; here the
        # copies start as the model's own weights and the conv's weights are redrawn per repeat.
        noised = _weight_noise_conv(model, layer, where)
        rewind_state = model.state_dict()
    sm = split_model(model, layer, x0, where=where, channel_axis=channel_axis, linearity=linearity,
                     method=split, rewind_state=rewind_state)
    # A check of the split, not of the data: a few images show it, and every rank of a
    # distributed sweep pays it (on the whole first batch of 128 it cost about a sixth of
    # a ResNet-18 stage's sweep of 256 images).
    sm.verify(x0[:VERIFY_IMAGES])
    if noised is not None:
        noisy_conv = sm._rewind[noised]
        clean_weight = noisy_conv.weight.detach().clone()
    C, axis = sm.num_channels, sm.channel_axis
    variants = _variants(C, channels, channel_sets)
    masks = channel_masks(C, variants, device=device)
    V = masks.shape[0]
    starts = list(range(0, d.n, batch_size))
    plan = _work_plan(len(starts), V, dist, layer)  # this rank's (batch, variants) items; one process: all

    cur = state.get("current")
    if cur is not None and cur.get("layer") == layer:
        acc = _restore_current(cur, device)
    else:
        acc = None
    if acc is None:
        stats = None
        if mode in ("mean", "activation-noise"):
            stats = _channel_stats(*_stats_sums(sm, d, starts, plan, batch_size, device, axis, C, dist))
        acc = dict(layer=layer, next_batch=0, stats=stats,
                   correct=torch.zeros(R, V, G, dtype=torch.int64, device=device),
                   loss=torch.zeros(R, V, G, dtype=torch.float64, device=device),
                   base_correct=torch.zeros(G, dtype=torch.int64, device=device),
                   base_loss=torch.zeros(G, dtype=torch.float64, device=device),
                   nonfinite=torch.zeros((), dtype=torch.int64, device=device),
                   outputs=None, base_outputs=None)
    stats = acc["stats"]
    if stats is not None:
        stats = tuple(s.to(device) for s in stats)

    chunk = variants_per_chunk(sm, V, min(batch_size, d.n), max_bytes)
    # next_batch: the items of this rank's plan done (in one process the batches done)
    bar = Progress(sum(R * -(-len(vr) // chunk) for _, vr in plan[acc["next_batch"]:]), f"sweep {layer}", progress)
    first = acc["next_batch"]
    for item in range(first, len(plan)):
        bi, vr = plan[item]
        start = starts[bi]
        own = vr.start == 0  # a batch's baseline is counted by the rank holding its first variants
        x, y, g = d.batch(start, batch_size, device)
        pre = sm.prefix(x)
        base = sm.baseline(pre) if own or item == first else None
        if item == first:
            # Labels and groups are checked once, not per call (groups in _as_data): the
            # per-chunk reduction below runs unchecked, and NaN/Inf logits are counted on the
            # device and read once after the layer.
            check_labels("labels", d.labels, d.n, base.shape[-1], d.labels.device)
        if own:
            acc["nonfinite"] += nonfinite_count(base)
            bc, bl = _group_outcomes_unchecked(base[None], y, g, G, backend=backend)
            acc["base_correct"] += bc[0]
            acc["base_loss"] += bl[0].double()
        if return_outputs:
            if acc["outputs"] is None:
                L = base.shape[-1]
                acc["outputs"] = torch.zeros(R, V, d.n, L, dtype=torch.float32)
                acc["base_outputs"] = torch.zeros(d.n, L, dtype=torch.float32)
            if own:
                acc["base_outputs"][start:start + x.shape[0]] = base.float().cpu()
        for r in range(R):
            if mode == "zero":
                rep = 0.0
            elif mode == "mean":
                rep = stats[0].to(pre.act.dtype)
            elif mode == "activation-noise":
                rep = _noise(pre.act, axis, stats[0], stats[1], seed, li, r, start)
            elif mode == "weight-noise":
                with torch.no_grad():
                    noisy_conv.weight.copy_(weight_noise(clean_weight, noise_kind, noise_std, seed, li, r))
                rep = sm.prefix(x).rewound
            else:
                rep = pre.rewound
            for c0 in range(vr.start, vr.stop, chunk):
                c1 = min(c0 + chunk, vr.stop)
                logits = sm.run_variants(pre, masks[c0:c1], rep, backend=backend, channels=variants[c0:c1])
                acc["nonfinite"] += nonfinite_count(logits)
                cc, cl = _group_outcomes_unchecked(logits, y, g, G, backend=backend)
                acc["correct"][r, c0:c1] += cc
                acc["loss"][r, c0:c1] += cl.double()
                if return_outputs:
                    acc["outputs"][r, c0:c1, start:start + x.shape[0]] = logits.float().cpu()
                bar.update(1)
        acc["next_batch"] = item + 1
        if store is not None and item + 1 < len(plan):  # the last item is saved as a done layer
            state["current"] = {k: _to_cpu(v) for k, v in acc.items()}
            store.save_state(state_file, state)
    bar.close()
    if dist is not None and dist.world_size > 1:
        # The ranks filled disjoint (batch, variant) cells: the sums are the one-process
        # totals (counts exactly; float64 losses up to the order of the additions).
        for key in ("correct", "loss", "base_correct", "base_loss", "nonfinite", "outputs", "base_outputs"):
            if acc[key] is not None:
                all_reduce_sum_(acc[key], dist)
    raise_nonfinite("logits", int(acc["nonfinite"]))

    correct = acc["correct"][0].cpu() if R == 1 else acc["correct"].double().mean(0).cpu()
    outputs = acc["outputs"]
    if outputs is not None and R == 1:
        outputs = outputs[0]
    return LayerSweep(layer=layer, where=where, mode=mode, channel_axis=axis, num_channels=C, channels=variants,
                      correct=correct, loss=acc["loss"].mean(0).cpu(), group_counts=counts.clone(),
                      baseline_correct=acc["base_correct"].cpu(), baseline_loss=acc["base_loss"].cpu(),
                      repeats=R, method=sm.method, linearity=sm.linear is not None, outputs=outputs,
                      baseline_outputs=acc["base_outputs"])


# ---------------------------------------------------------------------------------------
# Reference: one hooked full forward per variant and batch


def _outcomes_reference(logits, y, g, G):
    correct, loss = group_outcomes_reference(logits.double()[None], y, g, G)  # float64: the baseline's exact sums
    return correct[0], loss[0]


class _Point:
    """Where the reference's hooks go for one ablation point."""

    def __init__(self, model, layer, where, x0, channel_axis, rewind_state):
        self.model = model
        if where == "post-activation":
            sm = split_model(model, layer, x0, where=where, channel_axis=channel_axis, linearity=False,
                             method="fx")
            last = sm.chain_nodes[-1]
            if last.op != "call_module":
                # The hook loop can only modify module outputs; the fast path has no such limit.
                raise NotImplementedError(
                    f"channel_ablation_reference: layer {layer!r} with where='post-activation' ends in the "
                    f"function {getattr(last.target, '__name__', last.target)}, not a module, so it cannot be hooked; use "
                    f"channel_ablation_sweep, or name the activation module with where='output'")
            self.modules = [c.target for c in sm.chain_nodes]
            self.module, self.call_index = last.target, sm.act_call_index
        else:
            name = layer if where == "output" else _resolve_conv(model, layer)
            self.modules, self.module, self.call_index = [name], name, 0
        self.rewound = None
        if rewind_state is not None:
            self.rewound = _load_rewound(model, [m for m in self.modules], rewind_state)
        self.channel_axis = channel_axis

    def run(self, x, modify):
        """model(x) with modify(act, rewound_act_or_None) replacing the ablation point."""
        captured: dict = {}
        handles = []
        first = get_submodule(self.model, self.modules[0])
        calls = [0]
        if len(self.modules) > 1:
            def grab_input(_m, args, _out):
                captured.setdefault("input", args[0])
            handles.append(first.register_forward_hook(grab_input))

        def hook(_m, args, out):
            k = calls[0]
            calls[0] += 1
            if k != self.call_index:
                return None
            rew = None
            if self.rewound is not None:
                if len(self.modules) == 1:
                    rew = self.rewound[self.modules[0]](*args)
                else:
                    h = captured["input"]
                    for name in self.modules:
                        h = self.rewound[name](h)
                    rew = h
            return modify(out, rew)

        handles.append(get_submodule(self.model, self.module).register_forward_hook(hook))
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()


def channel_ablation_reference(model: nn.Module, layers, data, *, channels=None, channel_sets=None,
                               mode: str = "zero", where: str = "output", repeats: int = 1, rewind_to=None,
                               noise_kind: str = "replace", noise_std: Optional[float] = None,
                               num_groups: Optional[int] = None, return_outputs: bool = False,
                               batch_size: int = 256, seed: int = 0, progress: bool = False,
                               channel_axis: Optional[int] = None) -> SweepResult:
    """The naive loop: one full forward per (variant, batch) with a forward hook that
    replaces the variant's channels in the layer output. Same results as the fast path."""
    _check_args(mode, where, repeats, rewind_to, batch_size, noise_kind, noise_std)
    layers = _check_layers(model, layers)
    d = _as_data(data, num_groups)
    d.check_images(batch_size)
    device = _device(model)
    rewind_state = _rewind_weights(rewind_to) if mode == "rewind" else None
    G, R = d.num_groups, repeats
    counts = torch.bincount(d.groups, minlength=G)
    starts = list(range(0, d.n, batch_size))
    results = {}
    with eval_mode(model), torch.no_grad(), no_inplace(model):
        x0, _, _ = d.batch(0, batch_size, device)
        for li, layer in enumerate(layers):
            noised = _weight_noise_conv(model, layer, where) if mode == "weight-noise" else None
            point = _Point(model, layer, where, x0, channel_axis,
                           model.state_dict() if noised is not None else rewind_state)
            if noised is not None:
                clean_weight = point.rewound[noised].weight.detach().clone()
            shape: dict = {}

            def grab_shape(out, rew):
                shape.setdefault("s", out.shape)
            point.run(x0[:1], grab_shape)
            ndim = len(shape["s"])
            axis = default_channel_axis(ndim) if channel_axis is None else channel_axis % ndim
            C = shape["s"][axis]
            variants = _variants(C, channels, channel_sets)
            V = len(variants)
            stats = None
            if mode in ("mean", "activation-noise"):
                sums = [0, 0, 0]

                def grab(out, rew):
                    _accumulate_stats(out, axis, sums)
                    return None
                for start in starts:
                    point.run(d.batch(start, batch_size, device)[0], grab)
                stats = _channel_stats(*sums)
            correct = torch.zeros(R, V, G, dtype=torch.int64)
            loss = torch.zeros(R, V, G, dtype=torch.float64)
            base_c = torch.zeros(G, dtype=torch.int64)
            base_l = torch.zeros(G, dtype=torch.float64)
            outputs = base_out = None
            bar = Progress(len(starts) * R * V, f"reference {layer}", progress)
            for start in starts:
                x, y, g = d.batch(start, batch_size, device)
                logits = model(x)
                c, l_ = _outcomes_reference(logits, y, g, G)
                base_c += c.cpu()
                base_l += l_.cpu()
                if return_outputs:
                    if outputs is None:
                        outputs = torch.zeros(R, V, d.n, logits.shape[-1])
                        base_out = torch.zeros(d.n, logits.shape[-1])
                    base_out[start:start + x.shape[0]] = logits.float().cpu()
                for r in range(R):
                    if noised is not None:
                        with torch.no_grad():
                            point.rewound[noised].weight.copy_(
                                weight_noise(clean_weight, noise_kind, noise_std, seed, li, r))
                    for v, chans in enumerate(variants):
                        idx = torch.tensor(chans, dtype=torch.long, device=device)

                        def modify(out, rew, idx=idx, r=r, start=start):
                            if mode == "zero":
                                rep = torch.zeros_like(out)
                            elif mode == "mean":
                                shp = [1] * out.dim()
                                shp[axis] = -1
                                rep = stats[0].to(out.dtype).reshape(shp).expand_as(out)
                            elif mode == "activation-noise":
                                rep = _noise(out, axis, stats[0], stats[1], seed, li, r, start)
                            else:
                                rep = rew
                            out = out.clone()
                            out.index_copy_(axis, idx, rep.index_select(axis, idx).to(out.dtype))
                            return out
                        logits = point.run(x, modify)
                        c, l_ = _outcomes_reference(logits, y, g, G)
                        correct[r, v] += c.cpu()
                        loss[r, v] += l_.cpu()
                        if return_outputs:
                            outputs[r, v, start:start + x.shape[0]] = logits.float().cpu()
                        bar.update(1)
            bar.close()
            results[layer] = LayerSweep(
                layer=layer, where=where, mode=mode, channel_axis=axis, num_channels=C, channels=variants,
                correct=correct[0] if R == 1 else correct.double().mean(0), loss=loss.mean(0),
                group_counts=counts.clone(), baseline_correct=base_c, baseline_loss=base_l, repeats=R,
                method="hook-loop", linearity=False,
                outputs=(outputs[0] if R == 1 else outputs) if return_outputs else None,
                baseline_outputs=base_out)
    return SweepResult(layers=results, mode=mode, where=where, num_groups=G, num_samples=d.n, repeats=R, seed=seed)


# ---------------------------------------------------------------------------------------
# Cheaper importance scores: weight norm and gradient norm (docs/experiments.md#spurious-memorization)


def _score_module(model: nn.Module, name: str) -> Optional[str]:
    """The conv/Linear whose output channels are `name`'s channels: the module itself, its
    only conv/Linear, or its last one outside shortcut/downsample branches; None if none."""
    module = get_submodule(model, name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return name
    found = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if len(found) > 1:
        found = [n for n in found if not any(k in n for k in ("shortcut", "downsample"))]
    return f"{name}.{found[-1]}" if found else None


def channel_conv(model: nn.Module, name: str) -> Optional[str]:
    """The conv/Linear whose output channels are layer `name`'s channels (the module itself,
    its only conv/Linear, or its last one outside shortcut/downsample branches), or None."""
    return _score_module(model, name)


BRANCH_NAMES = ("downsample", "shortcut")  # residual-branch convs, named as torchvision / timm / ours do


def conv_names(model: nn.Module, *, downsample: bool = True) -> list[str]:
    """Every convolution of the model in definition order; downsample=False leaves out the
    residual-branch (downsample / shortcut) convs, as the published weight-norm ranking does."""
    return [n for n, m in model.named_modules() if isinstance(m, _CONVS)
            and (downsample or not any(k in n.split(".") for k in BRANCH_NAMES))]


def global_top(scores: dict, k: int) -> list[dict]:
    """The k largest per-channel scores over all tensors together (the published criteria
    take the global argmax over every conv, k times, zeroing the winner each time: the same
    as the global top k). Ties: the earlier tensor, then the lower channel."""
    check_int("k", k, 1)
    flat = [(float(v), i, c, name) for i, (name, values) in enumerate(scores.items())
            for c, v in enumerate(torch.as_tensor(values).flatten().tolist())]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"layer": name, "channel": c, "score": v} for v, _, c, name in flat[:k]]


def weight_norm_scores(model: nn.Module, layers=None) -> dict[str, torch.Tensor]:
    """L2 norm of each output channel's weights: name -> (Cout,) float64.

    layers=None: every conv and Linear of the model; else the named layers (a container
    is scored by the conv/Linear that writes its output channels; layers without one are
    left out)."""
    if layers is None:
        names = {n: n for n, m in model.named_modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}
    else:
        names = {}
        for layer in ([layers] if isinstance(layers, str) else layers):
            target = _score_module(model, layer)
            if target is not None:
                names[layer] = target
    return {k: get_submodule(model, t).weight.detach().flatten(1).double().norm(dim=1).cpu()
            for k, t in names.items()}


def gradient_norm_scores(model: nn.Module, layers, data, group: int, *, num_samples: int = 200,
                         batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-output-channel norm of the gradient of the mean cross-entropy on the
    `num_samples` worst-predicted (highest-loss) samples of `group`, for each layer's
    conv/Linear weight (as in weight_norm_scores): name -> (Cout,) float64."""
    d = _as_data(data, None)
    if not 0 <= int(group) < d.num_groups:
        raise ValueError(f"group must be in [0, {d.num_groups}), got {group}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    layers = _check_layers(model, [layers] if isinstance(layers, str) else
                           (layers if layers is not None else
                            [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]))
    targets = {layer: _score_module(model, layer) for layer in layers}
    targets = {k: v for k, v in targets.items() if v is not None}
    members = (d.groups == int(group)).nonzero().flatten()
    if members.numel() == 0:
        raise ValueError(f"group {group} has no samples")
    device = _device(model)
    with eval_mode(model):
        losses = []
        with torch.no_grad():
            for i in range(0, members.numel(), batch_size):
                idx = members[i:i + batch_size]
                x, y = _gather(d, idx, device)
                losses.append(F.cross_entropy(model(x), y, reduction="none").cpu())
        worst = members[torch.argsort(torch.cat(losses), descending=True, stable=True)[:num_samples]]
        weights = [get_submodule(model, t).weight for t in targets.values()]
        grads = [torch.zeros_like(w) for w in weights]
        for i in range(0, worst.numel(), batch_size):
            x, y = _gather(d, worst[i:i + batch_size], device)
            loss = F.cross_entropy(model(x), y, reduction="sum") / worst.numel()
            for acc, gw in zip(grads, torch.autograd.grad(loss, weights, allow_unused=True)):
                if gw is not None:
                    acc += gw
    return {k: gw.flatten(1).double().norm(dim=1).cpu() for k, gw in zip(targets, grads)}


def _gather(d: _Data, idx: torch.Tensor, device):
    return d.images(idx, device), d.labels[idx].to(device)
