"""Config, presets and the command line: flat flags, one place of checks, explicit flags win."""

import dataclasses
import re
import subprocess
import sys

import pytest

from hflows_jax import methods, models
from hflows_jax.training import Config, cli, presets
from hflows_jax.training.config import FLAGS, GROUPS


def test_every_field_is_one_flag_and_replace_round_trips():
    cfg = Config()
    fields = sum(len(dataclasses.fields(cls)) for cls in GROUPS.values())
    assert len(FLAGS) == fields == len(cfg.flags())
    assert {"model", "method", "dataset", "target_sparsity", "workdir"} <= set(FLAGS)
    changed = cfg.replace(model="resnet20", batch_size=64, method="rigl", seed=3)
    assert (changed.model.name, changed.data.batch_size, changed.method.name,
            changed.run.seed) == ("resnet20", 64, "rigl", 3)
    assert changed.model.width == cfg.model.width  # untouched fields stay
    assert Config().replace(**changed.flags()) == changed
    with pytest.raises(ValueError, match=r"Unknown config fields \['modle'\]"):
        cfg.replace(modle="vgg19")


def test_the_config_module_needs_no_jax():
    code = ("import sys, importlib.util, pathlib; "
            "spec = importlib.util.spec_from_file_location('config', "
            "'hflows_jax/training/config.py'); m = importlib.util.module_from_spec(spec); "
            "sys.modules['config'] = m; spec.loader.exec_module(m); "
            "m.Config().replace(seed=1); assert 'jax' not in sys.modules, 'jax imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("flags, message", [
    (dict(target_sparsity=0.0), r"--target_sparsity must lie in \(0, 1\)"),
    (dict(target_sparsity=1.0), r"--target_sparsity must lie in \(0, 1\)"),
    (dict(model="alexnet"), "Unknown model 'alexnet'"),
    (dict(method="obd"), "Unknown method 'obd'"),
    (dict(dtype="float16"), "--dtype must be one of"),
    (dict(batch_size=0), r"^--batch_size must be >= 1, got 0\.$"),
    (dict(log_every=-1), r"^--log_every must be >= 1, got -1\.$"),
    (dict(pruning_epochs=0), "--pruning_epochs >= 1"),
    (dict(dense_only=True, dense_epochs=0), "--dense_only"),
    (dict(method="random", distribution="global"), "does not apply to random"),
    (dict(method="magnitude", distribution="2:4"), "does not apply to magnitude"),
    (dict(method="snip", distribution="2:4"), r"pass --target_sparsity=0\.5"),
    (dict(measure="grasp"), r"--measure applies to --method=\['importance'\], not hyperflows"),
    (dict(method="importance", rounds=0), "--rounds must be >= 1"),
    (dict(method="importance", distribution="2:4", target_sparsity=0.5, rounds=3),
     "prunes once: drop --rounds=3"),
    (dict(method="importance", measure="taylor"), "Unknown importance measure 'taylor'"),
    (dict(regrowth_allowance=-0.1), "--regrowth_allowance"),
    (dict(controller="bang_bang"), "--controller must be one of"),
    (dict(kernel_init="orthogonal"), "--kernel_init must be one of"),
    (dict(parallel="vmap"), "--parallel must be one of"),
    (dict(coordinator_address="127.0.0.1:1234"), "go together"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id must lie"),
])
def test_validate_names_the_bad_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        Config().replace(**flags).validate()


def test_presets_are_complete_valid_configs():
    assert {"cifar", "cifar_flax", "mnist", "compare_mnist", "compare_mnist_quick",
            "compare_cifar10_5k", "compare_cifar10_5k_quick", "compare_cifar10_5k_short",
            "compare_cifar10_5k_short_quick"} <= set(presets.PRESETS)
    for name, cfg in presets.PRESETS.items():
        assert isinstance(cfg, Config) and cfg.validate() is cfg, name
        assert cfg.model.name in models.MODELS and cfg.method.name in methods.REGISTRY
    reference = {"kernel_init": "he_uniform", "train_bn_scale": False,
                 "zero_init_residual": False}
    for name in ("cifar", "compare_cifar10_5k"):  # the reference's model choices
        assert {k: presets.get(name).flags()[k] for k in reference} == reference, name
    assert presets.get("cifar_flax").model.kernel_init == "lecun_normal"
    assert presets.get("mnist").model.kernel_init == "lecun_normal"  # MNIST unchanged
    quick = presets.get("compare_cifar10_5k_quick")
    assert (quick.model.name, quick.schedule.pruning_epochs) == ("lenet5", 3)
    with pytest.raises(ValueError, match="Unknown preset"):
        presets.get("imagenet")


def test_cli_starts_from_a_preset_and_explicit_flags_win():
    cfg = cli.parse(presets.CIFAR, "prog", "doc", ["--preset=mnist", "--seed=4",
                                                    "--augment=true"])
    assert cfg.model.name == "lenet300" and cfg.schedule.pruning_epochs == 40
    assert cfg.run.seed == 4 and cfg.data.augment is True
    plain = cli.parse(presets.CIFAR, "prog", "doc", ["--width=0.5", "--dense_only"])
    assert plain.model.name == "vgg19" and plain.model.width == 0.5
    assert plain.schedule.dense_only is True
    with pytest.raises(ValueError, match="Unknown model 'alexnet'"):
        cli.parse(presets.CIFAR, "prog", "doc", ["--model=alexnet"])


def test_help_gives_every_flag_a_line_and_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = cli.parser(presets.MNIST, "prog", "doc").format_help()
    entries = re.split(r"\n  (?=--)", text[text.index("options:"):])[1:]  # one per flag
    helps = {}
    for entry in entries:  # "--flag METAVAR help text (default: value)", lines joined
        flag, _, help, default = re.fullmatch(r"(\S+) (\S+) (.+) \(default: (.*)\)",
                                              " ".join(entry.split())).groups()
        helps[flag] = (help, default)
    assert set(helps) == {"--preset"} | {f"--{flag}" for flag in FLAGS}
    for flag, value in presets.MNIST.flags().items():
        shown = "unset" if value is None else str(value).lower() if isinstance(
            value, bool) else str(value)
        assert helps[f"--{flag}"][1] == shown, flag
        assert len(helps[f"--{flag}"][0]) >= 10, flag
    assert helps["--dataset"][1] == "mnist" and helps["--augment"][1] == "false"


@pytest.mark.slow
def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.cifar", "--model=alexnet",
                             f"--workdir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "error: Unknown model 'alexnet'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_shared_data_skips_instead_of_failing():
    from tests import conftest

    with pytest.raises(pytest.skip.Exception, match="no_such_file.npz is missing"):
        conftest.shared_file("no_such_file.npz")
