"""Training: the loss and its gradients against transformers, the optimizer step, data parallelism."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

import phi4_jax
from phi4_jax.parallel import mesh as meshes
from phi4_jax.train import Trainer, TrainConfig, loss
from phi4_jax.checkpoints.hf import hf_tensors, param_key, split_hf_tensor

SHAPE = "phi-4-mini"  # partial rotary, LongRoPE, GQA, tied embeddings: the demo model's architecture
# One optimizer setting and one batch shape for every trainer below, so that they run the same compiled
# step. Clipping at 0.5 acts on the tiny model's first gradients (norm > 0.5: checked below).
CONFIG = TrainConfig(learning_rate=1e-2, warmup_steps=10, total_steps=100, clip_norm=0.5, weight_decay=0.1)


def batch(seed=0, rows=4, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 256, (rows, length)).astype(np.int32)
    weights = (rng.random((rows, length)) < 0.6).astype(np.float32)  # the positions that count
    return ids, weights


@pytest.fixture(scope="module")
def first_gradients(tiny_model):
    """(model config, loss, gradients as a pure dict of NumPy arrays) of the freshly loaded model on
    `batch()`, from one jitted program."""
    model = tiny_model(SHAPE)[0]  # (only read: a Trainer gets a model of its own, as it donates its arrays)
    ids, weights = batch()
    graphdef, params = nnx.split(model)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), ids, weights)))(params)
    return model.config, float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def test_loss_and_gradients_equal_transformers(tiny_checkpoint, first_gradients):
    _, hf = tiny_checkpoint(SHAPE)
    config, got, grads = first_gradients
    ids, weights = batch()
    labels = torch.tensor(np.where(weights > 0, ids, -100), dtype=torch.long)
    hf.zero_grad()
    want = hf(torch.tensor(ids, dtype=torch.long), labels=labels).loss
    want.backward()
    assert got == pytest.approx(want.item(), abs=1e-5)
    ours = traverse_util.flatten_dict(grads)
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    checked = 0
    for name, (_, targets) in hf_tensors(config).items():
        for path, want_grad in split_hf_tensor(hf_grads[name], targets).items():
            np.testing.assert_allclose(np.asarray(ours[param_key(path)]), want_grad, rtol=1e-4,
                                       atol=1e-4 * np.abs(want_grad).max(), err_msg=path)
            checked += 1
    assert checked == len(ours)


def test_step_follows_adamw_with_warmup_and_clipping(tiny_checkpoint, first_gradients):
    """One step from fresh moments: AdamW's first update is -lr * (sign-like g/|g| + wd * p), with
    g clipped to `clip_norm` first; lr is the warmup's first nonzero value."""
    folder, _ = tiny_checkpoint(SHAPE)
    model = phi4_jax.load(folder, dtype="float32", progress=False)[0]
    assert (CONFIG.learning_rate, CONFIG.warmup_steps, CONFIG.clip_norm, CONFIG.weight_decay) == (1e-2, 10, 0.5, 0.1)
    trainer = Trainer(model, CONFIG)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params))
    ids, weights = batch()
    _, _, grads = first_gradients  # of these very parameters, on this batch
    norm = float(optax_global_norm(grads))
    assert norm > 0.5  # so the clipping acts
    trainer.step(ids, weights)  # warmup step 0: learning rate 0, no update
    after0 = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params))
    jax.tree.map(np.testing.assert_array_equal, after0, before)
    trainer.step(ids, weights)  # step 1: lr = 1e-2 / 10
    after1 = traverse_util.flatten_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params)))
    flat_before = traverse_util.flatten_dict(before)
    g = traverse_util.flatten_dict(jax.tree.map(lambda x: x * 0.5 / norm, grads))
    lr, eps = 1e-3, 1e-8
    checked = total = 0
    for key, p in flat_before.items():
        # Moments after two steps with the same gradient (step 0 updated them too, at lr 0).
        m = (1 - 0.9**2) * g[key] / (1 - 0.9**2)
        v = (1 - 0.98**2) * g[key] ** 2 / (1 - 0.98**2)
        want = p - lr * (m / (np.sqrt(v) + eps) + 0.1 * p)
        # Where |g| is at float noise, g / |g| is any sign: compare the rest.
        clear = np.abs(g[key]) > 1e-4
        np.testing.assert_allclose(after1[key][clear], want[clear], rtol=1e-5, atol=2e-7, err_msg=str(key))
        checked += clear.sum()
        total += clear.size
    assert checked > 0.2 * total


def optax_global_norm(tree):
    import optax

    return optax.global_norm(tree)


@pytest.mark.slow  # the AdamW step against its formulas is the quick test
def test_training_lowers_the_loss(tiny_checkpoint):
    folder, _ = tiny_checkpoint(SHAPE)
    trainer = Trainer(phi4_jax.load(folder, dtype="float32", progress=False)[0], CONFIG)
    ids, weights = batch()
    losses = [trainer.step(ids, weights) for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.slow  # a Trainer on a mesh of 8 devices beside one on one device
def test_data_parallel_training_matches_one_device(tiny_checkpoint):
    """Three steps on data=2 x fsdp=2 x tensor=2 (the batch's 4 rows one per data x fsdp device)."""
    folder, _ = tiny_checkpoint(SHAPE)
    one = Trainer(phi4_jax.load(folder, dtype="float32", progress=False)[0], CONFIG)
    mesh = meshes.make_mesh("data=2,fsdp=2,tensor=2")
    many = Trainer(phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)[0], CONFIG, mesh=mesh)
    for seed in range(3):
        ids, weights = batch(seed)
        assert many.step(ids, weights) == pytest.approx(one.step(ids, weights), abs=1e-5)
    # The moments stay laid out like the parameters (fsdp x tensor), not replicated.
    assert meshes.device_bytes(many.opt_state) < meshes.device_bytes(one.opt_state) / 3
    got = traverse_util.flatten_dict(nnx.to_pure_dict(many.params))
    for key, want in traverse_util.flatten_dict(nnx.to_pure_dict(one.params)).items():
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), rtol=0, atol=2e-5, err_msg=str(key))
