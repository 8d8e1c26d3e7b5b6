"""DeNetDM stage 1 + stage 2 on colored digits: all (ratio, seed) members as one stack against
the published loop, one member at a time.

Workload (DeNetDM stage 1 + 2 on Colored MNIST, docs/performance.md#baselines; colored-digits is its
offline stand-in): the MLP product of experts (deep + shallow branch, one linear head) for
stage1_epochs, then the distilled target branch for stage2_epochs, on every member
(conflict ratio x seed), with per-epoch validation of every head and selection of the best
epoch per member. No ERM / LfF baselines (cfg.baselines = ()).
- fast path: experiments.denetdm.run_denetdm (all members one StackedModules, the MLPs as
  batched matmuls, fused Adam, uint8 data on the device, batches gathered there, stage 2's
  frozen branches computed once per image, all heads in one evaluation pass, counts on the
  device).
- baseline: `published_loop` below, written the way the public code (kadarsh22/DeNetDM,
  train_decam_stage1.py / train_decam_stage2.py) trains: one member after another, a plain
  ProductOfExperts and then a DistilledTarget with the frozen stage-1 model as teacher, a
  torch DataLoader over a TensorDataset of float images (per-sample indexing, collate per
  step, drop_last), torch.optim.Adam, and per epoch one validation pass per head with the
  per-(label, bias) cell accuracies computed on the host; a state_dict copy of the best epoch.
  It uses exactly our initialization (denetdm._seeded + the same builders and salts), batch
  order (make_generator(seed, 11, epoch) through a sampler), losses and selection rule, and
  freezes the stage-2 branches in eval mode (the public code leaves them in train mode).
  Three choices keep the baseline no slower than the public code: one forward of the module
  per step (the public stage 2 runs the model twice plus the teacher), the frozen stage-2
  parameters out of autograd (requires_grad off; the public code backpropagates into them),
  and the epoch loss summed on the device (no host sync per step); the validation loader
  uses the training batch size, as the public code does.
Checked first in float64 at a small size: the same best epoch per member and phase, the same
validation and test metrics, per-epoch training losses within 1e-9. Then both are timed in
float32 (wall time; on the CPU CPU_ROUNDS times each, alternately, medians, with one
intra-op thread, CPU_THREADS; on a GPU once).
FLOP rates (`flop_counts`, from the layer sizes): each path's FLOPs over its wall time, against
one core's fastest measured fp32 rate (common.cpu_fp32_rate; the timed run uses one thread). Both paths train the
same FLOPs per step, but our stage 2 computes its frozen branches once per image rather than
in every step, and the loop evaluates every head in a pass of its own (3x our evaluation
FLOPs). What remains is matmuls of every member's 3072-input first layers, which stacking does
not make cheaper: the ratio is bounded by how close the stack runs to the matmul kernel's rate.
"""
from __future__ import annotations

import copy
import math
import os
import statistics

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from shortcut_fast.bench.common import BenchRow, alternating_wall_ms, cpu_fp32_rate, record, time_cpu
from shortcut_fast.data import load_dataset
from shortcut_fast.data.core import make_generator
from shortcut_fast.experiments import denetdm as dn

LOSS_TOLERANCE = 1e-9    # per-epoch mean training loss, float64 check
METRIC_TOLERANCE = 1e-12  # accuracies are ratios of counts: one sample more or less moves them by >= 1e-4
# CPU timing on one intra-op thread: on the shared, oversubscribed CI machine two threads
# spin-wait on each other and inflate both paths' wall times erratically (up to 8x).
CPU_THREADS = 1
CPU_ROUNDS = 3  # both paths timed 3 times, alternately (medians)


# ---------------------------------------------------------------------------------------
# The baseline: the published loop, one member at a time


class EpochOrder(Sampler):
    """Indices of one epoch: torch.randperm(n, generator=make_generator(seed, 11, epoch))."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=make_generator(self.seed, 11, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def _float_dataset(ds) -> TensorDataset:
    """Images as floats in [0, 1] (the default dtype), labels, bias labels."""
    if not getattr(ds, "in_memory", False):
        ds = ds.load_into_memory()
    return TensorDataset(ds.images.to(torch.get_default_dtype()) / 255, ds.labels, ds.attributes)


def evaluate(model, loader, head: int, num_classes: int, device) -> dict:
    """One pass over `loader` for one head: per-(label, bias) cell accuracies on the host."""
    model.eval()
    k = num_classes
    correct = torch.zeros(k * k, dtype=torch.int64)
    count = torch.zeros(k * k, dtype=torch.int64)
    with torch.no_grad():
        for x, y, a in loader:
            logits = model(x.to(device))[head]
            pred = logits.max(1)[1].cpu()
            cell = y * k + a
            correct.index_add_(0, cell, (pred == y).long())
            count.index_add_(0, cell, torch.ones_like(cell))
    present = count > 0
    cell_acc = torch.where(present, correct.double() / count.clamp(min=1), torch.zeros((), dtype=torch.float64))
    aligned = torch.eye(k, dtype=torch.bool).flatten()

    def share(mask):
        den = int(count[mask].sum())
        return int(correct[mask].sum()) / den if den > 0 else float("nan")

    return {"unbiased": float(cell_acc.sum() / present.sum().clamp(min=1)), "aligned": share(aligned),
            "conflicting": share(~aligned), "accuracy": int(correct.sum()) / max(int(count.sum()), 1)}


def _stage1_loss(out, y, cfg):
    return F.cross_entropy(out[0], y, reduction="none").mean()


def _stage2_loss(out, y, cfg):
    T = cfg.temperature
    ce = F.cross_entropy(out[0], y, reduction="none").mean()
    soft_targets = F.softmax(out[2].detach() / T, dim=-1)  # the teacher: stage-1 f(phi_d), frozen
    soft_prob = F.log_softmax(out[1] / T, dim=-1)           # the student: f_t(phi_t)
    distillation = -torch.sum(soft_targets * soft_prob) / soft_prob.size()[0] * (T ** 2)
    return ce + cfg.distill_weight * distillation


def train_stage(model, params, heads, select, epochs, lr, weight_decay, loss_fn, cfg, train_loader, val_loader,
                num_classes, device, frozen=()):
    """Adam on `params` for `epochs`; after every epoch one validation pass per head; keep a
    copy of the state_dict of the epoch with the best validation unbiased accuracy of
    `select` (strictly greater). Returns the record and leaves the best state loaded."""
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sel = heads.index(select)
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    history = []
    for epoch in range(epochs):
        model.train()
        for name in frozen:
            getattr(model, name).eval()
        train_loader.sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        for x, y, _ in train_loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y, cfg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        val = [evaluate(model, val_loader, j, num_classes, device) for j in range(len(heads))]
        score = val[sel]["unbiased"]
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        history.append({"train_loss": float(loss_sum) / steps, "val_unbiased": [v["unbiased"] for v in val]})
    model.load_state_dict(best_state)
    return {"best_epoch": best_epoch, "history": history}


def published_loop(splits: list, members: list[tuple[float, int]], cfg: dn.DeNetDMConfig, device="cpu") -> list[dict]:
    """DeNetDM stage 1 + 2 of every member, one after another. splits[i]: member i's
    DatasetSplits; members[i]: its (ratio, seed). Returns per member
    {phase: {best_epoch, history, val: {head: metrics}, test: {head: metrics}}}."""
    (shallow_depth, deep_depth), = cfg.depths
    results = []
    for s, (ratio, seed) in zip(splits, members):
        C, side = s.image_shape[0], s.image_shape[-1]
        k = s.num_classes
        factory = dn._Factory(cfg, C, side, k)
        train_set, val_set, test_set = _float_dataset(s.train), _float_dataset(s.val), _float_dataset(s.test)
        pin = torch.device(device).type == "cuda"
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=EpochOrder(len(train_set), seed),
                                  drop_last=True, num_workers=0, pin_memory=pin)
        val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0, pin_memory=pin)
        test_loader = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=False, num_workers=0, pin_memory=pin)
        out = {}

        # stage 1: product of experts, plain cross-entropy, selection on the shallow branch alone
        dn._seeded(seed, 21)
        model = dn.ProductOfExperts(factory.branch("deep", deep_depth), factory.branch("shallow", shallow_depth),
                                    k).to(device)
        rec = train_stage(model, list(model.parameters()), dn.STAGE1_HEADS, "shallow", cfg.stage1_epochs,
                          cfg.stage1_lr, cfg.stage1_weight_decay, _stage1_loss, cfg, train_loader, val_loader, k,
                          device)
        rec["val"] = {h: evaluate(model, val_loader, j, k, device) for j, h in enumerate(dn.STAGE1_HEADS)}
        rec["test"] = {h: evaluate(model, test_loader, j, k, device) for j, h in enumerate(dn.STAGE1_HEADS)}
        out["stage1"] = rec

        # stage 2: a new target branch distilled from the selected stage-1 model's f(phi_d);
        # phi_b, phi_d and f frozen (eval mode, out of the optimizer)
        dn._seeded(seed, 22)
        student = dn.DistilledTarget(model, factory.target()).to(device)
        for p in list(student.deep.parameters()) + list(student.shallow.parameters()) + \
                list(student.head.parameters()):
            p.requires_grad_(False)
        params = list(student.target.parameters()) + list(student.target_head.parameters())
        rec = train_stage(student, params, dn.STAGE2_HEADS, "target", cfg.stage2_epochs, cfg.stage2_lr,
                          cfg.stage2_weight_decay, _stage2_loss, cfg, train_loader, val_loader, k, device,
                          frozen=("deep", "shallow"))
        rec["val"] = {h: evaluate(student, val_loader, j, k, device) for j, h in enumerate(dn.STAGE2_HEADS)}
        rec["test"] = {h: evaluate(student, test_loader, j, k, device) for j, h in enumerate(dn.STAGE2_HEADS)}
        out["stage2"] = rec
        results.append(out)
    return results


# ---------------------------------------------------------------------------------------
# Comparison


def _mlp_layers(cfg: dn.DeNetDMConfig, depth: int, in_features: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear of an MLP branch's features (depth - 1 blocks; the head apart)."""
    return [(in_features, cfg.width)] + [(cfg.width, cfg.width)] * (depth - 2)


def flop_counts(cfg: dn.DeNetDMConfig, image_shape, num_classes: int, sizes: dict) -> dict:
    """FLOPs of both paths from the layer sizes (arch mlp): 2 x in x out per image for a Linear's
    forward, the same again for its weight gradient (trained layers) and for its input gradient
    (where one flows: not into the images, not into frozen branches). sizes: train / val / test
    image counts per member. The loop evaluates each head in its own pass; we evaluate all heads
    in one (also the test split after every epoch when cfg.test_curves). Without augmentation our
    stage 2 computes the frozen branches once per training image, the loop in every step."""
    (shallow, deep), = cfg.depths
    n_in = math.prod(image_shape)
    mac = lambda layers: sum(i * o for i, o in layers)  # noqa: E731
    first = n_in * cfg.width
    b, d = mac(_mlp_layers(cfg, deep, n_in)), mac(_mlp_layers(cfg, shallow, n_in))
    t = b  # the target is like the deep branch
    head = cfg.width * num_classes
    # per image: (forward, weight gradients, input gradients) multiply-adds
    stage1 = (b + d + 3 * head, b + d + 3 * head, (b - first) + (d - first) + 3 * head)
    stage2 = (b + d + t + 3 * head, t + 2 * head, (t - first) + 2 * head)
    M, B = len(cfg.members), cfg.batch_size
    steps = sizes["train"] // B
    out = {"train_flops_per_member_step": {"stage1": 2 * B * sum(stage1), "stage2": 2 * B * sum(stage2)}}
    loop_train = 2 * M * steps * B * (cfg.stage1_epochs * sum(stage1) + cfg.stage2_epochs * sum(stage2))
    train = loop_train
    if cfg.augment == "none":  # the frozen features once per image, then per step only what is left
        train += 2 * M * (sizes["train"] * (b + d) - steps * B * cfg.stage2_epochs * (b + d))
    evals = {}
    for name, epochs, fwd in (("stage1", cfg.stage1_epochs, stage1[0]), ("stage2", cfg.stage2_epochs, stage2[0])):
        per_epoch = sizes["val"] + (sizes["test"] if cfg.test_curves else 0)
        evals[name] = 2 * M * fwd * (epochs * per_epoch + sizes["val"] + sizes["test"])
        loop_images = epochs * sizes["val"] + sizes["val"] + sizes["test"]  # no test curves in the loop
        evals[name + "_loop"] = 2 * M * fwd * loop_images * len(dn.STAGE1_HEADS)
    out["flops"] = train + evals["stage1"] + evals["stage2"]
    out["baseline_flops"] = loop_train + evals["stage1_loop"] + evals["stage2_loop"]
    out["train_flops"], out["baseline_train_flops"] = train, loop_train
    return out


def matmul_rate(members: int, batch: int, n_in: int, width: int) -> float:
    """GFLOP/s of the kernel behind most of both paths' FLOPs, on this CPU: the first layers'
    batched matmuls (forward x W^T and weight gradient g^T x, as ensemble.stacked_linear runs
    them), median of repeated runs."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(members, batch, n_in, generator=g), torch.randn(members, width, n_in, generator=g)
    grad = torch.randn(members, batch, width, generator=g)
    t = time_cpu(lambda: (torch.bmm(x, w.mT), torch.bmm(grad.mT, x)), min_runs=10)
    return 2 * 2 * members * batch * n_in * width / (t.median_ms / 1e3) / 1e9


def _loader(image_size: int):
    cache = {}

    def load(ratio, seed):
        if (ratio, seed) not in cache:
            cache[(ratio, seed)] = load_dataset("colored-digits", seed=seed, conflict_ratio=ratio, unbiased_val=True,
                                                image_size=image_size)
        return cache[(ratio, seed)]

    return load


def _max_abs(a, b) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) if not (math.isnan(x) and math.isnan(y)) else 0.0 for x, y in zip(a, b)), default=0.0)


def compare(ours: dict, loop: list[dict]) -> dict:
    """Differences between run_denetdm's result and published_loop's: best epochs (count of
    mismatches), reported val/test metrics, per-epoch train losses and validation curves."""
    tag = next(iter(ours["phases"])).rsplit("-", 1)[0]  # denetdm-<shallow>-<deep>
    phases = {"stage1": f"{tag}-stage1", "stage2": f"{tag}-stage2"}
    out = {"best_epoch_mismatches": 0, "max_metric_diff": 0.0, "max_train_loss_diff": 0.0,
           "max_val_curve_diff": 0.0}
    for stage, name in phases.items():
        hist = ours["phases"][name]["history"][0]  # one stacked group
        for i, member in enumerate(loop):
            rec = member[stage]
            out["best_epoch_mismatches"] += ours["phases"][name]["best_epoch"][i] != rec["best_epoch"]
            out["max_train_loss_diff"] = max(out["max_train_loss_diff"], _max_abs(
                [e["train_loss"][i] for e in hist], [e["train_loss"] for e in rec["history"]]))
            out["max_val_curve_diff"] = max(out["max_val_curve_diff"], _max_abs(
                [v for e in hist for v in e["val_unbiased"][i]],
                [v for e in rec["history"] for v in e["val_unbiased"]]))
    for method in ours["methods"].values():
        stage = "stage1" if method["phase"].endswith("stage1") else "stage2"
        for i, per in enumerate(method["per_member"]):
            rec = loop[i][stage]
            for split in ("val", "test"):
                mine, theirs = per[split], rec[split][method["head"]]
                out["max_metric_diff"] = max(out["max_metric_diff"], _max_abs(
                    [mine[m] for m in dn.METRICS], [theirs[m] for m in dn.METRICS]))
    return out


def _both(load, cfg: dn.DeNetDMConfig, device, rounds: int = 1):
    """Both paths timed `rounds` times, alternately: (ours, median ms, loop, median ms, runs).
    The shared CPU machine's speed drifts by up to 20 % between runs of several seconds."""
    splits = [load(r, s) for r, s in cfg.members]
    out, runs = alternating_wall_ms({"ours": lambda: dn.run_denetdm(load, cfg, device=device, progress=False),
                                     "loop": lambda: published_loop(splits, cfg.members, cfg, device)}, rounds, device)
    return out["ours"], statistics.median(runs["ours"]), out["loop"], statistics.median(runs["loop"]), runs


def check(device="cpu", *, ratios=(0.02, 0.1), seeds=1, epochs=(3, 3), width=32, image_size=16,
          batch_size=64, lr=3e-3) -> dict:
    """Both paths in float64 at a small size; raises if they disagree. Returns the differences
    and the selected epochs (lr 3e-3: noisy enough validation curves that an earlier epoch
    than the last gets selected, so selection and the restored stage-1 teacher are exercised)."""
    cfg = dn.DeNetDMConfig(ratios=ratios, seeds=seeds, stage1_epochs=epochs[0], stage2_epochs=epochs[1], width=width,
                           batch_size=batch_size, stage1_lr=lr, stage2_lr=lr, baselines=(), test_curves=False)
    load = _loader(image_size)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, _, loop, _, _ = _both(load, cfg, device)
    finally:
        torch.set_default_dtype(old)
    diff = compare(ours, loop)
    bad = []
    if diff["best_epoch_mismatches"]:
        bad.append(f"{diff['best_epoch_mismatches']} selected epochs differ")
    if not diff["max_metric_diff"] <= METRIC_TOLERANCE or not diff["max_val_curve_diff"] <= METRIC_TOLERANCE:
        bad.append(f"metrics differ by {diff['max_metric_diff']:.3g}, validation curves by "
                   f"{diff['max_val_curve_diff']:.3g}")
    if not diff["max_train_loss_diff"] <= LOSS_TOLERANCE:
        bad.append(f"train losses differ by {diff['max_train_loss_diff']:.3g} (> {LOSS_TOLERANCE})")
    if bad:
        raise RuntimeError("run_denetdm and the published loop disagree (float64): " + "; ".join(bad))
    best = {stage: [m[stage]["best_epoch"] for m in loop] for stage in ("stage1", "stage2")}
    return {**diff, "members": len(cfg.members), "epochs": list(epochs), "width": width, "image_size": image_size,
            "best_epochs": best}


def run(device: str = "cpu", quick: bool = False):
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _run(device, quick)
    finally:
        torch.set_num_threads(threads)


def _run(device: str, quick: bool):
    if quick:
        ratios, seeds, epochs, width, side = (0.02, 0.1), 1, (1, 1), 32, 16
        checked = check(device, ratios=ratios, seeds=1, epochs=(1, 1), width=16, image_size=16)
    else:
        ratios, seeds, width, side = (0.005, 0.01, 0.02, 0.05), 3, 100, 32
        epochs = (10, 10) if device == "cuda" else (3, 3)
        checked = check(device)
    # No per-epoch test curves: the published loop evaluates only validation while it trains.
    cfg = dn.DeNetDMConfig(ratios=ratios, seeds=seeds, stage1_epochs=epochs[0], stage2_epochs=epochs[1], width=width,
                           baselines=(), test_curves=False)
    load = _loader(side)
    for r, s in cfg.members:  # data built before timing (both paths get the same in-memory splits)
        load(r, s)
    ours, ours_ms, loop, loop_ms, runs = _both(load, cfg, device, CPU_ROUNDS if device == "cpu" else 1)
    f32 = compare(ours, loop)  # float32: informative only (near-ties may round apart)
    first = load(*cfg.members[0])
    M = len(cfg.members)
    steps = len(first.train) // cfg.batch_size
    (shallow, deep), = cfg.depths
    flops = flop_counts(cfg, first.image_shape, first.num_classes,
                        {p: len(getattr(first, p)) for p in ("train", "val", "test")})
    rates = {**flops, "gflops_per_s": flops["flops"] / ours_ms / 1e6,
             "baseline_gflops_per_s": flops["baseline_flops"] / loop_ms / 1e6}
    if device == "cpu":  # the timed run uses one thread: its bound is one core's rate
        peak = cpu_fp32_rate()
        rates.update(peak, fraction_of_core_rate=rates["gflops_per_s"] / peak["cpu_fp32_gflops_per_core"],
                     baseline_fraction_of_core_rate=rates["baseline_gflops_per_s"] / peak["cpu_fp32_gflops_per_core"])
        # Were every FLOP of the stack run at the first layers' matmul rate, it would take
        # flops / rate: the loop's time over that bounds the ratio on this CPU.
        rate = matmul_rate(M, cfg.batch_size, math.prod(first.image_shape), width)
        rates.update(matmul_gflops_per_s=rate, ratio_bound_at_matmul_rate=loop_ms / (flops["flops"] / rate / 1e6))
    row = BenchRow(
        workload="denetdm_stage1_stage2",
        sizes=dict(data="colored-digits", members=M, ratios=list(ratios), seeds=seeds,
                   images={p: len(getattr(first, p)) for p in ("train", "val", "test")},
                   image_shape=list(first.image_shape), stage1_epochs=epochs[0], stage2_epochs=epochs[1],
                   batch_size=cfg.batch_size, steps_per_epoch=steps,
                   model=f"mlp width {width}, deep {deep} / shallow {shallow} layers, target like deep"),
        dtype="float32",
        backend="stacked (batched matmuls)",
        baseline="the published loop (kadarsh22/DeNetDM): one member after another, plain modules, DataLoader over "
                 "a float TensorDataset (collate per step, drop_last), torch.optim.Adam, one host-side "
                 "validation pass per head per epoch (batch = training batch), state_dict copy of the best epoch",
        median_ms=ours_ms, p20_ms=ours_ms, p80_ms=ours_ms,
        baseline_ms=loop_ms,
        ratio=loop_ms / ours_ms,
        achieved={"check_float64": "identical best epochs and metrics, losses within 1e-9",
                  "check_members": checked["members"], "check_epochs": checked["epochs"],
                  "check_best_epoch_mismatches": checked["best_epoch_mismatches"],
                  "check_max_metric_diff": checked["max_metric_diff"],
                  "check_max_val_curve_diff": checked["max_val_curve_diff"],
                  "check_max_train_loss_diff": checked["max_train_loss_diff"],
                  "check_best_epochs": checked["best_epochs"],
                  "float32_best_epoch_mismatches": f32["best_epoch_mismatches"],
                  "float32_max_metric_diff": f32["max_metric_diff"],
                  "ms_runs": runs["ours"], "baseline_ms_runs": runs["loop"],
                  "member_steps_per_s": M * steps * sum(epochs) / (ours_ms / 1e3),
                  "baseline_member_steps_per_s": M * steps * sum(epochs) / (loop_ms / 1e3),
                  "cpu_threads": torch.get_num_threads() if device == "cpu" else None,
                  "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                  **rates},
        quick=quick,
    )
    return [record(row, device)]
