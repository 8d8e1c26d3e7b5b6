"""Occupancy by construction: at the GPU benchmark sizes every Triton launch has at least
MIN_PROGRAMS programs (twice an H100's 132 SMs), or is launch-bound and listed below with the
reason its op's docstring gives. bench/occupancy.py computes the table from the grid functions
the launches call; bench/results/occupancy.json must be that table."""
import json
import math

import pytest
import torch

from shortcut_fast.bench import occupancy
from shortcut_fast.kernels import MIN_PROGRAMS

# (op, part of the size) -> why fewer programs do. The work's least time on an H100 must be
# under occupancy.LAUNCH_BOUND_US, and the entry goes stale (fails) once the launch has enough.
LAUNCH_BOUND = {
    ("group_outcomes", "ablation sweep"): "a chunk of up to 15 variants x 1,024 images x 10 classes is 0.6 MB of "
                                          "logits: a fraction of a microsecond",
    ("group_outcomes", "DeNetDM evaluation"): "3 heads x 12 members x 1,024 images x 10 classes is 1.5 MB of "
                                              "logits: half a microsecond",
    ("probe_stats", "x (1024, 64), z (1024, 256)"): "42 MFLOP: the batch is split into 16 ranges of 64 "
                                                    "samples already",
    ("probe_step", "logistic: x (1024, 512), 16 probes"): "34 MFLOP: the batch is split into 16 ranges of 64 "
                                                          "rows already",
    ("probe_step", "gaussian: x (1024, 512), 16 probes"): "34 MFLOP: as the logistic probes",
}


@pytest.fixture(scope="module")
def table():
    return occupancy.table()


def _listed(row):
    return [why for (op, part), why in LAUNCH_BOUND.items() if op == row["op"] and part in row["size"]]


def test_every_launch_fills_an_h100_or_is_launch_bound(table):
    assert {r["op"] for r in table} == {"class_spectrum_sum", "band_filter", "remove_frequencies", "probe_stats",
                                        "probe_step", "channel_ablate", "group_outcomes"}
    short, stale = [], []
    for r in table:
        if r["programs"] >= MIN_PROGRAMS:
            if _listed(r):
                stale.append(f"{r['op']} ({r['size']}): {r['programs']} programs, no longer launch-bound")
        elif not _listed(r) or r["best_us"] >= occupancy.LAUNCH_BOUND_US:
            short.append(f"{r['op']} ({r['size']}): {r['programs']} programs for {r['best_us']} us of work")
    assert not short, "too few programs to fill an H100:\n" + "\n".join(short)
    assert not stale, "\n".join(stale)
    used = {key for key in LAUNCH_BOUND for r in table if r["op"] == key[0] and key[1] in r["size"]}
    assert used == set(LAUNCH_BOUND), f"entries matching no launch: {set(LAUNCH_BOUND) - used}"


def test_results_file_is_the_table(table):
    saved = json.loads(occupancy.RESULTS.read_text())
    assert saved == {**occupancy.report(), "rows": table}, \
        "bench/results/occupancy.json is stale: python -m shortcut_fast.bench.occupancy"


class _Recorder:
    """Stands in for torch.library.wrap_triton: kernel[grid](...) records the grid."""

    grids: list = []

    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Recorder.grids.append(tuple(grid))


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_launches_use_their_grid_functions(monkeypatch):
    """The grid a launch passes is what its grid function says, at sizes where the splits
    and variant groups come into play."""
    from shortcut_fast.kernels import ablation, band_filter, class_spectrum, probe_stats, probe_training

    monkeypatch.setattr(torch.library, "wrap_triton", _Recorder)
    body = lambda op: op._init_fn  # noqa: E731  (the launch code, not the fake meta tensors get)
    cases = [
        (lambda: body(class_spectrum.class_spectrum_sum_op)(_meta(8, 3, 40, 24), _meta(8, dtype=torch.int64), 10),
         lambda: class_spectrum.class_spectrum_grid(8, 3, 40, 24)),
        (lambda: body(band_filter.band_filter_op)(_meta(4, 3, 32, 32), _meta(5, 32, 32)),
         lambda: band_filter.band_filter_grid(4, 3, 32, 32, 5)),
        (lambda: body(band_filter.remove_frequencies_op)(_meta(4, 3, 224, 224), _meta(9, 2, dtype=torch.int64)),
         lambda: band_filter.remove_frequencies_grid(4, 3, 224, 224, 9)),
        (lambda: body(probe_stats.probe_stats_op)(_meta(1000, 70), _meta(1000, 5)),
         lambda: probe_stats.probe_stats_grid(1000, 70, 5)),
        (lambda: body(probe_training.probe_step_op)(_meta(1000, 40), _meta(1000, 3), _meta(3, 40, 5), _meta(3, 5),
                                                   _meta(3), 0),
         lambda: probe_training.probe_step_grid(1000, 40, 3, 5)),
        (lambda: body(ablation.channel_ablate_op)(_meta(2, 3, 5), _meta(7, 3, dtype=torch.bool), _meta(3)),
         lambda: ablation.channel_ablate_grid(2, 3, 5, 7)),
        (lambda: body(ablation.group_outcomes_op)(_meta(3, 700, 10), _meta(700, dtype=torch.int64),
                                                  _meta(700, dtype=torch.int64), 4),
         lambda: ablation.group_outcomes_grid(3, 700, 10)),
    ]
    with occupancy.gpu_launch_sizes():
        for launch, grid in cases:
            _Recorder.grids = []
            launch()
            assert _Recorder.grids == [grid()]
    # the splits and groups above are real: more than one along the axis they add
    with occupancy.gpu_launch_sizes():
        assert probe_stats.probe_stats_grid(1000, 70, 5)[2] > 1
        assert probe_training.probe_step_grid(1000, 40, 3, 5)[2] > 1
        assert ablation.channel_ablate_grid(2, 3, 5, 7)[1] > 1
    assert math.prod(probe_stats.probe_stats_grid(1000, 70, 5)) == 4  # the interpreter: one split
