"""Model definitions: sizes, shapes, prunable leaves, and real forward passes."""

import jax
import jax.numpy as jnp
import pytest

import hflows_jax as hf
from hflows_jax import models

CIFAR = (32, 32, 3)
EXPECTED_PARAMS = {  # for 10 classes
    "vgg19": (20.0e6, 0.05e6),
    "resnet50": (23.5e6, 0.05e6),
    "resnet18": (11.17e6, 0.01e6),
    "resnet20": (0.27e6, 0.005e6),
    "lenet300": (266610, 0),
    "lenet5": (44426, 0),
}


def abstract_variables(name, num_classes=10, width=1.0):
    model = models.create(name, num_classes, width)
    shape = (28, 28, 1) if name.startswith("lenet") else CIFAR
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2,) + shape)))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2,) + shape), train=False),
                            variables)
    return variables, logits


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_and_output_shapes(name):
    variables, logits = abstract_variables(name)
    count = sum(x.size for x in jax.tree.leaves(variables["params"]))
    want, tolerance = EXPECTED_PARAMS[name]
    assert abs(count - want) <= tolerance, count
    assert logits.shape == (2, 10)
    _, logits100 = abstract_variables(name, num_classes=100)
    assert logits100.shape == (2, 100)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_every_conv_and_dense_kernel_is_prunable_by_default(name):
    variables, _ = abstract_variables(name)
    params = variables["params"]
    presence = hf.hyperflows(hf.pressure.constant(1.0)).init(params).presence
    flat_presence = jax.tree.leaves_with_path(presence, is_leaf=lambda x: x is None)
    for path, t in flat_presence:
        is_kernel = path[-1].key == "kernel"
        assert (t is not None) == is_kernel, jax.tree_util.keystr(path)
    kernels = [t for _, t in flat_presence if t is not None]
    assert len(kernels) == {"vgg19": 17, "resnet50": 54, "resnet18": 21, "resnet20": 22,
                            "lenet300": 3, "lenet5": 5}[name]


def test_width_multiplier_shrinks_the_model():
    full, _ = abstract_variables("resnet20")
    half, _ = abstract_variables("resnet20", width=0.5)
    count = lambda v: sum(x.size for x in jax.tree.leaves(v["params"]))  # noqa: E731
    assert count(half) < 0.3 * count(full)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg19", "resnet50"])
def test_full_size_forward_pass(name):
    model = models.create(name, 10)
    x = jax.random.normal(jax.random.key(1), (2,) + CIFAR)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()
    logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
    model = models.create("resnet20", 10, width=0.25, dtype=jnp.bfloat16)
    x = jnp.zeros((2,) + CIFAR)
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x).dtype == jnp.float32


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models are .*resnet20.*vgg19"):
        models.create("alexnet", 10)


@pytest.mark.slow
def test_reference_recipe_options_bn_scale_and_he_uniform():
    x = jnp.ones((4, 32, 32, 3))
    frozen = models.create("resnet20", 10, width=0.25, train_bn_scale=False,
                           kernel_init="he_uniform", zero_init_residual=False)
    trained = models.create("resnet20", 10, width=0.25)
    vf, vt = frozen.init(jax.random.key(0), x), trained.init(jax.random.key(0), x)
    scales = lambda v: [p for path, p in jax.tree.leaves_with_path(v["params"])  # noqa: E731
                        if path[-1].key == "scale"]
    assert scales(vf) == [] and len(scales(vt)) > 0  # frozen: no scale to train, it is 1
    # zero-init of each block's last BatchNorm only in the default
    assert float(vt["params"]["ResNetBlock_0"]["BatchNorm_1"]["scale"].sum()) == 0.0

    def two_sgd_steps(model, variables):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.mean(out ** 2)
        params = variables["params"]
        for _ in range(2):
            params = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
        return params

    moved = two_sgd_steps(trained, vt)
    assert any(not jnp.array_equal(a, b) for a, b in zip(scales({"params": moved}), scales(vt)))
    assert scales({"params": two_sgd_steps(frozen, vf)}) == []

    # He-uniform: U(+-sqrt(6 / fan_in)), variance 2 / fan_in; Flax's lecun_normal: 1 / fan_in.
    big = models.create("vgg19", 10, kernel_init="he_uniform")
    kernel = big.init(jax.random.key(1), x[:1])["params"]["Conv_8"]["kernel"]  # 3x3x512->512
    fan_in = 3 * 3 * kernel.shape[2]
    assert float(jnp.var(kernel)) == pytest.approx(2.0 / fan_in, rel=0.02)
    assert float(jnp.abs(kernel).max()) <= (6.0 / fan_in) ** 0.5
    lecun = models.create("vgg19", 10).init(jax.random.key(1), x[:1])["params"]["Conv_8"]
    assert float(jnp.var(lecun["kernel"])) == pytest.approx(1.0 / fan_in, rel=0.05)
    with pytest.raises(ValueError, match="Unknown kernel init"):
        models.create("lenet300", 10, kernel_init="orthogonal")
