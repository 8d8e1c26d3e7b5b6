"""selftest: passes here on every usable backend, and catches a backend that returns a
wrong result or crashes, naming the op and the backend (library rows and CLI last line)."""
import json

import pytest
import torch

import conftest
from shortcut_fast import selftest
from shortcut_fast.backends import backend_status
from shortcut_fast.ops import ablation, band_filter, probe_training
from cli_runner import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# cpp, and triton through the interpreter (conftest sets TRITON_INTERPRET=1) on the CPU
DEVICE = "cuda" if conftest.HAS_GPU else "cpu"
EXPECTED = ("cuda", "triton") if conftest.HAS_GPU else ("cpp", "triton")




def _last_line(result):
    return [line for line in result.output.strip().splitlines() if line.strip()][-1]


def test_covers_every_registered_op():
    """A new torch.ops.shortcut_fast op (compiled, or <op>_triton) needs a selftest entry."""
    for module in ("band_filter", "class_spectrum", "probe_stats", "ablation", "probe_training"):
        if backend_status("triton", DEVICE):
            __import__(f"shortcut_fast.kernels.{module}")
    ops = {name.split("::", 1)[1].removesuffix("_triton") for name in torch._C._dispatch_get_all_op_names()
           if name.startswith("shortcut_fast::")}
    assert ops and ops <= set(selftest.OPS), f"ops without a selftest entry: {sorted(ops - set(selftest.OPS))}"


def test_passes_on_every_usable_backend():
    rows = selftest.run_selftest(DEVICE, seed=1)
    for backend in EXPECTED:  # a missing build is a failure here, not a silent pass
        assert backend_status(backend, DEVICE), f"{backend}: {backend_status(backend, DEVICE).reason}"
    assert not selftest.failures(rows), selftest.failures(rows)
    checked = {(r.op, r.backend) for r in rows if r.status == "pass"}
    for op, spec in selftest.OPS.items():
        table = getattr(__import__(f"shortcut_fast.ops.{spec.table[0]}", fromlist=["_"]), spec.table[1])
        for backend in EXPECTED:
            if backend in table:
                assert (op, backend) in checked, f"{op} on {backend} was not checked"
    # the awkward shapes were really run: one element and an empty batch
    shapes = {r.shape for r in rows if r.op == "band_filter" and r.status == "pass"}
    assert {"x (1, 1, 1, 1), 3 masks", "x (0, 2, 8, 8), 3 masks"} <= shapes
    # float64 on triton is refused by the op: reported as a skip with the reason
    skips = [r for r in rows if r.status == "skip"]
    assert skips and all(r.backend == "triton" and r.dtype == "float64" and "float64" in r.detail for r in skips)


def test_names_the_unusable_backends():
    rows = selftest.run_selftest("cpu", quick=True, ops=["channel_ablate"])
    unavailable = {r.backend: r.detail for r in rows if r.status == "unavailable"}
    assert unavailable["cuda"] == backend_status("cuda", "cpu").reason


def _plus(impl, delta):
    """impl with `delta` added to every floating-point output (int counts and None kept)."""
    def shift(o):
        return o + delta if isinstance(o, torch.Tensor) and o.is_floating_point() else o

    def wrong(*args, **kwargs):
        out = impl(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return shift(out)
        items = [shift(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)  # NamedTuple or tuple

    return wrong


@pytest.mark.parametrize("op,module,table,backend", [
    ("band_filter", band_filter, "_BAND_FILTER", EXPECTED[0]),
    ("group_outcomes", ablation, "_GROUP_OUTCOMES", "triton"),  # a tuple (int64 counts, float loss)
    ("probe_step", probe_training, "_STEP", "triton"),  # a NamedTuple with a None field
])
def test_fails_naming_op_and_backend_when_a_backend_is_off_by_1e_2(monkeypatch, op, module, table, backend):
    impls = getattr(module, table)
    monkeypatch.setitem(impls, backend, _plus(impls[backend], 1e-2))
    rows = selftest.run_selftest(DEVICE, quick=True, ops=[op, "channel_ablate"])
    failed = selftest.failures(rows)
    assert failed and {(r.op, r.backend) for r in failed} == {(op, backend)}
    assert all(r.max_abs_error == pytest.approx(1e-2, rel=1e-3) for r in failed if r.max_abs_error)
    assert all(r.status == "pass" for r in rows if r.op == "channel_ablate")  # the others still pass

    result = run_cli("selftest", "--device", DEVICE, "--quick", "--seed", "3")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{op} on {backend}" in _last_line(result)
    assert "FAIL" in result.output


def test_a_crashing_backend_is_a_failure_not_a_crash(monkeypatch):
    def boom(*args):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setitem(ablation._CHANNEL_ABLATE, EXPECTED[0], boom)
    rows = selftest.run_selftest(DEVICE, quick=True, ops=["channel_ablate"])
    failed = selftest.failures(rows)
    assert failed and all(r.backend == EXPECTED[0] and "kernel launch failed" in r.detail for r in failed)


def test_wrong_shape_is_a_failure(monkeypatch):
    impls = band_filter._REMOVE_FREQUENCIES
    monkeypatch.setitem(impls, "triton", lambda *args: impls["torch"](*args)[:1])
    rows = selftest.run_selftest(DEVICE, quick=True, ops=["remove_frequencies"])
    failed = selftest.failures(rows)
    assert failed and all(r.backend == "triton" and "shape" in r.detail for r in failed)


def test_cli_passes_and_prints_the_table():
    result = run_cli("selftest", "--device", DEVICE, "--quick", "--seed", "0")
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    for column in ("op", "backend", "dtype", "shape", "max abs error", "tolerance", "result"):
        assert column in header
    assert "probe_step" in result.output and "triton" in result.output
    if DEVICE == "cpu":
        assert "backend cuda not usable on cpu: cuda needs CUDA tensors" in result.output
    assert _last_line(result).startswith("all ")


@pytest.mark.parametrize("args,name", [
    (["--device", "tpu"], "--device"),
    (["--seed", "-1"], "--seed"),
])
def test_cli_bad_options_name_the_option(args, name):
    result = run_cli("selftest", *args)
    assert result.exit_code == 2
    assert name in _last_line(result)


def test_library_arguments_are_checked():
    with pytest.raises(ValueError, match="ops must be names from .*'nope'"):
        selftest.run_selftest("cpu", ops=["nope"])
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        selftest.run_selftest("meta")
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        selftest.run_selftest("cpu", seed=-1)


def test_record_then_info_reports_what_was_verified_where(tmp_path, monkeypatch):
    from shortcut_fast.bench import common

    path = tmp_path / "verified.jsonl"
    monkeypatch.setattr(common, "VERIFIED_FILE", path)
    result = run_cli("selftest", "--device", "cpu", "--quick", "--seed", "0", "--record")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    cpp = [x for x in lines if x["backend"] == "cpp"]
    assert cpp and cpp[0]["mode"] == "compiled" and cpp[0]["failed"] == 0 and cpp[0]["passed"] > 0
    assert cpp[0]["device_slug"].startswith("cpu") and "group_outcomes" in cpp[0]["ops"]
    # a later failing record of the same backend and device replaces the earlier one in the summary
    bad = dict(cpp[0], failed=2, date="2999-01-01T00:00:00+00:00")
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n")
    latest = common.verified_backends(path)[("cpp", "compiled")]
    assert len(latest) == 1 and latest[0]["failed"] == 2
    info = run_cli("info")
    assert info.exit_code == 0, info.output
    assert "cpp     (compiled) FAILED 2 of" in info.output
    assert "cuda    never verified on a GPU" in info.output
