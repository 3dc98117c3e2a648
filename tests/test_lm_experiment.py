"""experiments.lm: its text (the standard library, held out by file), its scanned GPT
through the library's public calls, and one tiny run end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hflows_jax as hf
from experiments import lm


def test_the_text_is_the_standard_librarys_held_out_by_file():
    train, train_files = lm.stdlib_text(lm.TRAIN[:3])
    valid, valid_files = lm.stdlib_text(lm.VALIDATION[:2])
    assert not set(train_files) & set(valid_files)
    want = b"".join(open(p, "rb").read() for p in train_files)
    assert bytes(train.astype(np.uint8)) == want
    with pytest.raises(FileNotFoundError, match="no_such_module"):
        lm.stdlib_text(("no_such_module",))


def test_windows_are_next_character_pairs():
    text = np.arange(1000, dtype=np.int32) % 256
    x, y = next(lm.windows(text, 16, 4, seed=0))
    assert x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(y[:, -1], (x[:, -1] + 1) % 256)


def test_the_scanned_gpt_is_causal_and_exports_exactly():
    model = lm.GPT(lm.Size(context=8, width=16, heads=4, layers=2))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 256)  # the future does not leak
    np.testing.assert_allclose(fn(params, changed)[:, :5], fn(params, tokens)[:, :5],
                               rtol=1e-6, atol=1e-6)
    masks = hf.prune(params, "wanda", sparsity=0.5, fn=fn, batches=[tokens],
                     distribution="per_output", is_prunable=lm.is_kernel)
    assert masks["blocks"]["ln1"]["scale"] is None and masks["embed"]["embedding"] is None
    up = np.asarray(masks["blocks"]["up"]["kernel"])  # (layers, in, out): per layer alike
    assert (up.sum(axis=1) == 8).all()
    compact = hf.export(fn, params, masks, tokens)
    want = fn(hf.multiply_masks(params, masks), tokens)
    np.testing.assert_allclose(compact(tokens), want, rtol=1e-4, atol=1e-4)


def test_target_sparsity_reads_both_spellings():
    assert lm.target_sparsity("90%") == pytest.approx(0.9)
    assert lm.target_sparsity("2:4") == pytest.approx(0.5)


@pytest.mark.slow
def test_a_tiny_run_writes_its_table(tmp_path):
    result = lm.main(["--quick", "--steps=4", "--prune_steps=4", "--regrowth_steps=2",
                      "--validation=8", f"--out={tmp_path}"])
    assert len(result["text"]["sha256"]) == 64  # the bytes read, hashed
    methods = [(r["method"], r["target"]) for r in result["rows"]]
    assert methods[0] == ("dense", "") and ("wanda", "2:4") in methods
    assert ("hyperflows", "90%") in methods
    for r in result["rows"]:
        assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1
    wanda = next(r for r in result["rows"] if r["method"] == "wanda" and r["target"] == "50%")
    assert abs(wanda["sparsity"] - 0.5) < 0.01
    text = (tmp_path / "lm.md").read_text()
    assert "missed" in text  # four pruning steps cannot reach 90 %: the table says so
    assert (tmp_path / "lm.png").stat().st_size > 0
