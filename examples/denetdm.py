"""DeNetDM: debiasing by depth modulation, against ERM and LfF.

DeNetDM trains its own networks (model=None): a deep and a shallow branch as a product of
experts (stage 1: the shallow branch takes the bias), then a target branch distilled against
the shallow one (stage 2). The baselines (here ERM) train on the same data, seeds and epochs.
Data: "colored-digits", the offline digits with a planted colour per class; the conflict
ratio is the fraction of training images whose colour names another class. Real runs use
100 + 100 epochs and several seeds and ratios; two epochs each show the workflow in seconds.

    python examples/denetdm.py [OUT_FOLDER]           # seconds on a CPU
"""
import sys
import tempfile

import shortcut_fast as sf

config = sf.denetdm.Config(ratios=(0.05,), seeds=1, stage1_epochs=2, stage2_epochs=2, baseline_epochs=4,
                           width=32, batch_size=128, baselines=("erm",))
result = sf.denetdm.run(None, "colored-digits", config)  # loaded per (ratio, seed), unbiased val/test

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="denetdm-")
result.write(out)  # result.json, accuracy.png, curves.png
print(result.summary())
