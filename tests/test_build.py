"""The build produced what the environment promised (set by `make test` and .ci/run)."""
import os

import pytest
import torch

from shortcut_fast.backends import extension_cuda_archs, extension_has_cuda, extension_status


@pytest.mark.skipif(os.environ.get("SHORTCUT_FAST_EXPECT_EXT") != "1", reason="SHORTCUT_FAST_EXPECT_EXT not set")
def test_extension_was_built_and_loads():
    status = extension_status()
    assert status, status.reason


@pytest.mark.skipif(os.environ.get("SHORTCUT_FAST_EXPECT_CUDA_BUILD") != "1",
                    reason="SHORTCUT_FAST_EXPECT_CUDA_BUILD not set")
def test_extension_has_cuda_kernels():
    assert extension_has_cuda(), "the CUDA sources were expected to be compiled into _C"
    # setup.py records the arch list (without a GPU: sm_80, sm_90 and PTX) in _C
    archs = extension_cuda_archs()
    assert archs not in (None, "unknown"), f"the build did not record its CUDA archs: {archs!r}"
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None and not torch.cuda.is_available():
        assert archs == "8.0;9.0+PTX"


def test_kernels_package_is_installed_under_shortcut_fast():
    from shortcut_fast import kernels

    assert kernels.__name__ == "shortcut_fast.kernels"
    assert os.path.basename(os.path.dirname(kernels.__file__)) == "kernels"
