"""shortcut_fast.pipeline.prepare: a dataset and its recipe's model from Python, the way the
commands get them (trained in a run folder, cached, or loaded from weights)."""
import pytest
import torch

import shortcut_fast as sf
from shortcut_fast.run_folder import RunFolderError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="mlp", model_options={"width": 8}, epochs=1)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prepare_trains_once_and_reuses_the_model(tmp_path):
    splits, net = sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "m", **TINY)
    assert splits.name.startswith("colored") and (tmp_path / "m" / "model" / "best.pt").is_file()
    _, again = sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "m", **TINY)
    assert _same(net, again)
    # another folder, same settings: the model cache gives the same model without training
    _, cached = sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "n", **TINY)
    assert _same(net, cached)


def test_prepare_refuses_other_settings_in_the_same_folder(tmp_path):
    sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "m", **TINY)
    with pytest.raises(RunFolderError):
        sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "m", seed=1, **TINY)


def test_prepare_loads_your_weights_strictly(tmp_path):
    splits, net = sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "m", **TINY)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    _, loaded = sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "w",
                                    weights=tmp_path / "w.pt", model="mlp", model_options={"width": 8})
    assert _same(net, loaded) and not (tmp_path / "w" / "model").exists()
    with pytest.raises(sf.pipeline.SettingError, match="shape mismatch") as info:
        sf.pipeline.prepare("colored-digits", "memorization", folder=tmp_path / "x", weights=tmp_path / "w.pt",
                            model="mlp", model_options={"width": 16})
    assert info.value.setting == "weights"
