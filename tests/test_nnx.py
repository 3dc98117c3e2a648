"""Flax NNX: the helpers on ``nnx.Optimizer.opt_state`` and on ``nnx.state(model, nnx.Param)``.

One short run prunes a small NNX MLP to a target sparsity through ``nnx.Optimizer`` with a
masked forward (the network runs on ``W * M``, gradients taken with respect to ``W * M``),
then every helper is checked on the NNX trees it leaves behind.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hflows_jax as hf

TARGET = 0.9
STEPS = 300  # the whole pruning phase: the run ends as the pressure drops to 0


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


@nnx.jit
def train_step(model, opt, x, y):  # as in the README's NNX section
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    effective = hf.apply_masks(params, opt.opt_state)             # W * M

    def loss_fn(effective):                                       # the network runs on W * M
        logits = nnx.merge(graphdef, effective, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(effective)          # gradient w.r.t. W * M
    opt.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def trained():
    x, y = data()
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(
        hf.hyperflows(hf.pressure.trajectory(target_sparsity=TARGET, total_steps=STEPS,
                                             update_every=10),
                      presence_optimizer=optax.adam(1e-2)),
        optax.sgd(0.1, momentum=0.9),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = [float(train_step(model, opt, x, y)) for _ in range(STEPS)]
    return model, opt, losses, (x, y)


KERNELS = ("hidden", "out")


def test_short_run_reaches_the_target_sparsity(trained):
    model, opt, losses, (x, y) = trained
    sparsity = hf.sparsity(opt.opt_state)
    assert isinstance(sparsity, jax.Array) and sparsity.shape == ()
    assert abs(float(sparsity) - TARGET) < 0.03, float(sparsity)
    layers = hf.layer_sparsity(opt.opt_state)
    assert set(layers) == {"hidden/kernel", "out/kernel"}
    sizes = {"hidden/kernel": 8 * 32, "out/kernel": 32 * 3}
    weighted = sum(float(layers[k]) * n for k, n in sizes.items()) / sum(sizes.values())
    np.testing.assert_allclose(weighted, float(sparsity), rtol=1e-6)
    # The network trained on W * M: the pruned network alone fits the task (trained on the
    # dense W instead, it keeps a loss near 0.5 once pruned).
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    pruned = nnx.clone(model)
    nnx.update(pruned, hf.finalize(nnx.state(model, nnx.Param), opt.opt_state))
    assert float(loss_on(pruned, x, y)) < 0.1
    assert float(jnp.mean(pruned(x).argmax(axis=1) == y)) > 0.95
    state = hf.find_pruner_state(opt.opt_state)
    assert isinstance(state, hf.HyperflowsState)
    assert isinstance(state.count, jax.Array) and int(state.count) == STEPS
    assert int(opt.step[...]) == STEPS
    assert float(hf.pressure_value(opt.opt_state)) == 0.0  # the pruning phase is over


def test_apply_masks_and_finalize_zero_exactly_the_masked_weights(trained):
    model, opt, _, (x, y) = trained
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
        # Ready for nnx.update: the updated copy computes x @ (W * M) + b.
        masked_model = nnx.clone(model)
        nnx.update(masked_model, out)
        h = jax.nn.relu(x @ (params["hidden"]["kernel"][...] * masks["hidden"]["kernel"])
                        + params["hidden"]["bias"][...])
        expected = (h @ (params["out"]["kernel"][...] * masks["out"]["kernel"])
                    + params["out"]["bias"][...])
        np.testing.assert_allclose(masked_model(x), expected, rtol=1e-5, atol=1e-5)
    by_hand = hf.multiply_masks(params, masks)
    assert jax.tree.structure(by_hand) == jax.tree.structure(params)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), by_hand,
                        hf.apply_masks(params, opt.opt_state))
    assert all(jax.tree.leaves(same))


def test_finalize_zeroes_non_finite_pruned_weights(trained):
    model, opt, _, _ = trained
    params = nnx.state(model, nnx.Param)
    mask = np.asarray(hf.masks(opt.opt_state)["hidden"]["kernel"])
    poisoned = jax.tree.map(lambda p: p, params)
    poisoned["hidden"]["kernel"][...] = jnp.where(mask, params["hidden"]["kernel"][...], jnp.nan)
    out = np.asarray(hf.finalize(poisoned, opt.opt_state)["hidden"]["kernel"][...])
    assert np.all(out[~mask] == 0) and np.all(np.isfinite(out))


def test_flows_on_nnx_params_and_grads(trained):
    model, opt, _, (x, y) = trained
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)
    grads = jax.grad(lambda p: loss_on(nnx.merge(graphdef, p), x, y))(
        hf.apply_masks(params, opt.opt_state))
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


def test_mismatched_trees_still_fail_clearly(trained):
    model, opt, _, _ = trained
    one_layer = nnx.state(model.hidden, nnx.Param)
    for helper in (hf.apply_masks, hf.finalize):
        with pytest.raises(ValueError, match="masks do not have the structure of params"):
            helper(one_layer, opt.opt_state)
    with pytest.raises(ValueError, match="gradients do not have the structure of params"):
        hf.flows(nnx.state(model, nnx.Param), nnx.state(model.out, nnx.Param), opt.opt_state)
    plain = nnx.Optimizer(MLP(nnx.Rngs(1)), optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="No pruning state found"):
        hf.sparsity(plain.opt_state)


def test_importing_the_package_does_not_load_flax_nnx():
    code = "import sys, hflows_jax; print('flax.nnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
