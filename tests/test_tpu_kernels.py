"""JAX's TPU kernels behind the attention interface (`model/tpu_attention.py`): splash attention in
Pallas interpret mode against the XLA path, a whole model through it, ragged paged decode over our
cache copied into its pages, both kernels compiled for v5e and v6e, and what "auto" picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax.config import PRESETS, Phi4Config
from phi4_jax.errors import ConfigError
from phi4_jax.model import attention, tpu_attention
from phi4_jax.model.backend import Backend
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.parallel import rules

CPU = Backend("cpu")  # splash in interpret mode
# float32, interpret mode against XLA: the same sums in another order (online softmax by blocks);
# measured about 2e-6 on outputs of size ~1 and log-sum-exps of ~6.
TOLERANCE = dict(rtol=0, atol=2e-5)


def random_block(batch, q_len, k_len, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, k_len, head_dim)), jnp.float32) for _ in range(2))
    return q, k, v


def prompt_mask(batch, q_len, k_len, window=None, start=None):
    """Queries at positions start[b] .. + q_len over cache slots 0 .. k_len - 1 (start 0: a prompt
    in one piece, keys = queries)."""
    start = np.zeros(batch, int) if start is None else np.asarray(start)
    q_positions = jnp.asarray(start[:, None] + np.arange(q_len))
    return attention.causal_mask(q_positions, jnp.broadcast_to(jnp.arange(k_len), (batch, k_len)), window)


def both(q, k, v, mask):
    """(splash, xla) `attend_block` results, each jitted."""
    run = lambda impl: jax.jit(lambda *a: attention.attend_block(*a, impl, CPU))(q, k, v, mask)  # noqa: E731
    return run("splash"), run("xla")


@pytest.mark.parametrize("heads, kv_heads, q_len, k_len, window, start, head_dim", [
    (6, 2, 256, 256, None, None, 128),  # GQA 3:1, a prompt in one piece
    pytest.param(8, 2, 256, 256, 100, None, 128, marks=pytest.mark.slow),  # GQA 4:1, a window shorter than the prompt
    pytest.param(6, 2, 200, 200, None, None, 128, marks=pytest.mark.slow),  # odd length: padded to 256
    (8, 2, 130, 384, 150, [100, 254], 128),  # a piece over the cache at two offsets: queries padded
    # Key blocks of 512 full, partial and empty, in that order; with a window, empty ones first too.
    (4, 2, 128, 1536, None, [1000, 1300], 128),
    pytest.param(4, 2, 128, 1536, 200, [1100, 1400], 128, marks=pytest.mark.slow),
    pytest.param(4, 4, 256, 256, None, None, 96, marks=pytest.mark.slow),  # Phi-3.5-mini's head_dim 96, as it is
])
def test_splash_matches_xla(heads, kv_heads, q_len, k_len, window, start, head_dim):
    """The mask as an array (a dynamic mask) and as each query's last key (`attention.Causal`: the
    kernel computes it per block)."""
    q, k, v = random_block(2, q_len, k_len, heads, kv_heads, head_dim)
    start = np.zeros(2, int) if start is None else np.asarray(start)
    causal = attention.Causal(jnp.asarray(start[:, None] + np.arange(q_len)), k_len, window)
    mask = prompt_mask(2, q_len, k_len, window, start)
    assert np.array_equal(causal.dense(), mask)
    (out, lse), (want_out, want_lse) = both(q, k, v, mask)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape and out.dtype == lse.dtype == jnp.float32
    got = jax.jit(lambda *a: attention.attend_block(*a, "splash", CPU))(q, k, v, causal)
    for out, lse in ((out, lse), got):
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), **TOLERANCE)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), **TOLERANCE)


def test_splash_with_segments_matches_xla():
    """Prompts packed in a row (`attention.Causal` with segments, the keys the queries themselves):
    four prompts of 50, in a row of 200 (padded to 256 for the kernel)."""
    q, k, v = random_block(2, 200, 200, 4, 2, 128)
    causal = attention.Causal(jnp.broadcast_to(jnp.arange(200), (2, 200)), 200, None,
                              jnp.broadcast_to(jnp.arange(200) // 50, (2, 200)))
    got = jax.jit(lambda *a: attention.attend(*a, "splash", CPU))(q, k, v, causal)
    want = attention.attend(q, k, v, causal.dense(), "xla", CPU)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOLERANCE)


def test_splash_gives_zeros_and_minus_infinity_where_a_query_sees_nothing():
    """Ring blocks have queries that see none of a block's keys: whole query blocks (the kernel
    skips them) and single rows (the kernel averages the values there)."""
    q, k, v = random_block(1, 256, 256, 4, 2, 128)
    mask = np.array(prompt_mask(1, 256, 256))
    mask[0, :128] = False  # the first query block sees nothing
    mask[0, 200] = False  # one row of a block that sees keys
    (out, lse), (want_out, want_lse) = both(q, k, v, jnp.asarray(mask))
    for got in (out, want_out):
        assert np.all(np.asarray(got)[0, :128] == 0) and np.all(np.asarray(got)[0, 200] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :128])) and np.all(np.isneginf(np.asarray(lse)[0, 200]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), **TOLERANCE)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), **TOLERANCE)


def test_splash_leaves_short_calls_to_xla_and_has_a_gradient():
    """Fewer than 128 queries (decode's one) take the XLA path, bit for bit; `attend` (the dense
    path, training's) differentiates through the kernel."""
    q, k, v = random_block(2, 1, 256, 8, 2, 128)
    mask = prompt_mask(2, 1, 256, start=[17, 255])
    (out, lse), (want_out, want_lse) = both(q, k, v, mask)
    assert (np.array_equal(np.asarray(out), np.asarray(want_out))
            and np.array_equal(np.asarray(lse), np.asarray(want_lse)))

    q, k, v = random_block(1, 128, 128, 4, 1, 128)
    mask = prompt_mask(1, 128, 128)
    def grad(impl, mask):
        loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, impl, CPU) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    # The mask as an array and as each query's last key (the model's form for splash).
    grads = [grad("splash", mask), grad("splash", attention.Causal(jnp.arange(128)[None], 128)), grad("xla", mask)]
    for *got, want in zip(*grads):
        for g in got:
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=0, atol=1e-4)  # gradients of ~10-50


@pytest.mark.parametrize("axes", [dict(data=2, tensor=2), dict(seq=2, tensor=2)])
def test_splash_on_a_mesh_runs_per_shard_and_matches_xla(axes):
    """Splash given the mesh (`shard_map` over rows and heads from the rules table): a piece over the
    cache on data x tensor, and ring attention's blocks on seq x tensor (a map inside ring's own
    map, manual over seq), against XLA on one device."""
    from phi4_jax.model import ring
    from phi4_jax.parallel.mesh import make_mesh

    mesh = make_mesh(axes, jax.devices()[:4])
    if "seq" in axes:  # a prompt of 2048 over itself, zig-zag: 1024 queries a device in chunks of 512
        q, k, v = random_block(1, 2048, 2048, 4, 2, 128)
        positions = jnp.asarray(ring.zigzag_order(2048, 2))[None]
        # Ordered: each query's last key in a block (`attention.Causal`), the blocks empty, partial
        # or full; the reference reads the masks from the positions.
        run = lambda impl, ordered: jax.jit(lambda q, k, v: ring.ring_attend(  # noqa: E731
            mesh, q, k, v, positions, positions, ordered=ordered, implementation=impl, backend=CPU)[0])
        got, want = run("splash", True)(q, k, v), run("xla", False)(q, k, v)
    else:
        q, k, v = random_block(2, 130, 384, 4, 2, 128)
        last = jnp.asarray(np.array([[100], [254]]) + np.arange(130))  # the model's form of the mask
        put = lambda x, names: jax.device_put(x, rules.sharding(mesh, names, x.shape))  # noqa: E731
        args = (put(q, ("batch", None, "q_heads", None)), put(k, ("batch", "kv_heads", None, None)),
                put(v, ("batch", "kv_heads", None, None)), attention.Causal(put(last, ("batch", None)), 384))
        got = jax.jit(lambda *a: attention.attend_block(*a, "splash", CPU, mesh))(*args)
        want = attention.attend_block(q, k, v, prompt_mask(2, 130, 384, None, [100, 254]), "xla", CPU)
        assert got[0].sharding.spec == rules.spec(mesh, ("batch", None, "q_heads", None), q.shape)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOLERANCE)


def test_splash_over_a_split_cache_matches_xla():
    """A chat's next turn of 130 tokens at positions 200.. over a cache of 512 slots split over
    seq=2: each shard gets the queries' limits in its own slots (the second's start below 0: the
    first queries see none of it), against XLA's masks."""
    from phi4_jax.model import ring
    from phi4_jax.parallel.mesh import make_mesh

    mesh = make_mesh(dict(seq=2), jax.devices()[:2])
    q, k, v = random_block(2, 130, 130, 4, 2, 128)
    cache = random_block(2, 1, 512, 4, 2, 128, seed=1)[1:]
    positions = jnp.broadcast_to(200 + jnp.arange(130), (2, 130))
    run = lambda impl: jax.jit(lambda *a: ring.cache_attend(  # noqa: E731
        mesh, *a, window=300, implementation=impl, backend=CPU))(q, k, v, positions, cache)
    (got, got_cache), (want, want_cache) = run("splash"), run("xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOLERANCE)
    assert all(np.array_equal(a, b) for a, b in zip(got_cache, want_cache))


@pytest.mark.slow  # a whole model in interpret mode
def test_a_model_gives_the_same_logits_with_splash():
    """A tiny model with head_dim 128 (GQA 2:1, a window shorter than the prompt): logits of a prompt
    of odd length in one piece, splash (interpret mode) against XLA, the same weights."""
    config = Phi4Config.from_dict(dict(PRESETS["tiny-phi-4"], hidden_size=256, intermediate_size=128,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                       original_max_position_embeddings=512, sliding_window=150))
    assert config.head_dim == 128 and config.window == 150

    def split(impl):
        model = nnx.eval_shape(lambda: Phi4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                                                       attention=impl, backend=CPU))
        assert model.attention == impl
        return nnx.split(model)

    # Weights drawn in numpy (initialising the model eagerly compiles ~20 programs), large enough
    # that attention moves the logits: norms near 1, projections of unit gain.
    rng = np.random.default_rng(0)
    draw = lambda a: jnp.asarray(1 + 0.2 * rng.standard_normal(a.shape, np.float32) if len(a.shape) == 1  # noqa: E731
                                 else rng.standard_normal(a.shape, np.float32) / np.sqrt(a.shape[-1]))
    state = jax.tree.map(draw, split("xla")[1])
    ids = jax.random.randint(jax.random.key(1), (2, 200), 0, config.vocab_size)
    run = jax.jit(lambda graphdef, s, i: nnx.merge(graphdef, s)(i), static_argnums=0)
    logits = {impl: np.asarray(run(split(impl)[0], state, ids)) for impl in ("splash", "xla")}
    # Logits of size ~4 after two layers; measured 7e-6 apart.
    assert np.abs(logits["xla"]).max() > 1
    np.testing.assert_allclose(logits["splash"], logits["xla"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("heads, kv_heads, window", [(6, 2, None), (8, 2, 40)])
def test_ragged_paged_decode_over_our_cache_copied_into_pages(heads, kv_heads, window):
    """Our cache copied into the kernel's pages, one decode query per row at odd lengths (1, a page
    and a bit, all of it), through the kernel's own reference with our arguments: the XLA path's
    output. (The kernel itself runs on no CPU: see the next test.)"""
    batch, length, page_size, head_dim = 3, 96, 16, 128
    q, k, v = random_block(batch, 1, length, heads, kv_heads, head_dim)
    lengths = jnp.array([1, 17, length])
    # Jitted, the copy and the XLA path are a program each (eagerly, every op compiles on its own).
    pages, page_indices = jax.jit(tpu_attention.pages_from_cache, static_argnums=2)(k, v, page_size)
    assert pages.shape == (batch * length // page_size, page_size, 2 * kv_heads, head_dim)
    got = tpu_attention.paged_decode(q, pages, page_indices, lengths, window, reference=True)
    want = jax.jit(attention.attend)(q, k, v, prompt_mask(batch, 1, length, window, start=lengths - 1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOLERANCE)


def test_jax_cannot_yet_interpret_ragged_paged_attention():
    """jax 0.10.2's TPU interpreter has no reshape of a ref, which the kernel does to the pages it
    copies in (its HLO interpreter fails sooner). When this stops raising, check the kernel's
    output here against `attention.attend`, as the test above checks the reference's."""
    q, k, v = random_block(2, 1, 32, 4, 2, 128)
    pages, page_indices = tpu_attention.pages_from_cache(k, v, 16)
    decode = jax.jit(lambda *a: tpu_attention.paged_decode(*a, interpret=True))
    with pytest.raises(Exception, match="ReshapeTransform"):
        decode(q, pages, page_indices, jnp.array([5, 32]))


def compile_for(topology, fn, *shapes):
    """`fn` compiled for one chip of a TPU slice (libtpu, no TPU) from `(shape, dtype)` pairs."""
    pytest.importorskip("libtpu")  # here only: interpret mode needs no libtpu
    from phi4_jax.planner import targets

    device = targets.devices(topology)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    # Mosaic's lowering asks the default device which chip it lowers for: the target, not the CPU.
    with jax.default_device(device):
        return jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]).compile()


def about(got: int, want: int) -> bool:
    """A buffer size as planned, give or take the TPU's tiling of small arrays."""
    return want <= got <= 1.01 * want + 4096


@pytest.mark.slow  # compiling for a TPU slice
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_splash_compiles_for_tpu_without_the_scores(topology):
    """bfloat16 through Mosaic's custom call, in under a quarter of the scratch one float32 score
    matrix of the call would take (32 MiB here): the kernel never holds all the scores."""
    batch, length, heads, kv_heads, head_dim = 1, 1024, 8, 2, 128
    shapes = [((batch, length, heads, head_dim), jnp.bfloat16), ((batch, kv_heads, length, head_dim), jnp.bfloat16),
              ((batch, kv_heads, length, head_dim), jnp.bfloat16), ((batch, length, length), jnp.bool_)]
    tpu = Backend("tpu")
    splash = compile_for(topology, lambda *a: attention.attend_block(*a, "splash", tpu), *shapes)
    assert "tpu_custom_call" in splash.as_text()
    memory = splash.memory_analysis()
    assert about(memory.argument_size_in_bytes, sum(np.prod(s) * jnp.dtype(d).itemsize for s, d in shapes))
    assert about(memory.output_size_in_bytes, batch * length * heads * (head_dim + 1) * 4)  # out and lse, float32
    assert 0 < memory.temp_size_in_bytes < batch * heads * length * length * 4 / 4


@pytest.mark.slow  # compiling for a TPU slice
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_ragged_paged_decode_compiles_for_tpu(topology):
    """bfloat16, Phi-4-mini's GQA (24 query / 8 KV heads here as 16 / 8); phi-4's 10 KV heads are
    refused by the kernel (20 combined heads do not tile)."""
    batch, length, page_size, head_dim = 4, 1024, 64, 128

    def step(heads, kv_heads):
        shapes = [((batch, 1, heads, head_dim), jnp.bfloat16), ((batch, kv_heads, length, head_dim), jnp.bfloat16),
                  ((batch, kv_heads, length, head_dim), jnp.bfloat16), ((batch,), jnp.int32)]

        def decode(q, k, v, lengths):
            pages, page_indices = tpu_attention.pages_from_cache(k, v, page_size)
            return tpu_attention.paged_decode(q, pages, page_indices, lengths, window=256)

        return compile_for(topology, decode, *shapes), shapes

    compiled, shapes = step(16, 8)
    assert "tpu_custom_call" in compiled.as_text()
    memory = compiled.memory_analysis()
    assert about(memory.argument_size_in_bytes, sum(np.prod(s) * jnp.dtype(d).itemsize for s, d in shapes))
    assert about(memory.output_size_in_bytes, batch * 16 * head_dim * 2)
    with pytest.raises(ValueError, match="can not be XLA fully tiled"):
        step(40, 10)


def test_auto_picks_splash_on_a_tpu_for_head_dim_128():
    resolve = attention.resolve
    assert resolve("auto", jnp.bfloat16, "tpu", 128) == "splash"  # phi-4, Phi-4-mini
    assert resolve("auto", jnp.bfloat16, "tpu", 96) == "xla"  # Phi-3.5-mini: "splash" runs it, untimed
    assert resolve("auto", jnp.bfloat16, "cpu", 128) == "xla"
    assert resolve("auto", jnp.float32, "cpu", 128) == "xla"
    assert resolve("auto", jnp.bfloat16, "gpu", 128) == "cudnn"
    assert resolve("auto", jnp.float32, "gpu", 128) == "xla"
    assert resolve("splash", jnp.bfloat16, "tpu", 96) == "splash"
    for platform in ("tpu", "cpu"):
        attention.check("splash", jnp.bfloat16, platform)
    with pytest.raises(ConfigError, match="TPU kernel.*--attention cudnn"):
        attention.check("splash", jnp.bfloat16, "gpu")
    config = Phi4Config.from_preset("tiny-phi-4")  # head_dim 4
    model = nnx.eval_shape(lambda: Phi4ForCausalLM(config, rngs=nnx.Rngs(0), backend=Backend("tpu")))
    assert model.attention == "xla"
