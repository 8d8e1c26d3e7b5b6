"""bench/roofline.py: the bytes and FLOPs of every benchmarked kernel (hand-computed small
cases, and the output bytes against the ops' real outputs), the bound and best time, the
device matching, the roofline fields of recorded rows, and the table the docs render."""
from __future__ import annotations

import json
import math

import pytest
import torch

from shortcut_fast.bench import common, roofline as rl
from shortcut_fast.bench.common import BenchRow
from cli_runner import run_cli


# ---------------------------------------------------------------------------------------
# Formulas


def test_rfft2_flops_is_half_a_complex_fft():
    assert rl.rfft2_flops(4, 8) == 2.5 * 32 * 5  # N = 32, log2 N = 5
    assert rl.rfft2_flops(1, 1) == 0


def test_class_spectrum_work():
    (p,) = rl.class_spectrum(B=2, C=3, H=4, W=8, K=5)
    # x 2*3*32 float32 + 2 int64 labels + out 5*3*32 float32
    assert p.bytes == 768 + 16 + 1920
    # per image-channel: rfft2 400 + half spectrum 4*5 points x (|.| 4 + add 1)
    assert p.flops == 6 * (400 + 100)
    assert p.precision == "fp32"


def test_band_filter_and_remove_frequencies_work():
    (band,) = rl.band_filter(B=2, C=3, H=4, W=8, K=5)
    assert band.bytes == 768 + 5 * 32 + 5 * 768  # x, bool masks, (K, B, C, H, W) float32 out
    assert band.flops == 6 * 400 + 30 * (2 * 20 + 400)  # forward FFTs; per output: mask product + inverse FFT
    (remove,) = rl.remove_frequencies(B=2, C=3, H=4, W=8, K=5)
    assert remove.bytes == 768 + 5 * 2 * 8 + 5 * 768  # x, int64 pairs, out
    assert remove.flops == 6 * 400 + 30 * 32 * 4


def test_output_bytes_match_the_ops_outputs():
    """The bytes written in each formula are those of the op's real output on a small case."""
    from shortcut_fast.ops import class_spectrum_sum, freq
    from shortcut_fast.ops.band_filter import band_filter
    from shortcut_fast.ops.probe_stats import probe_stats

    B, C, H, W, K = 2, 3, 4, 8, 5
    x = torch.randn(B, C, H, W)
    labels = torch.randint(0, K, (B,))
    masks = freq.pair_masks(H, W, freq.conjugate_pairs(H, W)[:K])
    inputs = x.numel() * 4
    out = class_spectrum_sum(x, labels, K, backend="torch")
    assert rl.class_spectrum(B, C, H, W, K)[0].bytes == inputs + labels.numel() * 8 + out.numel() * out.element_size()
    out = band_filter(x, masks, "stop", backend="torch")
    assert masks.dtype == torch.bool
    assert rl.band_filter(B, C, H, W, K)[0].bytes == inputs + masks.numel() + out.numel() * out.element_size()
    xs, zs = torch.randn(10, 3), torch.randn(10, 2)
    outs = probe_stats(xs, zs, backend="torch")
    assert rl.probe_stats(10, 3, 2)[0].bytes == (xs.numel() + zs.numel()) * 4 + sum(o.numel() * 4 for o in outs)


def test_probe_work():
    (stats,) = rl.probe_stats(N=10, D=3, K=2, precision="tf32")
    assert (stats.flops, stats.precision) == (2 * 10 * 3 * 5 + 10 * (3 + 6), "tf32")
    (fit,) = rl.ridge_fit(D=2, K=3, L=4)
    assert fit.flops == 13 * 8 + (6 + 8) * 4 * 3 and fit.precision == "fp64"
    phases = rl.vinfo_probes(n_train=8, n_heldout=2, D=3, K=2, alphas=4)
    assert [p.precision for p in phases] == ["fp32", "fp64"]
    assert phases[0].flops == stats.flops  # both splits together: N = 10
    assert phases[0].bytes == stats.bytes + (9 + 6 + 3 + 4) * 4  # a second set of statistics written
    (step,) = rl.probe_step(N=4, D=3, K=2, C=5)
    params = 2 * 3 * 5 + 2 * 5
    assert step.bytes == 4 * 3 * 4 + 4 * 2 * 8 + params * 4 + (2 + params) * 4
    assert step.flops == 4 * 4 * 3 * 2 * 5 + 5 * 4 * 2 * 5


def test_model_workloads_count_the_suffix_per_variant():
    """Width-4 CIFAR ResNet-18: layer4 has 32 channels at 4x4; its second block is two 3x3
    convs (2 * 32*32*9*16 flops each), the head a 32 -> 10 linear layer."""
    cost = rl.model_cost(4)
    conv, head = 2 * 32 * 32 * 9 * 16, 2 * 32 * 10
    assert cost.modules["layer4.1"] == 2 * conv
    (out,) = rl.ablation_sweep(images=3, model="resnet18(width=4)", stage="layer4", where="output")
    # one full forward per image, then 32 variants after layer4.0 and 32 after layer4.1
    assert out.flops == 3 * (cost.flops + 32 * (2 * conv + head) + 32 * head)
    assert out.precision == "tf32"
    (post,) = rl.ablation_sweep(images=3, model="resnet18(width=4)", stage="layer4", where="post-activation")
    # conv2 by linearity: one input channel of 32
    assert post.flops == 3 * (cost.flops + 32 * (conv / 32 + 2 * conv + head) + 32 * (conv / 32 + head))
    params = sum(p.numel() for p in __import__("shortcut_fast.models", fromlist=["build_model"]).build_model(
        "resnet18", num_classes=10, width=4).parameters())
    assert out.bytes == 3 * (3 * 32 * 32 * 4 + 16) + params * 4 + 64 * 4 * 16
    (dfm,) = rl.dfm_search(classes=1, images=2, candidates=3, model="resnet18(width=4)", precision="bf16")
    assert dfm.flops == 2 * 3 * rl.rfft2_flops(32, 32) + 6 * (cost.flops + 3 * 32 * 32 * 4)
    assert dfm.bytes == 2 * 3 * 32 * 32 * 4 + params * 4 + 3 * 4
    with pytest.raises(ValueError, match="resnet18"):
        rl.dfm_search(1, 1, 1, "vit")


def test_triton_dft_kernels_count_their_matmuls():
    s = dict(B=2, C=3, H=32, W=32, K=5)
    # class spectrum: row transform 4 H W^2 (one block of 64 rows), column transform 8 H^2 W, |.| 4 HW
    assert rl.triton_flops("class_spectrum_sum", s) == 6 * (4 * 32 ** 3 + 8 * 32 ** 3 + 4 * 1024)
    big = dict(s, H=224, W=224)
    assert rl.triton_flops("class_spectrum_sum", big) == 6 * (4 * 4 * 224 ** 3 + 8 * 224 ** 3 + 4 * 224 ** 2)
    assert rl.triton_flops("band_filter", s) == 6 * rl.rfft2_flops(32, 32) + 30 * 6 * 32 ** 3
    assert rl.triton_flops("remove_frequencies", s) is None


def test_workloads_without_a_roofline():
    for workload in ("train_step", "localization_ensemble", "denetdm_stage1_stage2", "dfm_search_gradient"):
        assert rl.workload_phases(workload, {}) is None


def test_precision_follows_the_tf32_switches_and_autocast():
    sizes = dict(n_train=8, n_heldout=2, D=3, K=2, alphas=4)
    assert rl.workload_phases("vinfo_probes", sizes)[0].precision == "fp32"
    assert rl.workload_phases("vinfo_probes", sizes, tf32_matmul=True)[0].precision == "tf32"
    dfm = dict(classes=1, images=1, candidates=1, model="resnet18(width=4)")
    assert rl.workload_phases("dfm_search_loss", dfm, tf32_conv=False)[0].precision == "fp32"
    assert rl.workload_phases("dfm_search_cifar", dfm, "bfloat16 autocast")[0].precision == "bf16"


# ---------------------------------------------------------------------------------------
# Bound and best time


def test_bound_and_best_time():
    peaks = rl.Peaks(1e12, {"fp64": 1e12, "fp32": 2e12, "tf32": 4e12, "bf16": 8e12})
    memory = rl.Phase("a", bytes=3e12, flops=2e12, precision="fp32")  # 3 s of traffic, 1 s of arithmetic
    compute = rl.Phase("b", bytes=1e12, flops=8e12, precision="tf32")  # 1 s vs 2 s
    assert rl.phase_ms(memory, peaks) == (3000.0, "memory")
    assert rl.phase_ms(compute, peaks) == (2000.0, "compute")
    both = rl.roofline([memory, compute], peaks)
    assert both["best_ms"] == 5000.0 and both["bound"] == "memory"  # the longer phase decides
    assert both["bytes"] == 4e12 and both["flops"] == 10e12 and both["precision"] == "fp32+tf32"
    assert [p["bound"] for p in both["phases"]] == ["memory", "compute"]
    # the same arithmetic at fp64 (a quarter of the tf32 peak) makes the second phase the longer one
    slow = rl.roofline([memory, rl.Phase("b", 1e12, 8e12, "fp64")], peaks)
    assert slow["bound"] == "compute" and slow["best_ms"] == 11000.0
    assert "best_ms" not in rl.roofline([memory], None)


def test_device_matching():
    assert rl.match_device("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert rl.match_device("NVIDIA H100 SXM5 80GB") == "H100 SXM"
    assert rl.match_device("NVIDIA H100 PCIe") == "H100 PCIe"
    assert rl.match_device("NVIDIA H200") == "H200"
    assert rl.match_device("NVIDIA A100-SXM4-80GB") == "A100 SXM 80GB"
    for other in ("NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-40GB",
                  "NVIDIA A100 80GB PCIe", "NVIDIA H100", "NVIDIA GeForce RTX 4090", ""):
        assert rl.match_device(other) is None, other
    assert rl.peak_flops("NVIDIA H100 PCIe", "tf32") == 378e12
    assert rl.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert rl.peak_flops("NVIDIA L4", "bf16") is None
    for peaks in rl.PEAKS.values():  # every precision a phase may ask for
        assert set(peaks.flops) == set(rl.PRECISIONS)


# ---------------------------------------------------------------------------------------
# Recorded rows


def _row(workload="band_filter", backend="cuda", median_ms=1.0, sizes=None):
    return BenchRow(workload=workload, sizes=sizes or dict(B=256, C=3, H=32, W=32, K=512), dtype="float32",
                    backend=backend, baseline="loop", median_ms=median_ms, p20_ms=median_ms, p80_ms=median_ms,
                    baseline_ms=2 * median_ms, ratio=2.0)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


def _on_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_gpu_row_carries_its_roofline(results, monkeypatch):
    _on_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    row = common.record(_row(median_ms=0.964), "cuda")
    r = row.roofline
    (phase,) = rl.band_filter(256, 3, 32, 32, 512)
    best = max(phase.bytes / 3.35e12, phase.flops / 66.9e12) * 1e3
    assert (r["bytes"], r["flops"], r["bound"], r["device"]) == (phase.bytes, phase.flops, "memory", "H100 SXM")
    assert r["best_ms"] == pytest.approx(best) and r["fraction"] == pytest.approx(best / 0.964)
    assert "kernel_best_ms" not in r  # the cuda backend uses cuFFT
    saved = json.loads(common.record_path("cuda").read_text().splitlines()[-1])
    assert saved["roofline"] == pytest.approx(r)
    line = row.summary()
    assert "roofline" in line and "memory-bound on H100 SXM" in line and f"{best / 0.964:.0%}" in line


def test_triton_row_shows_the_kernels_own_floor(results, monkeypatch):
    _on_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    r = common.record(_row(backend="triton"), "cuda").roofline
    assert r["kernel_flops"] == rl.triton_flops("band_filter", dict(B=256, C=3, H=32, W=32, K=512))
    assert r["kernel_best_ms"] == pytest.approx(r["kernel_flops"] / 66.9e12 * 1e3)
    assert r["kernel_best_ms"] > r["best_ms"]  # DFT matmuls at fp32 cost more than the memory floor


def test_unknown_gpu_gets_no_best_time(results, monkeypatch):
    _on_gpu(monkeypatch, "NVIDIA GeForce RTX 4090")
    row = common.record(_row(), "cuda")
    assert "best_ms" not in row.roofline and "fraction" not in row.roofline
    assert "RTX 4090" in row.roofline["note"] and row.roofline["bytes"] > 0
    assert "no peak figures" in row.summary()


def test_cpu_rows_never_fail(results):
    """Every workload of the GPU table recorded on the CPU: bytes and FLOPs, no bound or best
    time; a workload without a roofline gets None; a broken one is recorded with the error."""
    for spec in rl.gpu_rows():
        row = common.record(_row(spec["workload"], "cpp", 10.0, spec["sizes"]), "cpu")
        assert row.roofline["bytes"] > 0 and row.roofline["flops"] > 0
        assert not {"bound", "best_ms", "fraction"} & set(row.roofline), spec["workload"]
        assert "roofline:" in row.summary()
    assert common.record(_row("train_step", sizes=dict(width=16)), "cpu").roofline is None
    broken = common.record(_row(sizes=dict(B=1)), "cpu")  # sizes missing: the row is still recorded
    assert broken.roofline["error"].startswith("KeyError")
    assert "roofline failed" in broken.summary()
    assert len(common.record_path("cpu").read_text().splitlines()) == len(rl.gpu_rows()) + 2


# ---------------------------------------------------------------------------------------
# The table


def test_table_reads_the_benchmarks_sizes():
    from shortcut_fast.bench import band_filter, class_spectrum

    t = rl.table()
    by = {}
    for r in t["rows"]:
        by.setdefault(r["workload"], []).append(r)
    assert [tuple(r["sizes"].values()) for r in by["class_spectrum_sum"]] == class_spectrum.cases("cuda", False)
    assert [tuple(r["sizes"].values()) for r in by["band_filter"]] == band_filter.cases("cuda", False)
    for r in t["rows"]:  # the band filter and class spectrum are memory-bound, the model workloads compute-bound
        assert r["bound"] == ("memory" if r["workload"] in ("class_spectrum_sum", "band_filter",
                                                            "remove_frequencies") else "compute"), r["label"]
        assert r["best_ms"] > 0 and math.isfinite(r["best_ms"])


def test_committed_table_is_current():
    """bench/results/roofline_h100.json (rendered into docs/performance.md) is what the code gives now."""
    saved = json.loads(rl.RESULTS.read_text())
    assert saved == json.loads(json.dumps(rl.table())), "run `shortcut-fast bench --roofline` and commit the file"


def test_cli_prints_the_table_without_running(tmp_path, monkeypatch):
    out = tmp_path / "roofline.json"
    monkeypatch.setattr(rl, "RESULTS", out)
    monkeypatch.setattr("shortcut_fast.bench.run_benchmarks",
                        lambda *a, **k: pytest.fail("--roofline must not run a benchmark"))
    result = run_cli("bench", "--roofline")
    assert result.exit_code == 0, result.output
    assert "H100 SXM" in result.output and "band filter" in result.output and "memory" in result.output
    assert json.loads(out.read_text())["device"] == "H100 SXM"
