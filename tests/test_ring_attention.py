"""Ring attention over the seq axis against dense causal attention (8 simulated CPU devices)."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax import sharding
from phi4_jax.attention import attend, causal_mask
from phi4_jax.ring_attention import ring_attend, unzigzag, zigzag

from conftest import greedy_run

PAD_POSITION = 10**6  # padding sits after every real token: no real query sees it


def ring_vs_dense(n, length, heads, kv_heads, window, batch=2, head_dim=16, seed=0, q_chunk=2048):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, length, head_dim)).astype(np.float32) for _ in range(2))
    positions = np.broadcast_to(np.arange(length), (batch, length))
    dense = attend(q, k, v, causal_mask(positions, positions, window))
    pad = -length % (2 * n)  # zig-zag needs 2n equal chunks
    padded = np.concatenate([positions, np.broadcast_to(PAD_POSITION + np.arange(pad), (batch, pad))], 1)
    mesh = sharding.make_mesh(f"seq={n}", jax.devices()[:n])
    seq_axis = lambda x, axis: zigzag(jnp.asarray(np.pad(x, [(0, pad) if a == axis else (0, 0)  # noqa: E731
                                                            for a in range(x.ndim)])), n, axis)
    out = ring_attend(mesh, seq_axis(q, 1), seq_axis(k, 2), seq_axis(v, 2), zigzag(jnp.asarray(padded), n, 1),
                      zigzag(jnp.asarray(padded), n, 1), window, q_chunk)
    return np.asarray(unzigzag(out, n, 1)[:, :length]), np.asarray(dense)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 2)])  # GQA 4:1 and 3:1
@pytest.mark.parametrize("length", [64, 50])  # a multiple of 2n chunks, and not (padded)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_equals_dense_causal_attention(n, length, heads, kv_heads, window):
    ring, dense = ring_vs_dense(n, length, heads, kv_heads, window)
    assert ring.shape == dense.shape == (2, length, heads, 16) and ring.dtype == np.float32
    np.testing.assert_allclose(ring, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, q_chunk", [(2, 4), (4, 2)])
def test_queries_folded_in_pieces_give_the_same(n, q_chunk):
    ring, dense = ring_vs_dense(n, 64, 8, 2, 7, q_chunk=q_chunk)
    np.testing.assert_allclose(ring, dense, rtol=0, atol=1e-5)


def test_zigzag_gives_device_i_chunks_i_and_mirror():
    n = 4
    x = jnp.arange(16)  # 2n = 8 chunks of 2
    blocks = np.asarray(zigzag(x, n, 0)).reshape(n, 4)
    for i, block in enumerate(blocks):
        assert block.tolist() == [2 * i, 2 * i + 1, 2 * (7 - i), 2 * (7 - i) + 1]
    np.testing.assert_array_equal(unzigzag(zigzag(x, n, 0), n, 0), x)


def test_zigzag_balances_causal_work():
    """Visible (query, key) pairs per device: equal under zig-zag; 2n-1 : 1 in contiguous blocks."""
    n, length = 4, 64
    positions = np.arange(length)
    pairs = lambda block: int((block[:, None] >= positions[None]).sum())  # noqa: E731
    balanced = [pairs(b) for b in np.asarray(zigzag(jnp.asarray(positions), n, 0)).reshape(n, -1)]
    contiguous = [pairs(b) for b in positions.reshape(n, -1)]
    assert len(set(balanced)) == 1
    assert max(contiguous) > 5 * min(contiguous)


def test_next_block_is_sent_before_this_blocks_dot_products():
    """In the ring step (the scan body), `ppermute` precedes the block's `dot_general`s, so the
    transfer can overlap the compute (XLA:CPU itself has no asynchronous collectives)."""
    n, batch, length, heads, kv_heads, head_dim = 4, 1, 32, 4, 2, 8
    mesh = sharding.make_mesh(f"seq={n}", jax.devices()[:n])
    q = jnp.zeros((batch, length, heads, head_dim))
    kv = jnp.zeros((batch, kv_heads, length, head_dim))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    jaxpr = jax.make_jaxpr(lambda *a: ring_attend(mesh, *a))(q, kv, kv, positions, positions)

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                yield eqn.params["jaxpr"].jaxpr
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from scans(sub)

    [body] = list(scans(jaxpr.jaxpr))
    names = [eqn.primitive.name for eqn in body.eqns]
    assert "ppermute" in names and names.count("dot_general") == 2
    assert names.index("ppermute") < names.index("dot_general"), names


@pytest.mark.parametrize("spec", ["seq=4", "tensor=2,seq=4"])
def test_model_with_ring_attention_gives_the_one_device_logits(tiny_checkpoint, spec):
    """Tiny Phi-4-mini (LongRoPE threshold 16): a 40-token prompt split over seq=4, zig-zagged,
    also composed with tensor parallelism; logits equal the single-device run's."""
    import phi4_jax
    from flax import nnx

    folder, _ = tiny_checkpoint("phi-4-mini")
    ids = np.random.default_rng(3).integers(3, 256, (2, 40))
    want = np.asarray(phi4_jax.load(folder, dtype="float32", progress=False)[0](ids))
    n_devices = int(np.prod(list(sharding.parse_mesh(spec).values())))
    mesh = sharding.make_mesh(spec, jax.devices()[:n_devices])
    model, _ = phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)
    n = mesh.shape["seq"]
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    logits = phi4_jax.forward(*nnx.split(model), zigzag(jnp.asarray(ids), n, 1), zigzag(positions, n, 1), ring=mesh)
    got = np.asarray(unzigzag(logits, n, 1))
    assert got.shape == (2, 40, 256)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["seq=4", "tensor=2,seq=4"])
def test_engine_prefills_with_the_ring_and_decodes_the_one_device_tokens(tiny_checkpoint, monkeypatch, spec):
    """A seq mesh: fresh prompts are prefilled with ring attention (here a 20-token prompt past
    the LongRoPE threshold of 16, in a batch), the KV cache is split over seq, and greedy decoding
    (crossing the threshold too) gives the single-device tokens."""
    import phi4_jax
    from phi4_jax import model as model_module
    from phi4_jax.engine import Engine
    folder, _ = tiny_checkpoint("phi-4-mini")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 20, 3)]
    greedy = functools.partial(greedy_run, prompts=prompts)

    want, _ = greedy(Engine(phi4_jax.load(folder, dtype="float32", progress=False)[0]))
    calls = []
    traced = model_module.ring_attend
    monkeypatch.setattr(model_module, "ring_attend", lambda *a, **k: calls.append(1) or traced(*a, **k))
    n_devices = int(np.prod(list(sharding.parse_mesh(spec).values())))
    mesh = sharding.make_mesh(spec, jax.devices()[:n_devices])
    got, gen = greedy(Engine(phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)[0]))
    assert calls  # the prefill went through the ring
    assert got == want
    assert gen.state.cache.keys[0].sharding.spec[2] == "seq"
