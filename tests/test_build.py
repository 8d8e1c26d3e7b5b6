"""The build produced what the environment promised (set by `make test` and .ci/run)."""
import os

import pytest

from shortcut_fast.backends import extension_has_cuda, extension_status


@pytest.mark.skipif(os.environ.get("SHORTCUT_FAST_EXPECT_EXT") != "1", reason="SHORTCUT_FAST_EXPECT_EXT not set")
def test_extension_was_built_and_loads():
    status = extension_status()
    assert status, status.reason


@pytest.mark.skipif(os.environ.get("SHORTCUT_FAST_EXPECT_CUDA_BUILD") != "1",
                    reason="SHORTCUT_FAST_EXPECT_CUDA_BUILD not set")
def test_extension_has_cuda_kernels():
    assert extension_has_cuda(), "the CUDA sources were expected to be compiled into _C"


def test_kernels_package_is_installed_under_shortcut_fast():
    from shortcut_fast import kernels

    assert kernels.__name__ == "shortcut_fast.kernels"
    assert os.path.basename(os.path.dirname(kernels.__file__)) == "kernels"
