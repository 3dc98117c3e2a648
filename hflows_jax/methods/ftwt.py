"""FTWT (Elkerdawy et al.; METHOD.md section 9): a gating head per conv switches its
channels for each input; the heads learn the channels' heatmap-mass targets."""

from __future__ import annotations

import jax
import optax

from hflows_jax.methods.base import Budget, ChannelMethod
from hflows_jax.structured import ftwt


class FTWT(ChannelMethod):
    name = "ftwt"
    masked = False  # no masks in the optimizer state: the model gates per input
    loss_term = staticmethod(ftwt.gating_loss)

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        """The heads' optimizer. FTWT weighs its mask loss 1 for the first half of the
        epochs, then 0; decoupled, that loss reaches only the heads, so this is the heads'
        learning rate going to 0."""
        half = (b.pruning_steps + b.regrowth_steps) // 2
        return optax.sgd(optax.join_schedules([optax.constant_schedule(ftwt.HEADS_LR),
                                               optax.constant_schedule(0.0)], [half]),
                         momentum=0.9)

    def optimizer(self, b: Budget, *weight_links):
        return ftwt.with_heads(self.pruner(b), *weight_links)

    def model(self, plain, target_sparsity):
        return ftwt.to_ftwt(plain, target_sparsity)

    def readings(self, opt_state) -> dict[str, float]:
        return {"sparsity": 0.0, "pressure": 0.0, "skipped_steps": 0}

    def layer_sparsity(self, opt_state) -> dict[str, float]:
        return {}

    def pruned_network(self, model, params, batch_stats, opt_state, image_shape) -> tuple:
        """The gated model itself: what it removes changes with the input."""
        return model, {"params": params, "batch_stats": batch_stats}, None, None

    def removed(self, network, opt_state, test_images) -> tuple[float, str]:
        model, variables = network[:2]
        return (1.0 - ftwt.executed_flops(model, variables, test_images()),
                "of the multiply-adds removed (mean over the test set)")

    def structured_row(self, report, state, exported) -> dict:
        """No exported model: the mean multiply-adds executed over the test set, and the
        whole backbone's params with the heads'."""
        backbone = sum(x.size for k, v in state.params.items() if not ftwt.is_gate(k)
                       for x in jax.tree.leaves(v))
        return {"flops_fraction": 1 - report["target_removed"],
                "params_fraction": report["params_total"] / backbone,
                "speedup_b1": None, "speedup_b256": None}
