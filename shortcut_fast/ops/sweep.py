"""Exact channel-ablation sweeps with per-group outcomes (EXPERIMENTS.md section 3).

For each layer and each channel (or channel set), modify that channel at the ablation point
and count per-group correct predictions and summed cross-entropy over a data set.

Fast path (`channel_ablation_sweep`): the model is cut at the ablation point
(models.split): the prefix runs once per image batch, the cached activation is expanded into
many masked copies in one op (ops.ablation.channel_ablate) or, when the next layer is a conv
or Linear, through linearity (one grouped conv for all channels), the rest of the model
runs on the V*B stacked variants in chunks sized by `max_bytes`, and one reduction
(ops.ablation.group_outcomes) gives per-(variant, group) counts.

Ground truth (`channel_ablation_reference`): one full forward per channel and batch with a
forward hook that modifies the layer output; it is also the benchmark baseline.

Modes: "zero"; "mean" (per-channel mean over the data and positions, from a first pass);
"noise" (Gaussian noise with the channel's mean and std, `repeats` seeded draws, averaged);
"rewind" (the ablation point recomputed with the weights of `rewind_to` for the chain that
produces it: the named module for "output", the conv for "pre-bn", conv and BN for
"post-activation"). The model is evaluated in eval mode (its mode is restored afterwards).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.models.introspect import get_submodule
from shortcut_fast.models.split import (
    WHERE,
    _resolve_conv,
    default_channel_axis,
    eval_mode,
    no_inplace,
    split_model,
)
from shortcut_fast.ops._checks import check_int
from shortcut_fast.ops.ablation import channel_masks, group_outcomes

MODES = ("zero", "mean", "noise", "rewind")

__all__ = [
    "MODES",
    "LayerSweep",
    "SweepResult",
    "channel_ablation_sweep",
    "channel_ablation_reference",
    "weight_norm_scores",
    "gradient_norm_scores",
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

    def batch(self, start: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stop = min(start + size, self.n)
        if hasattr(self.source, "get_batch"):
            x, _, _ = self.source.get_batch(torch.arange(start, stop), device=device)
        else:
            x = self.source[start:stop].to(device)
            if not x.is_floating_point():
                x = x.float().div_(255)
        return x, self.labels[start:stop].to(device), self.groups[start:stop].to(device)


def _as_data(data, num_groups: Optional[int]) -> _Data:
    if hasattr(data, "images") and hasattr(data, "get_batch"):
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


def load_state(rewind_to) -> dict:
    """A state dict from a state dict, a model, or a checkpoint path (the project's
    checkpoints keep the weights under "model")."""
    if isinstance(rewind_to, nn.Module):
        return rewind_to.state_dict()
    if isinstance(rewind_to, (str, os.PathLike)):
        state = torch.load(rewind_to, map_location="cpu", weights_only=False)
    elif isinstance(rewind_to, dict):
        state = rewind_to
    else:
        raise TypeError(f"rewind_to must be a state dict, a checkpoint path or a model, got "
                        f"{type(rewind_to).__name__}")
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def _check_args(mode, where, repeats, rewind_to, batch_size):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if repeats > 1 and mode != "noise":
        raise ValueError(f"repeats > 1 only makes sense for mode 'noise', got mode {mode!r}")
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


# ---------------------------------------------------------------------------------------
# Partial results


def _save_partial(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        from shortcut_fast.report import write_json

        write_json(state, tmp)
    else:
        torch.save(state, tmp)
    os.replace(tmp, path)


def _load_partial(path: Path, fingerprint: dict) -> Optional[dict]:
    if not path.exists():
        return None
    if path.suffix == ".json":
        from shortcut_fast.report import read_json

        state = read_json(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
    old = state.get("fingerprint")
    from shortcut_fast.report import to_jsonable

    if to_jsonable(old) != to_jsonable(fingerprint):
        diff = sorted(k for k in fingerprint if (old or {}).get(k) != to_jsonable(fingerprint[k]))
        raise ValueError(f"partial file {path} was written by a different sweep (differs in {diff}); "
                         f"delete it or pass another partial_path")
    return state


_LAYER_TENSORS = ("correct", "loss", "group_counts", "baseline_correct", "baseline_loss", "outputs",
                  "baseline_outputs")


def _layer_from_state(d) -> LayerSweep:
    if isinstance(d, LayerSweep):
        return d
    d = dict(d)
    for k in _LAYER_TENSORS:
        if d.get(k) is not None and not isinstance(d[k], torch.Tensor):
            dtype = torch.int64 if k in ("group_counts", "baseline_correct") or (
                k == "correct" and d.get("repeats", 1) == 1) else torch.float64
            if k in ("outputs", "baseline_outputs"):
                dtype = torch.float32
            d[k] = torch.tensor(d[k], dtype=dtype)
    return LayerSweep(**d)


def _restore_current(cur: dict, device) -> dict:
    """Accumulators of a half-done layer from a partial file (.pt tensors or .json lists)."""
    dtypes = dict(correct=torch.int64, loss=torch.float64, base_correct=torch.int64, base_loss=torch.float64,
                  outputs=torch.float32, base_outputs=torch.float32)
    acc = dict(cur)
    for k, dt in dtypes.items():
        if acc.get(k) is not None:
            acc[k] = torch.as_tensor(acc[k], dtype=dt)
            if k not in ("outputs", "base_outputs"):
                acc[k] = acc[k].to(device)
    if acc.get("stats") is not None:
        acc["stats"] = tuple(torch.as_tensor(s, dtype=torch.float64, device=device) for s in acc["stats"])
    return acc


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


# ---------------------------------------------------------------------------------------
# Fast path


def channel_ablation_sweep(model: nn.Module, layers, data, *, channels=None, channel_sets=None, mode: str = "zero",
                           where: str = "output", repeats: int = 1, rewind_to=None, num_groups: Optional[int] = None,
                           return_outputs: bool = False, batch_size: int = 256, max_bytes: Optional[int] = None,
                           backend: str = "auto", seed: int = 0, progress: bool = False, partial_path=None,
                           channel_axis: Optional[int] = None, linearity: bool = True,
                           split: str = "auto") -> SweepResult:
    """Per-(variant, group) outcomes of ablating each channel (or channel set) of each layer.

    layers: module names (a str for one). data: an ImageDataset or (images, labels, groups).
    channels: channel indices (one variant each; default every channel); channel_sets: lists
    of channels ablated together (appended after `channels`). batch_size images per prefix
    run; variants run in chunks whose stacked suffix activations stay under max_bytes
    (default: 16 MB on the CPU, where cache-sized chunks ran 1.7x faster than 1 GB ones
    on a ResNet-18 stage, and 1 GB on a GPU).
    partial_path (.pt or .json): written after every batch and layer; a rerun with the same
    arguments resumes from it. linearity=False turns off the next-layer linearity shortcut;
    split="hook" forces the (slow) full-forward fallback. backend goes to channel_ablate and
    group_outcomes.
    """
    _check_args(mode, where, repeats, rewind_to, batch_size)
    layers = _check_layers(model, layers)
    d = _as_data(data, num_groups)
    device = _device(model)
    if max_bytes is None:
        max_bytes = (16 << 20) if device.type == "cpu" else (1 << 30)
    check_int("max_bytes", max_bytes, 1)
    rewind_state = load_state(rewind_to) if mode == "rewind" else None
    G, R = d.num_groups, repeats
    fingerprint = dict(layers=layers, where=where, mode=mode, repeats=R, seed=seed, n=d.n, num_groups=G,
                       channels=None if channels is None else [int(c) for c in channels],
                       channel_sets=None if channel_sets is None else [sorted(map(int, s)) for s in channel_sets],
                       return_outputs=return_outputs, batch_size=batch_size, channel_axis=channel_axis)
    path = Path(partial_path) if partial_path is not None else None
    state = (_load_partial(path, fingerprint) if path is not None else None) or \
        {"fingerprint": fingerprint, "done": {}, "current": None}
    counts = torch.bincount(d.groups, minlength=G)
    results: dict[str, LayerSweep] = {}
    with eval_mode(model), torch.no_grad():
        for li, layer in enumerate(layers):
            if layer in state["done"]:
                results[layer] = _layer_from_state(state["done"][layer])
                continue
            results[layer] = _sweep_layer(model, layer, li, d, device, state, path, counts, channels=channels,
                                          channel_sets=channel_sets, mode=mode, where=where, repeats=R,
                                          rewind_state=rewind_state, return_outputs=return_outputs,
                                          batch_size=batch_size, max_bytes=max_bytes, backend=backend,
                                          seed=seed, progress=progress, channel_axis=channel_axis,
                                          linearity=linearity, split=split)
            state["done"][layer] = results[layer]
            state["current"] = None
            if path is not None:
                _save_partial(path, state)
    return SweepResult(layers=results, mode=mode, where=where, num_groups=G, num_samples=d.n, repeats=R, seed=seed)


def _sweep_layer(model, layer, li, d: _Data, device, state, path, counts, *, channels, channel_sets, mode, where,
                 repeats, rewind_state, return_outputs, batch_size, max_bytes, backend, seed, progress,
                 channel_axis, linearity, split) -> LayerSweep:
    R, G = repeats, d.num_groups
    x0, _, _ = d.batch(0, batch_size, device)
    sm = split_model(model, layer, x0, where=where, channel_axis=channel_axis, linearity=linearity,
                     method=split, rewind_state=rewind_state)
    sm.verify(x0)
    C, axis = sm.num_channels, sm.channel_axis
    variants = _variants(C, channels, channel_sets)
    masks = channel_masks(C, variants, device=device)
    V = masks.shape[0]
    starts = list(range(0, d.n, batch_size))

    cur = state.get("current")
    if cur is not None and cur.get("layer") == layer:
        acc = _restore_current(cur, device)
    else:
        acc = None
    if acc is None:
        stats = None
        if mode in ("mean", "noise"):
            sums = [torch.zeros(C, dtype=torch.float64, device=device),
                    torch.zeros(C, dtype=torch.float64, device=device), 0]
            for start in starts:
                x, _, _ = d.batch(start, batch_size, device)
                _accumulate_stats(sm.prefix(x).act, axis, sums)
            stats = _channel_stats(*sums)
        acc = dict(layer=layer, next_batch=0, stats=stats,
                   correct=torch.zeros(R, V, G, dtype=torch.int64, device=device),
                   loss=torch.zeros(R, V, G, dtype=torch.float64, device=device),
                   base_correct=torch.zeros(G, dtype=torch.int64, device=device),
                   base_loss=torch.zeros(G, dtype=torch.float64, device=device),
                   outputs=None, base_outputs=None)
    stats = acc["stats"]
    if stats is not None:
        stats = tuple(s.to(device) for s in stats)

    chunk = max(1, min(V, int(max_bytes // sm.per_variant_bytes(min(batch_size, d.n)))))
    bar = _progress(progress, (len(starts) - acc["next_batch"]) * R * -(-V // chunk), f"sweep {layer}")
    for bi in range(acc["next_batch"], len(starts)):
        start = starts[bi]
        x, y, g = d.batch(start, batch_size, device)
        pre = sm.prefix(x)
        base = sm.baseline(pre)
        bc, bl = group_outcomes(base, y, g, G, backend=backend)
        acc["base_correct"] += bc[0]
        acc["base_loss"] += bl[0].double()
        if return_outputs:
            if acc["outputs"] is None:
                L = base.shape[-1]
                acc["outputs"] = torch.zeros(R, V, d.n, L, dtype=torch.float32)
                acc["base_outputs"] = torch.zeros(d.n, L, dtype=torch.float32)
            acc["base_outputs"][start:start + x.shape[0]] = base.float().cpu()
        for r in range(R):
            if mode == "zero":
                rep = 0.0
            elif mode == "mean":
                rep = stats[0].to(pre.act.dtype)
            elif mode == "noise":
                rep = _noise(pre.act, axis, stats[0], stats[1], seed, li, r, start)
            else:
                rep = pre.rewound
            for c0 in range(0, V, chunk):
                logits = sm.run_variants(pre, masks[c0:c0 + chunk], rep, backend=backend)
                cc, cl = group_outcomes(logits, y, g, G, backend=backend)
                acc["correct"][r, c0:c0 + chunk] += cc
                acc["loss"][r, c0:c0 + chunk] += cl.double()
                if return_outputs:
                    acc["outputs"][r, c0:c0 + chunk, start:start + x.shape[0]] = logits.float().cpu()
                if bar is not None:
                    bar.update(1)
        acc["next_batch"] = bi + 1
        if path is not None and bi + 1 < len(starts):
            state["current"] = {k: (v.cpu() if isinstance(v, torch.Tensor) else
                                    tuple(s.cpu() for s in v) if isinstance(v, tuple) else v)
                                for k, v in acc.items()}
            _save_partial(path, state)
    if bar is not None:
        bar.close()

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
    lf = logits.double()
    hit = (lf.argmax(-1) == y).long()
    loss = F.cross_entropy(lf, y, reduction="none")
    return (torch.zeros(G, dtype=torch.int64, device=y.device).index_add_(0, g, hit),
            torch.zeros(G, dtype=torch.float64, device=y.device).index_add_(0, g, loss))


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
            from shortcut_fast.models.split import _load_rewound

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
                               num_groups: Optional[int] = None, return_outputs: bool = False,
                               batch_size: int = 256, seed: int = 0, progress: bool = False,
                               channel_axis: Optional[int] = None) -> SweepResult:
    """The naive loop: one full forward per (variant, batch) with a forward hook that
    replaces the variant's channels in the layer output. Same results as the fast path."""
    _check_args(mode, where, repeats, rewind_to, batch_size)
    layers = _check_layers(model, layers)
    d = _as_data(data, num_groups)
    device = _device(model)
    rewind_state = load_state(rewind_to) if mode == "rewind" else None
    G, R = d.num_groups, repeats
    counts = torch.bincount(d.groups, minlength=G)
    starts = list(range(0, d.n, batch_size))
    results = {}
    with eval_mode(model), torch.no_grad(), no_inplace(model):
        x0, _, _ = d.batch(0, batch_size, device)
        for li, layer in enumerate(layers):
            point = _Point(model, layer, where, x0, channel_axis, rewind_state)
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
            if mode in ("mean", "noise"):
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
            bar = _progress(progress, len(starts) * R * V, f"reference {layer}")
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
                    for v, chans in enumerate(variants):
                        idx = torch.tensor(chans, dtype=torch.long, device=device)

                        def modify(out, rew, idx=idx, r=r, start=start):
                            if mode == "zero":
                                rep = torch.zeros_like(out)
                            elif mode == "mean":
                                shp = [1] * out.dim()
                                shp[axis] = -1
                                rep = stats[0].to(out.dtype).reshape(shp).expand_as(out)
                            elif mode == "noise":
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
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
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
# Cheaper importance scores (EXPERIMENTS.md section 3 (a), (b))


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
    if hasattr(d.source, "get_batch"):
        x, _, _ = d.source.get_batch(idx, device=device)
    else:
        x = d.source[idx.to(d.source.device)].to(device)
        if not x.is_floating_point():
            x = x.float().div_(255)
    return x, d.labels[idx].to(device)
