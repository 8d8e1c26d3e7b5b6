"""Channel-ablation sweep of every channel of a ResNet-18 stage, per-group accuracy.

Fast path: surgery.sweep.channel_ablation_sweep (prefix run once per batch, V*B stacked
variants, linearity for the next conv, one per-(variant, group) reduction). Baselines:
the naive loop (channel_ablation_reference: one hooked full forward per channel and batch)
and captum's LayerFeatureAblation(perturbations_per_eval=k), which returns the drop of the
label logit per sample (not group counts), so it is checked against the fast path's
per-sample logits on a slice before timing. The fast path's per-group counts must equal
the naive loop's before anything is recorded.

Two sweeps per stage: the block outputs (where="output": prefix caching only) and each
block's conv1 after BN + ReLU (where="post-activation": the next layer is a conv, so
linearity applies). Two stages: layer2 (about 60 % of the network's compute lies after it,
which bounds what caching the prefix can save) and layer4 (little lies after it).
"""
from __future__ import annotations

import torch

from shortcut_fast.bench.common import BenchRow, record, wall_ms
from shortcut_fast.models import build_model
from shortcut_fast.surgery import channel_ablation_reference, channel_ablation_sweep


def _captum(model, layer_module, x, y, channels, k, batch_size):
    """captum LayerFeatureAblation over all channels: (N, C) drop of the label logit."""
    from captum.attr import LayerFeatureAblation

    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]

        def target_logit(inp, yb=yb):  # captum stacks k perturbations along the batch
            logits = model(inp)
            return logits.gather(1, yb.repeat(logits.shape[0] // yb.numel())[:, None])[:, 0]

        lfa = LayerFeatureAblation(target_logit, layer_module)
        mask = torch.arange(channels, device=x.device).reshape(1, channels, 1, 1)
        with torch.no_grad():
            attr = lfa.attribute(xb, layer_mask=mask, perturbations_per_eval=k)
        out.append(attr[:, :, 0, 0])
    return torch.cat(out)


def settings(device: str, quick: bool) -> dict:
    """Model width, images, stages swept and images per batch (bench/roofline.py and
    bench/occupancy.py read them too)."""
    batch = 128 if device == "cpu" else 1024  # 128: the CPU's best forward batch (README)
    if quick:
        return dict(width=8, images=96, stages=("layer2",), batch=batch)
    return dict(width=16 if device == "cpu" else 64, images=256 if device == "cpu" else 10_000,
                stages=("layer2", "layer4"), batch=batch)


def run(device: str = "cpu", quick: bool = False, stages=None):
    s = settings(device, quick)
    width, n, stages, batch = s["width"], s["images"], stages or s["stages"], s["batch"]
    k = 8 if device == "cpu" else 16
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=width).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    groups = (y % 4).to(device)  # any grouping: 4 groups
    try:
        import captum  # noqa: F401
        have_captum = True
    except ImportError:
        have_captum = False

    rows = []
    for stage in stages:
        rows += _run_stage(model, stage, x, y, groups, width, n, batch, k, have_captum, device, quick)
    return rows


def _run_stage(model, stage, x, y, groups, width, n, batch, k, have_captum, device, quick):
    data = (x, y, groups)
    blocks = [name for name in model.block_names if name.startswith(stage + ".")]
    rows = []
    for where, layers in (("output", blocks), ("post-activation", [f"{b}.conv1" for b in blocks])):
        fast_fn = lambda: channel_ablation_sweep(model, layers, data, where=where, batch_size=batch)  # noqa: E731
        fast, fast_ms = wall_ms(fast_fn, device)
        fast_ms = min(fast_ms, wall_ms(fast_fn, device)[1])  # shared machines: best of two
        slow, slow_ms = wall_ms(lambda: channel_ablation_reference(model, layers, data, where=where,
                                                                 batch_size=batch), device)
        same = all(torch.equal(fast[l].correct, slow[l].correct) and
                   torch.equal(fast[l].baseline_correct, slow[l].baseline_correct) for l in layers)
        if not same:
            raise RuntimeError(f"fast sweep ({where}) disagrees with the hook loop on per-group counts")
        variants = sum(fast[l].correct.shape[0] for l in layers)
        sizes = dict(images=n, H=32, W=32, model=f"resnet18(width={width})", stage=stage, where=where,
                     layers=layers, variants=variants, groups=4)
        linear = [fast[l].linearity for l in layers]
        rows.append(record(BenchRow(
            workload=f"ablation_sweep_{where.replace('-', '_')}", sizes=sizes, dtype="float32", backend="auto",
            baseline="one hooked full forward per channel (channel_ablation_reference)", median_ms=fast_ms,
            p20_ms=fast_ms, p80_ms=fast_ms, baseline_ms=slow_ms, ratio=slow_ms / fast_ms,
            achieved={"identical_group_counts": same, "linearity": linear,
                      "variant_images_per_s": variants * n / fast_ms * 1e3}, quick=quick), device))
        if not have_captum:
            continue
        # captum: same drops of the label logit as the fast path on a slice, then timed on everything
        mods = [model.get_submodule(l if where == "output" else l.replace(".conv1", ".act1")) for l in layers]
        m = min(n, 32)
        check = channel_ablation_sweep(model, layers, (x[:m], y[:m], groups[:m]), where=where,
                                       return_outputs=True, backend="torch")
        for layer, module in zip(layers, mods):
            r = check[layer]
            C = r.num_channels
            ours = (r.baseline_outputs.gather(1, y[:m, None].cpu())
                    - r.outputs.gather(2, y[:m].cpu()[None, :, None].expand(C, -1, 1))[..., 0].T)
            theirs = _captum(model, module, x[:m], y[:m], C, k, batch).cpu()
            torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-4)

        def captum_all():
            return [_captum(model, module, x, y, check[l].num_channels, k, batch) for l, module in zip(layers, mods)]
        _, captum_ms = wall_ms(captum_all, device)
        rows.append(record(BenchRow(
            workload=f"ablation_sweep_{where.replace('-', '_')}", sizes=sizes, dtype="float32", backend="auto",
            baseline=f"captum LayerFeatureAblation(perturbations_per_eval={k})", median_ms=fast_ms,
            p20_ms=fast_ms, p80_ms=fast_ms, baseline_ms=captum_ms, ratio=captum_ms / fast_ms,
            achieved={"same_label_logit_drops_on_slice": True, "captum_gives": "label-logit drop only"},
            quick=quick), device))
    return rows
