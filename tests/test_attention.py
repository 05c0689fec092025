"""The attention block interface: output and log-sum-exp per query, exact merging of key blocks,
and the implementations behind it (checked against numpy in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi4_jax.model import attention
from phi4_jax.errors import ConfigError
from phi4_jax.model.backend import Backend

B, T, S, H, KV, D = 2, 5, 12, 6, 2, 8  # GQA 3:1


@pytest.fixture(scope="module")
def block():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, KV, S, D)).astype(np.float32) for _ in range(2))
    mask = rng.random((B, T, S)) < 0.6
    mask[0, 2] = False  # a query that sees no key
    mask[1, :, 0] = True  # every other query sees at least one
    return q, k, v, mask


def reference(q, k, v, mask):
    """float64 numpy: output and log-sum-exp, query head h on KV head h // (H / KV)."""
    kv = np.repeat(np.arange(KV), q.shape[2] // KV)
    scores = np.einsum("bthd,bhsd->bhts", q.astype(np.float64), k[:, kv].astype(np.float64)) / np.sqrt(D)
    scores = np.where(mask[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = np.log(np.exp(scores).sum(-1))  # [B, H, T]
        p = np.nan_to_num(np.exp(scores - lse[..., None]))
    out = np.einsum("bhts,bhsd->bthd", p, v[:, kv].astype(np.float64))
    return out, lse.transpose(0, 2, 1)


def test_block_gives_the_softmax_output_and_log_sum_exp(block):
    out, lse = attention.attend_block(*block)
    want_out, want_lse = reference(*block)
    assert out.shape == (B, T, H, D) and lse.shape == (B, T, H)
    assert out.dtype == lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-5)
    assert np.all(np.asarray(out)[0, 2] == 0) and np.all(np.isneginf(np.asarray(lse)[0, 2]))


@pytest.mark.parametrize("query", [0, 2, 4])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("heads", [H, KV])  # three queries per KV head, or one (its own form on accelerators)
def test_one_query_gives_the_reference_in_the_cpu_form_and_the_accelerators(block, query, platform, heads):
    """A decode step's single query: XLA:CPU's own forms of the products (heads as rows), and the
    plain ones every accelerator program uses, both match the float64 reference."""
    q, k, v, mask = block
    one = (q[:, query:query + 1, :heads], k, v, mask[:, query:query + 1])
    want_out, want_lse = reference(*one)
    backend = Backend(platform)
    assert backend.heads_as_rows == (platform == "cpu")
    out, lse = jax.jit(lambda *a: attention.attend_block(*a, backend=backend))(*one)
    assert out.shape == (B, 1, heads, D) and lse.shape == (B, 1, heads)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("copies", [1, 4])  # 15 query rows a KV head (the decode form), or 60
def test_the_accelerators_forms_give_the_reference_for_many_queries(block, copies):
    q, k, v, mask = block
    many = (np.tile(q, (1, copies, 1, 1)), k, v, np.tile(mask, (1, copies, 1)))
    want_out, want_lse = reference(*many)
    out, lse = jax.jit(lambda *a: attention.attend_block(*a, backend=Backend("gpu")))(*many)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("cut", [1, 6, 11])
def test_merging_two_key_blocks_equals_attending_both(block, cut):
    """Blocks [0, cut) and [cut, S): some queries see nothing in one of them, one query in neither."""
    q, k, v, mask = block
    first = attention.attend_block(q, k[:, :, :cut], v[:, :, :cut], mask[:, :, :cut])
    second = attention.attend_block(q, k[:, :, cut:], v[:, :, cut:], mask[:, :, cut:])
    out, lse = attention.merge(first, second)
    whole_out, whole_lse = attention.attend_block(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(whole_out), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(whole_lse))
    finite = np.isfinite(np.asarray(whole_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(whole_lse)[finite], rtol=1e-6)


def test_jax_nn_kernel_path_agrees_with_the_reference(block):
    """The cuDNN path goes through `jax.nn.dot_product_attention`; run that same path with its XLA
    kernel (cuDNN needs a GPU) to check our side of it: layouts, scale, residual, unseen queries."""
    out, lse = attention._jax_nn_block(*block, "xla")
    want_out, want_lse = attention.attend_block(*block, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6, atol=1e-5)


def test_attend_is_the_normalised_block_in_the_query_dtype(block):
    q, k, v, mask = block
    got = attention.attend(jnp.asarray(q, jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(q, k, v, mask)[0], atol=0.05)


def test_implementations_are_chosen_and_checked():
    assert attention.resolve("auto", jnp.bfloat16, "cpu") == "xla"  # cuDNN only on a GPU
    assert attention.resolve("auto", jnp.bfloat16, "tpu", 128) == "splash"  # tests/test_tpu_kernels.py
    assert attention.resolve("auto", jnp.bfloat16, "tpu", 96) == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"
    attention.check("xla", jnp.float32, "cpu")
    with pytest.raises(ConfigError, match="flash"):
        attention.check("flash", jnp.float32, "cpu")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*--attention xla"):
        attention.check("cudnn", jnp.bfloat16, "tpu")
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        attention.check("cudnn", jnp.float32, "gpu")


def test_load_refuses_an_implementation_that_cannot_run_before_reading_weights(tiny_checkpoint):
    import phi4_jax

    folder, _ = tiny_checkpoint("phi-4")
    with pytest.raises(ConfigError, match="cudnn"):  # on a CPU: no GPU; on a GPU: not float32
        phi4_jax.load(folder, dtype="float32", progress=False, attention="cudnn")
    model, _ = phi4_jax.load(folder, dtype="float32", progress=False, attention="xla")
    assert model.attention == "xla"


@pytest.mark.parametrize("offset", [0, 150])  # a prompt over itself; a piece over the cache before it
@pytest.mark.parametrize("window", [None, 100])
def test_causal_blocks_equal_attending_every_key(offset, window):
    """`attend_causal` (queries in blocks over the keys up to each block) gives what `attend` over
    every key gives, and the float64 reference, for a prompt of 2.3 blocks."""
    rng = np.random.default_rng(offset)
    length = int(2.3 * attention.CAUSAL_BLOCK)
    q = rng.standard_normal((1, length, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, KV, offset + length, D)).astype(np.float32) for _ in range(2))
    positions = offset + np.arange(length)[None]
    mask = np.asarray(attention.causal_mask(positions, np.arange(offset + length)[None], window))
    blocked = np.asarray(attention.attend_causal(q, k, v, mask))
    np.testing.assert_allclose(blocked, np.asarray(attention.attend(q, k, v, mask)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(blocked, reference(q, k, v, mask)[0], rtol=0, atol=1e-5)
