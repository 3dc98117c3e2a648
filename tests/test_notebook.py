"""notebooks/hyperflows_colab.ipynb runs end to end on CPU in its TINY preset.

The notebook is executed with nbclient in a fresh ipykernel of this very Python
(``sys.executable``, through a kernelspec written to a temporary JUPYTER_PATH), from the
notebook's own directory as Jupyter would. TINY is turned on through the environment
variable the notebook documents, ``HFLOWS_NOTEBOOK_TINY=1``; the report cell prints its
report as JSON, which the test reads back.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import host_devices_xla_flags

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "hyperflows_colab.ipynb"
KERNEL = "hflows_notebook_test"


def cell(nb, tag):
    found = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged {tag!r}"
    return found[0]


def stdout(c) -> str:
    return "".join(o.get("text", "") for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def has_image(c) -> bool:
    return any("image/png" in o.get("data", {}) for o in c.outputs)


def test_stored_without_outputs_and_with_full_defaults():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, c.source[:60]
    settings = cell(nb, "settings").source
    assert "TINY = False" in settings and "RUN_FULL_RECIPE = False" in settings
    assert 'REPO_URL = "' in cell(nb, "setup").source


@pytest.fixture(params=[1, 2], ids=["1device", "2devices"])
def kernel_of_this_python(request, tmp_path, monkeypatch):
    """A kernelspec that runs ipykernel in sys.executable, with TINY on and JAX on CPU
    with 1 or 2 host devices (Colab's TPU is one chip; the older TPU runtime had 8)."""
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} {host_devices_xla_flags(request.param)}".strip()
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hflows_jax notebook test",
        "language": "python",
        "env": {"HFLOWS_NOTEBOOK_TINY": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags,
                "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL, request.param


@pytest.mark.slow
def test_tiny_notebook_runs_and_prunes_to_target(kernel_of_this_python):
    kernel, n_devices = kernel_of_this_python
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=300,
                            startup_timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError if any cell fails

    assert "TINY=True" in stdout(cell(nb, "settings"))
    assert has_image(cell(nb, "train")), "the live plot drew nothing"
    assert has_image(cell(nb, "layers")), "the per-layer bar chart drew nothing"
    assert "Skipped" in stdout(cell(nb, "full-recipe"))

    report = json.loads(stdout(cell(nb, "report")))
    assert report["dataset"] == "synthetic"
    assert report["devices"] == f"{n_devices} x cpu"
    assert report["target_sparsity"] == 0.9
    assert abs(report["sparsity"] - 0.9) <= 0.02, report["sparsity"]
    assert report["test_accuracy"] >= 0.9, report["test_accuracy"]
    assert report["test_accuracy_finalized"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert set(report["layer_sparsity"]) == {"Dense_0/kernel", "Dense_1/kernel",
                                             "Dense_2/kernel"}
    prunable = 784 * 75 + 75 * 25 + 25 * 10  # LeNet-300-100 at width 0.25
    assert report["params_total"] == prunable + 75 + 25 + 10
    assert report["params_remaining"] == pytest.approx(
        report["params_total"] - report["sparsity"] * prunable, abs=1)
