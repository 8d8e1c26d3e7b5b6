"""Precision of the matmul-shaped kernels (shortcut_fast.ops.precision): every op and precision
within its documented tolerance of the float64 reference, the auto choice, the argument's
path from the CLI to the kernels. Triton runs through the interpreter on the CPU, which
rounds the operands as the GPU does (kernels/_dot.py)."""
import math
import re
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from conftest import HAS_GPU
from shortcut_fast.backends import backend_status
from shortcut_fast.ops import freq
from shortcut_fast.ops import precision as P
from shortcut_fast.ops.band_filter import band_filter, band_filter_chunks, remove_frequencies, remove_frequencies_chunks
from shortcut_fast.ops.class_spectrum import ClassSpectrum, class_spectrum_sum
from shortcut_fast.ops.probe_stats import ProbeStats, accumulate_probe_stats, fit_probes, probe_stats
from shortcut_fast.ops.probe_training import probe_step, train_probes

DEVICE = "cuda" if HAS_GPU else "cpu"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _triton():
    status = backend_status("triton", DEVICE)
    if not status:
        pytest.fail(f"triton on {DEVICE} is unavailable: {status.reason}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------
# The table and the choice


def test_every_op_has_a_tolerance_for_every_precision():
    assert set(P.TOLERANCES) == set(P.OPS) == set(P.REQUIRED) == set(P.AUTO)
    for op in P.OPS:
        assert set(P.TOLERANCES[op]) == set(P.PRECISIONS)
        # the fewer mantissa bits, the larger the tolerance
        tol = P.TOLERANCES[op]
        assert tol["ieee"] <= tol["tf32"] < tol["bf16"] and tol["tf32x3"] <= tol["tf32"]
    assert sorted(P.FASTEST_FIRST) == sorted(P.PRECISIONS)
    assert P.PRECISION_CHOICES == ("auto", *P.PRECISIONS)


@pytest.mark.parametrize("op", P.OPS)
def test_auto_is_the_fastest_precision_within_what_the_op_needs(op):
    choice = P.AUTO[op]
    assert P.TOLERANCES[op][choice] <= P.REQUIRED[op]
    faster = P.FASTEST_FIRST[:P.FASTEST_FIRST.index(choice)]
    assert all(P.TOLERANCES[op][p] > P.REQUIRED[op] for p in faster)


def test_auto_choices():
    # band filter and class spectrum: tf32 can lose 3 x 2^-10 of a bright image, more than half
    # an 8-bit level; probe statistics need float32; probe step gradients take bf16.
    assert P.AUTO == {"band_filter": "tf32x3", "class_spectrum_sum": "tf32x3", "probe_stats": "tf32x3",
                      "probe_step": "bf16"}


@pytest.mark.parametrize("op", P.OPS)
def test_resolve(op):
    assert P.resolve(op, "auto", "cpu") == "ieee"  # the CPU backends and the interpreter
    assert P.resolve(op, "auto", torch.device("cuda", 0)) == P.AUTO[op]
    for p in P.PRECISIONS:
        assert P.resolve(op, p, "cpu") == P.resolve(op, p, "cuda") == p
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'ieee'"):
        P.resolve(op, "fp8", "cpu")


def test_docs_table_is_the_code_table():
    """docs/performance.md#precision states the constants: it must say what the code says."""
    def fmt(v):
        k = math.log2(v)
        return f"2^{int(k)}" if k == int(k) else {1e-5: "1e-5", 1 / 510: "1/510"}[v]

    names = {"band filter": "band_filter", "class spectrum": "class_spectrum_sum",
             "probe statistics": "probe_stats", "probe step": "probe_step"}
    text = (ROOT / "docs" / "performance.md").read_text()
    rows = {}
    for line in text.split("## Precision", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in names:
            rows[names[cells[0]]] = cells
    assert set(rows) == set(P.OPS)
    for op, cells in rows.items():
        assert cells[1:5] == [fmt(P.TOLERANCES[op][p]) for p in ("ieee", "tf32x3", "tf32", "bf16")], op
        assert cells[5] == fmt(P.REQUIRED[op]) and cells[6] == P.AUTO[op], op


# ---------------------------------------------------------------------------------------
# Every op and precision within its tolerance


def _images(shape, seed, kind="randn"):
    g = _gen(seed)
    x = torch.rand(shape, generator=g) if kind == "rand" else torch.randn(shape, generator=g)
    return x.to(DEVICE)


BAND_CASES = [
    # (x shape, image kind, masks, mode)
    ((3, 3, 32, 32), "randn", "pairs", "stop"),  # CIFAR: the DFM search's single-pair removals
    ((2, 2, 31, 17), "randn", "random", "pass"),  # odd sides, off every block
    ((2, 1, 70, 66), "rand", "random", "stop"),  # several tiles; bright images (a large DC)
    ((2, 3, 28, 28), "rand", "all", "pass"),  # all-pass of bright images: the worst case of truncation
    ((1, 1, 1, 1), "randn", "all", "pass"),  # one pixel
    ((2, 1, 1, 7), "randn", "random", "stop"),  # a single row
]


def _masks(kind, H, W, seed):
    if kind == "pairs":
        pairs = freq.conjugate_pairs(H, W)
        return freq.pair_masks(H, W, pairs[torch.randperm(len(pairs), generator=_gen(seed))[:5]])
    if kind == "all":
        return torch.ones(1, H, W, dtype=torch.bool)
    return freq.symmetrize(torch.rand(3, H, W, generator=_gen(seed)) < 0.5)


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("case", BAND_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[1]}-{c[2]}")
def test_band_filter_within_tolerance(case, precision):
    shape, kind, mask_kind, mode = case
    x = _images(shape, seed=sum(shape), kind=kind)
    masks = _masks(mask_kind, *shape[-2:], seed=len(shape))
    got = band_filter(x, masks, mode, backend="triton", precision=precision)
    assert P.error("band_filter", got, x, masks, mode=mode) <= P.TOLERANCES["band_filter"][precision]


SPECTRUM_CASES = [((5, 3, 32, 32), 3, "rand"), ((3, 2, 17, 12), 2, "randn"), ((2, 1, 70, 66), 2, "rand"),
                  ((1, 1, 1, 1), 1, "randn"), ((4, 1, 1, 5), 3, "rand")]


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("case", SPECTRUM_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[2]}")
def test_class_spectrum_within_tolerance(case, precision):
    shape, classes, kind = case
    x = _images(shape, seed=sum(shape), kind=kind)
    labels = torch.randint(0, classes, (shape[0],), generator=_gen(1)).to(DEVICE)
    got = class_spectrum_sum(x, labels, classes, backend="triton", precision=precision)
    assert P.error("class_spectrum_sum", got, x, labels, classes) <= P.TOLERANCES["class_spectrum_sum"][precision]


STATS_CASES = [(300, 40, 20, 0.5), (70, 33, 17, 0.0), (200, 130, 5, 3.0), (1, 1, 1, 0.0), (5, 70, 1, -2.0)]


def _stats_inputs(N, D, K, offset, seed):
    g = _gen(seed)
    x = torch.randn(N, D, generator=g) + offset  # not centred: sums without cancellation too
    z = x[:, :1] * torch.randn(1, K, generator=g) + torch.randn(N, K, generator=g)
    return x.to(DEVICE), z.to(DEVICE)


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("case", STATS_CASES, ids=lambda c: "x".join(map(str, c)))
def test_probe_stats_within_tolerance(case, precision):
    x, z = _stats_inputs(*case, seed=sum(case[:3]))
    got = probe_stats(x, z, backend="triton", precision=precision)
    assert P.error("probe_stats", got, x, z) <= P.TOLERANCES["probe_stats"][precision]


STEP_CASES = [("softmax", 13, 5, 2, 3), ("softmax", 70, 37, 3, 10), ("logistic", 70, 37, 3, 1),
              ("gaussian", 70, 37, 3, 1), ("gaussian", 1, 1, 1, 1), ("softmax", 100, 80, 2, 5)]


def _step_inputs(family, N, D, K, C, seed):
    g = _gen(seed)
    x = torch.randn(N, D, generator=g)
    bias = torch.randn(K, C, generator=g) if family == "softmax" else torch.randn(K, generator=g)
    weight = torch.randn((K, D, C) if family == "softmax" else (K, D), generator=g) / D ** 0.5
    log_var = torch.randn(K, generator=g) * 0.5 if family == "gaussian" else None
    if family == "gaussian":
        targets = torch.randn(N, K, generator=g)
    else:
        targets = torch.randint(0, C if family == "softmax" else 2, (N, K), generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(targets), to(weight), to(bias), to(log_var)


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_probe_step_within_tolerance(case, precision):
    family = case[0]
    inputs = _step_inputs(*case, seed=sum(case[1:]))
    got = probe_step(*inputs, family=family, backend="triton", precision=precision)
    assert P.error("probe_step", got, *inputs, family=family) <= P.TOLERANCES["probe_step"][precision]


# ---------------------------------------------------------------------------------------
# The precision reaches the kernel: the reduced ones round (the tests above could not fail
# for a kernel that ignored them otherwise), ieee and auto on the CPU do not


def _run(op, precision):
    """(result, error) of op at `precision` on inputs large enough for rounding to show."""
    if op == "band_filter":
        x = _images((2, 2, 32, 32), seed=3, kind="rand")
        masks = _masks("random", 32, 32, seed=4)
        got = band_filter(x, masks, backend="triton", precision=precision)
        return got, P.error(op, got, x, masks)
    if op == "class_spectrum_sum":
        x = _images((4, 2, 32, 32), seed=5, kind="rand")
        labels = torch.tensor([0, 1, 0, 1], device=DEVICE)
        got = class_spectrum_sum(x, labels, 2, backend="triton", precision=precision)
        return got, P.error(op, got, x, labels, 2)
    if op == "probe_stats":
        x, z = _stats_inputs(300, 40, 20, 0.5, seed=6)
        got = probe_stats(x, z, backend="triton", precision=precision)
        return got, P.error(op, got, x, z)
    inputs = _step_inputs("softmax", 70, 37, 3, 10, seed=7)
    got = probe_step(*inputs, family="softmax", backend="triton", precision=precision)
    return got, P.error(op, got, *inputs, family="softmax")


@pytest.mark.parametrize("op", P.OPS)
def test_reduced_precisions_round_and_float32_ones_do_not(op):
    errors = {p: _run(op, p)[1] for p in P.PRECISIONS}
    float32 = P.TOLERANCES[op]["ieee"]
    assert errors["ieee"] <= float32 and errors["tf32x3"] <= float32
    # 10 and 7 mantissa bits: errors far above float32's (tf32 truncates, so its errors add
    # up where bf16's, rounded to nearest, partly cancel: either may be the larger)
    assert errors["tf32"] > 10 * float32 and errors["bf16"] > 10 * float32, errors


def _same(got, want) -> bool:
    got, want = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (got, want))
    return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(HAS_GPU, reason="auto is ieee off the GPU only")
@pytest.mark.parametrize("op", P.OPS)
def test_auto_off_the_gpu_is_ieee(op):
    assert _same(_run(op, "auto")[0], _run(op, "ieee")[0])


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("op", P.OPS)
def test_auto_on_the_gpu_is_the_ops_choice(op):
    assert _same(_run(op, "auto")[0], _run(op, P.AUTO[op])[0])


def test_backends_without_precisions_ignore_it():
    """cpp and torch are exact in their dtype: every precision gives their one result."""
    x = torch.rand(2, 3, 16, 12, generator=_gen(8))
    masks = _masks("random", 16, 12, seed=9)
    labels = torch.tensor([0, 1])
    xs, zs = _stats_inputs(50, 6, 3, 0.5, seed=10)
    xs, zs = xs.cpu(), zs.cpu()
    for backend in ("torch", "cpp"):
        want = (band_filter(x, masks, backend=backend), class_spectrum_sum(x, labels, 2, backend=backend),
                probe_stats(xs, zs, backend=backend))
        for p in P.PRECISIONS:
            got = (band_filter(x, masks, backend=backend, precision=p),
                   class_spectrum_sum(x, labels, 2, backend=backend, precision=p),
                   probe_stats(xs, zs, backend=backend, precision=p))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert all(torch.equal(a, b) for a, b in zip(got[2], want[2]))
    inputs = [t.cpu() if t is not None else None for t in _step_inputs("logistic", 20, 4, 2, 1, seed=11)]
    want = probe_step(*inputs, family="logistic", backend="torch")
    for p in P.PRECISIONS:
        got = probe_step(*inputs, family="logistic", backend="torch", precision=p)
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


def test_remove_frequencies_is_the_same_in_every_precision():
    x = _images((2, 2, 16, 12), seed=12)
    pairs = freq.conjugate_pairs(16, 12)[:6]
    want = remove_frequencies(x, pairs, backend="triton")
    for p in P.PRECISION_CHOICES:
        assert torch.equal(remove_frequencies(x, pairs, backend="triton", precision=p), want)
        chunks = list(remove_frequencies_chunks(x, pairs, backend="triton", precision=p, max_bytes=4 << 10))
        assert torch.equal(torch.cat([c.images for c in chunks]), want)


def test_streaming_forms_pass_the_precision_on():
    """The chunked filter, ClassSpectrum, ProbeStats, fit_probes and train_probes at a precision
    give the op's own result at that precision."""
    x = _images((2, 2, 16, 16), seed=13, kind="rand")
    masks = _masks("random", 16, 16, seed=14)
    want = band_filter(x, masks, backend="triton", precision="bf16")
    chunks = list(band_filter_chunks(x, masks, backend="triton", precision="bf16", max_bytes=4 << 10))
    assert len(chunks) == masks.shape[0]  # one mask of both images each
    assert torch.equal(torch.cat([c.images for c in chunks]), want)

    labels = torch.tensor([0, 1], device=DEVICE)
    acc = ClassSpectrum(2, backend="triton", precision="bf16").update(x, labels)
    assert torch.equal(acc.sums, class_spectrum_sum(x, labels, 2, backend="triton", precision="bf16"))

    xs, zs = _stats_inputs(40, 5, 3, 0.0, seed=15)
    stats = ProbeStats(5, 3, device=DEVICE, backend="triton", precision="bf16").update(xs, zs)
    direct = probe_stats(xs - stats.shift_x, zs - stats.shift_z, backend="triton", precision="bf16")
    assert torch.equal(stats.xx, direct[0]) and torch.equal(stats.xz, direct[1])
    assert accumulate_probe_stats(xs, zs, backend="triton", precision="tf32").precision == "tf32"
    tf32 = fit_probes(xs, zs, xs, zs, backend="triton", precision="tf32")
    ieee = fit_probes(xs, zs, xs, zs, backend="triton", precision="ieee")
    assert not torch.equal(tf32.weight, ieee.weight)
    torch.testing.assert_close(tf32.weight, ieee.weight, rtol=0.05, atol=0.05)

    x, t, _, _, _ = _step_inputs("logistic", 40, 4, 2, 1, seed=16)
    kw = dict(epochs=1, batch_size=16, backend="triton")
    bf16, ieee = train_probes(x, t, "logistic", precision="bf16", **kw), train_probes(x, t, "logistic", **kw)
    assert not torch.equal(bf16.weight, ieee.weight)
    torch.testing.assert_close(bf16.weight, ieee.weight, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("call", [
    lambda: band_filter(torch.zeros(1, 1, 4, 4), torch.ones(4, 4, dtype=torch.bool), precision="fp8"),
    lambda: list(band_filter_chunks(torch.zeros(1, 1, 4, 4), torch.ones(4, 4, dtype=torch.bool), precision="fp8")),
    lambda: remove_frequencies(torch.zeros(1, 1, 4, 4), [[0, 1]], precision="fp8"),
    lambda: class_spectrum_sum(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), 1, precision="fp8"),
    lambda: ClassSpectrum(2, precision="fp8"),
    lambda: probe_stats(torch.zeros(3, 2), torch.zeros(3, 1), precision="fp8"),
    lambda: ProbeStats(2, 1, precision="fp8"),
    lambda: probe_step(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1),
                       family="logistic", precision="fp8"),
    lambda: train_probes(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.long), "logistic", precision="fp8"),
])
def test_a_bad_precision_is_refused_naming_the_choices(call):
    with pytest.raises(ValueError, match=re.escape(f"precision must be one of {P.PRECISION_CHOICES}, got 'fp8'")):
        call()


# ---------------------------------------------------------------------------------------
# The experiments and the command line


def test_configs_take_and_check_a_precision():
    from shortcut_fast.experiments.complexity import ComplexityConfig
    from shortcut_fast.experiments.freq_probe import FreqProbeConfig

    for config in (FreqProbeConfig, ComplexityConfig):
        assert config().precision == "auto"
        assert config(precision="tf32").precision == "tf32"
        with pytest.raises(ValueError, match="precision must be one of"):
            config(precision="fp8")


@pytest.mark.parametrize("command", ["spectrum", "freq-probe", "complexity"])
def test_cli_precision_option(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "--precision [auto|ieee|tf32x3|tf32|bf16]" in result.output
    result = run_cli(command, "--precision", "fp8")
    assert result.exit_code == 2 and "--precision" in result.output and "'fp8' is not one of" in result.output


@pytest.mark.parametrize("command,module,config", [
    ("freq-probe", "shortcut_fast.experiments.freq_probe", "FreqProbeConfig"),
    ("complexity", "shortcut_fast.experiments.complexity", "ComplexityConfig"),
])
def test_cli_passes_the_precision_to_the_config(monkeypatch, tmp_path, command, module, config):
    import importlib

    mod = importlib.import_module(module)
    seen = {}
    original = getattr(mod, config)

    def capture(**kw):
        seen.update(kw)
        original(**kw)  # checks as the real one does
        raise ValueError("captured")  # stop before training

    monkeypatch.setattr(mod, config, capture)
    data = ["--data", "synthetic-freq"] if command == "freq-probe" else []
    result = run_cli(command, *data, "--precision", "tf32", "--out", tmp_path / "run")
    assert "captured" in result.output and seen["precision"] == "tf32"


def test_cli_precision_is_fingerprinted(tmp_path):
    import json

    runs = {}
    for p in ("auto", "bf16"):
        out = tmp_path / p
        r = run_cli("spectrum", "--data", "synthetic-freq", "-D", "n_train=20", "-D", "num_classes=2",
                    "--precision", p, "--out", out)
        assert r.exit_code == 0, r.output
        runs[p] = json.loads((out / "run.json").read_text())
        assert runs[p]["settings"]["precision"] == p
    assert runs["auto"]["fingerprint"] != runs["bf16"]["fingerprint"]
