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


def test_bfloat16_compute_keeps_float32_params():
    model = models.create("resnet20", 10, width=0.25, dtype=jnp.bfloat16)
    x = jnp.zeros((2,) + CIFAR)
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x).dtype == jnp.float32


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models are .*resnet20.*vgg19"):
        models.create("alexnet", 10)
