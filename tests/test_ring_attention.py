"""Ring attention over the seq axis against dense causal attention (8 simulated CPU devices)."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.parallel import mesh as meshes
from phi4_jax.model.attention import attend, causal_mask
from phi4_jax.model.ring import ring_attend, unzigzag, zigzag

from conftest import greedy_run

PAD_POSITION = 10**6  # padding sits after every real token: no real query sees it


@functools.partial(jax.jit, static_argnums=3)
def dense_attention(q, k, v, window):
    """The reference: causal attention over the whole sequence on one device (jitted: one program
    where the same ops run eagerly would compile each on its own)."""
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return attend(q, k, v, causal_mask(positions, positions, window))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def padded_ring(mesh, q, k, v, window, query_block):
    """Ring attention over `mesh`'s seq axis of a sequence padded to 2n equal chunks (padding at
    `PAD_POSITION` on), zig-zagged, and the result put back in order with the padding cut."""
    n = mesh.shape["seq"]
    batch, length = q.shape[:2]
    pad = -length % (2 * n)  # zig-zag needs 2n equal chunks
    positions = jnp.concatenate([jnp.arange(length), PAD_POSITION + jnp.arange(pad)])
    positions = zigzag(jnp.broadcast_to(positions, (batch, length + pad)), n, 1)
    seq_axis = lambda x, axis: zigzag(jnp.pad(x, [(0, pad) if a == axis else (0, 0)  # noqa: E731
                                                  for a in range(x.ndim)]), n, axis)
    out, _ = ring_attend(mesh, seq_axis(q, 1), seq_axis(k, 2), seq_axis(v, 2), positions, positions, window,
                         query_block)
    return unzigzag(out, n, 1)[:, :length]


def ring_vs_dense(n, length, heads, kv_heads, window, batch=2, head_dim=16, seed=0, query_block=2048):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, length, head_dim)).astype(np.float32) for _ in range(2))
    mesh = meshes.make_mesh(f"seq={n}", jax.devices()[:n])
    return np.asarray(padded_ring(mesh, q, k, v, window, query_block)), np.asarray(dense_attention(q, k, v, window))


# Every pair of levels of (devices n, length, GQA heads, window) at least once: 6 cases where all
# combinations are 24. The factors that interact meet in every combination of their levels:
# n x length (how much padding the devices' blocks hold: 50 tokens pad to 52, 56 or 64), n x window
# (chunks of 16, 8 or 4 tokens: a 7-token window reaches into the one before, or two before at
# n=8), length x window (padded queries see only padding within the window, every key without
# one). The GQA ratio only shapes each block's product.
@pytest.mark.parametrize("n, length, heads, kv_heads, window", [
    (2, 64, 8, 2, None), (2, 50, 6, 2, 7),
    (4, 64, 6, 2, 7), (4, 50, 8, 2, None),
    (8, 64, 6, 2, None), (8, 50, 8, 2, 7),  # GQA 4:1 and 3:1; 64 a multiple of 2n chunks, 50 not (padded)
])
def test_ring_equals_dense_causal_attention(n, length, heads, kv_heads, window):
    ring, dense = ring_vs_dense(n, length, heads, kv_heads, window)
    assert ring.shape == dense.shape == (2, length, heads, 16) and ring.dtype == np.float32
    np.testing.assert_allclose(ring, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n, query_block", [(2, 4), (4, 2)])
def test_queries_folded_in_pieces_give_the_same(n, query_block):
    ring, dense = ring_vs_dense(n, 64, 8, 2, 7, query_block=query_block)
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
    mesh = meshes.make_mesh(f"seq={n}", jax.devices()[:n])
    q = jnp.zeros((batch, length, heads, head_dim))
    kv = jnp.zeros((batch, kv_heads, length, head_dim))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    jaxpr = jax.make_jaxpr(lambda *a: ring_attend(mesh, *a)[0])(q, kv, kv, positions, positions)

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


def test_the_ring_copies_its_blocks_out_of_the_loop_at_most_every_other_step():
    """A block is sent on while it is attended over, so XLA copies it out of the loop's carry at
    each iteration: two steps an iteration halve those copies (XLA:CPU here; the GPU's 4.3 GB and
    TPU's traffic at 32K/128K in bench/RESULTS.md)."""
    from phi4_jax.planner import hlo

    n, batch, length, kv_heads, head_dim = 4, 1, 64, 2, 8
    mesh = meshes.make_mesh(f"seq={n}", jax.devices()[:n])
    q = jnp.zeros((batch, length, 4, head_dim))
    kv = jnp.zeros((batch, kv_heads, length, head_dim))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cache = (jnp.zeros((batch, kv_heads, 2 * length, head_dim)),) * 2
    program = hlo.parse(jax.jit(lambda *a: ring_attend(mesh, *a[:5], cache=a[5])).lower(
        q, kv, kv, positions, positions, cache).compile().as_text())
    block = (batch, kv_heads, length // n, head_dim)
    copied = sum(times for i, times in program.instructions(fused=False, looped=True)
                 if i.op == "copy" and [a.dims for a in i.arrays] == [block])
    assert 0 < copied <= n  # K and V every other step (one step an iteration: 2n)


@pytest.mark.parametrize("spec", ["seq=4", pytest.param("tensor=2,seq=4", marks=pytest.mark.slow)])
def test_model_with_ring_attention_gives_the_one_device_logits(tiny_checkpoint, spec):
    """Tiny Phi-4-mini (LongRoPE threshold 16): a 40-token prompt split over seq=4, zig-zagged,
    also composed with tensor parallelism; logits equal the single-device run's."""
    import phi4_jax
    from flax import nnx

    folder, _ = tiny_checkpoint("phi-4-mini")
    ids = np.random.default_rng(3).integers(3, 256, (2, 40))
    want = np.asarray(phi4_jax.load(folder, dtype="float32", progress=False)[0](ids))
    n_devices = int(np.prod(list(meshes.parse_mesh(spec).values())))
    mesh = meshes.make_mesh(spec, jax.devices()[:n_devices])
    model, _ = phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)
    n = mesh.shape["seq"]
    positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
    logits = phi4_jax.forward(*nnx.split(model), zigzag(jnp.asarray(ids), n, 1), zigzag(positions, n, 1), ring=mesh)
    got = np.asarray(unzigzag(logits, n, 1))
    assert got.shape == (2, 40, 256)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["seq=4", pytest.param("tensor=2,seq=4", marks=pytest.mark.slow)])
def test_engine_prefills_with_the_ring_and_decodes_the_one_device_tokens(tiny_checkpoint, monkeypatch, spec):
    """A seq mesh: fresh prompts are prefilled with ring attention (here a 20-token prompt past
    the LongRoPE threshold of 16, in a batch), the KV cache is split over seq, and greedy decoding
    (crossing the threshold too) gives the single-device tokens."""
    import phi4_jax
    from phi4_jax.model import phi4 as model_module
    from phi4_jax.engine.runner import ModelRunner
    folder, _ = tiny_checkpoint("phi-4-mini")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 20, 3)]
    greedy = functools.partial(greedy_run, prompts=prompts)

    want, _ = greedy(ModelRunner(phi4_jax.load(folder, dtype="float32", progress=False)[0]))
    calls = []
    traced = model_module.ring_attend
    monkeypatch.setattr(model_module, "ring_attend", lambda *a, **k: calls.append(1) or traced(*a, **k))
    n_devices = int(np.prod(list(meshes.parse_mesh(spec).values())))
    mesh = meshes.make_mesh(spec, jax.devices()[:n_devices])
    got, gen = greedy(ModelRunner(phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)[0]))
    assert calls  # the prefill went through the ring
    assert got == want
    assert gen.state.cache.keys[0].sharding.spec[2] == "seq"


@functools.partial(jax.jit, static_argnums=5)
def dense_write_and_attend(q, k, v, cache, starts, window):
    """The reference: the new tokens' keys/values written at slots starts[b].. of the whole cache
    on one device, and the new queries' attention over it."""
    from phi4_jax.model.cache import write

    cache = tuple(write(c, x, starts) for c, x in zip(cache, (k, v)))
    batch, slots = q.shape[0], cache[0].shape[2]
    positions = starts[:, None] + jnp.arange(q.shape[1])
    mask = causal_mask(positions, jnp.broadcast_to(jnp.arange(slots), (batch, slots)), window)
    return attend(q, *cache, mask), cache


def split_cache_vs_dense(n, q_len, heads, kv_heads, window, slots=64, head_dim=16, seed=0):
    """New tokens at positions starts[b].. of rows whose earlier slots are filled, attended over a
    cache split over seq=n, against the dense write and attention."""
    from phi4_jax.model.ring import cache_attend

    rng = np.random.default_rng(seed)
    starts = np.array([14, 37])  # row 0's new tokens cross a shard boundary at seq=4 (16 slots each)
    batch = len(starts)
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, q_len, head_dim)).astype(np.float32) for _ in range(2))
    cache = tuple(rng.standard_normal((batch, kv_heads, slots, head_dim)).astype(np.float32) for _ in range(2))
    positions = starts[:, None] + np.arange(q_len)
    dense, dense_cache = dense_write_and_attend(q, k, v, cache, starts, window)
    mesh = meshes.make_mesh(f"seq={n}", jax.devices()[:n])
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "seq"))
    out, got_cache = jax.jit(cache_attend, static_argnums=(0, 6))(
        mesh, q, k, v, positions, tuple(jax.device_put(c, split) for c in cache), window)
    return out, got_cache, dense, dense_cache


# Every pair of levels of (devices n, new tokens, GQA heads, window) at least once: 6 cases where
# all combinations are 24. The factors that interact meet in every combination of their levels:
# n x new tokens (5 new tokens at 14.. cross the shard boundary at 16 for n=4 and n=8, not for
# n=2), n x window (a 7-slot window within one shard or over two), new tokens x window. The GQA
# ratio only shapes each shard's product.
@pytest.mark.parametrize("n, q_len, heads, kv_heads, window", [
    (2, 1, 8, 2, None), (2, 5, 6, 2, 7),
    (4, 1, 6, 2, None), (4, 5, 8, 2, 7),
    (8, 1, 8, 2, 7), (8, 5, 6, 2, None),  # a decode step (1); a chat turn's new tokens (5)
])
def test_attention_over_a_split_cache_equals_dense(n, q_len, heads, kv_heads, window):
    """Each device attends over its shard; log-sum-exp combined, the result is dense attention's,
    and the new keys/values land in the shards that own their slots, as the dense write puts them."""
    out, cache, dense, dense_cache = split_cache_vs_dense(n, q_len, heads, kv_heads, window)
    assert out.shape == dense.shape == (2, q_len, heads, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=0, atol=1e-5)
    for got, want in zip(cache, dense_cache):
        assert got.sharding.spec[2] == "seq"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("n", [2, 8])
def test_ring_prefill_fills_each_devices_cache_shard_as_the_blocks_pass(n):
    """A zig-zagged 64-token prompt into a 128-slot cache split over seq=n (half the shards get no
    prompt token): every slot ends up holding its position's keys/values, as the dense write does."""
    from phi4_jax.model.cache import write

    rng = np.random.default_rng(1)
    batch, length, slots, heads, kv_heads, d = 2, 64, 128, 4, 2, 8
    q = rng.standard_normal((batch, length, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kv_heads, length, d)).astype(np.float32) for _ in range(2))
    empty = np.zeros((batch, kv_heads, slots, d), np.float32)
    mesh = meshes.make_mesh(f"seq={n}", jax.devices()[:n])

    @jax.jit
    def ring_prefill(q, k, v, cache):
        zig = lambda x, axis: zigzag(x, n, axis)  # noqa: E731
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        out, cache = ring_attend(mesh, zig(q, 1), zig(k, 2), zig(v, 2), zig(positions, 1), zig(positions, 1),
                                 cache=cache)
        return unzigzag(out, n, 1), cache

    out, cache = ring_prefill(q, k, v, (empty, empty))
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_attention(q, k, v, None)), atol=1e-5)
    dense_write = jax.jit(write)
    for got, new in zip(cache, (k, v)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dense_write(empty, new, jnp.zeros(batch, jnp.int32))))


def test_a_seq_mesh_communicates_only_the_ring_and_the_softmax_combine():
    """Compiled steps on seq=8 (tiny Phi-4-mini, 2 layers): the ring prefill sends K, V and their
    positions on at each step of its loop (3 collective-permutes a step, two steps an iteration)
    and fills the cache without any other collective; each decode step combines the shards'
    softmaxes with 2 all-reduces per layer (max, then denominator and accumulator) and nothing else."""
    from phi4_jax.planner import plan

    from test_plan import tiny

    config = tiny("phi-4-mini")
    layers = config.num_hidden_layers
    p = plan.plan(config, meshes.make_mesh("seq=8"), context=64, batch=1, dtype="float32")
    prefill, decode = (p["steps"][s]["collectives"] for s in ("prefill", "decode"))
    assert prefill["collective-permute"] == 2 * 3 * layers
    assert prefill["all-gather"] == prefill["all-to-all"] == prefill["reduce-scatter"] == 0
    assert prefill["all-reduce"] <= 1  # the last token's hidden state, from the device holding it
    assert decode == {"all-reduce": 2 * layers, "all-gather": 0, "reduce-scatter": 0,
                      "collective-permute": 0, "all-to-all": 0}


@pytest.mark.slow  # the quick loop keeps the ring prefill and decode (test_engine_prefills_with_the_ring...)
@pytest.mark.parametrize("prefill_piece", [None, 3])
def test_next_chat_turn_on_a_seq_mesh_reuses_the_split_cache(tiny_checkpoint, monkeypatch, prefill_piece):
    """A chat's next turn on seq=4: its new tokens (in pieces of 3, too) attend over the split cache
    of the first turn, and decoding continues over it; the tokens equal one device's fresh run."""
    import phi4_jax
    from phi4_jax.model import phi4 as model_module
    from phi4_jax.engine.runner import ModelRunner
    from phi4_jax.engine.sampling import SamplingParams

    folder, _ = tiny_checkpoint("phi-4")
    rng = np.random.default_rng(5)
    turn1, more = rng.integers(3, 256, 7).tolist(), rng.integers(3, 256, 9).tolist()
    one = ModelRunner(phi4_jax.load(folder, dtype="float32", progress=False)[0])
    mesh = meshes.make_mesh("seq=4", jax.devices()[:4])
    split = ModelRunner(phi4_jax.load(folder, dtype="float32", mesh=mesh, progress=False)[0],
                        prefill_piece=prefill_piece)
    calls = []
    traced = model_module.cache_attend
    monkeypatch.setattr(model_module, "cache_attend", lambda *a, **k: calls.append(1) or traced(*a, **k))
    params = SamplingParams(max_tokens=6)
    first, _ = greedy_run(split, [turn1], max_tokens=6)
    assert first == greedy_run(one, [turn1], max_tokens=6)[0]
    gen = split.start([turn1], params, [[]])
    while not gen.finished:
        gen.advance(6)
    turn2 = turn1 + first[0] + more
    again = split.start([turn2], SamplingParams(max_tokens=8), [[]], continuing=gen)
    assert again.reused_tokens == len(turn1) + len(first[0]) - 1
    assert calls  # decode and the continuation went through the split-cache attention
    assert again.advance(8)[0] == greedy_run(one, [turn2], max_tokens=8)[0][0]
