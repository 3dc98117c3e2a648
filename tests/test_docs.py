"""The documentation: README's promises, every guide's code run, the site built strictly.

A guide's code blocks run in order in one namespace per page. Where a page's blocks use
names the page leaves to the reader (a model, a loss, data), ``CONTEXT`` supplies small
ones; the code itself runs as written. The "Your own model" and "Flax NNX" guides are
run, with their results checked, by tests/test_compact.py and tests/test_nnx.py.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hflows_jax as hf
from hflows_jax import models
from tests.helpers import macs_latency_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = ROOT / "docs" / "guides"


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_blocks(path: pathlib.Path, scope: dict) -> dict:
    for i, code in enumerate(python_blocks(path)):
        exec(compile(code, f"{path.name} (block {i + 1})", "exec"), scope)  # noqa: S102
    return scope


def test_readme_is_short_starts_with_its_two_commands_and_links_what_exists():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    first, second = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert first.startswith("pip install -e . && python -m experiments.mnist")
    assert second.strip() == 'pip install -e ".[dev]" && python -m pytest -q tests'
    assert text.index(first) < text.index("## ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), link


@pytest.mark.slow
def test_readme_code_prunes_and_exports():
    scope = run_blocks(README, {})
    assert abs(float(hf.sparsity(scope["opt_state"])) - 0.9) < 0.02
    compact = scope["compact"]
    assert 0 < compact.macs < compact.dense_macs
    masked = hf.multiply_masks(scope["cnn"], scope["masks"])
    np.testing.assert_allclose(np.asarray(compact(scope["images"])),
                               np.asarray(scope["fn"](masked, scope["images"])),
                               rtol=1e-5, atol=1e-5)


def _mlp_context() -> dict:
    params = {"w1": jax.random.normal(jax.random.key(0), (20, 32)) * 0.2,
              "w2": jax.random.normal(jax.random.key(1), (32, 4)) * 0.2}
    x = jax.random.normal(jax.random.key(2), (32, 20))
    y = jnp.arange(32) % 4

    def loss_fn(p, batch):
        logits = jax.nn.relu(batch[0] @ p["w1"]) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return dict(params=params, loss_fn=loss_fn, batch=(x, y), batches=[(x, y)],
                pruning_epochs=10, regrowth_epochs=2, steps_per_epoch=50)


def _cnn_context() -> dict:
    model = models.create("vgg19", 10, width=0.0625)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 100)  # two classes: one batch of the page's 256
    images = rng.normal(size=(200, 32, 32, 3)).astype(np.float32)

    def cross_entropy(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return dict(model=model, params=variables["params"], stats=variables["batch_stats"],
                x_train=images, y_train=labels, cross_entropy=cross_entropy,
                epoch_steps=10, jax=jax, optax=optax, hf=hf)


def _structured_context() -> dict:
    scope = _cnn_context()
    model, stats = scope["model"], scope["stats"]
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x,  # noqa: E731
                                  train=False)
    example = jnp.zeros((2, 32, 32, 3))
    groups = hf.structured.channel_groups(fn, scope["params"], example)
    # the page measures its table (latency.measure); a multiply-add one keeps this short
    return dict(scope, example=example, fn=fn, table=macs_latency_table(groups))


CONTEXT = {"getting-started.md": _mlp_context, "importance.md": _cnn_context,
           "structured.md": _structured_context}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(CONTEXT))
def test_guide_code_runs(page):
    path = GUIDES / page
    assert python_blocks(path), f"{page} has no code"
    scope = run_blocks(path, CONTEXT[page]())
    if page == "getting-started.md":
        assert float(hf.sparsity(scope["opt_state"])) == 0.0  # nothing pruned at step 0
    if page == "structured.md":
        assert scope["compact"].macs == scope["compact"].dense_macs  # nothing pruned yet


def test_the_overshoot_table_is_what_the_warning_computes():
    """getting-started.md's table of the steps below which a schedule overshoots."""
    from hflows_jax import recipe

    text = (GUIDES / "getting-started.md").read_text()
    rows = re.findall(r"\| (\d+) % \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", text)
    assert len(rows) == 3
    for target, *steps in rows:
        for lr, n in zip((1e-3, 3e-3, 1e-2, 3e-2), steps):
            fewer, enough = int(n) - 1, int(n) + 1
            assert recipe.overshoot_warning(int(target) / 100, lr, fewer) is not None or \
                recipe.unreachable_warning(int(target) / 100, lr, fewer) is not None
            assert recipe.overshoot_warning(int(target) / 100, lr, enough) is None


def test_every_guide_with_code_is_run_by_a_test():
    run_elsewhere = {"your-own-model.md", "nnx.md"}  # test_compact.py, test_nnx.py
    with_code = {p.name for p in GUIDES.glob("*.md") if python_blocks(p)}
    assert with_code == set(CONTEXT) | run_elsewhere


def test_results_name_where_they_came_from():
    """Result files written since provenance came in name their commit, command and
    data hash; the older ones are listed here, so that a new file without it fails."""
    import json

    older = {"compare_cifar10", "compare_cifar10_5k", "compare_cifar10_5k_quick",
             "compare_cifar10_5k_short", "compare_mnist", "compare_mnist_quick",
             "conv_speed_resnet20", "conv_speed_resnet20_x1", "conv_speed_vgg19",
             "evidence_cifar10_5k", "gradient_flow_cifar10_5k", "gradient_flow_mnist",
             "oneshot_mnist", "overhead", "pressure_law", "pressure_law_cifar10_5k",
             "structured", "structured_cifar10_resnet20", "structured_cifar10_resnet20_2seeds",
             "structured_cifar10_vgg19", "structured_cifar10_vgg19_2seeds",
             "channel_landing/channel_landing", "latency/latency",
             "latency_resnet20_folded/latency", "latency_resnet50/latency"}
    results = ROOT / "docs" / "results"
    for path in sorted(results.rglob("*.json")):
        name = str(path.relative_to(results).with_suffix(""))
        env = json.loads(path.read_text()).get("environment", {})
        if name in older:
            continue
        assert env.get("commit") and env.get("command") and "data" in env, name


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
