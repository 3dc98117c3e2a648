"""What a run is: one frozen ``Config``, grouped as data, model, method, schedule, run.

Everything here is plain Python (no jax), so a config can be built, compared, printed
and checked before any device is touched. ``validate`` is the one place where a config's
values are checked. On the command line and in ``report.json`` a config is flat: every
field is a flag of its own name, except each group's ``name``, which is the group's flag
(``--model=vgg19``, ``--method=hyperflows``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # cifar10, cifar100, mnist (tfds) or npz:PATH
    data_dir: str | None = None
    batch_size: int = 128  # global, split over all devices
    augment: bool = True  # random crop (pad 4) and horizontal flip


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "vgg19"
    width: float = 1.0
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    kernel_init: str = "lecun_normal"  # or "he_uniform" (the reference)
    train_bn_scale: bool = True  # False: BatchNorm scale fixed at 1 (the reference)
    zero_init_residual: bool = True  # ResNets: a block's last BatchNorm scale starts at 0


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    name: str = "hyperflows"  # or a baseline: magnitude, snip, grasp, random, rigl
    target_sparsity: float = 0.98
    distribution: str | None = None  # baselines: global, uniform or erk (None: the method's)
    presence_lr: float | None = None  # None: recipe.presence_regime of the pruning steps
    regrowth_allowance: float = 0.15
    pressure_updates_per_epoch: int | None = None  # None: recipe.presence_regime (~100 in all)
    controller: str | None = None  # trajectory (reference) or pi; None: the method's own
    measure: str | None = None  # importance: a name of hf.importance.MEASURES
    rounds: int | None = None  # importance: pruning rounds over the pruning epochs
    round_to: int | None = None  # channel Hyperflows: channels kept per layer, a multiple
    target: str | None = None  # channel Hyperflows: "flops" (None) or "latency"
    target_speedup: float | None = None  # --target=latency: the speed-up asked for
    latency_batch: int | None = None  # --target=latency: the batch it is measured at (1)
    latency_table: str | None = None  # --target=latency: a saved table (else measured)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    dense_epochs: int = 160
    init_checkpoint: str | None = None  # a run's checkpoints/dense: skip dense training
    pruning_epochs: int = 100
    regrowth_epochs: int = 60
    dense_only: bool = False  # the dense baseline: dense_epochs of training, no pruning
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    workdir: str = "workdir/cifar"
    eval_every: int = 1
    # While pruning: evaluate on BatchNorm statistics re-estimated over this many training
    # batches with the current masks (0: on the running statistics, which lag them).
    bn_batches: int = 32
    log_every: int = 50
    compilation_cache: bool = True  # JAX's persistent compilation cache, in a user directory
    keep_checkpoints: int = 2  # checkpoints kept per phase; 0 keeps every epoch's
    parallel: str = "pmap"  # or "shard_map": the same per-device step over a device mesh
    # A multi-process run started by hand: the same command on every host with its own
    # --process_id. Clusters JAX detects itself (TPU pods, SLURM) need none of these.
    coordinator_address: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None


GROUPS = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig,
          "schedule": ScheduleConfig, "run": RunConfig}
# Flags that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"workdir", "eval_every", "log_every", "data_dir",
                               "compilation_cache", "keep_checkpoints", "parallel", "coordinator_address",
                               "num_processes", "process_id"})
PARALLEL = ("pmap", "shard_map")
DTYPES = ("float32", "bfloat16")


def _flag_table() -> dict[str, tuple[str, str, type]]:
    """flag -> (group, field, value type); a field ``float | None`` has type float."""
    types = {t.__name__: t for t in (bool, int, float, str)}
    return {(group if f.name == "name" else f.name):
            (group, f.name, types[str(f.type).split(" |")[0]])
            for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


FLAGS = _flag_table()


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    run: RunConfig = RunConfig()

    def flags(self) -> dict[str, Any]:
        """The flat view: ``{flag: value}``, as on the command line and in report.json."""
        return {flag: getattr(getattr(self, group), name)
                for flag, (group, name, _) in FLAGS.items()}

    def replace(self, **flags: Any) -> Config:
        """A copy with some flags changed: ``cfg.replace(model="resnet20", batch_size=64)``."""
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise ValueError(f"Unknown config fields {unknown}: known are {sorted(FLAGS)}.")
        groups = {}
        for flag, value in flags.items():
            group, name, _ = FLAGS[flag]
            groups.setdefault(group, {})[name] = value
        return dataclasses.replace(self, **{
            group: dataclasses.replace(getattr(self, group), **changes)
            for group, changes in groups.items()})

    @property
    def pruned(self) -> bool:
        return not self.schedule.dense_only

    def validate(self) -> Config:
        """Every check of a config's values, in one place; returns the config, with
        ``--target_sparsity`` the latency ``--target_speedup`` removes where it is set."""
        # The registries own the names; they are imported here, not at module level,
        # so that this module stays free of jax.
        from hflows_jax import importance, methods, models
        from hflows_jax.n_m import parse_n_m

        d, m, p, s, r = self.data, self.model, self.method, self.schedule, self.run
        _require(0.0 < p.target_sparsity < 1.0,
                 f"--target_sparsity must lie in (0, 1), got {p.target_sparsity}.")
        _require(m.dtype in DTYPES, f"--dtype must be one of {list(DTYPES)}, got {m.dtype!r}.")
        _require(m.name in models.MODELS,
                 f"Unknown model {m.name!r}: known models are {sorted(models.MODELS)}.")
        _require(p.name in methods.REGISTRY,
                 f"Unknown method {p.name!r}: use one of {list(methods.REGISTRY)}.")
        _require(m.width > 0, f"--width must be positive, got {m.width}.")
        _require(not s.dense_only or (s.dense_epochs >= 1 and not s.init_checkpoint),
                 "--dense_only trains --dense_epochs (>= 1) from scratch.")
        _require(min(s.dense_epochs, s.regrowth_epochs) >= 0 and s.pruning_epochs >= 1,
                 "--dense_epochs and --regrowth_epochs must be >= 0, --pruning_epochs >= 1.")
        for flag, value in (("batch_size", d.batch_size), ("eval_every", r.eval_every),
                            ("log_every", r.log_every),
                            ("pressure_updates_per_epoch", p.pressure_updates_per_epoch)):
            _require(value is None or value >= 1, f"--{flag} must be >= 1, got {value}.")
        _require(p.regrowth_allowance >= 0,
                 f"--regrowth_allowance must be >= 0, got {p.regrowth_allowance}.")
        _require((p.presence_lr is None or p.presence_lr > 0) and s.lr > 0,
                 "--lr and --presence_lr must be positive.")
        _require(m.kernel_init in models.KERNEL_INITS,
                 f"--kernel_init must be one of {list(models.KERNEL_INITS)}, "
                 f"got {m.kernel_init!r}.")
        method = methods.get(p.name)
        method.distribution(p.distribution)
        for flag in ("measure", "rounds", "round_to", "target", "target_speedup",
                     "latency_batch", "latency_table"):
            takers = [x.name for x in methods.REGISTRY.values() if flag in x.options]
            _require(getattr(p, flag) is None or flag in method.options,
                     f"--{flag} applies to --method={takers}, not {p.name}.")
        _require(p.rounds is None or p.rounds >= 1, f"--rounds must be >= 1, got {p.rounds}.")
        _require(p.round_to is None or p.round_to >= 1,
                 f"--round_to must be >= 1, got {p.round_to}.")
        _require(p.target in (None, "flops", "latency"),
                 f"--target must be flops or latency, got {p.target!r}.")
        latency = p.target == "latency"
        _require(latency == (p.target_speedup is not None),
                 "--target=latency takes --target_speedup (e.g. 2: half the dense model's "
                 "latency), and --target_speedup only --target=latency.")
        _require(p.target_speedup is None or p.target_speedup > 1,
                 f"--target_speedup must be above 1, got {p.target_speedup}.")
        _require(latency or (p.latency_batch is None and p.latency_table is None),
                 "--latency_batch and --latency_table apply to --target=latency only.")
        _require(p.latency_batch is None or p.latency_batch >= 1,
                 f"--latency_batch must be >= 1, got {p.latency_batch}.")
        _require(p.latency_table is None or os.path.isfile(p.latency_table),
                 f"--latency_table={p.latency_table}: no such file.")
        if p.measure is not None:
            importance.measure(p.measure)
        n_m = parse_n_m(p.distribution or "")
        if n_m:
            removed = 1 - n_m[0] / n_m[1]
            _require(abs(p.target_sparsity - removed) < 1e-9,
                     f"--distribution={p.distribution} removes {removed:g} of the weights: "
                     f"pass --target_sparsity={removed:g}.")
            _require((p.rounds or 1) == 1,
                     f"--distribution={p.distribution} prunes once: drop --rounds={p.rounds}.")
        _require(r.keep_checkpoints >= 0,
                 f"--keep_checkpoints must be >= 0, got {r.keep_checkpoints}.")
        _require(r.bn_batches >= 0, f"--bn_batches must be >= 0, got {r.bn_batches}.")
        _require(r.parallel in PARALLEL,
                 f"--parallel must be one of {list(PARALLEL)}, got {r.parallel!r}.")
        explicit = (r.coordinator_address, r.num_processes, r.process_id)
        _require(all(v is None for v in explicit) or all(v is not None for v in explicit),
                 "--coordinator_address, --num_processes and --process_id go together.")
        _require(r.num_processes is None or 0 <= r.process_id < r.num_processes,
                 f"--process_id must lie in [0, --num_processes), got {r.process_id} of "
                 f"{r.num_processes}.")
        _require(p.controller is None or p.controller in methods.CONTROLLERS,
                 f"--controller must be one of {list(methods.CONTROLLERS)}, "
                 f"got {p.controller!r}.")
        if latency:  # what --target_sparsity counts: the fraction of the latency removed
            return self.replace(target_sparsity=1.0 - 1.0 / p.target_speedup)
        return self


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
