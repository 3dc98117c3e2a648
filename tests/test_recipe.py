"""The reference recipe as functions of a run's length: presence regime, reachability."""

import pytest

from hflows_jax import methods, recipe
from hflows_jax.training import presets, train


def test_presence_regime_keeps_the_reference_and_scales_with_length():
    lr, period = recipe.presence_regime(100 * 391)  # the reference: 100 epochs of 391 steps
    assert period == 391 and lr == pytest.approx(0.35 / 391)
    assert 0.8e-3 < lr < 1.2e-3  # the reference's 1e-3
    lr, period = recipe.presence_regime(20 * 79)  # cifar10_5k, batch 64, 20 epochs
    assert period == 15 and lr == pytest.approx(0.35 / 100)  # crossing takes >= 100 steps
    for steps in (50, 1580, 18720, 39100, 10 ** 6):
        lr, period = recipe.presence_regime(steps)
        assert 0.35 / lr >= 100  # a score needs at least 100 one-signed steps to cross
        assert 100 <= steps // period <= 200 or period == 1  # about 100 decisions
    with pytest.raises(ValueError, match="pruning_steps"):
        recipe.presence_regime(0)


def test_presence_lr_in_regrowth_is_the_references_sixty_epochs_scaled():
    lr, pruning = 1e-3, 100
    reference = recipe.presence_learning_rate(lr, pruning, 60 * 391)  # 60 epochs of 391 steps
    assert float(reference(pruning - 1)) == pytest.approx(lr)
    for epoch in (0, 1, 49):  # x0.75 an epoch, from the first regrowth step to the last
        for step in (epoch * 391, epoch * 391 + 390):
            assert float(reference(pruning + step)) == pytest.approx(lr * 0.75 ** (epoch + 1))
    assert float(reference(pruning + 50 * 391)) == 0.0  # frozen for the last 10 epochs
    one_epoch = recipe.presence_learning_rate(lr, pruning, 120)  # two steps a sixtieth
    assert float(one_epoch(pruning + 3)) == pytest.approx(lr * 0.75 ** 2)
    assert float(one_epoch(pruning + 99)) == pytest.approx(lr * 0.75 ** 50)
    assert float(one_epoch(pruning + 100)) == 0.0


def test_unreachable_warning_from_the_travel_bound():
    # 0.9 of scores uniform in (0.2, 0.5) need to travel 0.2 + 0.3 * 0.9 = 0.47.
    assert recipe.unreachable_warning(0.9, 1e-3, 470) is None
    message = recipe.unreachable_warning(0.9, 1e-3, 469)
    assert "cannot reach 90.00%" in message and "0.469" in message and "0.470" in message


def test_overshoot_warning_below_five_crossing_times():
    # 0.47 to travel at lr 1e-3: 470 steps to cross; five times that is 2350.
    assert recipe.overshoot_warning(0.9, 1e-3, 2350) is None
    message = recipe.overshoot_warning(0.9, 1e-3, 2349)
    assert "about 470 steps" in message and "2349 steps" in message
    assert recipe.overshoot_warning(0.9, 1e-3, 400) is None  # unreachable: the other warning


def test_start_warning_fires_for_a_too_short_run_and_not_for_the_defaults():
    hyperflows = methods.get("hyperflows")
    # The run of the issue: ResNet-20 on cifar10_5k, batch 128 (39 steps an epoch), two
    # pruning epochs at the recipe's presence lr 1e-3: scores move at most 0.078.
    short = presets.CIFAR.replace(model="resnet20", dense_epochs=1, pruning_epochs=2,
                                  regrowth_epochs=1, target_sparsity=0.9, presence_lr=1e-3)
    assert hyperflows.start_warnings(short, 39)
    # With its presence lr from the regime it still cannot prune in 78 steps.
    assert hyperflows.start_warnings(short.replace(presence_lr=None), 39)
    # Three pruning epochs of the narrow-VGG probe (79 steps an epoch): reachable, but
    # short; that run ended at 99.87 % for a 90 % target.
    probe = presets.CIFAR.replace(pruning_epochs=3, target_sparsity=0.9)
    assert "overshoot" in " ".join(hyperflows.start_warnings(probe, 79))
    assert hyperflows.start_warnings(presets.MNIST, 468) == []
    assert hyperflows.start_warnings(presets.CIFAR, 390) == []
    assert methods.get("magnitude").start_warnings(short, 39) == []


def test_start_warning_names_the_presence_lr_flag_only_where_dropping_it_helps():
    hyperflows = methods.get("hyperflows")
    # 20 pruning epochs of 39 steps at presence lr 1e-4: unreachable; the default fits.
    slow = presets.CIFAR.replace(model="resnet20", pruning_epochs=20, target_sparsity=0.9,
                                 presence_lr=1e-4)
    (message,) = hyperflows.start_warnings(slow, 39)
    fitting = recipe.fitting_presence_lr(
        recipe.pruning_phase_sparsity(0.9, slow.method.regrowth_allowance), 780)
    assert fitting is not None and "drop --presence_lr: its default" in message
    assert f"{fitting:.3g}" in message
    # At the default, the remedy is more epochs only.
    short = presets.CIFAR.replace(model="resnet20", pruning_epochs=2, target_sparsity=0.9)
    for message in hyperflows.start_warnings(short, 39):
        assert "--presence_lr" not in message and message.endswith("more pruning epochs.")


@pytest.mark.parametrize("removed, text", [
    (0.0, "the run pruned nothing: 0.00% sparsity for a 90.00% target."),
    (0.8, "the run ended at 80.00% sparsity, 10.00 points below the 90.00% target."),
    (0.95, "the run ended at 95.00% sparsity, 5.00 points above the 90.00% target."),
])
def test_missed_target_message_says_above_or_below(removed, text):
    cfg = presets.CIFAR.replace(target_sparsity=0.9)
    assert train.missed_target_message(cfg, removed, "sparsity") == text


def test_fitting_presence_lr_is_the_regime_lr_where_no_warning_fires():
    lr, _ = recipe.presence_regime(39100)
    assert recipe.fitting_presence_lr(0.9, 39100) == lr
    # One epoch of 469 steps for 98 %: the regime's lr crosses in 141 steps, too few
    # crossings to settle, and a larger lr would follow the flows' noise.
    assert recipe.overshoot_warning(0.98, recipe.presence_regime(469)[0], 469)
    assert recipe.fitting_presence_lr(0.98, 469) is None
