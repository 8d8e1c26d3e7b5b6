"""Throughput benchmarks (installed as shortcut_fast.bench).

One module per workload; each times the fast path against the baseline it replaces in
the same process, on the same inputs, after checking both give the same answer, and
appends JSON lines to bench/results/<device-slug>.jsonl.
"""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "class-spectrum": "shortcut_fast.bench.class_spectrum",
    "band-filter": "shortcut_fast.bench.band_filter",
    "dfm-search": "shortcut_fast.bench.dfm_search",
    "probe-stats": "shortcut_fast.bench.probe_stats",
    "ablation-sweep": "shortcut_fast.bench.ablation_sweep",
    "localization": "shortcut_fast.bench.localization",
    "denetdm": "shortcut_fast.bench.denetdm",
    "train": "shortcut_fast.bench.train",
    "dfm-cifar": "shortcut_fast.bench.dfm_cifar",
    "distributed": "shortcut_fast.bench.distributed",
}


def run_benchmarks(names, *, device="cpu", quick=False, echo=print):
    from shortcut_fast.bench.common import record_path

    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        echo(f"== {name} on {device}{' (quick)' if quick else ''}")
        for row in module.run(device=device, quick=quick):
            echo("  " + row.summary())
    echo(f"results appended to {record_path(device)}")
