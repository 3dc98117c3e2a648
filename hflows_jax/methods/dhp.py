"""DHP (Li et al.; METHOD.md section 9) as its authors run it (ofsoundof/dhp,
``classification/main_dhp.py``): hypernetwork convs whose latents a proximal L1 step drives
to zero, searched unmasked until the multiply-adds left reach the target (or the pruning
epochs end); then the pruned plain network, fine-tuned by a fresh SGD schedule of its own in
the run's regrowth epochs."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

import hflows_jax as hf
from hflows_jax.methods.base import Budget, ChannelMethod, Retraining
from hflows_jax.recipe import multistep
from hflows_jax.structured.dhp import DHPResNet, DHPVGG, dhp, plain_variables, to_dhp

# DHP's SGD, in its search and its fine-tune alike (util/option.py, util/template.py's VGG
# weight decay): lr 0.1, momentum 0.9, times 0.1 at each milestone of a MultiStepLR.
LR, GAMMA, MOMENTUM, WEIGHT_DECAY = 0.1, 0.1, 0.9, 5e-4
SEARCH_MILESTONE = 50  # the search's, in epochs (dhp_resnet20.sh: --decay step-50+...)
FINE_TUNE_MILESTONES = (150 / 300, 225 / 300)  # the fine-tune's (...+step-150-225 of 300)
HYPERNETWORKS = (DHPVGG, DHPResNet)  # the search's networks
# --regularization_factor: its default (util/option_dhp.py) for a network DHP has no script
# for (VGG); what its ResNet scripts set (dhp_resnet20.sh, dhp_resnet56.sh), by --model.
REG = 1e-4
SCRIPT_REG = {"resnet20": 2e-4, "resnet56": 3e-4}
OFFICIAL_STEPS_PER_EPOCH = 782  # CIFAR-10's 50000 training images at DHP's batch 64


def search_lr(steps_per_epoch: int) -> optax.Schedule:
    return multistep(LR, GAMMA, [SEARCH_MILESTONE * steps_per_epoch])


def lr_sum(steps_per_epoch: int, steps: int) -> float:
    """The search's lr summed over its ``steps``: a latent's shrink is ``reg`` times it."""
    return float(jnp.sum(search_lr(steps_per_epoch)(jnp.arange(steps))))


def fine_tune_lr(steps: int) -> optax.Schedule:
    """DHP's fine-tune schedule (300 epochs) scaled to ``steps``."""
    return multistep(LR, GAMMA, [int(f * steps) for f in FINE_TUNE_MILESTONES])


def epoch_reg(steps_per_epoch: int, model: str = "") -> float:
    """DHP's reg for ``model`` in a run of ``steps_per_epoch``: its per-step reg times its
    steps per epoch over ours, so that a latent shrinks by as much an epoch (``REG * lr *
    782``, 0.0078 at lr 0.1) as in DHP's CIFAR runs, on a data set of any size."""
    return SCRIPT_REG.get(model, REG) * OFFICIAL_STEPS_PER_EPOCH / steps_per_epoch


def reaching_reg(steps_per_epoch: int, steps: int, shrink: float) -> float:
    """The reg at which the search's ``steps`` can shrink a latent by ``shrink`` in all
    (this project's rule before DHP's own reg: ``DHP.shrink``)."""
    return shrink / lr_sum(steps_per_epoch, max(steps, 1))


class DHP(ChannelMethod):
    name = "dhp"
    prunes_at_init = True  # it trains its hypernetwork model from initialization
    masked = False  # its search runs on the latents as they are (its fine-tune is masked)
    # None: DHP's reg per epoch (``epoch_reg``). A number: the reg that shrinks a latent by
    # that much over the search (``reaching_reg``): 1.0 reaches the target in a short run,
    # where DHP's reg falls far short of it (README, "DHP as its authors run it").
    shrink: float | None = None

    def reg(self, steps_per_epoch: int, pruning_steps: int, model: str = "") -> float:
        if self.shrink is None:
            return epoch_reg(steps_per_epoch, model)
        return reaching_reg(steps_per_epoch, pruning_steps, self.shrink)

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        return dhp(b.channel_groups(), b.target_sparsity, search_lr(b.steps_per_epoch),
                   reg=self.reg(b.steps_per_epoch, b.pruning_steps, b.model))

    def optimizer(self, b: Budget, *weight_links) -> optax.GradientTransformation:
        """DHP's SGD in place of the run's ``weight_links`` (``--lr``'s schedule,
        ``--weight_decay``), then the proximal step, which acts on its final updates."""
        del weight_links
        return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                           optax.sgd(search_lr(b.steps_per_epoch), momentum=MOMENTUM),
                           self.pruner(b))

    def retraining(self, b: Budget, model) -> Retraining:
        """The search's pruned plain network (``plain_variables``), its channels fixed in the
        optimizer state (``fixed_channels``), trained by a fresh SGD schedule over the
        regrowth steps, as DHP fine-tunes after its search."""
        groups, lr = b.channel_groups(), fine_tune_lr(b.regrowth_steps)
        tx = optax.chain(hf.structured.fixed_channels(groups),
                         optax.add_decayed_weights(WEIGHT_DECAY),
                         optax.sgd(lr, momentum=MOMENTUM))

        def start(state):
            kept = hf.channel_masks(state.opt_state)
            _, params, batch_stats = plain_variables(model, state.params, state.batch_stats,
                                                     kept, groups)
            opt_state = optax.tree.set(tx.init(params), kept=kept,
                                       masks=groups.expand(kept, params))
            return state._replace(step=jnp.zeros_like(state.step), params=params,
                                  batch_stats=batch_stats, opt_state=opt_state)

        return Retraining(model.base, tx, start, lambda step: {"lr": float(lr(step))})

    def model(self, plain, target_sparsity):
        return to_dhp(plain)

    def pruned_network(self, model, params, batch_stats, opt_state, image_shape) -> tuple:
        """The search's state: the plain network cut where its masks say (``plain_variables``
        with its ``kept``); the fine-tune's: as every channel method's."""
        if not isinstance(model, HYPERNETWORKS):
            return super().pruned_network(model, params, batch_stats, opt_state, image_shape)
        kept = hf.channel_masks(opt_state)
        plain, params, batch_stats = plain_variables(model, params, batch_stats)
        groups = hf.structured.channel_groups(plain, params, image_shape)
        masks = groups.expand(kept, params)
        return (plain, {"params": hf.multiply_masks(params, masks), "batch_stats": batch_stats},
                masks, groups)

    def plain(self, model, params, batch_stats):
        """The plain network: generated by the search's hypernetworks; the fine-tune's as
        is."""
        if isinstance(model, HYPERNETWORKS):
            return plain_variables(model, params, batch_stats)
        return model, params, batch_stats

    def learning_rates(self, b: Budget, step: int) -> dict[str, float]:
        return {"lr": float(search_lr(b.steps_per_epoch)(step))}

    def start_warnings(self, cfg, steps_per_epoch: int) -> list[str]:
        """DHP's SGD in place of the run's; no fine-tune; and a search too short for its reg
        to reach the target: the shrink alone cuts the latents whose |initial value| (drawn
        from N(0, 1)) it covers, where even cuts of ``1 - sqrt(1 - target)`` of every
        layer's channels reach a FLOP target."""
        s, warnings = cfg.schedule, super().start_warnings(cfg, steps_per_epoch)
        steps = s.pruning_epochs * steps_per_epoch
        reach = self.reg(steps_per_epoch, steps, cfg.model.name) * lr_sum(steps_per_epoch,
                                                                           steps)
        cut = math.erf(reach / math.sqrt(2))  # of the latents, from N(0, 1)
        needed = 1 - math.sqrt(1 - cfg.method.target_sparsity)
        if cut < needed:
            warnings.append(f"--method=dhp's search shrinks a latent by about {reach:.3g} in "
                            f"{s.pruning_epochs} pruning epochs (DHP's reg, per epoch): it cuts "
                            f"about {cut:.0%} of the channels, where the target needs about "
                            f"{needed:.0%} of every layer's; the run will likely end short of "
                            "it. Give it more pruning epochs.")
        if (s.lr, s.weight_decay) != (LR, WEIGHT_DECAY):
            warnings.append(f"--method=dhp trains with DHP's SGD (lr {LR:g}, weight decay "
                            f"{WEIGHT_DECAY:g}), not --lr={s.lr:g} and "
                            f"--weight_decay={s.weight_decay:g}.")
        if not s.regrowth_epochs:
            warnings.append("--method=dhp with --regrowth_epochs=0 never trains its pruned "
                            "network: the accuracy reported is the unmasked search's.")
        return warnings


class DHPReach(DHP):
    """DHP with the reg that lets its search reach the target in the run's pruning epochs
    (``shrink = 1``: a latent can shrink by 1 over the search): for comparisons at equal
    epochs, where DHP's own reg, made for searches of up to 100 epochs, ends far short."""

    name = "dhp_reach"
    shrink = 1.0
