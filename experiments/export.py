"""A finished run as a deployable model: the compact model, serialized, and how fast it is.

    python -m experiments.export --workdir=RUN --out=DIR

RUN is a finished pruning run (its report.json and its checkpoints; the last one, of its
last phase, is exported). Writes to --out:

- ``model.jax``: the compact model (``hf.export``: dead units and channels removed, the
  run's own network re-run on the smaller arrays) as one function, uint8 NHWC images ->
  float32 logits, the run's
  normalization inside (``(images / 255 - mean) / std``, the training images' channel
  statistics, as in training). Serialized with ``jax.export`` with a symbolic batch size;
  load it without this package (export.json's ``load`` says which imports it needs)::

      import jax  # and jax.experimental.sparse for a file with BCSR layers
      exported = jax.export.deserialize(open("model.jax", "rb").read())
      logits = exported.call(images)  # uint8, (batch, H, W, C)

  The weights are constants inside. It is exported for the platform this runs on, and
  tuned on this machine (``--tune``, ``hf.export(tune=)``): at each batch size of 1, 32
  and 256 (and up to the next) it runs the fastest of the compact program, its BCSR
  layers as BCSR, its channel counts padded to multiples of 8, and the masked dense model,
  as timed here at export, so that no batch size runs slower than dense
  (``routes`` in export.json). With ``--bcsr=auto`` (default) its fully connected layers
  at most 10 to 20 % dense may run as BCSR matrices; BCSR runs on CPU as a custom call
  that ``import jax.experimental.sparse`` registers, without ``jax.export``'s
  compatibility guarantee, so such a file is for a jaxlib like the one that wrote it
  (``environment`` in export.json). ``--bcsr=off`` writes dense layers only, with the
  guarantee; ``--bcsr=on`` BCSR for every fully connected layer at every batch size.
- ``dense.jax``: the same for the masked dense model (the linen model on W * M, eval mode).
- ``export.json``, ``export.md``, ``export.png``: parameters and multiply-adds of both,
  their test accuracy (through the serialized functions), and latency at batch 1, 32 and
  256: the median of interleaved calls (dense, compact, dense, ...; each waited for)
  after a warm-up, beside the MAC-bound speed-up macs_dense / macs_compact
  (``macs_compact``: the compact model with dense kernels; ``macs_compact_bcsr``: with the
  BCSR layers counting their nonzeros).

The models run in float32 whatever the run's compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import scaffold
from hflows_jax.compact import BCSR_CUSTOM_CALL, BORDERS, export, median_ms
from hflows_jax.data import normalize
from hflows_jax.training import Config, open_run, outputs, train
from hflows_jax.training.checkpoint import checkpoint_dir
from hflows_jax.training.train import EVAL_BATCH

BATCHES = (1, 32, 256)
BCSR_CHOICES = {"auto": None, "on": True, "off": False}  # hf.export's bcsr=
LOAD = {False: "import jax", True: "import jax, jax.experimental.sparse"}  # by BCSR layers


def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.export", __doc__, "workdir/export",
                        "5 timed calls per batch size instead of 100")
    p.add_argument("--workdir", required=True, help="a finished pruning run's workdir")
    p.add_argument("--repeats", type=int, default=100, help="timed calls per model and batch")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--dataset", default=None,
                   help="the run's dataset where it moved (default: as in report.json)")
    p.add_argument("--border", default="keep", choices=BORDERS,
                   help="hf.export's border rule for constant channels")
    p.add_argument("--bcsr", default="auto", choices=tuple(BCSR_CHOICES),
                   help="fully connected layers as BCSR: auto (measured rule), on, off")
    p.add_argument("--tune", default=",".join(map(str, BATCHES)),
                   help="batch sizes at which hf.export times its programs (compact, BCSR, "
                        "padded, dense) here and serves the fastest; 'off': the compact "
                        "program, BCSR layers by --bcsr")
    args = scaffold.parse(p, argv, {"repeats": 5, "warmup": 2})
    args.tune = None if args.tune == "off" else tuple(int(b) for b in args.tune.split(","))
    return args


def restore_last(cfg: Config):
    """The run opened for analysis (float32, no device axis: ``open_run``) and the last
    state of its last phase after the dense one (pruning, or the method's fine-tune),
    ``(run, epoch, TrainState)``."""
    if cfg.schedule.dense_only:
        raise ValueError(f"{cfg.run.workdir} is a dense-only run (dense_only: true): it has "
                         "no masks, so there is no compact model to export.")
    directory = checkpoint_dir(cfg.run.workdir, "pruning")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no pruning checkpoints in this run.")
    run = open_run(cfg, axis_name=None, dtype=jnp.float32)
    for phase in reversed(run.phases[1:]):
        if not os.path.isdir(checkpoint_dir(cfg.run.workdir, phase.name)):
            continue
        ckpt = run.checkpoints(phase.name)
        try:
            epoch = ckpt.latest()
            if epoch is not None:
                return run, epoch, ckpt.restore(epoch, run.template(phase.name))[0]
        finally:
            ckpt.close()
    raise FileNotFoundError(f"{directory} holds no checkpoint.")


def predict_functions(run, state, epoch: int):
    """``(dense, compacted)``: the masked linen model as a function uint8 images -> float32
    logits, normalization inside, on the BatchNorm statistics the run evaluated its epoch
    ``epoch`` on (``--bn_batches``); and ``compacted(**export_options) -> (compact,
    compact_model)``, the same function of its ``hf.export`` with those options
    (``border``, ``bcsr``, ``channel_multiple``). The statistics are re-estimated once,
    however many exports follow. A wrapped model (DHP's search) is timed as the plain
    model it stands for."""
    model, variables, masks, _ = train.evaluated_network(run, state, epoch)
    if masks is None:
        raise ValueError(f"--method={run.method.name} switches channels per input: it has no "
                         "fixed compact model to export.")
    inputs = run.inputs

    def logits(params, x):
        return model.apply({**variables, "params": params}, x, train=False).astype(jnp.float32)

    example = normalize(inputs.data.x_test[:2], inputs.mean, inputs.std)

    def dense(images):
        return logits(variables["params"], normalize(images, inputs.mean, inputs.std))

    def compacted(**options):
        compact = export(logits, variables["params"], masks, example, **options)

        def compact_fn(images):
            return compact.forward(compact.params, normalize(images, inputs.mean, inputs.std))

        return compact_fn, compact

    return dense, compacted


def serialize(fn, image_shape: tuple[int, ...], bcsr: bool = False) -> bytes:
    """``fn`` (uint8 images -> logits) exported with a symbolic batch size; ``bcsr``: it
    runs BCSR layers, whose CPU custom call needs its compatibility check disabled."""
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b,) + tuple(image_shape), jnp.uint8)
    disabled = [jax.export.DisabledSafetyCheck.custom_call(BCSR_CUSTOM_CALL)] if bcsr else []
    return bytes(jax.export.export(jax.jit(fn), disabled_checks=disabled)(spec).serialize())


def load(path: str):
    """A serialized model (``jax.export.Exported``), as a user of model.jax loads it."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


def test_accuracy(fn, images: np.ndarray, labels: np.ndarray) -> float:
    correct = 0
    for i in range(0, len(images), EVAL_BATCH):
        logits = fn(images[i:i + EVAL_BATCH])
        correct += int(np.sum(np.argmax(np.asarray(logits), -1) == labels[i:i + EVAL_BATCH]))
    return correct / len(images)


def latency(fns: dict, images: np.ndarray, batch: int, repeats: int, warmup: int) -> dict:
    """Median milliseconds per call of each function, calls interleaved, each waited for."""
    x = jnp.asarray(np.resize(images, (batch,) + images.shape[1:]))
    return median_ms({name: functools.partial(fn, x) for name, fn in fns.items()}, repeats,
                     warmup)


def markdown(result: dict) -> str:
    header = ["batch", "dense ms", "compact ms", "speed-up", "MAC-bound speed-up"]
    rows = [[r["batch"], f"{r['dense_ms']:.3f}", f"{r['compact_ms']:.3f}",
             f"{r['speedup']:.2f}x", f"{result['mac_bound_speedup']:.2f}x"]
            for r in result["latency"]]
    bcsr = result["bcsr_layers"]
    bound = (f", {result['mac_bound_speedup_bcsr']:.2f}x with the BCSR layers "
             f"({', '.join(bcsr)}) counting their nonzeros" if bcsr else "")
    runs = ", ".join(f"{r['program']}{'+bcsr' if r['sparse'] else ''} from batch "
                     f"{max(r['batch'], 1)}" for r in result["routes"])
    return (f"# export: {result['run']}\n\n"
            f"Params {result['params_dense']} dense, {result['params_compact']} compact; "
            f"MACs per image {result['macs_dense']} dense, {result['macs_compact']} compact "
            f"(MAC-bound speed-up {result['mac_bound_speedup']:.2f}x{bound}). Test accuracy "
            f"{100 * result['test_accuracy_dense']:.2f} % dense (masked), "
            f"{100 * result['test_accuracy_compact']:.2f} % compact. model.jax: {runs} "
            f"(--bcsr={result['bcsr']}). Median of {result['repeats']} interleaved calls "
            f"after {result['warmup']} warm-up calls.\n\n"
            + outputs.markdown_table(header, rows))


def plot(fig, result: dict) -> None:
    a, b = fig.subplots(1, 2)
    batches = [r["batch"] for r in result["latency"]]
    x = np.arange(len(batches))
    series = [("dense", "dense_ms"), ("compact", "compact_ms")]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        a.bar(x + (i - (len(series) - 1) / 2) * width,
              [r[key] for r in result["latency"]], width, label=label)
    a.set_xticks(x, [str(n) for n in batches])
    a.set_xlabel("batch")
    a.set_ylabel("median latency (ms)")
    a.set_yscale("log")
    a.legend(fontsize=7)
    b.plot(batches, [r["speedup"] for r in result["latency"]], "o-", label="compact")
    b.axhline(result["mac_bound_speedup"], color="black", ls="--", lw=0.8,
              label="MAC bound (compact)")
    if result["bcsr_layers"]:
        b.axhline(result["mac_bound_speedup_bcsr"], color="gray", ls=":", lw=0.8,
                  label="MAC bound (BCSR nonzeros)")
    b.axhline(1.0, color="black", lw=0.5)
    b.set_xscale("log")
    b.set_xlabel("batch")
    b.set_ylabel("speed-up over the masked dense model")
    b.legend(fontsize=7)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = scaffold.read_report(args.workdir)
    # a run from before --bn_batches evaluated on its running statistics
    flags = {"bn_batches": 0, **report["config"], "workdir": args.workdir}
    if args.dataset:
        flags["dataset"] = args.dataset
    cfg = Config().replace(**flags)
    run, epoch, state = restore_last(cfg)
    inputs, shape = run.inputs, run.inputs.data.image_shape
    dense, compacted = predict_functions(run, state, epoch)
    compact, compact_model = compacted(border=args.border, bcsr=BCSR_CHOICES[args.bcsr],
                                       tune=args.tune)
    bcsr_layers = [r.name for r in compact_model.layers if r.bcsr]
    os.makedirs(args.out, exist_ok=True)
    paths = {name: os.path.join(args.out, f"{name}.jax") for name in ("model", "dense")}
    outputs.atomic_write(paths["model"], serialize(compact, shape, compact_model.has_bcsr))
    outputs.atomic_write(paths["dense"], serialize(dense, shape))
    served = {"dense": load(paths["dense"]), "compact": load(paths["model"])}
    loaded = {name: jax.jit(e.call) for name, e in served.items()}
    x_test, y_test = inputs.data.x_test, inputs.data.y_test
    rows = []
    for batch in BATCHES:
        ms = latency(loaded, x_test, batch, args.repeats, args.warmup)
        rows.append({"batch": batch, "dense_ms": ms["dense"], "compact_ms": ms["compact"],
                     "speedup": ms["dense"] / ms["compact"]})
    # Counts of the compact model with dense kernels (a BCSR layer counts its nonzeros).
    counts = compact_model
    if bcsr_layers:
        counts = compacted(border=args.border, bcsr=False)[1]
    result = {
        "run": args.workdir, "epoch": epoch, "model": cfg.model.name,
        "dataset": cfg.data.dataset, "sparsity": report["sparsity"],
        "params_dense": counts.params_dense, "params_nonzero": counts.params_nonzero,
        "params_compact": counts.params_compact,
        "macs_dense": counts.dense_macs, "macs_nonzero": counts.masked_macs,
        "macs_compact": counts.macs,
        "mac_bound_speedup": counts.dense_macs / max(counts.macs, 1),
        # BCSR layers count their nonzero entries.
        "macs_compact_bcsr": compact_model.macs,
        "mac_bound_speedup_bcsr": counts.dense_macs / max(compact_model.macs, 1),
        "test_accuracy_dense": test_accuracy(loaded["dense"], x_test, y_test),
        "test_accuracy_compact": test_accuracy(loaded["compact"], x_test, y_test),
        "test_accuracy_run": report["test_accuracy"],
        "bcsr": args.bcsr,
        "bcsr_layers": bcsr_layers,
        "routes": [dataclasses.asdict(r) for r in compact_model.routes],
        "load": LOAD[compact_model.has_bcsr],
        "border": args.border,
        "repeats": args.repeats, "warmup": args.warmup,
        "latency": rows,
        "files": {"model": paths["model"], "dense": paths["dense"]},
        "platforms": list(served["compact"].platforms),
        "summary": compact_model.summary(),
        "environment": outputs.environment(),
    }
    scaffold.write_results(args.out, "export", result, markdown(result),
                           lambda fig: plot(fig, result))
    return result


if __name__ == "__main__":
    scaffold.command_line(main)
