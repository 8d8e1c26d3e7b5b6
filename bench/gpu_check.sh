#!/usr/bin/env bash
# One call on a lent GPU machine (see the device tool): build the extension there, run the
# GPU-marked tests and every benchmark; results append to bench/results/<gpu>.jsonl.
# Usage (repo root): bash bench/gpu_check.sh [benchmark names...]
# The device allows 600 s per call: the build plus the tests fit in one call, but the
# probe-stats (N = 50,000 vs RidgeCV) and ablation-sweep (10,000 images vs captum) benchmarks
# may not; name one or two benchmarks per call after the first. `train` (ResNet-18 w64 on
# 49,152 images, eager and --compile, against a DataLoader loop) and `dfm-cifar` (the full
# 10 classes x 1,000 images x 514 pairs search plus one baseline class) take a few minutes
# each: e.g. `bash bench/gpu_check.sh train dfm-cifar` as a second call.
set -euo pipefail
SHORTCUT_FAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
shortcut-fast info
shortcut-fast selftest --device cuda --record || echo "selftest FAILED (the table above names the op and backend)"  # seconds; go on to the tests
SHORTCUT_FAST_EXPECT_EXT=1 SHORTCUT_FAST_EXPECT_CUDA_BUILD=1 python -m pytest -q -p no:logging -m gpu
python -m pytest -q -p no:logging tests/test_class_spectrum.py tests/test_band_filter.py tests/test_freq_probe.py
if [ "$#" -eq 0 ]; then shortcut-fast bench --device cuda; else for n in "$@"; do shortcut-fast bench "$n" --device cuda; done; fi
if [ -n "${OUT:-}" ]; then cp bench/results/*.jsonl "$OUT"/; fi
