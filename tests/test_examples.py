"""Every script in examples/ runs (as a researcher would: its own process, from the repository
root), writes its result.json, and its result shows what the script says it shows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def _read(folder: Path) -> dict:
    path = folder / "result.json"
    assert path.is_file(), f"no {path}"
    return json.loads(path.read_text())


def _freq_probe(out: Path, stdout: str) -> None:
    rec = _read(out)
    assert rec["command"] == "freq-probe" and rec["result"]["test_accuracy"] > 0.9
    found = [line for line in stdout.splitlines() if "planted frequency" in line]
    assert len(found) == 4 and all(line.endswith("in its DFM: True") for line in found), found


def _complexity(out: Path, stdout: str) -> None:
    factors = _read(out)["result"]["factors"]
    # the planted colour is the simpler factor, and the one the decisions follow
    assert factors["complexity"]["attribute"] < factors["complexity"]["label"]
    assert factors["decision"]["follows_attribute"] > 0.5
    assert (out / "features.csv").is_file()


def _memorization(out: Path, stdout: str) -> None:
    mem = _read(out / "memorization")["result"]
    gaps = [mem["memorization_gap"][g] for g in mem["grouping"]["minority"]]
    assert max(gaps) > 0.3, gaps  # the minority training images were memorized
    assert mem["top_channels"][0]["score"] > 0
    mit = _read(out / "mitigation")
    assert mit["command"] == "mitigate" and len(mit["result"]["history"]) == 2


def _localization(out: Path, stdout: str) -> None:
    res = _read(out)["result"]
    assert res["total_drop"]["conflicting"]["mean"] > 0.2  # skewed training did learn the shortcut
    assert res["units"][-1] == "head" and (out / "contributions.png").is_file()


def _denetdm(out: Path, stdout: str) -> None:
    rec = _read(out)
    assert rec["command"] == "denetdm" and rec["config"]["ratios"] == [0.05]
    assert {"denetdm", "erm"} <= set(rec["methods"]) and (out / "accuracy.png").is_file()


CHECKS = {"freq_probe.py": _freq_probe, "complexity.py": _complexity, "memorization.py": _memorization,
          "localization.py": _localization, "denetdm.py": _denetdm}


def test_every_analysis_has_an_example_and_every_example_a_check():
    assert SCRIPTS == sorted(CHECKS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_and_its_result_holds(script, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert str(out) in done.stdout  # the summary names the folder written
    CHECKS[script](out, done.stdout)
