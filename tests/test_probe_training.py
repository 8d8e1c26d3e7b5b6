"""train_probes / probe_step: the fused Triton step against the analytic torch reference,
the reference against autograd, and trained probes against closed forms and sklearn."""
import math

import pytest
import torch

from conftest import FAST_BACKENDS
from shortcut_fast.backends import BackendUnavailable, backend_status
from shortcut_fast.ops.probe_training import (FAMILIES, TrainedProbes, probe_step, probe_step_reference,
                                              train_probes)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems (conftest)


# probe_step has no compiled (cpp/cuda) implementation: only the Triton kernel is fast.
STEP_BACKENDS = [p for p in FAST_BACKENDS if p.values[0] == "triton"]


def _check_backend(backend, device):
    status = backend_status(backend, device)
    if not status:  # a missing build is a failure, not a skip
        pytest.fail(f"{backend} on {device} is unavailable: {status.reason}")


def _problem(family, N, D, K, C=3, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    if family == "softmax":
        t = torch.randint(0, C, (N, K), generator=g)
        w, b, lv = torch.randn(K, D, C, generator=g), torch.randn(K, C, generator=g), None
    elif family == "logistic":
        t = torch.randint(0, 2, (N, K), generator=g)
        w, b, lv = torch.randn(K, D, generator=g), torch.randn(K, generator=g), None
    else:
        t = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
        w, b = torch.randn(K, D, generator=g), torch.randn(K, generator=g)
        lv = 0.5 * torch.randn(K, generator=g)
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return x.to(device=device, dtype=dtype), t.to(device), cast(w), cast(b), cast(lv)


SHAPES = [
    (1, 1, 1),  # one sample, one feature, one probe
    (70, 5, 1),  # N not a multiple of the 64-row block
    (130, 37, 19),  # several row blocks, D blocks not full, K not a power of two
    (65, 70, 40),  # several D blocks and probe blocks
]


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_step_kernel_matches_reference(backend, device, family, shape):
    _check_backend(backend, device)
    N, D, K = shape
    C = 3 if family == "softmax" else 1
    x, t, w, b, lv = _problem(family, N, D, K, C=C, seed=sum(shape), device=device)
    got = probe_step(x, t, w, b, lv, family=family, backend=backend, precision="ieee")
    want = probe_step_reference(x.cpu().double(), t.cpu(), w.cpu().double(), b.cpu().double(),
                                None if lv is None else lv.cpu().double(), family)
    assert got.loss.shape == (K,) and got.grad_weight.shape == w.shape and got.grad_bias.shape == b.shape
    for name, a, e in zip(got._fields, got, want):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.cpu().double(), e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_step_kernel_split_over_rows_matches_reference(backend, device, family, monkeypatch):
    """A few probes: the GPU launch splits the minibatch (probe_step_grid); here the
    interpreter runs those GPU launch sizes."""
    _check_backend(backend, device)
    from shortcut_fast.kernels import probe_training as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)
    N, D, K = 300, 20, 3
    assert kernels.probe_step_grid(N, D, K, 3 if family == "softmax" else 1)[2] > 1
    x, t, w, b, lv = _problem(family, N, D, K, C=3, seed=5, device=device)
    got = probe_step(x, t, w, b, lv, family=family, backend=backend, precision="ieee")
    want = probe_step_reference(x.cpu().double(), t.cpu(), w.cpu().double(), b.cpu().double(),
                                None if lv is None else lv.cpu().double(), family)
    for name, a, e in zip(got._fields, got, want):
        if e is not None:
            torch.testing.assert_close(a.cpu().double(), e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
def test_step_kernel_many_classes_and_non_contiguous(backend, device):
    _check_backend(backend, device)
    x, t, w, b, _ = _problem("softmax", 50, 9, 3, C=17, seed=5, device=device)
    x_nc = torch.stack([x, x], 2).reshape(50, 18)[:, ::2]  # strided features
    w_nc = w.transpose(1, 2).contiguous().transpose(1, 2)  # (K, D, C) with C not innermost
    got = probe_step(x_nc, t, w_nc, b, family="softmax", backend=backend, precision="ieee")
    want = probe_step_reference(x.cpu(), t.cpu(), w.cpu(), b.cpu(), None, "softmax")
    for a, e in zip(got[:3], want[:3]):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
def test_triton_refuses_float64(backend, device):
    _check_backend(backend, device)
    x, t, w, b, lv = _problem("gaussian", 8, 3, 2, dtype=torch.float64, device=device)
    with pytest.raises(BackendUnavailable, match="float64"):
        probe_step(x, t, w, b, lv, family="gaussian", backend=backend)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_gradients_are_autograd_of_the_loss(family):
    """The analytic gradients (which the kernel mirrors) are those of the mean loss."""
    x, t, w, b, lv = _problem(family, 23, 4, 3, C=4, dtype=torch.float64, seed=1)
    params = [p.clone().requires_grad_(True) for p in (w, b, lv) if p is not None]
    step = probe_step(x, t, *params, family=family, backend="torch")
    if family == "softmax":
        z = torch.einsum("nd,kdc->nkc", x, params[0]) + params[1]
        loss = torch.nn.functional.cross_entropy(z.permute(0, 2, 1), t, reduction="none").mean(0)
    elif family == "logistic":
        z = x @ params[0].T + params[1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, t.double(), reduction="none").mean(0)
    else:
        mu = x @ params[0].T + params[1]
        loss = torch.nn.functional.gaussian_nll_loss(mu, t, params[2].exp().expand_as(mu), full=True,
                                                     reduction="none", eps=0).mean(0)
    torch.testing.assert_close(step.loss.detach(), loss.detach())
    grads = torch.autograd.grad(loss.sum(), params)
    got = [step.grad_weight, step.grad_bias] + ([step.grad_log_var] if family == "gaussian" else [])
    for a, e in zip(got, grads):
        torch.testing.assert_close(a.detach(), e)


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
def test_triton_training_equals_torch_training(backend, device):
    """The whole loop (minibatches, Adam, schedule) is shared: only the step differs."""
    _check_backend(backend, device)
    x, t, _, _, _ = _problem("softmax", 70, 6, 5, C=3, seed=3)
    kw = dict(num_classes=3, epochs=2, batch_size=32, lr=0.05, weight_decay=1e-3, seed=4)
    got = train_probes(x.to(device), t.to(device), "softmax", backend=backend, precision="ieee", **kw)
    want = train_probes(x, t, "softmax", backend="torch", **kw)
    assert isinstance(got, TrainedProbes) and got.weight.shape == (5, 6, 3)
    assert not torch.equal(want.weight, torch.zeros_like(want.weight))
    torch.testing.assert_close(got.weight.cpu(), want.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.heldout_loss.cpu(), want.heldout_loss, rtol=1e-4, atol=1e-5)


def test_gaussian_converges_to_least_squares():
    g = torch.Generator().manual_seed(0)
    N, D, K = 200, 4, 3
    x = torch.randn(N, D, generator=g)
    y = x @ torch.randn(D, K, generator=g) + 0.5 + 0.3 * torch.randn(N, K, generator=g)
    r = train_probes(x, y, "gaussian", epochs=300, batch_size=N, lr=0.05, backend="torch")
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(N, 1)], 1).double(), y.double()).solution.float()
    torch.testing.assert_close(r.weight, sol[:D].T, rtol=0, atol=1e-3)
    torch.testing.assert_close(r.bias, sol[D], rtol=0, atol=1e-3)
    # The learned variance is the maximum-likelihood one: the mean squared residual.
    resid = y - (x @ sol[:D] + sol[D])
    torch.testing.assert_close(r.log_var.exp(), resid.pow(2).mean(0), rtol=2e-2, atol=0)
    assert r.evaluated_on == "train" and r.heldout_accuracy is None


def test_logistic_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    N, D, c = 120, 3, 1.0
    x = torch.randn(N, D, generator=g)
    y = (torch.rand(N, generator=g) < torch.sigmoid(x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3)).long()
    r = train_probes(x, y[:, None], "logistic", epochs=600, batch_size=N, lr=0.05, weight_decay=1 / (c * N),
                     backend="torch")
    ref = sklearn.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(r.weight[0], torch.from_numpy(ref.coef_[0]).float(), rtol=0, atol=1e-2)
    torch.testing.assert_close(r.bias, torch.from_numpy(ref.intercept_).float(), rtol=0, atol=1e-2)
    want_p = torch.from_numpy(ref.predict_proba(x.numpy())[:, 1]).float()
    torch.testing.assert_close(r.predict(x)[:, 0], want_p, rtol=0, atol=1e-2)
    assert float(r.heldout_accuracy[0]) == pytest.approx(ref.score(x.numpy(), y.numpy()), abs=1 / N + 1e-9)


def test_softmax_matches_sklearn_multinomial():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(2)
    N, D, C, c = 150, 4, 3, 0.5
    x = torch.randn(N, D, generator=g)
    y = (x @ torch.randn(D, C, generator=g) + torch.randn(N, C, generator=g)).argmax(1)
    r = train_probes(x, y[:, None], "softmax", num_classes=C, epochs=600, batch_size=N, lr=0.05,
                     weight_decay=1 / (c * N), backend="torch")
    ref = sklearn.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    # With the penalty the optimum is unique: weights sum to zero over classes, as in sklearn.
    torch.testing.assert_close(r.weight[0].T, torch.from_numpy(ref.coef_).float(), rtol=0, atol=1e-2)
    want_p = torch.from_numpy(ref.predict_proba(x.numpy())).float()
    torch.testing.assert_close(r.predict(x)[:, 0], want_p, rtol=0, atol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_v_information_noise_vs_decodable(family):
    g = torch.Generator().manual_seed(3)
    N = 600
    x = torch.randn(N, 5, generator=g)
    signal = 3 * x[:, 0] - 2 * x[:, 1]
    if family == "gaussian":
        targets = torch.stack([torch.randn(N, generator=g), signal + 0.3 * torch.randn(N, generator=g)], 1)
        kw = {}
    else:
        C = 3 if family == "softmax" else 2
        noise = torch.randint(0, C, (N,), generator=g)
        decodable = (signal > 0).long() * (C - 1)
        targets = torch.stack([noise, decodable], 1)
        kw = {"num_classes": 3} if family == "softmax" else {}
    tr, te = slice(0, 400), slice(400, N)
    r = train_probes(x[tr], targets[tr], family, heldout=(x[te], targets[te]), epochs=60, batch_size=100,
                     lr=0.05, weight_decay=1e-3, backend="torch", **kw)
    assert r.evaluated_on == "heldout" and r.v_information.shape == (2,)
    assert float(r.v_information[0]) < 0.05  # noise: nothing to decode (clipped at 0)
    assert float(r.v_information[0]) >= 0
    assert float(r.v_information[1]) > 0.5  # nats
    torch.testing.assert_close(r.v_information, (r.constant_loss - r.heldout_loss).clamp_min(0))
    if family != "gaussian":
        assert float(r.heldout_accuracy[1]) > 0.9
    else:  # linear-Gaussian: I_V = -0.5 log(1 - R^2) with a learned variance, R^2 ~ 0.99
        assert float(r.v_information[1]) == pytest.approx(-0.5 * math.log(1 - 0.99), abs=0.5)


def test_constant_loss_is_the_entropy_of_the_class_frequencies():
    x = torch.zeros(8, 1)
    t = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])[:, None]
    r = train_probes(x, t, "softmax", num_classes=4, epochs=300, batch_size=8, lr=0.05, backend="torch")
    freq = torch.tensor([3, 3, 2.0]) / 8
    p = (torch.tensor([3, 3, 2, 0.0]) + 0.5) / (8 + 4 * 0.5)  # 0.5 pseudo-count per class
    torch.testing.assert_close(r.constant_loss, -(freq * p[:3].log()).sum()[None])
    # Constant features: the trained probe can only learn the (unsmoothed) class
    # frequencies, so its loss is their entropy; scored in-sample, the information left is
    # just the cost of the pseudo-count (O(C/N), here N = 8).
    entropy = -(freq * freq.log()).sum()
    torch.testing.assert_close(r.heldout_loss, entropy[None], rtol=0, atol=2e-3)
    torch.testing.assert_close(r.v_information, r.constant_loss - entropy, rtol=0, atol=2e-3)
    assert r.evaluated_on == "train"


def _bad(**over):
    x = torch.randn(10, 3)
    kw = dict(x=x, targets=torch.randint(0, 3, (10, 2)), family="softmax", num_classes=3)
    kw.update(over)
    return lambda: train_probes(kw.pop("x"), kw.pop("targets"), kw.pop("family"), **kw)


@pytest.mark.parametrize("call,exc,match", [
    (_bad(family="mlp"), ValueError, "family must be one of"),
    (_bad(x=torch.randn(10)), ValueError, r"x must have shape \(N, D\)"),
    (_bad(x=torch.randint(0, 3, (10, 3))), TypeError, "x must have dtype"),
    (_bad(x=torch.full((10, 3), float("nan"))), ValueError, "x contains 30 NaN"),
    (_bad(targets=torch.randint(0, 3, (9, 2))), ValueError, r"targets must have shape \(10, K\)"),
    (_bad(targets=torch.randn(10, 2)), TypeError, "targets must have dtype"),
    (_bad(targets=torch.full((10, 2), 3)), ValueError, r"targets must hold class indices in \[0, 3\)"),
    (_bad(num_classes=None), ValueError, "num_classes is required"),
    (_bad(num_classes=1), ValueError, "num_classes must be an int >= 2"),
    (_bad(family="logistic", num_classes=None), ValueError, "targets must hold binary labels"),
    (_bad(family="gaussian", num_classes=None), TypeError, "targets must have dtype"),
    (_bad(heldout=(torch.randn(4, 2), torch.randint(0, 3, (4, 2)))), ValueError, "heldout x must have D=3"),
    (_bad(heldout=(torch.randn(4, 3), torch.randint(0, 3, (4, 1)))), ValueError,
     r"heldout targets must have shape \(4, 2\)"),
    (_bad(heldout=torch.randn(4, 3)), TypeError, "heldout must be a"),
    (_bad(epochs=0), ValueError, "epochs must be an int >= 1"),
    (_bad(batch_size=1.5), ValueError, "batch_size must be an int"),
    (_bad(lr=-1.0), ValueError, "lr must be"),
    (_bad(weight_decay=-1.0), ValueError, "weight_decay must be"),
    (_bad(backend="cpp"), BackendUnavailable, "probe_step has no cpp implementation"),
    (lambda: probe_step(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.zeros(1, 3, 300),
                        torch.zeros(1, 300), family="softmax", backend="triton"), BackendUnavailable,
     "at most 256 classes, got 300"),
    (lambda: probe_step(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.zeros(2, 4, 3),
                        torch.zeros(2, 3), family="softmax"), ValueError, r"weight must have shape \(2, 3, 3\)"),
    (lambda: probe_step(torch.randn(4, 3), torch.randn(4, 2), torch.zeros(2, 3), torch.zeros(2),
                        family="gaussian"), TypeError, "log_var must be a torch.Tensor"),
    (lambda: probe_step(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.zeros(2, 3),
                        torch.zeros(3), family="logistic"), ValueError, r"bias must have shape \(2,\)"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
def test_triton_op_registration(backend, device):
    """Schema, fake (shape) implementation and autograd registration are consistent."""
    _check_backend(backend, device)
    from shortcut_fast.kernels import probe_training as kernels

    x, t, w, b, lv = _problem("gaussian", 9, 3, 2, device=device)
    args = (x, t.float(), w[..., None].contiguous(), b[:, None].contiguous(), lv, kernels.FAMILY_CODES["gaussian"])
    torch.library.opcheck(kernels.probe_step_op, args, test_utils=("test_schema", "test_faketensor"))
    from shortcut_fast.ops import probe_training as ops

    assert ops._MAX_TRITON_CLASSES == kernels.MAX_CLASSES


@pytest.mark.gpu
def test_compiles_on_gpu():
    _check_backend("triton", "cuda")
    x, t, w, b, _ = _problem("softmax", 300, 20, 7, C=5, device="cuda")

    def f(x, t, w, b):
        return probe_step(x, t, w, b, family="softmax", backend="triton").grad_weight * 2

    got = torch.compile(f, fullgraph=True)(x, t, w, b)
    want = 2 * probe_step_reference(x.cpu(), t.cpu(), w.cpu(), b.cpu(), None, "softmax").grad_weight
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch"), *STEP_BACKENDS])
@pytest.mark.parametrize("family", FAMILIES)
def test_step_on_an_empty_minibatch_is_zero(backend, device, family):
    """N = 0 on every backend: zero loss and zero gradients of the parameters' shapes."""
    _check_backend(backend, device)
    x, t, w, b, lv = _problem(family, 0, 5, 3, device=device)
    step = probe_step(x, t, w, b, lv, family=family, backend=backend)
    assert step.loss.shape == (3,) and not step.loss.any()
    assert step.grad_weight.shape == w.shape and not step.grad_weight.any()
    assert step.grad_bias.shape == b.shape and not step.grad_bias.any()
    assert (step.grad_log_var is None) == (family != "gaussian")
