"""Run a model to an ablation point once, then the rest of it on many modified copies.

`split_model(model, layer, x)` traces the model with torch.fx (the named module kept as one
leaf) and cuts the graph at the ablation point A:

  prefix  every node that does not depend on A (run once per image batch of B), including
          residual identity paths and downsample branches that join later;
  suffix  the nodes that depend on A, run on V*B stacked variants (variant-major: row
          v*B + b is variant v of image b). Prefix tensors the suffix reads ("live-ins")
          are repeated V times along their batch dimension, found by tracing shapes at two
          batch sizes; batch-dependent Python values (sizes) are recomputed in the suffix.

Ablation points (`where`):
  "output"           the named module's output.
  "pre-bn"           the named conv's (or Linear's) output, before the BatchNorm after it.
                     Zeroing a channel here does NOT silence it: BatchNorm maps 0 to the
                     constant beta - gamma * mean / sqrt(var + eps), so the next layer still
                     sees a (constant) signal; this is the "zero the filter" semantics.
  "post-activation"  follow the named conv's single-user chain conv -> [BatchNorm] ->
                     activation (ReLU/GELU/SiLU/... module or function) and ablate after the
                     activation: zero really means the channel sends nothing on.
A container name (e.g. a conv-BN-ReLU unit) resolves to its only conv for "pre-bn" and
"post-activation".

Channel axis: 1 for 4-D (N, C, H, W) and 2-D (N, C) activations, the last axis for 3-D
token tensors (N, T, D); override with channel_axis=.

Linearity: when A's only user is an nn.Conv2d (groups=1, zero padding) or nn.Linear, the
suffix starts after that layer: its output for a variant is out_base + the layer applied
(without bias) to the channel delta (replacement - A on the ablated channels). For one-hot
masks a grouped conv (groups = number of channels in the chunk) gives every channel's
contribution at once, so sweeping all C channels costs about one extra conv instead of C.

If fx cannot trace the model, the split falls back (with a warning) to running the whole
model on the V*B repeated input with a forward hook replacing the module's output: correct,
but without prefix caching or linearity. `verify` checks that unmodified variants
reproduce model(x).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from shortcut_fast.models.introspect import get_submodule
# surgery sits above ops/ and models/: it may use both (neither imports surgery).
from shortcut_fast.ops.ablation import channel_ablate

WHERE = ("output", "pre-bn", "post-activation")
METHODS = ("auto", "fx", "hook")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish,
                nn.Tanh, nn.Sigmoid)
_ACT_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.mish,
                  torch.relu, torch.tanh, torch.sigmoid}
_ACT_METHODS = {"relu", "relu_", "tanh", "sigmoid"}


def default_channel_axis(ndim: int) -> int:
    """1 for (N, C, ...) maps and (N, C) vectors, the last axis for (N, T, D) tokens."""
    return ndim - 1 if ndim == 3 else 1


@contextlib.contextmanager
def no_inplace(model: nn.Module):
    """Temporarily set `inplace=False` on modules that have it (e.g. torchvision's ReLU):
    cached prefix tensors must not be overwritten by a later in-place op."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluate in eval mode (BatchNorm running statistics), restoring the mode after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaves: set[str]) -> fx.Graph:
    """fx graph of model.forward with `leaves` kept as single call_module nodes.

    Project models validate their input with Python branches on its shape
    (`_check_input`); these are skipped while tracing (`verify` runs the real forward)."""
    patched = hasattr(model, "_check_input")
    if patched:
        model._check_input = lambda x: None  # instance attribute shadows the method
    try:
        return _Tracer(leaves).trace(model)
    finally:
        if patched:
            del model._check_input


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _resolve_conv(model: nn.Module, name: str) -> str:
    """The conv/Linear a "pre-bn"/"post-activation" ablation point refers to."""
    module = get_submodule(model, name)
    if isinstance(module, _CONV_TYPES):
        return name
    convs = [(n, m) for n, m in module.named_modules() if isinstance(m, _CONV_TYPES)]
    if len(convs) != 1:
        found = ", ".join(f"{name}.{n}" for n, _ in convs) or "none"
        raise ValueError(f"{name!r} is a {type(module).__name__}, not a conv or Linear, and it does "
                         f"not contain exactly one (found: {found}); name the conv itself")
    return f"{name}.{convs[0][0]}"


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    return False


def _describe(node: fx.Node) -> str:
    return str(node.target) if node.op in ("call_module", "call_function", "call_method") else node.op


def _summary(value: Any):
    if isinstance(value, torch.Tensor):
        return ("t", tuple(value.shape))
    if isinstance(value, (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)):
        return ("v", value)
    if isinstance(value, (tuple, list)):
        return ("s", tuple(_summary(v) for v in value))
    return ("o", type(value).__name__)


class _Probe(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.summaries: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.summaries[n] = _summary(out)
        return out


def _batch_kind(s2, s3):
    """'const', ('batch', dim) or 'move' from a node's summaries at batch sizes 2 and 3."""
    if s2[0] == "t" and s3[0] == "t":
        a, b = s2[1], s3[1]
        if a == b:
            return "const"
        if len(a) != len(b):
            return "move"
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1 and a[diff[0]] * 3 == b[diff[0]] * 2:
            return ("batch", diff[0])
        return "move"
    return "const" if s2 == s3 else "move"


def _repeat(t: torch.Tensor, V: int, dim: int) -> torch.Tensor:
    if V == 1:
        return t
    reps = [1] * t.dim()
    reps[dim] = V
    return t.repeat(*reps)


@dataclass
class Prefix:
    """What the prefix computed for one image batch."""
    act: torch.Tensor                       # the activation at the ablation point (B, ...)
    live_ins: list                          # values the suffix reads (tensors with batch dims)
    base: Optional[torch.Tensor] = None     # linearity: the next layer's output on act
    rewound: Optional[torch.Tensor] = None  # rewind: the ablation point with rewound weights
    x: Optional[torch.Tensor] = None        # hook fallback: the input batch


@dataclass
class SplitModel:
    """A model cut at one ablation point; build it with `split_model`."""
    model: nn.Module
    layer: str
    where: str
    channel_axis: int
    num_channels: int
    method: str                                  # "fx" or "hook"
    linear: Optional[nn.Module] = None           # the next layer used through linearity
    ablation_module: str = ""                    # module whose output (or chain end) is A
    chain: list = field(default_factory=list)    # module names conv[, bn][, act] (rewind)
    act_call_index: int = 0                      # which call of the last chain module is A
    chain_nodes: list = field(default_factory=list)  # fx nodes of the chain (fx method only)
    _prefix_gm: Any = None
    _suffix_gm: Any = None
    _live_dims: list = field(default_factory=list)   # batch dim per live-in (None = constant)
    _rewind: Optional[dict] = None               # module name -> rewound copy
    _per_sample_bytes: int = 0

    # -- running -----------------------------------------------------------------------
    def prefix(self, x: torch.Tensor) -> Prefix:
        with torch.no_grad(), no_inplace(self.model):
            if self.method == "hook":
                return self._hook_prefix(x)
            outs = self._prefix_gm(x)
        act, base, rewound, *live = outs
        return Prefix(act=act, live_ins=live, base=base, rewound=rewound)

    def run_variants(self, pre: Prefix, masks: torch.Tensor, replacement=0.0, *,
                     backend: str = "auto", channels: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """Logits (V, B, L) of the V variants masks (V, C) bool describe (see module doc).
        channels: the masks' rows as channel lists, when the caller has them: the linearity
        path then reads which channels are used from them, not from the masks on the device
        (two host syncs per call)."""
        V = masks.shape[0]
        B = pre.act.shape[0]
        with torch.no_grad(), no_inplace(self.model):
            if self.linear is not None:
                first = self._linear_variants(pre, masks, replacement, channels)
            else:
                first = channel_ablate(pre.act, masks, replacement, channel_axis=self.channel_axis,
                                       backend=backend).flatten(0, 1)
            if self.method == "hook":
                out = self._hook_run(pre.x, first, V)
            else:
                live = [v if d is None else _repeat(v, V, d) for v, d in zip(pre.live_ins, self._live_dims)]
                out = self._suffix_gm(first, *live)
        return out.reshape(V, B, *out.shape[1:])

    def baseline(self, pre: Prefix) -> torch.Tensor:
        """Logits (B, L) of the unmodified model."""
        masks = torch.zeros(1, self.num_channels, dtype=torch.bool, device=pre.act.device)
        return self.run_variants(pre, masks, 0.0, backend="torch", channels=[[]])[0]

    def per_variant_bytes(self, batch: int) -> int:
        """Rough peak memory of one variant of `batch` images in the suffix."""
        return max(1, self._per_sample_bytes * batch)

    def verify(self, x: torch.Tensor) -> None:
        """Raise if two unmodified variants do not reproduce model(x)."""
        with torch.no_grad(), no_inplace(self.model):
            ref = self.model(x)
        pre = self.prefix(x)
        masks = torch.zeros(2, self.num_channels, dtype=torch.bool, device=x.device)
        got = self.run_variants(pre, masks, 0.0, backend="torch", channels=[[], []])
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        tol = (1e-3 if ref.dtype in (torch.float16, torch.bfloat16) else 1e-4) * max(1.0, scale)
        err = float((got - ref[None]).abs().max()) if ref.numel() else 0.0
        if got.shape[1:] != ref.shape or not err <= tol:
            raise RuntimeError(
                f"splitting the model at {self.layer!r} (where={self.where!r}, method={self.method}) does "
                f"not reproduce model(x): max |difference| {err:.3g} > {tol:.3g} (output shapes "
                f"{tuple(got.shape[1:])} vs {tuple(ref.shape)}). The forward may depend on the batch "
                f"(BatchNorm in train mode, batch statistics) or on Python control flow that fx could not "
                f"see; try method='hook'")

    # -- linearity ----------------------------------------------------------------------
    def _linear_variants(self, pre: Prefix, masks: torch.Tensor, replacement, channels=None) -> torch.Tensor:
        act, base, layer = pre.act, pre.base, self.linear
        V, B = masks.shape[0], act.shape[0]
        if channels is not None:
            used = torch.tensor(sorted({int(c) for v in channels for c in v}), dtype=torch.long, device=masks.device)
            one_hot = all(len(set(v)) <= 1 for v in channels)
        else:
            used = masks.any(0).nonzero().flatten()
            one_hot = None
        if used.numel() == 0:
            return _repeat(base, V, 0)
        axis = self.channel_axis
        sub = act.index_select(axis, used)
        if isinstance(replacement, torch.Tensor) and replacement.shape == act.shape:
            rep = replacement.to(act.dtype).index_select(axis, used)
        else:
            rep = torch.as_tensor(replacement, dtype=act.dtype, device=act.device)
            if rep.dim() == 1:
                shape = [1] * act.dim()
                shape[axis] = -1
                rep = rep.index_select(0, used).reshape(shape)
        delta = rep - sub                               # (B, S, ...) channel-axis subset
        S = used.numel()
        sub_masks = masks[:, used]                       # (V, S)
        if one_hot is None:
            one_hot = bool((sub_masks.sum(1) <= 1).all())
        if isinstance(layer, nn.Linear):
            w = layer.weight[:, used].to(act.dtype)      # (Cout, S)
            if one_hot:
                pos = sub_masks.long().argmax(1)
                has = sub_masks.any(1).to(act.dtype)
                d = delta.index_select(-1, pos).movedim(-1, 0)          # (V, B, ...)
                contrib = d.unsqueeze(-1) * (w.t().index_select(0, pos) * has[:, None]).reshape(
                    V, *([1] * (d.dim() - 1)), -1)
            else:
                contrib = torch.einsum("b...s,vs,os->vb...o", delta, sub_masks.to(act.dtype), w)
            return (base.unsqueeze(0) + contrib).flatten(0, 1)
        # Conv2d: one grouped conv gives each used channel's contribution (B, S, Cout, H', W').
        w = layer.weight[:, used].to(act.dtype)          # (Cout, S, kh, kw)
        Cout = w.shape[0]
        wg = w.transpose(0, 1).reshape(S * Cout, 1, *w.shape[2:])
        per = F.conv2d(delta, wg, None, layer.stride, layer.padding, layer.dilation, groups=S)
        per = per.view(B, S, Cout * per.shape[-2] * per.shape[-1])
        if one_hot:
            pos = sub_masks.long().argmax(1)
            has = sub_masks.any(1).to(act.dtype)
            contrib = per.index_select(1, pos).transpose(0, 1) * has[:, None, None]   # (V, B, R)
        else:
            contrib = (sub_masks.to(act.dtype) @ per.transpose(0, 1).reshape(S, -1)).view(V, B, -1)
        return (base.reshape(1, B, -1) + contrib).reshape(V * B, *base.shape[1:])

    # -- hook fallback --------------------------------------------------------------------
    def _hooked(self, fn):
        module = get_submodule(self.model, self.ablation_module)
        calls = [0]

        def hook(_m, args, output):
            k = calls[0]
            calls[0] += 1
            if k == self.act_call_index:
                return fn(args, output)
            return None
        return module.register_forward_hook(hook)

    def _hook_prefix(self, x: torch.Tensor) -> Prefix:
        got: dict = {}

        def capture(args, output):
            got["act"] = output
            if self._rewind is not None:
                got["rewound"] = self._rewind[self.ablation_module](*args)
            return None
        handle = self._hooked(capture)
        try:
            self.model(x)
        finally:
            handle.remove()
        return Prefix(act=got["act"], live_ins=[], rewound=got.get("rewound"), x=x)

    def _hook_run(self, x: torch.Tensor, first: torch.Tensor, V: int) -> torch.Tensor:
        handle = self._hooked(lambda args, output: first)
        try:
            return self.model(_repeat(x, V, 0))
        finally:
            handle.remove()


def _load_rewound(model: nn.Module, names: list[str], rewind_state: dict) -> dict:
    """Deep copies of the named modules with the rewind state's weights."""
    out = {}
    for name in names:
        module = get_submodule(model, name)
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            out[name] = module
            continue
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in rewind_state.items() if k.startswith(prefix)}
        if not sub:
            raise ValueError(f"rewind_to has no weights for {name!r} (expected keys starting with {prefix!r})")
        clone = copy.deepcopy(module)
        clone.load_state_dict(sub, strict=True)
        out[name] = clone
    return out


def split_model(model: nn.Module, layer: str, x: torch.Tensor, *, where: str = "output",
                channel_axis: Optional[int] = None, linearity: bool = True, method: str = "auto",
                rewind_state: Optional[dict] = None) -> SplitModel:
    """Cut `model` at the ablation point (`layer`, `where`) using the example batch `x`.

    x is used to find batch dimensions and sizes (two tiny probe runs) and to `verify` the
    split. rewind_state: a state dict whose weights for the ablation chain (the named module
    for "output", the conv for "pre-bn", conv and BN for "post-activation") produce
    `Prefix.rewound`. The model is evaluated in eval mode by the caller (see surgery.sweep).
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a non-empty batch tensor")
    get_submodule(model, layer)  # clear error listing the valid names
    target = layer if where == "output" else _resolve_conv(model, layer)
    if method != "hook":
        try:
            return _split_fx(model, layer, target, x, where, channel_axis, linearity, rewind_state)
        except (fx.proxy.TraceError, TypeError, NotImplementedError, _Unsplittable) as exc:
            if method == "fx" or where == "post-activation":
                raise RuntimeError(f"cannot split the model at {layer!r} (where={where!r}) with "
                                   f"torch.fx: {exc}") from exc
            warnings.warn(f"torch.fx could not split the model at {layer!r} ({type(exc).__name__}: {exc}); "
                          f"falling back to full forwards with a hook on the V*B repeated input "
                          f"(correct, slower: no prefix caching, no linearity)", RuntimeWarning,
                          stacklevel=2)
    return _split_hook(model, layer, target, x, where, channel_axis, rewind_state)


class _Unsplittable(Exception):
    pass


def _probe_shapes(model, x, target):
    with torch.no_grad(), no_inplace(model):
        module = get_submodule(model, target)
        got = []
        h = module.register_forward_hook(lambda m, a, o: got.append(o) if not got else None)
        try:
            model(x[:1])
        finally:
            h.remove()
    if not got or not isinstance(got[0], torch.Tensor):
        raise ValueError(f"{target!r} was not called in the forward pass or its output is not a tensor")
    return got[0]


def _split_hook(model, layer, target, x, where, channel_axis, rewind_state) -> SplitModel:
    if where == "post-activation":
        raise RuntimeError("where='post-activation' needs torch.fx tracing")
    act = _probe_shapes(model, x, target)
    axis = default_channel_axis(act.dim()) if channel_axis is None else channel_axis % act.dim()
    sm = SplitModel(model=model, layer=layer, where=where, channel_axis=axis,
                    num_channels=act.shape[axis], method="hook", ablation_module=target, chain=[target])
    if rewind_state is not None:
        sm._rewind = _load_rewound(model, [target], rewind_state)
    # the whole model runs per variant; a few times the model's activations per sample
    sm._per_sample_bytes = 8 * act[:1].numel() * act.element_size()
    return sm


def _split_fx(model, layer, target, x, where, channel_axis, linearity, rewind_state) -> SplitModel:
    graph = trace(model, {target})
    gm_full = fx.GraphModule(model, graph)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _Unsplittable(f"forward takes {len(placeholders)} inputs; only one is supported")
    out_node = next(n for n in nodes if n.op == "output")

    calls = [n for n in nodes if n.op == "call_module" and n.target == target]
    if not calls:
        raise _Unsplittable(f"{target!r} is not called as a module in the traced forward")
    if len(calls) > 1:
        raise ValueError(f"{target!r} is called {len(calls)} times in one forward; its output is ambiguous")
    chain = [calls[0]]
    if where == "post-activation":
        node = calls[0]
        path = [target]
        while True:
            users = list(node.users)
            if len(users) != 1:
                raise ValueError(f"post-activation: {path[-1]!r}'s output has {len(users)} users, so there "
                                 f"is no single conv -> BN -> activation chain after {target!r} "
                                 f"(path so far: {' -> '.join(path)}); use where='pre-bn' or 'output'")
            nxt = users[0]
            path.append(_describe(nxt))
            if nxt.op == "call_module" and isinstance(modules.get(nxt.target), _BN_TYPES) and len(chain) == 1:
                chain.append(nxt)
                node = nxt
                continue
            if _is_activation(nxt, modules):
                chain.append(nxt)
                break
            raise ValueError(f"post-activation: after {target!r} comes {' -> '.join(path)}, not an activation "
                             f"(ReLU/GELU/SiLU...); use where='pre-bn' or name another layer")
    A = chain[-1]

    # probe batch sizes 2 and 3 to find every node's batch dimension
    probes = []
    with torch.no_grad(), no_inplace(model):
        for n in (2, 3):
            p = _Probe(gm_full)
            p.run(x[:1].expand(n, *x.shape[1:]).contiguous())
            probes.append(p.summaries)
    kind = {n: _batch_kind(probes[0][n], probes[1][n]) for n in nodes if n in probes[0]}
    if kind.get(A) != ("batch", 0):
        raise _Unsplittable(f"the activation at {target!r} has no batch dimension first ({probes[0][A]})")
    act_shape = probes[0][A][1]
    ndim = len(act_shape)
    axis = default_channel_axis(ndim) if channel_axis is None else channel_axis
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise ValueError(f"channel_axis {channel_axis} is invalid for an activation of shape (N, "
                         f"{', '.join(map(str, act_shape[1:]))})")
    axis %= ndim
    C = act_shape[axis]

    # the suffix: everything downstream of A
    desc: set = set()
    for n in nodes:
        if n is A or any(m is A or m in desc for m in _node_inputs(n)):
            if n is not A:
                desc.add(n)
    if out_node not in desc:
        raise ValueError(f"the model's output does not depend on {target!r}")
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or kind.get(result) != ("batch", 0):
        raise _Unsplittable("the model's output is not one tensor with the batch first")

    linear = None
    start = A
    users = list(A.users)
    if linearity and len(users) == 1 and users[0].op == "call_module" and users[0].args == (A,) \
            and not users[0].kwargs:
        mod = modules.get(users[0].target)
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros" \
                and ndim == 4 and axis == 1:
            linear = mod
        elif isinstance(mod, nn.Linear) and axis == ndim - 1:
            linear = mod
        if linear is not None:
            start = users[0]
            desc.discard(start)
    suffix = set(desc)

    # pull batch-dependent non-tensor values (sizes) into the suffix, recomputed there
    changed = True
    while changed:
        changed = False
        for n in list(suffix):
            for m in _node_inputs(n):
                if m in suffix or m is start or m.op == "get_attr":
                    continue
                k = kind.get(m)
                if k == "move":
                    if m.op == "placeholder":
                        raise _Unsplittable("a value derived from the input cannot be split")
                    suffix.add(m)
                    changed = True
    live = []
    for n in nodes:
        if n in suffix:
            for m in _node_inputs(n):
                if m not in suffix and m is not start and m.op != "get_attr" and m not in live:
                    live.append(m)
    live_dims = [k[1] if isinstance(k := kind.get(m), tuple) else None for m in live]

    rewind = None
    if rewind_state is not None:
        names = [c.target for c in chain if c.op == "call_module"]
        rewind = _load_rewound(model, names, rewind_state)

    # prefix graph: A, the base (linearity), the rewound A, the live-ins
    def ancestors(targets):
        seen: set = set()
        stack = list(targets)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(_node_inputs(n))
        return seen

    wanted = [A] + ([start] if linear is not None else []) + live
    pre_nodes = ancestors(wanted + ([c for c in chain] if rewind is not None else []))
    root: dict = {}

    def bind(n):
        if n.op in ("call_module", "get_attr"):
            obj = model
            for part in n.target.split("."):
                obj = getattr(obj, part)
            root[n.target] = obj

    g = fx.Graph()
    env: dict = {}
    for n in nodes:
        if n in pre_nodes:
            env[n] = g.node_copy(n, lambda a: env[a])
            bind(n)
    rewound_value = None
    if rewind is not None:
        renv: dict = {}
        for i, c in enumerate(chain):
            new = g.node_copy(c, lambda a: renv.get(a, env[a]))
            if c.op == "call_module":
                new.target = f"_rewind_{i}"
                root[new.target] = rewind[c.target]
            renv[c] = new
        rewound_value = renv[A]
    g.output((env[A], env[start] if linear is not None else None, rewound_value, *[env[m] for m in live]))
    prefix_gm = fx.GraphModule(root, g)

    sg = fx.Graph()
    senv: dict = {start: sg.placeholder("first")}
    for i, m in enumerate(live):
        senv[m] = sg.placeholder(f"live_{i}")
    sroot: dict = {}
    needed = set(suffix)
    for n in suffix:
        needed |= {m for m in _node_inputs(n) if m.op == "get_attr"}
    for n in nodes:
        if n in needed and n is not out_node and n not in senv:
            senv[n] = sg.node_copy(n, lambda a: senv[a])
            if n.op in ("call_module", "get_attr"):
                obj = model
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                sroot[n.target] = obj
    sg.output(senv[out_node.args[0]])
    suffix_gm = fx.GraphModule(sroot, sg)

    # memory per variant and image: the largest few suffix tensors (eager frees the rest)
    sizes = []
    for n in suffix | {start}:
        s2, s3 = probes[0].get(n), probes[1].get(n)
        if s2 and s2[0] == "t" and s3[0] == "t":
            sizes.append(abs(_numel(s3[1]) - _numel(s2[1])))
    sizes.sort(reverse=True)
    itemsize = x.element_size()
    per_sample = (sum(sizes[:3]) + sum(sizes[:1]) * (2 if linear is not None else 1)) * itemsize
    target_of_a = A.target if A.op == "call_module" else target
    call_index = sum(1 for n in nodes[:nodes.index(A)] if n.op == "call_module" and n.target == A.target) \
        if A.op == "call_module" else 0
    sm = SplitModel(model=model, layer=layer, where=where, channel_axis=axis, num_channels=C, method="fx",
                    linear=linear, ablation_module=target_of_a,
                    chain=[c.target if c.op == "call_module" else c.target for c in chain],
                    act_call_index=call_index, _prefix_gm=prefix_gm, _suffix_gm=suffix_gm,
                    chain_nodes=chain, _live_dims=live_dims, _rewind=rewind,
                    _per_sample_bytes=max(per_sample, 1))
    return sm


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
