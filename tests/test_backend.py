"""Backend forms are a static choice the model carries: the engine's programs traced for XLA:CPU and
for an accelerator (lowered here, as the planner lowers them) differ exactly in XLA:CPU's own forms,
and both give the same tokens."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax import ModelRunner, Phi4Config, Phi4ForCausalLM
from phi4_jax.model.phi4 import forward
from phi4_jax.engine.prefill import reach_groups
from phi4_jax.planner.plan import lower_step
from phi4_jax.model import cache, xla_tpu
from phi4_jax.model.backend import Backend

from conftest import greedy_run

CONFIG = Phi4Config.from_preset("tiny-phi-4")  # GQA 4:1: 40 query / 10 KV heads of 4 channels
CONTEXT, PIECE = 64, 16


def forms(step: str, batch: int, platform: str) -> dict:
    """What a lowered program (StableHLO, the forms as traced) holds of the backend-dependent forms."""
    text = lower_step(step, CONFIG, None, CONTEXT, batch, jnp.float32, PIECE, Backend(platform)).as_text()
    kv, d = CONFIG.num_key_value_heads, CONFIG.head_dim
    cache = re.compile(rf"tensor<{batch}x{kv}x\d+x{d}xf32>")  # a cache layer, or its first slots
    dots = re.findall(r"stablehlo\.dot_general [^\n]*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    # The attention products: one operand is (a part of) a cache layer; the other's rank tells the form.
    attention = [a if cache.fullmatch(b) else b for a, b in dots if cache.fullmatch(a) or cache.fullmatch(b)]
    return {"dots": len(dots), "attention_dots": len(attention),
            "attention_ranks": sorted({t.count("x") for t in attention}),
            # (a weight-first product's barrier holds one 2-D value; each layer's hidden states have
            # one of their own, and between groups of prompt pieces one holds the logits and the cache)
            "weight_first": len(re.findall(r"= stablehlo\.optimization_barrier %[\w#]+ : tensor<\d+x\d+x[a-z]", text)),
            "one_row_cache": f"tensor<{kv}x{CONTEXT}x{d}xf32>" in text}


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
@pytest.mark.parametrize("step, batch", [("prefill", 1), ("prefill", 4), ("decode", 1), ("decode", 2)])
def test_cpu_and_accelerator_programs_differ_exactly_in_the_cpu_forms(step, batch, accelerator):
    cpu, plain = forms(step, batch, "cpu"), forms(step, batch, accelerator)
    layers = CONFIG.num_hidden_layers
    assert cpu["dots"] == plain["dots"]  # the same products, written two ways
    # Scores and values, per layer (and per group of prompt pieces: each attends its own reach).
    loops = len(reach_groups(CONTEXT // PIECE)) if step == "prefill" else 1
    assert cpu["attention_dots"] == plain["attention_dots"] == 2 * layers * loops
    # XLA:CPU: each KV head's queries as the rows of 4-D batched products; elsewhere the 5-D forms.
    assert cpu["attention_ranks"] == [4] and plain["attention_ranks"] == [5]
    # XLA:CPU: projections of 2 to 64 rows put the weight first (behind a barrier); never elsewhere.
    rows = batch * (PIECE if step == "prefill" else 1)
    assert (cpu["weight_first"] > 0) == (1 < rows <= 64)
    assert plain["weight_first"] == 0
    # XLA:CPU: one row's cache layers carried and written without their batch axis; never elsewhere.
    assert cpu["one_row_cache"] == (batch == 1)
    assert not plain["one_row_cache"]


def built(**options) -> Phi4ForCausalLM:
    """The model as its constructor builds it, its weights shapes only (nothing to draw or compile)."""
    return nnx.eval_shape(lambda: Phi4ForCausalLM(CONFIG, rngs=nnx.Rngs(0), param_dtype=jnp.float32, **options))


def test_the_model_carries_its_backend_and_defaults_to_its_devices():
    model = built()
    assert model.backend == Backend.of()
    graphdef, _ = nnx.split(model)
    other, _ = nnx.split(built(backend=Backend("tpu" if model.backend.platform != "tpu" else "gpu")))
    assert graphdef != other  # the backend is in the graph definition: a jit key of its own
    with pytest.raises(ValueError, match="platform 'metal'"):
        Backend("metal")


@pytest.fixture(scope="module")
def both_forms(tiny_model):
    """The tiny phi-4 checkpoint's weights (CONFIG's shape) as a model of each form: {"cpu": ..., "gpu": ...}."""
    weights = nnx.state(tiny_model("phi-4")[0])
    assert jax.tree.map(jnp.shape, weights) == jax.tree.map(jnp.shape, nnx.state(built()))
    return {p: nnx.merge(nnx.graphdef(built(backend=Backend(p))), weights) for p in ("cpu", "gpu")}


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_both_forms_give_the_same_tokens(both_forms, batch):
    """The same weights traced with XLA:CPU's forms and with the plain ones (both run here) decode
    the same greedy tokens, and their prefill logits agree."""
    assert [m.backend.platform for m in both_forms.values()] == ["cpu", "gpu"]
    engines = [ModelRunner(m) for m in both_forms.values()]
    prompts = [np.random.default_rng(row).integers(3, 256, 5 + 3 * row).tolist() for row in range(batch)]
    cpu, plain = (greedy_run(e, prompts, max_tokens=16)[0] for e in engines)
    assert cpu == plain and all(len(row) == 16 for row in cpu)
    ids = np.array([prompts[0]], np.int32)
    logits = [np.asarray(forward(e.graphdef, e.params, ids)) for e in engines]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (1, 1), (2, 1), (3,)])
def test_the_tpu_lookup_form_gives_the_rows_of_a_plain_gather(shape):
    """`xla_tpu.rows` (one id: gathered with row 0 beside it, then dropped) is `table[ids]`, int8
    tables included, whatever the ids' shape."""
    table = jnp.asarray(np.random.default_rng(0).integers(-127, 128, (50, 8)), jnp.int8)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 50, shape), jnp.int32)
    got = jax.jit(xla_tpu.rows)(table, ids)
    assert got.shape == (*shape, 8) and np.array_equal(got, table[ids])


@pytest.mark.parametrize("tokens", [1, 3])
def test_the_tpu_cache_writes_put_each_token_where_the_plain_writes_do(tokens):
    """`cache.write` and `cache.write_at` traced for a TPU (one token pinned to the cache's layout,
    the split cache's one-token write as one window a row) write what the plain forms write, a slot
    past the cache's end dropped."""
    rng = np.random.default_rng(2)
    layer = jnp.asarray(rng.standard_normal((3, 2, 8, 4)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((3, 2, tokens, 4)), jnp.float32)
    starts = jnp.asarray([0, 5, 8 - tokens], jnp.int32)
    slots = jnp.asarray([[8] * tokens, [7 - t for t in range(tokens)], [3 + t for t in range(tokens)]], jnp.int32)
    tpu = Backend("tpu")
    written = jax.jit(lambda c, n, s: cache.write(c, n, s, tpu))(layer, new, starts)
    assert np.array_equal(written, cache.write(layer, new, starts))
    placed = jax.jit(lambda c, n, s: cache.write_at(c, n, s, tpu))(layer, new, slots)
    assert np.array_equal(placed, cache.write_at(layer, new, slots))
    assert np.array_equal(placed[0], layer[0]) and np.array_equal(placed[2, :, 3:3 + tokens], new[2])
