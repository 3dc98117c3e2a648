"""A character-level GPT trained on the Python standard library's own source, pruned.

    python -m experiments.lm --out=docs/results/lm
    python -m experiments.lm --quick --out=/tmp/lm   # a tiny model, a few steps: a smoke run

The text is on every machine, offline: a fixed list of standard-library modules read as
bytes (256 symbols), held out by file (``VALIDATION``). The model is GPT-style: pre-norm
blocks of causal self-attention and a GELU MLP, stacked by ``nn.scan`` (params with a
leading layer axis), as Flax LMs are written.

One command runs, from one dense model trained for ``--steps``:

- one-shot, no retraining (as the Wanda paper compares): magnitude (each layer alike)
  and Wanda (``|W|`` times the input feature's norm over ``--calibration`` training
  windows, per output unit), at 50 % and 2:4;
- Hyperflows from the dense model, ``--prune_steps`` then ``--regrowth_steps``, at 50 %,
  90 % and 2:4 (``hf.hyperflows(..., n_m="2:4")``);
- Wanda's 50 % and 2:4 masks trained as long with the masks fixed: what the extra steps
  alone give;
- the export of each pruned model (``hf.export``: multiply-adds kept, weights stored).

Writes lm.json, lm.md and lm.png: validation perplexity (per character) per method and
sparsity, beside the dense model's. Kernels only are pruned (embeddings, norms and biases
stay), as the Wanda paper does for the linear layers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import scaffold
from hflows_jax.training import outputs

VOCAB = 256
TRAIN = (
    "abc", "argparse", "ast", "base64", "bisect", "cmd", "code", "codecs",
    "collections/__init__", "colorsys", "configparser", "contextlib", "copy", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "enum", "fnmatch", "ftplib", "functools",
    "getopt", "glob", "gzip", "hashlib", "hmac", "imaplib", "inspect", "ipaddress",
    "keyword", "linecache", "locale", "logging/__init__", "mailbox", "mimetypes", "numbers",
    "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "queue", "quopri", "random", "re/__init__", "reprlib",
    "sched", "secrets", "selectors", "shelve", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "uuid", "warnings", "weakref", "webbrowser", "zipimport")
VALIDATION = ("calendar", "csv", "fractions", "gettext", "heapq", "pprint", "shlex",
              "textwrap", "wave")


def stdlib_text(modules: tuple) -> tuple[np.ndarray, list[str]]:
    """The modules' source files, joined, as bytes; and the paths read."""
    root = sysconfig.get_paths()["stdlib"]
    paths, missing = [], []
    for name in modules:
        found = [p for p in (os.path.join(root, name + ".py"),
                             os.path.join(root, name.removesuffix("/__init__") + ".py"),
                             os.path.join(root, name, "__init__.py")) if os.path.isfile(p)]
        (paths.append(found[0]) if found else missing.append(name))
    if missing:
        raise FileNotFoundError(f"the standard library at {root} lacks {missing}: this "
                                f"experiment reads a fixed list of its modules.")
    data = b"".join(open(p, "rb").read() for p in paths)
    return np.frombuffer(data, np.uint8).astype(np.int32), paths


def text_sha256(*texts: np.ndarray) -> str:
    """One hash of the bytes read (the standard library differs between Pythons)."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.astype(np.uint8).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The model.

@dataclasses.dataclass(frozen=True)
class Size:
    context: int = 128
    width: int = 128
    heads: int = 4
    layers: int = 4


class Block(nn.Module):
    """Pre-norm: x + attention(LN(x)) with a causal mask, then x + MLP(LN(x)). The
    projections are plain dense layers (query, key and value in one), as nanoGPT's."""

    heads: int

    @nn.compact
    def __call__(self, x, _):
        b, t, d = x.shape
        q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(nn.LayerNorm(name="ln1")(x)), 3, -1)
        split = lambda a: a.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, d)
        x = x + nn.Dense(d, name="proj")(attended)
        h = nn.gelu(nn.Dense(4 * d, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(d, name="down")(h), None


class GPT(nn.Module):
    size: Size

    @nn.compact
    def __call__(self, tokens):
        s = self.size
        x = nn.Embed(VOCAB, s.width, name="embed")(tokens)
        x = x + self.param("position", nn.initializers.normal(0.02),
                           (s.context, s.width))[:tokens.shape[1]]
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=s.layers)(s.heads, name="blocks")(x, None)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln")(x))


LANDED = 0.005  # a run further than this from its target (fraction removed) is marked


def target_sparsity(target: str) -> float:
    """``"50%"`` -> 0.5; ``"2:4"`` -> 0.5."""
    if ":" in target:
        n, m = map(int, target.split(":"))
        return 1 - n / m
    return float(target.rstrip("%")) / 100


def is_kernel(path, leaf) -> bool:
    """The dense layers' kernels: what is pruned."""
    del leaf
    return getattr(path[-1], "key", None) == "kernel"


# ---------------------------------------------------------------------------------------
# Training and evaluation.

def windows(text: np.ndarray, context: int, batch: int, seed: int):
    """Endless random training windows: ``(tokens, next tokens)``, each ``(batch, context)``."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, len(text) - context - 1, batch)
        idx = start[:, None] + np.arange(context + 1)
        yield text[idx[:, :-1]], text[idx[:, 1:]]


def validation_windows(text: np.ndarray, context: int, count: int) -> tuple:
    """``count`` windows spread evenly over the held-out text."""
    start = np.linspace(0, len(text) - context - 1, count).astype(int)
    idx = start[:, None] + np.arange(context + 1)
    return text[idx[:, :-1]], text[idx[:, 1:]]


def cross_entropy(model, params, tokens, targets):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, tokens), targets).mean()


def perplexity(model, params, valid: tuple, batch: int = 64) -> float:
    """Per character, over the held-out windows."""
    loss = jax.jit(functools.partial(cross_entropy, model))
    x, y = valid
    total = sum(float(loss(params, x[i:i + batch], y[i:i + batch])) * len(x[i:i + batch])
                for i in range(0, len(x), batch))
    return float(np.exp(total / len(x)))


def train(model, params, tx, batches, steps: int, label: str, pruned: bool,
          log_every: int = 100):
    """``steps`` of ``tx`` on ``hf.apply_masks(params)`` (``pruned``: ``tx`` holds a
    pruner); returns the params masked, the optimizer state and the losses logged."""
    import hflows_jax as hf

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(functools.partial(cross_entropy, model))(
            hf.apply_masks(params, opt_state, missing="ignore"), x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, log, started = tx.init(params), [], time.time()
    for i in range(steps):
        x, y = next(batches)
        params, opt_state, loss = step(params, opt_state, x, y)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            sparsity = float(hf.sparsity(opt_state)) if pruned else 0.0
            log.append({"step": i + 1, "loss": float(loss), "sparsity": sparsity})
            print(f"{label:>16} step {i + 1:5d}  loss {float(loss):.3f}  "
                  f"sparsity {sparsity:.3f}  "
                  f"[{time.time() - started:.0f}s]", flush=True)
    return hf.apply_masks(params, opt_state, missing="ignore"), opt_state, log


# ---------------------------------------------------------------------------------------
# The runs.

def parse_args(argv=None):
    p = scaffold.parser("python -m experiments.lm", __doc__, "workdir/lm",
                        "a tiny model, 30 dense and 40 pruning steps: a smoke run")
    p.add_argument("--steps", type=int, default=1500, help="dense training steps")
    p.add_argument("--prune_steps", type=int, default=800)
    p.add_argument("--regrowth_steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr of dense training")
    p.add_argument("--prune_lr", type=float, default=1e-3,
                   help="AdamW lr of the pruning runs and the fixed-mask runs")
    p.add_argument("--calibration", type=int, default=128,
                   help="training windows Wanda reads its input norms from")
    p.add_argument("--validation", type=int, default=512, help="held-out windows")
    p.add_argument("--width", type=int, default=Size.width)
    p.add_argument("--layers", type=int, default=Size.layers)
    p.add_argument("--context", type=int, default=Size.context)
    p.add_argument("--seed", type=int, default=0)
    args = scaffold.parse(p, argv, {"steps": 30, "prune_steps": 30, "regrowth_steps": 10,
                                    "batch": 8, "width": 32, "layers": 2, "context": 32,
                                    "calibration": 16, "validation": 32})
    for name in ("steps", "prune_steps", "regrowth_steps", "batch", "calibration",
                 "validation", "width", "layers", "context"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer")
    if args.width % Size.heads:
        p.error(f"--width must be a multiple of the {Size.heads} heads")
    return args


def hyperflows_chain(target: float, n_m: str | None, args):
    """Hyperflows before AdamW in the reference's regime, scaled onto these steps: the
    trajectory controller decides 100 times over the pruning steps, and a score crosses
    zero in one decision period at the presence lr (the reference's ratio; the recipe's
    floor of 100 steps a crossing, kept for long CIFAR runs, is left out here); the
    controller holds the target over the regrowth steps. Runs of this experiment that
    decided 12 times per crossing overshot a 50 % target to 68 % by step 200 (trajectory,
    every 8 steps); deciding once per crossing of 100 steps (signed PI), they stood at 24 %
    at step 700 of 800."""
    import hflows_jax as hf

    presence_lr, period = hf.recipe.presence_regime(args.prune_steps, min_crossing_steps=1)
    pressure = (hf.pressure.constant(0.0) if n_m else hf.pressure.trajectory(
        target, args.prune_steps, period, hold_steps=args.regrowth_steps))
    return optax.chain(
        hf.hyperflows(pressure, optax.adam(hf.recipe.presence_learning_rate(
            presence_lr, args.prune_steps, args.regrowth_steps)), is_prunable=is_kernel,
            n_m=n_m, warn=n_m is None),
        optax.adamw(hf.recipe.weight_learning_rate(args.prune_lr, args.prune_steps,
                                                   args.regrowth_steps)))


def fixed_chain(masks, args):
    """The same AdamW schedule on masks chosen once."""
    import hflows_jax as hf

    return optax.chain(hf.fixed_masks(masks), optax.adamw(hf.recipe.weight_learning_rate(
        args.prune_lr, args.prune_steps, args.regrowth_steps)))


def kernel_sparsity(masks) -> float:
    kept = [np.asarray(m) for m in jax.tree.leaves(masks)]
    return 1.0 - sum(int(k.sum()) for k in kept) / sum(k.size for k in kept)


def exported(model, params, masks, example) -> dict:
    """Multiply-adds per token and weights stored, dense and compact (``hf.export``)."""
    import hflows_jax as hf

    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    compact = hf.export(fn, params, masks, example, bcsr=False)
    return {"macs_per_token": compact.macs / example.shape[1],
            "dense_macs_per_token": compact.dense_macs / example.shape[1],
            "masked_macs_per_token": compact.masked_macs / example.shape[1]}


def dense_model(model, params, text, args) -> tuple:
    """The dense model trained for ``--steps``, or, where OUT holds one trained with these
    flags, that one (a rerun of the pruning runs needs no new dense model)."""
    from flax import serialization

    keys = ("steps", "batch", "lr", "width", "layers", "context", "seed")
    flags = {k: getattr(args, k) for k in keys}
    path = os.path.join(args.out, "dense_params.msgpack")
    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            saved = json.load(f)
        if saved["flags"] == flags:
            with open(path, "rb") as f:
                return serialization.from_bytes(params, f.read()), saved["log"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20),
                                                  args.steps, args.lr / 30)
    dense, _, log = train(model, params, optax.adamw(schedule),
                          windows(text, size_of(args).context, args.batch, args.seed),
                          args.steps, "dense", pruned=False)
    os.makedirs(args.out, exist_ok=True)
    outputs.atomic_write(path, serialization.to_bytes(dense))
    outputs.write_json(path + ".json", {"flags": flags, "log": log})
    return dense, log


def size_of(args) -> Size:
    return Size(args.context, args.width, Size.heads, args.layers)


def main(argv=None) -> dict:
    import hflows_jax as hf

    args = parse_args(argv)
    size = size_of(args)
    model = GPT(size)
    text, train_files = stdlib_text(TRAIN)
    held_out, valid_files = stdlib_text(VALIDATION)
    valid = validation_windows(held_out, size.context, args.validation)
    calibration = [next(windows(text, size.context, args.calibration, args.seed + 1))[0]]
    params = model.init(jax.random.key(args.seed), valid[0][:1])["params"]
    result = {"config": vars(args), "size": dataclasses.asdict(size), "rows": [],
              "text": {"train_bytes": len(text), "validation_bytes": len(held_out),
                       "sha256": text_sha256(text, held_out),
                       "train_files": [os.path.relpath(p, sysconfig.get_paths()["stdlib"])
                                       for p in train_files],
                       "validation_files": [os.path.relpath(
                           p, sysconfig.get_paths()["stdlib"]) for p in valid_files]}}

    def record(method, target, params, masks, seconds, log=None):
        row = {"method": method, "target": target,
               "perplexity": perplexity(model, params, valid), "seconds": round(seconds, 1)}
        if masks is not None:
            row["sparsity"] = kernel_sparsity(masks)
            row.update(exported(model, params, masks, valid[0][:2]))
        if log:
            row["log"] = log
        result["rows"].append(row)
        print(f"{method:>24} {target:>5}  perplexity {row['perplexity']:.3f}"
              + (f"  sparsity {row['sparsity']:.4f}" if masks is not None else ""), flush=True)
        result["environment"] = outputs.environment()
        scaffold.write_results(args.out, "lm", result, markdown(result), functools.partial(
            plot, result=result))

    started = time.time()
    dense, log = dense_model(model, params, text, args)
    record("dense", "", dense, None, time.time() - started, log)

    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    one_shot = {}
    for method, scores, distribution in (("magnitude", "magnitude", "uniform"),
                                         ("wanda", "wanda", "per_output")):
        for target in ("50%", "2:4"):
            started = time.time()
            masks = hf.prune(dense, scores, sparsity=None if ":" in target else 0.5,
                             distribution=distribution if target == "50%" else target,
                             is_prunable=is_kernel, fn=fn, batches=calibration)
            one_shot[method, target] = masks
            record(method, target, hf.multiply_masks(dense, masks), masks,
                   time.time() - started)

    runs = [("hyperflows", "50%"), ("hyperflows", "2:4"), ("wanda + fixed-mask training", "50%"),
            ("wanda + fixed-mask training", "2:4"), ("hyperflows", "90%")]
    for method, target in runs:
        started = time.time()
        if method == "hyperflows":
            tx = hyperflows_chain(target_sparsity(target), target if ":" in target else None,
                                  args)
        else:
            tx = fixed_chain(one_shot["wanda", target], args)
        params, opt_state, log = train(
            model, dense, tx, windows(text, size.context, args.batch, args.seed + 2),
            args.prune_steps + args.regrowth_steps, f"{method} {target}", pruned=True)
        record(method, target, params, hf.masks(opt_state), time.time() - started, log)
    return result


# ---------------------------------------------------------------------------------------
# Results.

def markdown(result: dict) -> str:
    c, size = result["config"], result["size"]
    rows = result["rows"]
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = ["# A character-level GPT on the standard library's source, pruned", "",
             f"`{result['environment']['command']}`", "",
             f"Model: {size['layers']} blocks (nn.scan) of width {size['width']}, "
             f"{size['heads']} heads, context {size['context']}; dense training "
             f"{c['steps']} steps of batch {c['batch']}; pruning runs {c['prune_steps']} + "
             f"{c['regrowth_steps']} steps from the dense model. Text: "
             f"{result['text']['train_bytes']:,} training bytes, "
             f"{result['text']['validation_bytes']:,} held-out bytes (other files).", "",
             "| method | target | sparsity (kernels) | validation perplexity | over dense | "
             "multiply-adds per token kept | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    missed = []
    for r in rows:
        sparsity = f"{100 * r['sparsity']:.2f} %" if "sparsity" in r else ""
        if "sparsity" in r and abs(r["sparsity"] - target_sparsity(r["target"])) > LANDED:
            sparsity += " (missed)"
            missed.append(f"{r['method']} {r['target']}")
        macs = (f"{r['macs_per_token'] / r['dense_macs_per_token']:.3f}"
                if "macs_per_token" in r else "")
        lines.append(f"| {r['method']} | {r['target']} | {sparsity} | {r['perplexity']:.3f} "
                     f"| {r['perplexity'] / dense:.3f} | {macs} | {r['seconds']} |")
    lines += ["", "Perplexity per character on held-out files (exp of the mean cross-entropy). "
              "One-shot rows are not retrained; 'multiply-adds kept' is the exported compact "
              "model's (hf.export: a unit whose weights are all gone leaves the layer) over "
              "the dense model's."]
    if missed:
        lines += ["", f"**Missed their target by more than {100 * LANDED:g} points:** "
                  + ", ".join(missed) + "."]
    return "\n".join(lines) + "\n"


def plot(fig, result: dict) -> None:
    ax = fig.add_subplot(1, 1, 1)
    rows = [r for r in result["rows"] if r["method"] != "dense"]
    dense = next((r["perplexity"] for r in result["rows"] if r["method"] == "dense"), None)
    labels = [f"{r['method']}\n{r['target']}" for r in rows]
    ax.barh(range(len(rows)), [r["perplexity"] for r in rows], color="tab:blue")
    if dense is not None:
        ax.axvline(dense, color="k", ls="--", label=f"dense {dense:.2f}")
        ax.legend(loc="lower right")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("validation perplexity per character (lower is better)")
    ax.set_title("Character-level GPT, pruned")


if __name__ == "__main__":
    scaffold.command_line(main)
