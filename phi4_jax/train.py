"""Training: next-token loss and a full-parameter AdamW step for the model, jitted, data-parallel on a mesh.

The step is a pure function of the split model state and the optimizer state (as decoding is).
On a mesh the parameters and optimizer moments follow the rules table (`embed` over fsdp: fully
sharded data parallel) and a batch splits over data and fsdp; jit adds the gradient reductions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from phi4_jax.errors import ConfigError
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.parallel import mesh as meshes
from phi4_jax.parallel import rules


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warmup then cosine decay, and gradient clipping by global norm."""

    learning_rate: float = 2e-3  # peak, reached after the warmup
    warmup_steps: int = 200
    total_steps: int = 6000  # the cosine reaches `end_learning_rate` here
    end_learning_rate: float = 1e-5
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0

    def __post_init__(self):
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be at least 0 and below "
                              f"total_steps={self.total_steps}")

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps,
                                                      self.total_steps, self.end_learning_rate)
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(schedule, self.b1, self.b2, weight_decay=self.weight_decay))


def loss(model: Phi4ForCausalLM, ids: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `ids[:, t+1]` from `ids[:, :t+1]`, over the positions
    where `weights[:, t+1]` is nonzero (weighted by it): `ids`, `weights` `[batch, seq]`."""
    logits = model(ids[:, :-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    w = weights[:, 1:].astype(jnp.float32)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


class Trainer:
    """Trains a model in place of its parameters: `trainer.step(ids, weights)` -> the batch's loss.

    Args:
      model: the model to train (split once here; `trainer.model` is the trained one).
      config: the optimizer's settings.
      mesh: lay the batch out over its data and fsdp axes (the model's parameters must already be
        on it, e.g. `sharding.place(model, mesh)`); None: one device.
    """

    def __init__(self, model: Phi4ForCausalLM, config: TrainConfig = TrainConfig(), mesh: Mesh | None = None):
        self.config = config
        self.graphdef, self.params = nnx.split(model)
        self.mesh = mesh
        self.optimizer = config.optimizer()
        # Moments shaped like the parameters, laid out like them (init is elementwise).
        self.opt_state = jax.jit(self.optimizer.init)(self.params)
        self.steps = 0

    @property
    def model(self) -> Phi4ForCausalLM:
        return nnx.merge(self.graphdef, self.params)

    def step(self, ids: np.ndarray, weights: np.ndarray) -> float:
        if self.mesh is not None:
            ids, weights = (meshes.put(x, rules.sharding(self.mesh, ("batch", None), x.shape))
                            for x in (np.asarray(ids), np.asarray(weights)))
        self.params, self.opt_state, value = _step(self.graphdef, self.params, self.opt_state, ids, weights,
                                                   optimizer=self.optimizer)
        self.steps += 1
        return float(value)


@functools.partial(jax.jit, donate_argnums=(1, 2), static_argnames=("optimizer",))
def _step(graphdef, params, opt_state, ids, weights, *, optimizer):
    value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), ids, weights))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
