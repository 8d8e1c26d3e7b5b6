"""The dispatch mechanism shared by every op."""
import pytest
import torch

from shortcut_fast.backends import BackendUnavailable, backend_status, choose_backend, compiled_has_kernel, dispatch, info
from cli_runner import run_cli


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'cpp', 'cuda', 'triton'\)"):
        choose_backend("op", "fastest", "cpu", ("torch",))


def test_explicit_backend_the_op_lacks_says_so():
    with pytest.raises(BackendUnavailable, match="op has no triton implementation"):
        choose_backend("op", "triton", "cpu", ("torch", "cpp"))


def test_input_specific_reason_is_reported():
    with pytest.raises(BackendUnavailable, match="too large for the kernel"):
        choose_backend("op", "cpp", "cpu", ("torch", "cpp"), unsupported={"cpp": "too large for the kernel"})


def test_auto_skips_unusable_and_falls_back_to_torch():
    assert choose_backend("op", "auto", "cpu", ("torch",)) == "torch"
    # cpp is implemented but not for these inputs: auto quietly takes the next one.
    assert choose_backend("class_spectrum_sum", "auto", "cpu", ("torch", "cpp"), unsupported={"cpp": "no"}) == "torch"


def test_auto_prefers_the_compiled_cpu_kernel_when_built():
    if not backend_status("cpp", "cpu"):
        pytest.skip("extension not built here")
    assert choose_backend("class_spectrum_sum", "auto", "cpu", ("torch", "cpp")) == "cpp"


def test_compiled_backend_needs_the_op_in_the_extension():
    if not backend_status("cpp", "cpu"):
        pytest.skip("extension not built here")
    with pytest.raises(BackendUnavailable, match="has no op no_such_op"):
        choose_backend("no_such_op", "cpp", "cpu", ("torch", "cpp"))


def test_dispatch_returns_the_chosen_implementation():
    impls = {"torch": lambda x: ("torch", x), "cpp": lambda x: ("cpp", x), "triton": lambda x: ("triton", x)}
    assert dispatch("op", "torch", "cpu", impls)(1) == ("torch", 1)
    # auto never fails for lack of a fast path; the "op" has no kernel in _C, so not cpp
    assert dispatch("op", "auto", "cpu", impls)(2) == ("torch", 2)
    with pytest.raises(BackendUnavailable, match="op: backend 'cuda' is unavailable: op has no cuda implementation"):
        dispatch("op", "cuda", "cpu", impls)
    with pytest.raises(BackendUnavailable, match="float64 input needs torch"):
        dispatch("op", "triton", "cpu", impls, unsupported={"triton": "float64 input needs torch"})


def test_compiled_kernels_are_looked_up_per_device():
    """The schemas exist without _C (declared in Python), so availability is the kernel's."""
    import shortcut_fast  # noqa: F401

    assert hasattr(torch.ops.shortcut_fast, "band_filter")
    assert not compiled_has_kernel("no_such_op", "cpp")
    if backend_status("cpp", "cpu"):
        assert compiled_has_kernel("band_filter", "cpp")
        assert choose_backend("band_filter", "auto", "cpu", ("torch", "cpp")) == "cpp"


def test_torch_is_always_available():
    assert backend_status("torch", "cpu")
    assert backend_status("torch", "meta")


def test_info_reports_every_backend_with_a_reason():
    data = info()
    assert data["torch"] == torch.__version__
    cpu = data["backends"]["cpu"]
    assert set(cpu) == {"torch", "cpp", "cuda", "triton"}
    assert all(isinstance(v["reason"], str) and v["reason"] for v in cpu.values())
    assert cpu["torch"]["usable"] is True


def test_info_command_names_usable_backends():
    result = run_cli("info")
    assert result.exit_code == 0, result.output
    assert "backends on cpu:" in result.output
    assert "torch   yes" in result.output


def test_extension_cuda_archs_reads_the_list_the_build_recorded(monkeypatch):
    from shortcut_fast import backends

    class Built:
        def cuda_compiled(self):
            return True

        def cuda_archs(self):
            return "8.0_9.0+PTX"  # setup.py's define: "_" for ";"

    class Older:  # built before the list was recorded
        def cuda_compiled(self):
            return True

    monkeypatch.setattr(backends, "extension", Built)
    assert backends.extension_cuda_archs() == "8.0;9.0+PTX"
    monkeypatch.setattr(backends, "extension", Older)
    assert backends.extension_cuda_archs() == "unknown"
    monkeypatch.setattr(backends, "extension", lambda: None)
    assert backends.extension_cuda_archs() is None
