"""FTWT (Elkerdawy et al.; METHOD.md section 9): a gating head per conv switches its
channels for each input; the heads learn the channels' heatmap-mass targets.

Run as its authors run it from a trained model (selkerdawy/FTWT, ``job_dynamic.sh``): a
mass threshold fixed for the run, here calibrated to the FLOP target on the weights
training starts from (``calibrate``); the backbone's SGD at lr 1e-2 with FTWT's steps and
weight decay, the heads' at lr 0.1 (``optimizer``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hflows_jax.methods.base import Budget, ChannelMethod, no_readings
from hflows_jax.structured import ftwt
from hflows_jax.structured.channels import path_of


def run_steps(b: Budget) -> int:
    """FTWT trains in one stretch: the pruning and regrowth epochs together."""
    return b.pruning_steps + b.regrowth_steps


class FTWT(ChannelMethod):
    name = "ftwt"
    masked = False  # no masks in the optimizer state: the model gates per input
    loss_term = staticmethod(ftwt.gating_loss)

    def pruner(self, b: Budget) -> optax.GradientTransformation:
        """The heads' optimizer (``ftwt.heads_optimizer``)."""
        return ftwt.heads_optimizer(run_steps(b))

    def optimizer(self, b: Budget, *weight_links) -> optax.GradientTransformation:
        """FTWT's two optimizers. The backbone's is FTWT's own (lr 1e-2 with its steps,
        weight decay 5e-4), in place of the run's ``weight_links`` (``--lr``'s schedule,
        ``--weight_decay``): FTWT fine-tunes a trained model at a tenth of its dense lr."""
        del weight_links
        return ftwt.with_heads(self.pruner(b), ftwt.backbone_optimizer(run_steps(b)))

    def model(self, plain, target_sparsity):
        return ftwt.to_ftwt(plain, target_sparsity)

    def calibrate(self, model, variables, batches) -> tuple:
        """The mass threshold, fixed for the run: ``ftwt.calibrate_threshold`` on the
        weights the run starts from. With ``--init_checkpoint`` (the comparisons' shared
        dense run) those are the trained dense weights, as in FTWT; without, the fresh
        initialization, before any dense epochs of the run (``start_warnings`` says so)."""
        params, batch_stats = variables
        threshold = ftwt.calibrate_threshold(
            model, {"params": params, "batch_stats": batch_stats}, [x for x, _ in batches])
        return params, {**batch_stats, "mass_threshold": jnp.asarray(threshold, jnp.float32)}

    def learning_rates(self, b: Budget, step: int) -> dict[str, float]:
        """The backbone's lr, the heads' and the mask loss's weight on their gradient."""
        return {"lr": float(ftwt.backbone_lr(run_steps(b))(step)), "heads_lr": ftwt.HEADS_LR,
                "mask_loss_weight": float(ftwt.mask_loss_weight(run_steps(b))(step))}

    def start_warnings(self, cfg, steps_per_epoch: int) -> list[str]:
        s, warnings = cfg.schedule, super().start_warnings(cfg, steps_per_epoch)
        if not s.init_checkpoint:
            warnings.append("--method=ftwt without --init_checkpoint calibrates its mass "
                            "threshold on the fresh initialization (FTWT starts from a trained "
                            "model): the FLOPs removed may land far from the target.")
        if s.weight_decay != ftwt.WEIGHT_DECAY:
            warnings.append(f"--method=ftwt trains its backbone with FTWT's weight decay "
                            f"{ftwt.WEIGHT_DECAY:g}, not --weight_decay={s.weight_decay:g}.")
        return warnings

    def readings(self, opt_state) -> dict[str, float]:
        return no_readings(opt_state)

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
        backbone = sum(x.size for path, x in jax.tree.leaves_with_path(state.params)
                       if not ftwt.is_gate(path_of(path)))
        return {"flops_fraction": 1 - report["target_removed"],
                "params_fraction": report["params_total"] / backbone,
                "speedup_b1": None, "speedup_b256": None, "speedup_b256_x8": None}
