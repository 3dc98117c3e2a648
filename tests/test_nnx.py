"""Flax NNX: the NNX guide's code block, run as it stands, and the helpers on the NNX trees it
leaves behind (``nnx.Optimizer.opt_state``, ``nnx.state(model, nnx.Param)``).

The guide (docs/guides/nnx.md) trains a model with BatchNorm and Dropout through
``hf.nnx.masked_value_and_grad``
(the model runs on ``W * M``, gradients taken with respect to ``W * M``) to a target
sparsity.
"""

import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hflows_jax as hf

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" / "nnx.md"
TARGET = 0.9
STEPS = 300  # the whole pruning phase: the run ends as the pressure drops to 0


def guide_nnx_code() -> str:
    """The first python block of the NNX guide's "Flax NNX" section."""
    section = GUIDE.read_text().split("## Flax NNX\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.out = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def data():
    x = jax.random.normal(jax.random.key(0), (128, 8))
    return x, jnp.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1)


def loss_on(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.fixture(scope="module")
def readme_run():
    """The guide's NNX block, run as it stands; its namespace and the warnings it raised."""
    namespace = {"__name__": "readme_nnx"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(guide_nnx_code(), str(GUIDE), "exec"), namespace)
    namespace["warnings"] = [w for w in caught if issubclass(w.category, UserWarning)]
    return namespace


KERNELS = ("hidden", "out")


def eval_forward(params, masks, bn, x):
    """The guide's Net in eval mode on W * M, written out: the oracle."""
    def kernel(name):
        return params[name]["kernel"][...] * masks[name]["kernel"]
    h = x @ kernel("hidden") + params["hidden"]["bias"][...]
    h = (h - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * params["bn"]["scale"][...] \
        + params["bn"]["bias"][...]
    return jax.nn.relu(h) @ kernel("out") + params["out"]["bias"][...]


def test_readme_run_reaches_the_target_silently_and_evaluates_the_masked_model(readme_run):
    model, opt, (x, y) = readme_run["model"], readme_run["opt"], (readme_run["x"],
                                                                   readme_run["y"])
    assert readme_run["warnings"] == []  # a good schedule: the library says nothing
    sparsity = hf.sparsity(opt.opt_state)
    assert isinstance(sparsity, jax.Array) and sparsity.shape == ()
    assert abs(float(sparsity) - TARGET) < 0.03, float(sparsity)
    layers = hf.layer_sparsity(opt.opt_state)
    assert set(layers) == {"hidden/kernel", "out/kernel"}
    assert all(type(v) is float for v in layers.values())
    sizes = {"hidden/kernel": 8 * 32, "out/kernel": 32 * 3}
    weighted = sum(layers[k] * n for k, n in sizes.items()) / sum(sizes.values())
    np.testing.assert_allclose(weighted, float(sparsity), rtol=1e-6)
    # The guide's last line zeroed the pruned weights: the model is the pruned network,
    # and the guide's masked evaluation agrees with it and with the oracle.
    masks = hf.masks(opt.opt_state)
    params = nnx.state(model, nnx.Param)
    for name in KERNELS:
        mask = np.asarray(masks[name]["kernel"])
        assert np.all(np.asarray(params[name]["kernel"][...])[~mask] == 0)
    bn = {"mean": model.bn.mean[...], "var": model.bn.var[...]}
    expected = eval_forward(params, masks, bn, x)
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)
    accuracy = float(readme_run["accuracy"](model, opt, x, y))
    assert accuracy == pytest.approx(float(jnp.mean(expected.argmax(axis=1) == y)))
    assert accuracy > 0.85, accuracy  # the pruned network alone fits the task
    # BatchNorm's running statistics moved away from their initial (0, 1) during training.
    assert float(jnp.abs(bn["mean"]).max()) > 1e-3 and float(jnp.abs(bn["var"] - 1).max()) > 1e-3
    state = hf.find_pruner_state(opt.opt_state)
    assert isinstance(state, hf.HyperflowsState)
    assert isinstance(state.count, jax.Array) and int(state.count) == STEPS
    assert int(opt.step[...]) == STEPS
    assert float(hf.pressure_value(opt.opt_state)) == 0.0  # the pruning phase is over


def short_run(steps=100):
    """The guide's model and step after ``steps`` of its training steps: part of each
    kernel pruned, the pruned weights still in ``W``."""
    namespace = {"__name__": "readme_nnx"}
    code = guide_nnx_code().split("\nx = jax.random.normal")[0]  # up to the data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, str(GUIDE), "exec"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    x, y = data()
    for _ in range(steps):
        namespace["train_step"](model, opt, x, y)
    masks = hf.masks(opt.opt_state)
    assert all(0 < np.sum(masks[n]["kernel"]) < masks[n]["kernel"].size for n in KERNELS)
    return namespace, model, opt, (x, y)


@pytest.fixture(scope="module")
def trained():
    _, model, opt, batch = short_run()
    return model, opt, batch


def test_masked_swaps_w_times_m_in_and_w_back_and_keeps_batchnorm_updates(trained):
    model, opt, (x, y) = trained
    model = nnx.clone(model)  # train mode, as the guide's training left it
    params = nnx.state(model, nnx.Param)
    weights = jax.tree.map(lambda v: np.asarray(v), nnx.to_pure_dict(params))
    masks = hf.masks(opt.opt_state)
    mean_before = np.asarray(model.bn.mean[...])
    with hf.nnx.masked(model, opt):
        for name in KERNELS:
            np.testing.assert_array_equal(
                np.asarray(getattr(model, name).kernel[...]),
                np.where(masks[name]["kernel"], weights[name]["kernel"], 0.0))
        model(x)  # train mode: BatchNorm updates its statistics
    for name in KERNELS:  # W is back, pruned entries included
        np.testing.assert_array_equal(np.asarray(getattr(model, name).kernel[...]),
                                      weights[name]["kernel"])
    assert not np.array_equal(np.asarray(model.bn.mean[...]), mean_before)


def test_an_update_inside_masked_is_refused(trained):
    model, opt, (x, y) = trained
    model, opt = nnx.clone(model), nnx.clone(opt)
    _, grads = hf.nnx.masked_value_and_grad(loss_on)(model, opt, x, y)
    with pytest.raises(RuntimeError, match="inside hf.nnx.masked"):
        with hf.nnx.masked(model, opt):
            opt.update(model, grads)


def test_masked_value_and_grad_is_the_gradient_at_w_times_m(trained):
    model, opt, (x, y) = trained
    model = nnx.clone(model)
    model.eval()  # no dropout, BatchNorm on its running statistics: one fixed function
    params = nnx.state(model, nnx.Param)
    masks = hf.masks(opt.opt_state)
    bn = {"mean": model.bn.mean[...], "var": model.bn.var[...]}
    loss, grads = hf.nnx.masked_value_and_grad(loss_on)(model, opt, x, y)
    # The oracle: the written-out network's gradient w.r.t. its effective weights.
    pure = nnx.to_pure_dict(params)
    effective = jax.tree.map(lambda w, m: w if m is None else w * m, pure,
                             nnx.to_pure_dict(masks), is_leaf=lambda m: m is None)
    ones = jax.tree.map(lambda m: None if m is None else jnp.ones_like(m),
                        nnx.to_pure_dict(masks), is_leaf=lambda m: m is None)

    def oracle(p):
        logits = eval_forward(p, ones, bn, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    want_loss, want = jax.value_and_grad(oracle)(effective)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got = nnx.to_pure_dict(grads)
    for path in (("hidden", "kernel"), ("out", "kernel"), ("bn", "scale"), ("out", "bias")):
        np.testing.assert_allclose(got[path[0]][path[1]], want[path[0]][path[1]],
                                   rtol=1e-4, atol=1e-6)
    assert set(got) == set(want)  # the optimizer's params only: no BatchNorm statistics


def test_apply_masks_and_finalize_zero_exactly_the_masked_weights(trained):
    model, opt, (x, y) = trained
    params = nnx.state(model, nnx.Param)
    masks = hf.masks(opt.opt_state)
    for name in KERNELS:
        mask = np.asarray(masks[name]["kernel"])
        weight = np.asarray(params[name]["kernel"][...])
        assert mask.dtype == bool and mask.shape == weight.shape
        assert 0 < mask.sum() < mask.size  # some weights pruned, some kept
        assert np.all(weight[~mask] != 0)  # the pruned weights are still there in W
        assert masks[name]["bias"] is None
    for helper in (hf.apply_masks, hf.finalize):
        out = helper(params, opt.opt_state)
        assert jax.tree.structure(out) == jax.tree.structure(params), helper.__name__
        for name in KERNELS:
            assert isinstance(out[name]["kernel"], nnx.Param)
            mask = np.asarray(masks[name]["kernel"])
            weight = np.asarray(params[name]["kernel"][...])
            np.testing.assert_array_equal(np.asarray(out[name]["kernel"][...]),
                                          np.where(mask, weight, 0.0))
            np.testing.assert_array_equal(np.asarray(out[name]["bias"][...]),
                                          np.asarray(params[name]["bias"][...]))
        # Ready for nnx.update: the updated copy computes the network on W * M.
        masked_model = nnx.clone(model)
        nnx.update(masked_model, out)
        masked_model.eval()
        bn = {"mean": model.bn.mean[...], "var": model.bn.var[...]}
        np.testing.assert_allclose(masked_model(x), eval_forward(params, masks, bn, x),
                                   rtol=1e-4, atol=1e-4)
    by_hand = hf.multiply_masks(params, masks)
    assert jax.tree.structure(by_hand) == jax.tree.structure(params)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), by_hand,
                        hf.apply_masks(params, opt.opt_state))
    assert all(jax.tree.leaves(same))


def test_finalize_zeroes_non_finite_pruned_weights(trained):
    model, opt, _ = trained
    params = nnx.state(model, nnx.Param)
    mask = np.asarray(hf.masks(opt.opt_state)["hidden"]["kernel"])
    poisoned = jax.tree.map(lambda p: p, params)
    poisoned["hidden"]["kernel"][...] = jnp.where(mask, params["hidden"]["kernel"][...], jnp.nan)
    out = np.asarray(hf.finalize(poisoned, opt.opt_state)["hidden"]["kernel"][...])
    assert np.all(out[~mask] == 0) and np.all(np.isfinite(out))


def test_flows_on_nnx_params_and_grads(trained):
    model, opt, (x, y) = trained
    params = nnx.state(model, nnx.Param)
    frozen = nnx.clone(model)
    frozen.eval()
    _, grads = hf.nnx.masked_value_and_grad(loss_on)(frozen, opt, x, y)
    flows = hf.flows(params, grads, opt.opt_state)
    assert flows["hidden"]["bias"] is None and flows["out"]["bias"] is None
    for name in KERNELS:
        expected = 0.25 * params[name]["kernel"][...] * grads[name]["kernel"][...]
        assert flows[name]["kernel"].dtype == jnp.float32
        np.testing.assert_allclose(flows[name]["kernel"], expected, rtol=1e-6, atol=1e-9)
        assert float(jnp.abs(expected).max()) > 0


def test_is_prunable_sees_the_paths_of_layer_sparsity():
    """A custom is_prunable gets ('hidden', 'kernel'), not the path into the Param wrapper."""
    only_hidden = lambda path, leaf: (  # noqa: E731
        jax.tree_util.keystr(path, simple=True, separator="/") == "hidden/kernel")
    tx = hf.hyperflows(hf.pressure.constant(1.0), is_prunable=only_hidden)
    opt = nnx.Optimizer(MLP(nnx.Rngs(0)), tx, wrt=nnx.Param)
    assert set(hf.layer_sparsity(opt.opt_state)) == {"hidden/kernel"}
    assert hf.masks(opt.opt_state)["out"]["kernel"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "snip"])
def test_baseline_pruners_under_nnx_optimizer(method):
    x, y = data()
    model = MLP(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)
    loss_fn = lambda params, batch: loss_on(nnx.merge(graphdef, params), *batch)  # noqa: E731
    pruner = (hf.baselines.random(0.8) if method == "random"
              else hf.baselines.snip(0.8, loss_fn, [(x, y)]))
    opt = nnx.Optimizer(model, optax.chain(pruner, optax.sgd(0.1)), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    opt.update(model, jax.grad(loss_fn)(hf.apply_masks(params, opt.opt_state), (x, y)))
    assert abs(float(hf.sparsity(opt.opt_state)) - 0.8) < 0.01
    masks, params = hf.masks(opt.opt_state), nnx.state(model, nnx.Param)
    for name in KERNELS:
        kernel = np.asarray(hf.apply_masks(params, opt.opt_state)[name]["kernel"][...])
        mask = np.asarray(masks[name]["kernel"])
        np.testing.assert_array_equal(kernel, np.where(mask, params[name]["kernel"][...], 0.0))


def test_masked_without_a_pruner_raises_or_runs_the_model_as_it_is():
    model = MLP(nnx.Rngs(0))
    plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    x, y = data()
    with pytest.raises(ValueError, match="No pruning state found"):
        hf.nnx.masked_value_and_grad(loss_on)(model, plain, x, y)
    loss, grads = hf.nnx.masked_value_and_grad(loss_on, missing="ignore")(model, plain, x, y)
    want_loss, want = nnx.value_and_grad(loss_on)(model, x, y)
    assert float(loss) == float(want_loss)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)


def test_mismatched_trees_still_fail_clearly(trained):
    model, opt, _ = trained
    one_layer = nnx.state(model.hidden, nnx.Param)
    for helper in (hf.apply_masks, hf.finalize):
        with pytest.raises(ValueError, match="masks do not have the structure of params"):
            helper(one_layer, opt.opt_state)
    with pytest.raises(ValueError, match="gradients do not have the structure of params"):
        hf.flows(nnx.state(model, nnx.Param), nnx.state(model.out, nnx.Param), opt.opt_state)
    plain = nnx.Optimizer(MLP(nnx.Rngs(1)), optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="No pruning state found"):
        hf.sparsity(plain.opt_state)


@pytest.mark.slow
def test_importing_the_package_does_not_load_flax_nnx():
    code = "import sys, hflows_jax; print('flax.nnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
