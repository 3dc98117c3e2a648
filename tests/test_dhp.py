"""DHP against hand computations and the plain model: the hypernetwork kernel, the conv
built on it, the proximal L1 step on latents, the latent channel masks, finalization to a
plain VGG (same logits, and through export a compact model), the search's FLOP stop and
its unmasked forward pass, DHP's reg and schedules, and a run that searches, then
fine-tunes the pruned plain VGG, and resumes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import hflows_jax as hf
from experiments import export as export_experiment
from hflows_jax import methods
from hflows_jax.methods import dhp as dhp_method
from hflows_jax.models import VGG
from hflows_jax.structured import channel_groups
from hflows_jax.structured.dhp import (DHPVGG, HyperConv, dhp, hyper_kernel, latent_masks,
                                       plain_variables, proximal_l1, to_dhp)
from hflows_jax.training import Config, TrainState, make_train_step, run
from hflows_jax.training.checkpoint import Checkpoints
from tests.helpers import interrupt_after_epoch, subset_npz

SMALL_VGG = dict(layers=(8, "M", 16, 16), num_classes=3)


def test_hyper_kernel_matches_the_formula_entry_by_entry():
    rng = np.random.default_rng(0)
    c_in, c_out, e, kh, kw = 3, 5, 8, 3, 2
    z_in, z_out = rng.normal(size=c_in), rng.normal(size=c_out)
    b0 = rng.normal(size=(c_in, c_out))
    w1, b1 = rng.normal(size=(c_in, c_out, e)), rng.normal(size=(c_in, c_out, e))
    w2, b2 = rng.normal(size=(c_in, c_out, kh * kw, e)), rng.normal(size=(c_in, c_out, kh * kw))
    got = np.asarray(hyper_kernel(*(jnp.asarray(a, jnp.float32) for a in
                                    (z_in, z_out, b0, w1, b1, w2, b2)), (kh, kw)))
    assert got.shape == (kh, kw, c_in, c_out)
    for i in range(c_in):
        for o in range(c_out):
            a = z_in[i] * z_out[o] + b0[i, o]
            b = a * w1[i, o] + b1[i, o]
            for t in range(kh * kw):
                want = sum(w2[i, o, t, j] * b[j] for j in range(e)) + b2[i, o, t]
                np.testing.assert_allclose(got[t // kw, t % kw, i, o], want, rtol=1e-4,
                                           atol=1e-4)


def test_hyper_conv_is_a_conv_with_the_generated_kernel_and_official_init():
    conv = HyperConv(features=6)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    z_in = jax.random.normal(jax.random.key(2), (4,))
    params = conv.init(jax.random.key(0), x, z_in)["params"]
    y, z_out = conv.apply({"params": params}, x, z_in)
    kernel = hyper_kernel(z_in, params["latent"], params["b0"], params["w1"], params["b1"],
                          params["w2"], params["b2"], (3, 3))
    want = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(z_out, params["latent"])
    assert params["latent"].shape == (6,) and params["w2"].shape == (4, 6, 9, 8)
    assert float(jnp.max(jnp.abs(params["w1"]))) <= math.sqrt(3)
    assert float(jnp.max(jnp.abs(params["w2"]))) <= math.sqrt(3 / (8 * 4 * 9))
    assert float(jnp.max(jnp.abs(params["w2"]))) > 0.5 * math.sqrt(3 / (8 * 4 * 9))
    # With the biases at 0 (init), a zero latent entry zeroes its channel's kernel: in the
    # outputs, and in the next layer's inputs through z_in.
    params["latent"] = params["latent"].at[2].set(0.0)
    y, _ = conv.apply({"params": params}, x, z_in.at[1].set(0.0))
    assert float(jnp.max(jnp.abs(y[..., 2]))) == 0.0
    kernel = hyper_kernel(z_in.at[1].set(0.0), params["latent"], params["b0"], params["w1"],
                          params["b1"], params["w2"], params["b2"], (3, 3))
    assert float(jnp.max(jnp.abs(kernel[:, :, 1, :]))) == 0.0


def test_proximal_step_shrinks_latents_after_the_weight_step():
    lr, reg = 0.1, 0.5
    params = {"conv": {"latent": jnp.array([1.0, -0.3, 0.02, 2.0, -1.5, 0.8]),
                       "w1": jnp.ones((2, 2))},
              "few": {"latent": jnp.array([1.0, 0.001, 0.002, 1.0, 0.003, 1.0])}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
    tx = optax.chain(optax.sgd(lr), proximal_l1(lr, reg=reg, threshold=5e-3, min_channels=4))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    v = params["conv"]["latent"] - lr * 0.2
    want = np.sign(v) * np.maximum(np.abs(v) - reg * lr, 0.0)
    np.testing.assert_allclose(new["conv"]["latent"], want, rtol=1e-6, atol=1e-7)
    assert float(new["conv"]["latent"][2]) == 0.0  # driven exactly to zero
    np.testing.assert_allclose(new["conv"]["w1"], params["conv"]["w1"] - lr * 0.2)
    # Only 3 entries above the threshold (<= min_channels): the plain step, no shrink.
    np.testing.assert_allclose(new["few"]["latent"], params["few"]["latent"] - lr * 0.2,
                               rtol=1e-6)


def test_latent_masks_keep_at_least_min_channels():
    params = {"a": {"latent": jnp.array([0.5, 0.001, -0.2, 0.0, 0.004, 0.3, -0.01]),
                    "w1": jnp.ones(3)},
              "b": {"latent": jnp.array([0.001, 0.0, -0.002, 0.003, 0.0005])}}
    masks = latent_masks(params, threshold=5e-3, min_channels=4)
    np.testing.assert_array_equal(masks["a"]["latent"],
                                  [True, False, True, False, False, True, True])
    assert masks["a"]["w1"] is None
    # Every entry below the threshold: the 4 largest |z| stay.
    np.testing.assert_array_equal(masks["b"]["latent"], [True, False, True, True, True])


def _perturbed(tree, seed, scale):
    """Every leaf moved by noise: biases that are not 0, so a zero latent alone does not
    zero its kernel, and BatchNorm statistics that are not the init's."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jnp.abs(jax.random.normal(k, x.shape))
                                        for k, x in zip(keys, leaves)])


@pytest.mark.slow
def test_plain_vgg_is_the_hypernetwork_model_with_the_zeroed_channels_cut_and_exports():
    model = DHPVGG(**SMALL_VGG)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    params = _perturbed(variables["params"], 2, 0.1)
    stats = _perturbed(variables["batch_stats"], 3, 0.5)
    # No latent at 0: the plain VGG computes what the hypernetwork model does.
    plain, full_params, full_stats = plain_variables(model, params, stats)
    assert isinstance(plain, VGG) and set(full_params) == {
        "Conv_0", "Conv_1", "Conv_2", "BatchNorm_0", "BatchNorm_1", "BatchNorm_2", "Dense_0"}
    assert full_params["Conv_1"]["kernel"].shape == (3, 3, 8, 16)
    np.testing.assert_allclose(
        plain.apply({"params": full_params, "batch_stats": full_stats}, x),
        model.apply({"params": params, "batch_stats": stats}, x), rtol=1e-4, atol=1e-5)

    # Channels 1 and 5 of the first conv and 0 of the last not kept (the search's masks):
    # the hypernetwork model still runs them; the plain VGG cuts them, as DHP slices them
    # away: no layer reads them.
    kept = {"Conv_0": np.arange(8) % 4 != 1, "Conv_1": np.ones(16, bool),
            "Conv_2": np.arange(16) != 0}
    groups = channel_groups(plain, full_params, (16, 16, 3))
    masks = groups.expand(kept, full_params)
    want = plain.apply({"params": hf.multiply_masks(full_params, masks),
                        "batch_stats": full_stats}, x)
    _, plain_params, plain_stats = plain_variables(model, params, stats, kept, groups)
    got = plain.apply({"params": plain_params, "batch_stats": plain_stats}, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    hyper = model.apply({"params": params, "batch_stats": stats}, x)
    assert float(jnp.max(jnp.abs(hyper - want))) > 1e-3  # the cut channels mattered

    compact = hf.export(lambda p, x: plain.apply({"params": p, "batch_stats": plain_stats}, x),
                        plain_params, groups.expand(kept, plain_params), x)
    assert compact.macs == float(groups.macs(kept)) < groups.dense_macs
    np.testing.assert_allclose(compact(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dhp_resnet_shares_a_latent_per_stage_and_cuts_to_the_plain_resnet():
    """DHP's ResNet (``resnet_dhp_share.py``): the stem, every block's second conv and the
    projection write their stage's stream from one latent; each block's first conv has
    its own; the last stage's is never pruned. Its plain ResNet computes what it does,
    and cut by the search's masks exports to a compact model."""
    plain_model = hf.models.ResNet(stage_sizes=(2, 1), block_cls=hf.models.resnet.ResNetBlock,
                                   num_filters=4, num_classes=3, zero_init_residual=False)
    model = to_dhp(plain_model)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    params = _perturbed(variables["params"], 2, 0.1)
    stats = _perturbed(variables["batch_stats"], 3, 0.5)
    latents = sorted(path for path in _paths(params) if "latent" in path)
    assert latents == ["ResNetBlock_0/Conv_0/latent", "ResNetBlock_1/Conv_0/latent",
                       "ResNetBlock_2/Conv_0/latent", "ResNetBlock_2/Conv_1/latent_whole",
                       "conv_init/latent"]
    plain, plain_params, plain_stats = plain_variables(model, params, stats)
    assert isinstance(plain, hf.models.ResNet) and type(plain) is not type(model)
    assert {p: v.shape for p, v in _paths(plain_params).items()} == {
        p: v.shape for p, v in _paths(plain_model.init(jax.random.key(0), x)["params"]).items()}
    hyper = model.apply({"params": params, "batch_stats": stats}, x)
    np.testing.assert_allclose(plain.apply({"params": plain_params, "batch_stats": plain_stats},
                                           x), hyper, rtol=1e-4, atol=1e-5)
    # Block 1's second conv writes stage 1's stream from the stem's latent; the stage-2
    # projection reads it and writes stage 2's from block 2's second conv's.
    block, z_stage = params["ResNetBlock_1"], params["conv_init"]["latent"]
    second = hyper_kernel(block["Conv_0"]["latent"], z_stage,
                          *(block["Conv_1"][k] for k in ("b0", "w1", "b1", "w2", "b2")), (3, 3))
    np.testing.assert_allclose(plain_params["ResNetBlock_1"]["Conv_1"]["kernel"], second,
                               rtol=1e-6)
    proj = params["ResNetBlock_2"]["conv_proj"]
    np.testing.assert_allclose(
        plain_params["ResNetBlock_2"]["conv_proj"]["kernel"],
        hyper_kernel(z_stage, params["ResNetBlock_2"]["Conv_1"]["latent_whole"],
                     *(proj[k] for k in ("b0", "w1", "b1", "w2", "b2")), (1, 1)), rtol=1e-6)

    groups = channel_groups(plain, plain_params, (8, 8, 3))
    search = dhp(groups, 0.5, 0.1).init(params)
    stream = groups.writes["conv_init"][0]
    assert set(search.kept) == set(groups.sizes)
    last = groups.writes["ResNetBlock_2/Conv_1"][0]  # kept whole, no latent of its own
    assert search.masks["ResNetBlock_2"]["Conv_1"]["latent_whole"] is None
    kept = {**search.kept, stream: np.arange(4) != 2,
            groups.writes["ResNetBlock_0/Conv_0"][0]: np.arange(4) != 0}
    assert bool(jnp.all(kept[last]))
    _, cut, _ = plain_variables(model, params, stats, kept, groups)
    compact = hf.export(lambda p, x: plain.apply({"params": p, "batch_stats": plain_stats}, x),
                        cut, groups.expand(kept, cut), x)
    assert compact.macs == float(groups.macs(kept)) < groups.dense_macs
    np.testing.assert_allclose(
        compact(x), plain.apply({"params": cut, "batch_stats": plain_stats}, x), rtol=1e-4,
        atol=1e-5)


def _paths(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree.leaves_with_path(tree)}


def test_dhp_search_stops_at_its_flops_target_and_then_freezes():
    model = to_dhp(VGG(**SMALL_VGG))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1])
    params, stats = variables["params"], variables["batch_stats"]
    plain, plain_params, _ = plain_variables(model, params, stats)
    groups = channel_groups(plain, plain_params, (8, 8, 3))
    target = 0.5
    tx = optax.chain(optax.sgd(0.05), dhp(groups, target, 0.05, reg=0.2))

    def loss(p, stats):
        logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    @jax.jit
    def step(p, s, stats):  # unmasked, as DHP searches
        grads, new = jax.grad(loss, has_aux=True)(p, stats)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, new["batch_stats"]

    state = tx.init(params)
    for _ in range(400):
        params, state, stats = step(params, state, stats)
        if bool(state[1].stopped):
            break
    search = state[1]
    assert bool(search.stopped), "the search never reached its target"
    kept_fraction = float(hf.structured.flops_fraction(groups, state))
    assert 1 - target - 0.05 <= kept_fraction <= 1 - target
    for g, k in search.kept.items():  # the minimum-channel rule
        assert int(np.sum(k)) >= 4, g
    # Stopped: 20 more steps change neither the masks nor, by a proximal step, the latents.
    frozen = search
    for _ in range(20):
        params, state, stats = step(params, state, stats)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), frozen.kept,
                                     state[1].kept))
    assert float(hf.structured.flops_fraction(groups, state)) == kept_fraction
    # The finalized latents are exactly the pruned channels: what plain_variables cuts.
    final = hf.finalize(params, state)
    for i in range(3):
        on = np.asarray(final[f"HyperConv_{i}"]["latent"]) != 0
        np.testing.assert_array_equal(on, state[1].kept[f"Conv_{i}"])


@pytest.mark.slow
def test_the_search_runs_unmasked_so_a_latent_at_zero_comes_back():
    """DHP's search trains on the latents as they are (``DHP.masked`` is False): a latent
    entry the proximal step drove to 0, below the threshold, so masked as pruned, still
    gets its gradient and leaves 0 when that outweighs the shrink, as in the official
    code, where the masked variant was dropped."""
    model = DHPVGG(**SMALL_VGG)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    variables = model.init(jax.random.key(0), x[:1])
    params = _perturbed(variables["params"], 2, 0.1)
    params["HyperConv_0"]["latent"] = params["HyperConv_0"]["latent"].at[1].set(0.0)
    plain, plain_params, _ = plain_variables(model, params, variables["batch_stats"])
    lr, reg = 0.1, 1e-4
    tx = optax.chain(optax.sgd(lr), dhp(channel_groups(plain, plain_params, (8, 8, 3)), 0.9,
                                        lr, reg=reg))
    state = TrainState(jnp.zeros((), jnp.int32), params, variables["batch_stats"],
                       tx.init(params))
    assert not bool(hf.channel_masks(state.opt_state)["Conv_0"][1])  # at 0: pruned
    step = jax.jit(make_train_step(model, tx, masked=methods.get("dhp").masked,
                                   axis_name=None))
    new, _ = step(state, x, y)

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": state.batch_stats}, x,
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(
            jax.nn.one_hot(y, 3), 0.0)).mean()

    g = float(jax.grad(loss)(params)["HyperConv_0"]["latent"][1])  # at the unmasked params
    assert abs(g) > reg
    came_back = float(new.params["HyperConv_0"]["latent"][1])
    assert came_back == pytest.approx(-np.sign(g) * lr * (abs(g) - reg), rel=1e-4)


def test_dhp_reg_is_officials_per_epoch_and_its_schedules_are_its_multistep():
    # 1e-4 a step at 782 steps an epoch (CIFAR-10, batch 64): the same shrink an epoch.
    assert dhp_method.epoch_reg(782) == pytest.approx(1e-4)
    assert dhp_method.epoch_reg(79) == pytest.approx(1e-4 * 782 / 79)
    assert methods.get("dhp").reg(79, 30 * 79) == pytest.approx(1e-4 * 782 / 79)  # by hand
    # DHP's ResNet scripts set their own: dhp_resnet20.sh 2e-4, dhp_resnet56.sh 3e-4.
    assert methods.get("dhp").reg(79, 30 * 79, "resnet20") == pytest.approx(2e-4 * 782 / 79)
    assert dhp_method.epoch_reg(782, "resnet56") == pytest.approx(3e-4)
    # One epoch of proximal steps without gradient: 0.1 * 1e-4 * 782 off every latent.
    latent = {"latent": jnp.linspace(0.5, 2.0, 8)}
    prox = proximal_l1(dhp_method.search_lr(79), reg=dhp_method.epoch_reg(79))
    state = prox.init(latent)
    for _ in range(79):
        updates, state = prox.update(jax.tree.map(jnp.zeros_like, latent), state, latent)
        latent = optax.apply_updates(latent, updates)
    np.testing.assert_allclose(latent["latent"], jnp.linspace(0.5, 2.0, 8) - 0.1 * 1e-4 * 782,
                               rtol=1e-5)
    # The search: lr 0.1, times 0.1 after 50 epochs; the fine-tune: 0.1, times 0.1 at half
    # and at three quarters of its steps (DHP's 150 and 225 of 300 epochs).
    search = dhp_method.search_lr(79)
    assert [float(search(s)) for s in (0, 50 * 79 - 1, 50 * 79)] == pytest.approx(
        [0.1, 0.1, 0.01])
    fine_tune = dhp_method.fine_tune_lr(20)
    assert [float(fine_tune(s)) for s in (0, 9, 10, 14, 15, 19)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # The earlier rule, as dhp_reach: the reg that shrinks a latent by 1 over the search.
    assert dhp_method.reaching_reg(79, 3 * 79, 1.0) == pytest.approx(1 / (0.1 * 3 * 79))
    assert methods.get("dhp_reach").reg(79, 3 * 79) == pytest.approx(1 / (0.1 * 3 * 79))
    # At DHP's strength, 30 epochs shrink a latent by 30 * 0.0078 = 0.23: about 19 % of
    # N(0, 1) latents, short of the 29 % of every layer that halves its FLOPs.
    cfg = Config().replace(method="dhp", target_sparsity=0.5, pruning_epochs=30)
    short = [w for w in methods.get("dhp").start_warnings(cfg, 79) if "short of it" in w]
    assert len(short) == 1 and "about 0.235 in 30 pruning epochs" in short[0]
    assert "cuts about 19% of the channels, where the target needs about 29%" in short[0]
    assert not any("short of it" in w for w in methods.get("dhp").start_warnings(
        cfg.replace(pruning_epochs=60), 79))  # 0.47: 36 %


@pytest.mark.slow
def test_a_dhp_run_searches_then_fine_tunes_the_plain_pruned_vgg_and_resumes(
        cifar_npz, tmp_path, monkeypatch):
    """One search epoch (``dhp_reach``: the reg that lets it stop at the target),
    then two fine-tune epochs of the plain VGG with the search's channels fixed; a run
    interrupted in the fine-tune resumes from it to the same end."""
    small = subset_npz(cifar_npz, tmp_path / "small.npz", train=64, test=32)
    cfg = Config().replace(model="vgg19", width=0.0625, dataset=small,
                           method="dhp_reach", target_sparsity=0.5, batch_size=16, dense_epochs=0,
                           pruning_epochs=1, regrowth_epochs=2, augment=False, bn_batches=2)
    whole = run(cfg.replace(workdir=str(tmp_path / "whole")))
    assert [r["phase"] for r in whole["history"]] == ["pruning", "finetune", "finetune"]
    assert [r["lr"] for r in whole["history"]] == pytest.approx([0.1, 0.01, 0.001])

    opened, epoch, state = export_experiment.restore_last(cfg.replace(
        workdir=str(tmp_path / "whole")))
    plain = hf.models.create("vgg19", 10, width=0.0625)
    plain_params = plain.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert epoch == 3 and set(state.params) == set(plain_params)
    # The fine-tune's channels are the search's, and what the report counts.
    search = Checkpoints(str(tmp_path / "whole" / "checkpoints" / "pruning"))
    searched, _ = search.restore(1, opened.template("pruning"))
    search.close()
    kept = hf.channel_masks(state.opt_state)
    jax.tree.map(np.testing.assert_array_equal, kept, hf.channel_masks(searched.opt_state))
    groups = channel_groups(plain, state.params, (32, 32, 3))
    assert whole["target_removed"] == pytest.approx(1 - float(groups.flops_fraction(kept)),
                                                    abs=1e-6)
    assert whole["target_removed"] >= 0.5  # the stop
    # Its masked rows never moved from the zeros plain_variables gave them.
    jax.tree.map(np.testing.assert_array_equal, hf.finalize(state.params, state.opt_state),
                 state.params)

    resume = interrupt_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match=r"after epoch 2 of 3 .*checkpoints/finetune"):
        run(cfg.replace(workdir=str(tmp_path / "resumed")))
    resume()
    resumed = run(cfg.replace(workdir=str(tmp_path / "resumed")))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert resumed["target_removed"] == whole["target_removed"]
    assert resumed["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-6)


def test_dhp_errors():
    with np.testing.assert_raises_regex(ValueError, "basic-block ResNets"):
        to_dhp(hf.models.create("resnet50", 10))
    model = DHPVGG(**SMALL_VGG)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    plain, plain_params, _ = plain_variables(model, variables["params"],
                                             variables["batch_stats"])
    groups = channel_groups(plain, plain_params, (8, 8, 3))
    with np.testing.assert_raises_regex(ValueError, "target"):
        dhp(groups, 1.5, 0.1)
    with np.testing.assert_raises_regex(ValueError, "no latent"):
        dhp(groups, 0.5, 0.1).init(plain_params)
