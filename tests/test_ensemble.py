"""Stacked-ensemble training (shortcut_fast.ensemble): every variant of the stacked run equals
the same variant trained alone, per-block gradient routing by hand, resume, bad input."""
import math

import pytest
import torch
from torch import nn

from shortcut_fast.ensemble import Variants, block_parameter_groups, predict_variants, train_variants
from shortcut_fast.models import build_model
from shortcut_fast.run_folder import Store


def _batches(n_batches=2, batch=8, channels=3, size=12, classes=4, seed=0):
    """batches(epoch): the same list for the same epoch; the skewed images carry a class patch."""

    def batches(epoch):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        out = []
        for _ in range(n_batches):
            x = torch.rand(batch, channels, size, size, generator=g)
            y = torch.randint(0, classes, (batch,), generator=g)
            xs = x.clone()
            xs[:, :, :3, :3] = (y.float() / classes)[:, None, None, None]  # label-aligned shortcut
            out.append((x, xs, y))
        return out

    return batches


def _model(name):
    torch.manual_seed(0)
    if name == "resnet20":  # BatchNorm
        return build_model("resnet20", num_classes=4, image_size=12, width=4)
    if name == "small-cnn":  # BatchNorm, padded so 12x12 inputs fit
        return build_model("small-cnn", num_classes=4, image_size=12, width=4, padding=2)
    return build_model("mlp", num_classes=4, in_channels=3, image_size=12, depth=4, width=16)  # no BatchNorm


def localization_variants(blocks, lr_scales=()):
    """Every variant kind over `blocks` (head last): clean, skew, skew@b, clean@b, and skewed
    training with block b's lr times s for s in lr_scales (the experiment's own table is
    experiments.localization.make_variants; this one keeps the engine's tests self-contained)."""
    L = len(blocks)
    names, skewed, scale = ["clean", "skew"], [[False] * L, [True] * L], [[1.0] * L, [1.0] * L]
    for i, b in enumerate(blocks):
        names += [f"skew@{b}", f"clean@{b}"]
        skewed += [[j == i for j in range(L)], [j != i for j in range(L)]]
        scale += [[1.0] * L, [1.0] * L]
    for s in lr_scales:
        for i, b in enumerate(blocks):
            names.append(f"skew lr*{s:g}@{b}")
            skewed.append([True] * L)
            scale.append([s if j == i else 1.0 for j in range(L)])
    return Variants(names, torch.tensor(skewed), torch.tensor(scale))


# ---------------------------------------------------------------------------------------
# Hand-computed routing of gradients


def _two_layer():
    """z = w2 * (w1 * x): one hidden unit, two classes; w1 = 1, w2 = (1, -1)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return model


@pytest.mark.parametrize("stacked", [True, False])
def test_each_block_gets_the_gradient_of_the_batch_its_mask_names(stacked):
    # One SGD step, lr 1, no momentum or decay. With label 0, input x and h = w1 x:
    #   z = (h, -h), p - e_0 = (-s, s) with s = sigmoid(-2h),
    #   dL/dw2 = (p - e_0) h = (-s h, s h),  dL/dw1 = (p - e_0) . w2 x = -2 s x.
    # Skewed batch x = 1 (h = 1, s = sigmoid(-2)); clean batch x = 2 (h = 2, s = sigmoid(-4)).
    model = _two_layer()
    groups = block_parameter_groups(model, ["0"])
    assert groups == [["0.weight"], ["1.weight"]]
    variants = Variants(["clean", "skew", "skew@0", "clean@0", "skew lr*0.1@0"],
                        torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool),
                        torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0.1, 1]]))
    batch = (torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([0]))
    states = train_variants(model, variants, groups, lambda e: [batch], epochs=1, lr=1.0, momentum=0.0,
                            weight_decay=0.0, stacked=stacked, progress=False)
    s1, s2 = 1 / (1 + math.exp(2)), 1 / (1 + math.exp(4))
    w1_skew, w1_clean = 1 + 2 * s1 * 1, 1 + 2 * s2 * 2  # w1 - dL/dw1
    w2_skew, w2_clean = 1 + s1 * 1, 1 + s2 * 2  # first entry of w2 - dL/dw2 (second = its negative)
    expected = {  # (w1, w2[0]) per variant
        "clean": (w1_clean, w2_clean),
        "skew": (w1_skew, w2_skew),
        "skew@0": (w1_skew, w2_clean),
        "clean@0": (w1_clean, w2_skew),
        "skew lr*0.1@0": (1 + 0.1 * 2 * s1, w2_skew),
    }
    for name, state in zip(variants.names, states):
        w1, w2 = expected[name]
        assert state["0.weight"].item() == pytest.approx(w1, abs=1e-6), name
        assert state["1.weight"][:, 0].tolist() == pytest.approx([w2, -w2], abs=1e-6), name


# ---------------------------------------------------------------------------------------
# Stacked == one after another


def _as(dtype, batches):
    return lambda epoch: [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches(epoch)]


# float64: the two paths agree to rounding (about 1e-15 here), so any routing, BN or optimizer
# difference shows; float32 without BatchNorm: the same within float32 noise. (float32 with
# BatchNorm is left out: a grouped conv sums in another order than a plain one, the order
# depends on the thread count, and BN on tiny batches amplifies it to ~1e-3 after two epochs.)
@pytest.mark.parametrize("name,blocks,dtype,atol", [
    ("resnet20", ["stem", "layer1", "layer2", "layer3"], torch.float64, 1e-10),  # stages as blocks, BN
    ("small-cnn", None, torch.float64, 1e-10),  # model_blocks, BatchNorm
    ("mlp", None, torch.float64, 1e-10),  # no BatchNorm
    ("mlp", None, torch.float32, 2e-5),
])
def test_every_variant_of_the_stacked_run_equals_it_trained_alone(name, blocks, dtype, atol):
    model = _model(name).to(dtype)
    blocks = blocks or model.block_names
    groups = block_parameter_groups(model, blocks)
    labels = blocks + ["head"]
    # every kind: all clean, all skewed, skewed at one block, clean at one block, lr x0.1, frozen
    variants = localization_variants(labels, lr_scales=(0.1, 0.0))
    assert variants.num_variants == 2 * len(labels) + 2 + 2 * len(labels)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(epochs=2, lr=0.05, progress=False)
    fast = train_variants(model, variants, groups, _as(dtype, _batches()), stacked=True, **kw)
    slow = train_variants(model, variants, groups, _as(dtype, _batches()), stacked=False, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in init.items())  # the model is not touched
    for v, vname in enumerate(variants.names):
        assert fast[v].keys() == init.keys()
        for key in init:
            torch.testing.assert_close(fast[v][key], slow[v][key], atol=atol, rtol=atol,
                                       msg=lambda m: f"{vname} {key}: {m}")
    # frozen blocks: bit-identical to the initialization in both runs; other blocks moved
    for v, vname in enumerate(variants.names):
        if "lr*0@" not in vname:
            continue
        frozen = labels.index(vname.split("@", 1)[1])
        for gi, group in enumerate(groups):
            for p in group:
                if gi == frozen:
                    assert torch.equal(fast[v][p], init[p]) and torch.equal(slow[v][p], init[p]), (vname, p)
        moved = [p for gi, g in enumerate(groups) if gi != frozen for p in g]
        assert any(not torch.equal(fast[v][p], init[p]) for p in moved)
    # not vacuous: the variants differ from one another by far more than the tolerance
    clean, skew = variants.names.index("clean"), variants.names.index("skew")
    assert max((fast[clean][p] - fast[skew][p]).abs().max().item() for g in groups for p in g) > 1e-3


def test_batchnorm_statistics_come_from_the_pass_that_trains_the_block():
    # With lr 0 nothing trains, so the running mean of the stem's BN after one step is
    # 0.9 * 0 + 0.1 * (batch mean of its input) for the batch of the pass that trains the stem.
    model = _model("resnet20")
    groups = block_parameter_groups(model, model.block_names)
    labels = model.block_names + ["head"]
    variants = localization_variants(labels)
    batches = _batches(n_batches=1)
    x_clean, x_skewed, _ = batches(0)[0]
    states = train_variants(model, variants, groups, batches, epochs=1, lr=1e-12, momentum=0.0,
                            weight_decay=0.0, progress=False)
    model.eval()
    with torch.no_grad():
        def stem_mean(x):
            return 0.1 * model.stem.conv(x).mean(dim=(0, 2, 3))
        expect = {True: stem_mean(x_skewed), False: stem_mean(x_clean)}
    for v, name in enumerate(variants.names):
        torch.testing.assert_close(states[v]["stem.bn.running_mean"], expect[bool(variants.skewed[v, 0])],
                                   atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.allclose(expect[True], expect[False], atol=1e-4)


# ---------------------------------------------------------------------------------------
# Resume, evaluation, helpers


@pytest.mark.parametrize("second", [True, False])
def test_resume_continues_where_the_store_left_off(tmp_path, second):
    model = _model("small-cnn")
    groups = block_parameter_groups(model, model.block_names)
    variants = localization_variants(model.block_names + ["head"]).subset([0, 1, 2, 5])
    kw = dict(lr=0.05, progress=False)
    whole = train_variants(model, variants, groups, _batches(), epochs=2, **kw)
    seen = []
    train_variants(model, variants, groups, _batches(), epochs=1, store=Store(tmp_path, False),
                   on_epoch_end=lambda e, states, rec: seen.append((e, len(states), rec["steps"])), **kw)
    assert seen == [(0, 4, 2)] and (tmp_path / "ensemble.pt").exists()
    resumed = train_variants(model, variants, groups, _batches(), epochs=2, store=Store(tmp_path, True),
                             stacked=second, on_epoch_end=lambda e, s, r: seen.append((e, len(s), r["steps"])),
                             **kw)
    assert seen[1:] == [(1, 4, 2)]  # only the second epoch ran
    for a, b in zip(whole, resumed):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    other = localization_variants(model.block_names + ["head"]).subset([0, 1, 3, 5])
    with pytest.raises(ValueError, match="other variants"):
        train_variants(model, other, groups, _batches(), epochs=3, store=Store(tmp_path, True), **kw)


def test_predict_variants_equals_each_variant_alone():
    model = _model("resnet20")
    groups = block_parameter_groups(model, ["stem", "layer1", "layer2", "layer3"])
    variants = localization_variants(["stem", "layer1", "layer2", "layer3", "head"]).subset([0, 1, 2])
    states = train_variants(model, variants, groups, _batches(), epochs=1, lr=0.05, progress=False)
    x = torch.rand(10, 3, 12, 12)
    logits = predict_variants(model, states, x, batch_size=4)
    assert logits.shape == (3, 10, 4)
    for v, state in enumerate(states):
        alone = _model("resnet20")
        alone.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(logits[v], alone.eval()(x), atol=1e-5, rtol=1e-4)


def test_variants_subset_and_checks():
    v = localization_variants(["a", "b", "head"], lr_scales=(0.1, 0.0))
    sub = v.subset([0, 3, 9])
    assert sub.names == ["clean", "clean@a", "skew lr*0.1@b"]
    assert sub.skewed.tolist() == [[False] * 3, [False, True, True], [True] * 3]
    assert sub.lr_scale[2].tolist() == pytest.approx([1, 0.1, 1])
    with pytest.raises(ValueError, match="names must be unique"):
        Variants(["a", "a"], torch.ones(2, 1, dtype=torch.bool), torch.ones(2, 1))


def test_block_parameter_groups_put_the_rest_in_a_head_group():
    model = _model("resnet20")
    groups = block_parameter_groups(model, ["layer1.0", "layer3"])
    assert len(groups) == 3
    assert all(p.startswith("layer1.0.") for p in groups[0]) and all(p.startswith("layer3.") for p in groups[1])
    assert "head.weight" in groups[2] and "stem.conv.weight" in groups[2]
    assert sorted(sum(groups, [])) == sorted(n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument():
    model = _model("mlp")
    with pytest.raises(ValueError, match=r"blocks: unknown block 'fc9'.*fc1, fc2, fc3"):
        block_parameter_groups(model, ["fc9"])
    with pytest.raises(ValueError, match="lies inside"):
        block_parameter_groups(_model("resnet20"), ["layer1", "layer1.0"])
    groups = block_parameter_groups(model, model.block_names)
    good = localization_variants(model.block_names + ["head"])
    with pytest.raises(ValueError, match="groups: 2 parameter groups"):
        train_variants(model, good, groups[:2], _batches(), epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="lr must be"):
        train_variants(model, good, groups, _batches(), epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="epochs must be"):
        train_variants(model, good, groups, _batches(), epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="lr_scale must hold"):
        Variants(["a"], torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="names must give one name per variant"):
        Variants(["a", "b"], torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2))

    def mismatched(epoch):
        x = torch.rand(4, 3, 12, 12)
        return [(x, x[:2], torch.zeros(4, dtype=torch.long))]

    with pytest.raises(ValueError, match="x_clean .* and x_skewed"):
        train_variants(model, good, groups, mismatched, epochs=1, lr=0.1, progress=False)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's SDPA fallback: slow, not wrong
@pytest.mark.parametrize("name", ["vgg11", "vit-tiny", "timm:convnext_atto"])
def test_stacked_equals_alone_on_the_issue_architectures(name):
    """VGG (BatchNorm), a DeiT-style ViT (LayerNorm, attention) and timm's ConvNeXt (depthwise
    convs, LayerNorm, layer scale) train as stacked ensembles too, equal to one by one (float64)."""
    from shortcut_fast.experiments.localization import model_units

    torch.manual_seed(0)
    options = {"vgg11": dict(width=4), "vit-tiny": dict(dim=16, depth=2, heads=2, patch=4),
               # convnext_atto's blocks, narrower and one per stage: the same module types, seconds not minutes
               "timm:convnext_atto": dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))}[name]
    size = 32 if "convnext" in name else 16  # ConvNeXt downsamples by 32
    model = build_model(name, num_classes=4, in_channels=3, image_size=size, **options).double()
    units = model_units(model, "stage")
    blocks = [b for members in units.values() for b in members][:2]  # two units keep it quick
    groups = block_parameter_groups(model, blocks)
    variants = localization_variants(blocks + ["head"], lr_scales=(0.0,)).subset([0, 1, 2, 5, 6])
    kw = dict(epochs=1, lr=0.05, progress=False)
    data = _as(torch.float64, _batches(n_batches=1, batch=4, size=size))
    fast = train_variants(model, variants, groups, data, stacked=True, **kw)
    slow = train_variants(model, variants, groups, data, stacked=False, **kw)
    for v, vname in enumerate(variants.names):
        for key in fast[v]:
            torch.testing.assert_close(fast[v][key], slow[v][key], atol=1e-10, rtol=1e-10,
                                       msg=lambda m: f"{name} {vname} {key}: {m}")


# ---------------------------------------------------------------------------------------
# stacked_linear: every member's nn.Linear as one batched matmul, with its own backward


@pytest.mark.parametrize("bias,x_grad", [(True, True), (False, True), (True, False)])
def test_stacked_linear_equals_each_members_linear_and_its_gradients(bias, x_grad):
    from shortcut_fast.ensemble import stacked_linear

    g = torch.Generator().manual_seed(0)
    M, B, n_in, n_out = 3, 5, 7, 4
    x = torch.randn(M, B, n_in, dtype=torch.float64, generator=g).requires_grad_(x_grad)
    w = torch.randn(M, n_out, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(M, n_out, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    upstream = torch.randn(M, B, n_out, dtype=torch.float64, generator=g)
    got = stacked_linear(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((got * upstream).sum(), inputs)
    want = torch.stack([torch.nn.functional.linear(x[m], w[m], None if b is None else b[m]) for m in range(M)])
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # the weight gradient comes in the weights' own layout (no transposing copy on its way to .grad)
    assert grads[1 if x_grad else 0].is_contiguous()


def test_stacked_linear_refuses_shapes_that_do_not_fit():
    from shortcut_fast.ensemble import stacked_linear

    with pytest.raises(ValueError, match="stacked_linear"):
        stacked_linear(torch.zeros(2, 3, 5), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="stacked_linear"):
        stacked_linear(torch.zeros(2, 3, 5), torch.zeros(3, 4, 5))
