"""The exported ELBOs equal their plain twins for shared noise, in value and gradient, bit for
bit; compiled by ``torch.compile``, to float rounding; one graph per shape (Kingma & Welling
2014, eq. 3). Every comparison goes through :func:`equivalence.assert_compiled_matches_eager`,
which asserts that the graph (or the compiled function) ran, not an eager fallback."""

import pyro
import pytest
import torch
from equivalence import assert_compiled_matches_eager
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from inference.estimators import EXPORT_AFTER_CALLS, JitTrace_ELBO, JitTraceMeanField_ELBO
from inference.lean_graph import count_ops
from models.vae import VAE

PAIRS = [(Trace_ELBO, JitTrace_ELBO), (TraceMeanField_ELBO, JitTraceMeanField_ELBO)]


def _loss_and_grad(elbo, vae, x, n, seed):
    pyro.set_rng_seed(seed)
    loss = elbo(vae.model, vae.guide)(x, num_data=n)
    vae.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in vae.parameters()]


@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_traced_loss_and_gradient_equal_the_plain_estimators(float64, plain, traced):
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((20, 6), 0.5))
    compiled = traced(export_after=0)
    for seed, rows in [(1, 8), (2, 8), (3, 4)]:  # a ragged last batch gets its own graph
        want, want_grad = _loss_and_grad(plain(), vae, x[:rows], 20, seed)
        got, got_grad = _loss_and_grad(lambda m, g: compiled(m, g), vae, x[:rows], 20, seed)
        assert got == pytest.approx(want, rel=1e-12)
        for a, b in zip(got_grad, want_grad, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert compiled.compilations(vae.model, vae.guide) == 2
    assert compiled.traced_loss(vae.model, vae.guide).graph_calls == 3


def test_meanfield_compiles_once_per_shape_for_fresh_bound_methods():
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = JitTraceMeanField_ELBO(export_after=0)
    for _ in range(4):  # vae.model is a new bound-method object each time
        elbo.differentiable_loss(vae.model, vae.guide, x)
    assert elbo.compilations(vae.model, vae.guide) == 1


def test_first_call_draws_the_same_noise_as_later_calls():
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = JitTrace_ELBO(export_after=0)
    values = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        values.append(elbo.differentiable_loss(vae.model, vae.guide, x))
    pyro.set_rng_seed(5)
    assert torch.equal(values[0], values[1])
    assert torch.equal(values[0], Trace_ELBO().differentiable_loss(vae.model, vae.guide, x))
    assert elbo.traced_loss(vae.model, vae.guide).graph_calls == 2


def test_a_shape_runs_eagerly_until_it_recurs_then_as_a_graph_with_the_same_numbers():
    """The first ``export_after`` calls of a shape run Pyro's Python; the next ones the graph,
    on the same random stream: one run's losses and gradients are those of an eager run."""
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    params = list(vae.parameters())

    def run(elbo):
        pyro.set_rng_seed(4)
        out = []
        for _ in range(5):
            loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=20)
            out.append((loss, torch.autograd.grad(loss, params)))
        return out

    switching = JitTraceMeanField_ELBO(export_after=3)
    got, want = run(switching), run(TraceMeanField_ELBO())
    traced = switching.traced_loss(vae.model, vae.guide)
    assert (traced.compilations, traced.graph_calls) == (1, 2)
    for (a, grads_a), (b, grads_b) in zip(got, want, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))
    assert EXPORT_AFTER_CALLS > 0  # the default: short-lived shapes never pay for an export


@pytest.mark.parametrize("exported_before", [0, 1])
def test_a_planned_shape_is_exported_only_if_the_calls_to_come_pay_for_it(
    monkeypatch, exported_before
):
    """Under ``planned_calls(n)`` a shape past ``export_after`` calls is exported only when
    ``n`` reaches the pay-back count: the first export's in a process (it also imports the
    tracer), a later one's after that; without a plan, as before. Same numbers either way."""
    import inference.traced_loss as traced_loss

    monkeypatch.setattr(traced_loss, "FIRST_EXPORT_PAYS_AFTER_CALLS", 9)
    monkeypatch.setattr(traced_loss, "EXPORT_PAYS_AFTER_CALLS", 5)
    pays = 5 if exported_before else 9
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))

    def run(elbo, plan):
        pyro.set_rng_seed(4)
        losses = []
        for calls in plan:
            with traced_loss.planned_calls(calls):
                losses.append(elbo.differentiable_loss(vae.model, vae.guide, x, num_data=20))
        return losses

    for plan, exported in [
        ([pays - 1] * 4, False),  # too few to come, at every call
        (list(range(pays + 1, 0, -1)), True),  # counting down: pays at the 2nd call
        (list(range(pays, 0, -1)), False),  # one short at the 2nd call, fewer after
        ([None] * 4, True),  # no plan: exported once past export_after
    ]:
        monkeypatch.setattr(traced_loss, "_exports_in_process", exported_before)
        elbo = JitTraceMeanField_ELBO(export_after=1)
        assert run(elbo, plan) == run(TraceMeanField_ELBO(), plan)
        traced = elbo.traced_loss(vae.model, vae.guide)
        assert traced.compilations == exported, plan
        assert traced.graph_calls == (len(plan) - 1 if exported else 0), plan


def test_a_cpu_graph_is_not_compiled_when_the_planned_calls_do_not_pay_for_it(monkeypatch):
    """``torch.compile`` saves a small CPU graph too little to pay for its seconds in a run of
    fewer than ``COMPILE_PAYS_AFTER_CALLS`` more calls: the graph keeps running exported."""
    import inference.traced_loss as traced_loss

    monkeypatch.setattr(traced_loss, "EXPORT_PAYS_AFTER_CALLS", 0)
    monkeypatch.setattr(traced_loss, "FIRST_EXPORT_PAYS_AFTER_CALLS", 0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    elbo = JitTraceMeanField_ELBO(export_after=0, compile_after=1)
    short = traced_loss.COMPILE_PAYS_AFTER_CALLS - 1  # calls to come at the first call
    for to_come in (short, short - 1, short - 2):
        with traced_loss.planned_calls(to_come):
            elbo.differentiable_loss(vae.model, vae.guide, x)
    traced = elbo.traced_loss(vae.model, vae.guide)
    assert (traced.compilations, traced.compiled, traced.graph_calls) == (1, 0, 3)


# --- the compiled graph is the plain estimator, bit for bit ---------------------------------------


def _graph_calls(elbo, model, guide):
    def count():
        traced = elbo.traced_loss(model, guide)
        return 0 if traced is None else traced.graph_calls

    return count


def _bitwise_equal_to_plain(plain, traced, model, guide, x, num_data, params, seeds=(1, 2)):
    """The exported graph (from the first call) against Pyro's eager estimator: the same loss
    and gradients bit for bit, and the graph ran."""
    estimator = traced(export_after=0)
    kwargs = {"num_data": num_data} if num_data is not None else {}
    assert_compiled_matches_eager(
        lambda: plain().differentiable_loss(model, guide, x, **kwargs),
        lambda: estimator.differentiable_loss(model, guide, x, **kwargs),
        _graph_calls(estimator, model, guide),
        params=params,
        seeds=seeds,
    )
    assert estimator.traced_loss(model, guide).fallbacks == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, num_data", [(7, 20), (20, None), (20, 20)])
@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_vae_graph_is_bitwise_the_plain_estimator(plain, traced, rows, num_data, dtype):
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=3, hidden_dims=(5,)).to(dtype)
    x = torch.bernoulli(torch.full((rows, 6), 0.4, dtype=dtype))
    _bitwise_equal_to_plain(
        plain, traced, vae.model, vae.guide, x, num_data, list(vae.parameters())
    )


@pytest.mark.parametrize("family", ["diag", "full", "flow"])
def test_builtin_guides_and_linear_gaussian_graphs_are_bitwise_plain(family):
    from models.guides import make_guide
    from models.linear_gaussian import LinearGaussian

    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    guide = make_guide(family, 6, 2, (5,))
    x = torch.bernoulli(torch.full((9, 6), 0.5))
    params = list(vae.decoder.parameters()) + list(guide.parameters())
    _bitwise_equal_to_plain(Trace_ELBO, JitTrace_ELBO, vae.model, guide, x, 30, params)
    if family != "flow":  # no closed-form KL for a flow
        _bitwise_equal_to_plain(
            TraceMeanField_ELBO, JitTraceMeanField_ELBO, vae.model, guide, x, 30, params
        )
    for noise in ("isotropic", "diagonal"):
        pyro.clear_param_store()  # the linear model's "encoder" and "decoder" are new modules
        lg = LinearGaussian(6, 2, noise=noise)
        y = torch.randn(9, 6)
        _bitwise_equal_to_plain(
            TraceMeanField_ELBO,
            JitTraceMeanField_ELBO,
            lg.model,
            lg.guide,
            y,
            30,
            list(lg.parameters()),
        )


def test_lean_graph_keeps_only_the_arithmetic_of_the_loss():
    """Dead log-densities, the plate's arange, identity expands and broadcasts, the N(0, 1)
    prior's fills and the arithmetic with them are gone; the ops that compute the loss remain,
    one noise draw included, each called through its public torch function."""
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=3, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((7, 6), 0.4))
    elbo = JitTraceMeanField_ELBO(export_after=0)
    elbo.differentiable_loss(vae.model, vae.guide, x, num_data=20)
    ((graph),) = elbo.traced_loss(vae.model, vae.guide).graphs()
    ops = count_ops(graph.module)
    for gone in ("arange", "expand", "broadcast_tensors", "new_zeros", "ones_like", "div"):
        assert gone not in ops, gone
    assert not any(name.startswith("aten.") for name in ops), ops
    assert ops["normal"] == 1 and ops["linear"] == 5 and ops["softplus"] == 2
    assert sum(ops.values()) == 26, ops


def test_fill_arithmetic_that_broadcasts_is_kept():
    """a / ones(...) that changes the shape is not an identity: the value must follow eager."""

    def model(x):
        loc = torch.zeros(3)
        scale = torch.ones(2, 3)
        with pyro.plate("data", x.shape[0], dim=-3):
            w = pyro.param("w", torch.full((3,), 0.5))
            pyro.sample("x", pyro.distributions.Normal(w / scale + loc, scale).to_event(2), obs=x)

    def guide(x):
        pass

    x = torch.randn(4, 2, 3)
    pyro.clear_param_store()
    model(x)
    _bitwise_equal_to_plain(
        Trace_ELBO, JitTrace_ELBO, model, guide, x, None, [pyro.param("w").unconstrained()]
    )


def test_a_tensor_the_model_closes_over_stays_the_models():
    """A tensor from outside the model (lifted into the graph as a constant) is read where the
    model reads it."""
    offset = torch.tensor([0.1, -0.2, 0.3])

    def model(x):
        w = pyro.param("w", torch.full((3,), 0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(w + offset, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    x = torch.randn(4, 3)
    pyro.clear_param_store()
    model(x)
    _bitwise_equal_to_plain(
        Trace_ELBO, JitTrace_ELBO, model, guide, x, None, [pyro.param("w").unconstrained()]
    )


def _mask_model(x):
    """A mask made from ones and edited in place: not a tensor of ones any more."""
    w = pyro.param("w", torch.full((3,), 0.5))
    mask = torch.ones(3)
    mask[0] = 0.0
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pyro.distributions.Normal(w * mask, 1.0).to_event(1), obs=x)


def _bits_model(x):
    """``view(dtype)``: reinterpreted bits, which TorchScript could not optimize; exported,
    it is one more ATen op (and the test checks that the graph ran, not an eager fallback)."""
    w = pyro.param("w", torch.full((3,), 0.5))
    odd = (x.view(torch.int32) & 1).to(x.dtype)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", pyro.distributions.Normal(w + odd, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("model", [_mask_model, _bits_model], ids=["mask", "view-dtype"])
def test_graphs_that_mutate_or_view_as_another_dtype_equal_eager(model):
    x = torch.randn(4, 3)
    pyro.clear_param_store()
    model(x)  # create w
    w = pyro.param("w").unconstrained()

    def guide(x):
        pass

    _bitwise_equal_to_plain(Trace_ELBO, JitTrace_ELBO, model, guide, x, None, [w])


@pytest.mark.parametrize("rows", [8, 64])
@pytest.mark.parametrize("plain, traced", PAIRS, ids=["trace", "meanfield"])
def test_several_particles_are_averaged_as_pyro_averages_them(plain, traced, rows):
    """With S > 1 particles Pyro averages the values as Python floats and the surrogates as
    tensors; the graph does the same, so value and gradients are still bit-identical (and an
    encoder run once per particle is not merged into one run, which would reorder gradients)."""
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=3, hidden_dims=(16, 8))
    x = torch.bernoulli(torch.full((rows, 64), 0.3))

    def make(cls):
        return lambda **options: cls(num_particles=3, vectorize_particles=False, **options)

    _bitwise_equal_to_plain(
        make(plain), make(traced), vae.model, vae.guide, x, 200, list(vae.parameters())
    )


# --- compiled by torch.compile: Pyro's numbers to float rounding ----------------------------------


def _close_to_plain_compiled(plain, traced, model, guide, x, params, **kwargs):
    """The compiled graph (exported and compiled at its first call) against Pyro's eager
    estimator for shared noise: the same loss and gradients to float32 rounding, and the
    compiled function ran (AOTAutograd's backward node, not eager autograd's)."""
    estimator = traced(export_after=0, compile_after=0)

    def compiled():
        loss = estimator.differentiable_loss(model, guide, x, **kwargs)
        assert "Compiled" in type(loss.grad_fn).__name__
        return loss

    def compiled_calls():
        traced_loss = estimator.traced_loss(model, guide)
        if traced_loss is None:
            return 0
        return sum(g.calls for g in traced_loss.graphs() if g.compiled is not None)

    assert_compiled_matches_eager(
        lambda: plain().differentiable_loss(model, guide, x, **kwargs),
        compiled,
        compiled_calls,
        params=params,
        exact=False,
        rtol=1e-4,
        atol=1e-5,
    )
    traced_loss = estimator.traced_loss(model, guide)
    assert traced_loss.compiled == 1 and traced_loss.fallbacks == 0


def test_compiled_vae_loss_and_gradients_are_pyros_to_rounding():
    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.5))
    _close_to_plain_compiled(
        TraceMeanField_ELBO,
        JitTraceMeanField_ELBO,
        vae.model,
        vae.guide,
        x,
        list(vae.parameters()),
        num_data=20,
    )


def test_compiled_user_model_with_constrained_parameters_is_pyros_to_rounding():
    """A user's model and guide written with pyro.param: a positive scale (read through its
    constraint's transform) and a global latent, Monte-Carlo KL."""

    def model(x):
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        scale = pyro.param(
            "scale", torch.tensor(0.5), constraint=pyro.distributions.constraints.positive
        )
        pyro.sample("mu", pyro.distributions.Normal(loc, scale))

    x = torch.randn(10) + 1.0
    pyro.clear_param_store()
    guide(x)
    store = pyro.get_param_store()
    params = [store.get_param(name).unconstrained() for name in ("loc", "scale")]
    _close_to_plain_compiled(Trace_ELBO, JitTrace_ELBO, model, guide, x, params)


# --- the estimators by name ------------------------------------------------------------------------


def test_the_command_lines_names_are_the_registrys():
    from inference import choices
    from inference.estimators import ESTIMATOR_CHOICES

    assert choices.ESTIMATORS == ESTIMATOR_CHOICES


@pytest.mark.parametrize(
    "name, alpha", [("renyi", 0.0), ("renyi:0.5", 0.5), ("renyi:-2", -2.0), ("renyi:1e-3", 1e-3)]
)
def test_renyi_by_name_is_pyros_renyi_elbo_with_that_alpha(name, alpha):
    from pyro.infer import RenyiELBO

    from inference.estimators import estimator_label, make_elbo

    elbo = make_elbo(name, num_particles=4)
    assert isinstance(elbo, RenyiELBO) and elbo.alpha == alpha and elbo.num_particles == 4
    assert estimator_label(name) == f"RenyiELBO(alpha={alpha:g})"


@pytest.mark.parametrize(
    "name, particles, match",
    [
        ("renyi:1", 4, "other than 1"),
        ("renyi:x", 4, "finite number"),
        ("renyi:nan", 4, "finite number"),
        ("renyi:0.5", 1, "more than one draw"),
        ("trace:0.5", 4, "unknown estimator"),
        ("renyl", 4, "unknown estimator"),
    ],
)
def test_a_bad_estimator_name_is_one_clear_line(name, particles, match):
    from inference.cli import error_line
    from inference.errors import OptionError
    from inference.train import TrainConfig

    with pytest.raises(OptionError, match=match) as info:
        TrainConfig(estimator=name, num_particles=particles)
    assert "\n" not in str(info.value) and info.value.option == "estimator"
    assert error_line(info.value).startswith("--estimator: ")


def test_a_renyi_run_trains_through_the_cli_and_explain_checks_its_objective(tmp_path):
    """``--estimator renyi:0.5`` trains RenyiELBO(alpha=0.5) on K = 3 draws; the report's sign
    check uses Trace_ELBO (whose loss is -ELBO); explain checks what RenyiELBO's .loss is minus
    (the Renyi bound, from the same draws) and finds it."""
    import contextlib
    import io
    import json

    from inference.cli import main

    run_dir = tmp_path / "renyi"
    common = ["--epochs", "1", "--hidden-dims", "8", "--latent-dim", "2", "--no-progress"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["train", "--estimator", "renyi:0.5", "--num-particles", "3", "--run-dir"]
            + [str(run_dir), "--json", *common]
        )
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["estimator"] == "RenyiELBO(alpha=0.5)"
    assert report["test"]["estimator"] == "trace" or "Trace_ELBO" in report["test"]["estimator"]
    residual = report["test"]["pyro_loss"] - (
        report["test"]["kl"] - report["test"]["reconstruction"]
    )
    assert abs(residual) <= 1e-5 * max(1.0, abs(report["test"]["loss"]))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["explain", str(run_dir), "--num-samples", "20", "--json"]) == 0
    objective = json.loads(printed.getvalue())["objective"]
    assert "RenyiELBO(alpha=0.5" in objective["estimator"]
    assert objective["ok"], objective


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.0])
def test_renyi_differentiable_loss_is_pyros_loss_and_its_gradient(float64, alpha):
    """``DifferentiableRenyiELBO.differentiable_loss``: Pyro's RenyiELBO.loss value, and the
    gradient its loss_and_grads accumulates, for the same draws."""
    from pyro.infer import RenyiELBO

    from inference.estimators import DifferentiableRenyiELBO

    torch.manual_seed(0)
    vae = VAE(6, latent_dim=2, hidden_dims=(5,))
    x = torch.bernoulli(torch.full((9, 6), 0.4))
    options = dict(alpha=alpha, num_particles=4, vectorize_particles=False)
    params = list(vae.parameters())
    pyro.set_rng_seed(3)
    want = RenyiELBO(**options).loss_and_grads(vae.model, vae.guide, x, num_data=30)
    want_grads = [p.grad.clone() for p in params]
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    got = DifferentiableRenyiELBO(**options).differentiable_loss(
        vae.model, vae.guide, x, num_data=30
    )
    got.backward()
    assert got.item() == pytest.approx(want, rel=1e-12)
    for p, g in zip(params, want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_a_tensor_keyword_argument_is_never_frozen_into_a_graph():
    """Subsample indices passed as a keyword (``model(data, ind=...)``, SVI Part II's form) change
    from call to call: each call's loss is Pyro's Trace_ELBO().loss for that call's indices, not
    the first exported call's."""
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    from models.structure import static_structure

    @static_structure
    def model(data, ind=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("d", data.shape[0], subsample=ind) as i:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[i])

    @static_structure
    def guide(data, ind=None):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    pyro.clear_param_store()
    data = torch.arange(10.0) * 3
    compiled = JitTrace_ELBO(export_after=0)
    for i in range(3):
        ind = torch.tensor([i, i + 5])
        pyro.set_rng_seed(i)
        got = compiled.differentiable_loss(model, guide, data, ind=ind).item()
        pyro.set_rng_seed(i)
        want = Trace_ELBO().loss(model, guide, data, ind=ind)
        assert got == pytest.approx(want, rel=1e-6)


def test_trace_graph_elbo_trains_with_pyro_s_value_and_gradient():
    """``--estimator graph``: the registry's TraceGraph_ELBO has a differentiable loss whose
    value is Pyro's ``TraceGraph_ELBO().loss`` and whose gradient is the one Pyro's
    ``loss_and_grads`` leaves (a non-reparameterized Bernoulli latent: REINFORCE), for shared
    noise; and it trains through fit."""
    import pyro.distributions as dist
    from pyro.infer import TraceGraph_ELBO
    from torch.distributions import constraints

    from inference.estimators import make_elbo
    from inference.train import TrainConfig, fit

    def model(x):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))

    x = torch.full((5,), 1.5)
    pyro.clear_param_store()
    ours = make_elbo("graph", 4)
    pyro.set_rng_seed(3)
    loss = ours.differentiable_loss(model, guide, x)
    (grad,) = torch.autograd.grad(loss, [pyro.param("p").unconstrained()])
    pyro.set_rng_seed(3)
    pyro_elbo = TraceGraph_ELBO(num_particles=4, vectorize_particles=False)
    param = pyro.param("p").unconstrained()
    param.grad = None
    want = pyro_elbo.loss_and_grads(model, guide, x)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(grad, param.grad)
    assert grad.abs() > 0  # the score-function term reached the parameter
    pyro.clear_param_store()
    result = fit(model, guide, x, config=TrainConfig(estimator="graph", epochs=3, progress=False))
    assert result.estimator == "graph"
