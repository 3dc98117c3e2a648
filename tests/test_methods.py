"""The method registry, and its model and loss hooks reaching the train step and the run."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import hflows_jax as hf
from hflows_jax import methods, models
from hflows_jax.training import Config, TrainState, make_train_step, run
from tests.helpers import subset_npz
from tests.test_importance import problem

PENALTY = 0.3


class Temperature(nn.Module):
    """A model wrapper with one extra parameter, sown for the loss term."""

    inner: nn.Module

    @nn.compact
    def __call__(self, x, train: bool = False):
        t = self.param("temperature", nn.initializers.constant(1.5), ())
        self.sow("intermediates", "temperature", t)
        return self.inner(x, train=train) * t


def temperature_penalty(params, intermediates):
    return PENALTY * intermediates["temperature"][0] ** 2


class TemperedRandom(methods.Method):
    """A method that overrides the model and the loss: random masks on a tempered model."""

    name = "tempered_random"
    distributions = ("uniform",)
    prunes_at_init = True
    loss_term = staticmethod(temperature_penalty)

    def pruner(self, b):
        return hf.baselines.random(b.target_sparsity, "uniform")

    def model(self, plain, target_sparsity):
        return Temperature(plain)


@pytest.fixture
def tempered_method():
    method = methods.register(TemperedRandom())
    yield method
    methods.REGISTRY.pop(method.name)


def test_registry_describes_every_method():
    assert list(methods.REGISTRY) == ["hyperflows", "hyperflows_channel", "dhp", "dhp_reach",
                                      "ftwt", "magnitude", "snip", "grasp", "random", "rigl",
                                      "ste_magnitude", "importance"]
    assert [m.name for m in methods.REGISTRY.values()
            if isinstance(m, methods.PressureMethod)] == ["hyperflows", "hyperflows_channel"]
    assert [m.name for m in methods.REGISTRY.values() if m.target == "flops"] == [
        "hyperflows_channel", "dhp", "dhp_reach", "ftwt"]
    assert {m.name for m in methods.REGISTRY.values() if m.prunes_at_init} == {
        "dhp", "dhp_reach", "snip", "grasp", "random", "rigl"}
    assert [m.name for m in methods.REGISTRY.values() if not m.masked] == ["dhp", "dhp_reach",
                                                                          "ftwt"]
    assert methods.get("random").distribution(None) == "erk"
    assert methods.get("magnitude").distribution("uniform") == "uniform"
    assert methods.get("snip").distribution("2:4") == "2:4"
    with pytest.raises(ValueError, match="does not apply to magnitude"):
        methods.get("magnitude").distribution("erk")
    with pytest.raises(ValueError, match="Unknown method 'obd'"):
        methods.get("obd")


@pytest.mark.slow
def test_model_and_loss_hooks_reach_the_train_step(tempered_method):
    model = tempered_method.model(models.create("lenet300", 3, width=0.05), 0.9)
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
    params = model.init(jax.random.key(2), x)["params"]
    tx = optax.chain(hf.baselines.random(0.5, "uniform"), optax.sgd(0.1))
    state = TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params))
    step = jax.jit(make_train_step(model, tx, masked=True,
                                   loss_term=tempered_method.loss_term, axis_name=None))
    new_state, metrics = step(state, x, y)

    def oracle(weights):  # the task loss on W * M, plus the penalty on the temperature
        logits = model.apply({"params": weights}, x)
        task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return task + PENALTY * weights["temperature"] ** 2

    effective = hf.apply_masks(params, state.opt_state)
    loss, grads = jax.value_and_grad(oracle)(effective)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    want = jax.tree.map(lambda p, g, m: p - 0.1 * (g if m is None else g * m),
                        params, grads, hf.masks(state.opt_state), is_leaf=lambda v: v is None)
    chex.assert_trees_all_close(new_state.params, want, atol=1e-6)


@pytest.mark.slow
def test_the_run_builds_the_model_through_the_registry(tempered_method, mnist_npz, tmp_path):
    dataset = subset_npz(mnist_npz, tmp_path / "small.npz", train=64, test=32)
    report = run(Config().replace(model="lenet300", width=0.05, dataset=dataset,
                                  method="tempered_random", target_sparsity=0.5,
                                  batch_size=32, dense_epochs=0, pruning_epochs=1,
                                  regrowth_epochs=0, augment=False,
                                  workdir=str(tmp_path / "run")))
    lenet = 784 * 15 + 15 + 15 * 5 + 5 + 5 * 10 + 10
    assert report["params_total"] == lenet + 1  # the wrapper's temperature
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_the_train_step_hands_its_running_statistics_to_a_pruner():
    """A pruner that scores in eval mode (``prune_at(..., loss_args=("batch_stats",))``)
    sees the statistics the step starts from, not the model's initial ones."""
    model, params, _, batches, _ = problem()
    variables = model.init(jax.random.key(0), batches[0][0])

    def eval_loss(p, batch, batch_stats):
        logits = model.apply({"params": p, "batch_stats": batch_stats}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    stats = jax.tree.map(lambda s: s + jax.random.uniform(jax.random.key(3), s.shape),
                         variables["batch_stats"])
    tx = optax.chain(hf.prune_at("loss_preservation", 0.5, [1], loss_fn=eval_loss,
                                 batches=batches, loss_args=("batch_stats",)),
                     optax.sgd(0.1))
    state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params))
    step = jax.jit(make_train_step(model, tx, masked=True, axis_name=None))
    new_state, _ = step(state, *batches[0])

    def oracle(batch_stats):
        return hf.prune(params, "loss_preservation", 0.5, batches=batches,
                        loss_fn=functools.partial(eval_loss, batch_stats=batch_stats))

    assert not jax.tree.all(jax.tree.map(jnp.array_equal, oracle(stats),
                                         oracle(variables["batch_stats"])))
    chex.assert_trees_all_equal(hf.masks(new_state.opt_state), oracle(stats))


@pytest.mark.slow
def test_importance_prunes_in_rounds_in_the_run(mnist_npz, tmp_path):
    dataset = subset_npz(mnist_npz, tmp_path / "small.npz", train=64, test=32)
    report = run(Config().replace(model="lenet300", width=0.05, dataset=dataset,
                                  method="importance", measure="biased_loss_preservation",
                                  rounds=2, target_sparsity=0.75, batch_size=16,
                                  dense_epochs=1, pruning_epochs=1, regrowth_epochs=1,
                                  augment=False, workdir=str(tmp_path / "run")))
    assert report["sparsity"] == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("controller", methods.CONTROLLERS)
def test_pressure_controller_holds_the_target_over_the_regrowth_steps(controller):
    """``hold=True`` (channel Hyperflows): the pressure stays on through the regrowth
    steps and drops to 0 after them; without, after the pruning steps."""
    b = methods.Budget(0.5, pruning_steps=40, regrowth_steps=20, steps_per_epoch=4,
                       controller_period=4, controller=controller, presence_lr=None,
                       weight_lr=None, regrowth_allowance=0.0, distribution=None, seed=0,
                       scoring=None, channel_groups=None)
    for hold, end in ((False, 40), (True, 60)):
        ctrl = methods.pressure_controller(b, 0.5, signed=True, hold=hold)
        state, gammas = ctrl.init(), []
        for step in range(1, 65):  # never pruned: pushed ever harder
            state = ctrl.update(state, jnp.float32(1.0), step)
            gammas.append(float(state.gamma))
        assert all(g > 0 for g in gammas[4:end - 1]), (controller, hold)
        assert all(g == 0 for g in gammas[end - 1:]), (controller, hold)
