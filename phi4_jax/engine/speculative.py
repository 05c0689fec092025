"""Prompt-lookup speculation: draft tokens found in a row's own history, on the device, per decode step.

No draft model: where the last few tokens of a row (an n-gram, n from `min_n` to `max_n`) occurred
before in its prompt or output, the k tokens that followed them there are proposed as its next k
(`propose`, the longest n-gram first, then its latest occurrence). The decode loop then runs the row's
newest token and the k drafts in one forward of k + 1 positions and samples each position as plain
decoding would (the same per-token keys, penalties and masks): a draft is kept while it equals the
token sampled after the ones kept before it, and the first token that differs is kept in its place.
With a point-mass proposal this is the standard rejection rule (a draft d is accepted with
probability p(d), else a token is drawn from p without d), so every row's tokens are those plain
decoding gives, seeded or greedy. Rows whose drafts keep failing rest from proposing for a while
(`backed_off`), and a step where no row proposes runs the plain one-token forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from phi4_jax.errors import ConfigError

METHODS = ("ngram",)
_DOUBLINGS = 6
MAX_REST = 2**_DOUBLINGS - 1  # steps a row rests after failing drafts: 1, 3, 7 .. doubling per failure in a row


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Prompt-lookup speculation: propose `k` tokens after the longest matching n-gram of `min_n` to
    `max_n` tokens. Static (hashable): part of the decode program's key."""

    k: int = 6
    min_n: int = 2
    max_n: int = 4

    def __post_init__(self):
        if not 1 <= self.k <= 15:  # (a call's tokens fit in the ring of RING = 16)
            raise ConfigError(f"speculative K (ngram:K) must be in [1, 15], got {self.k}")
        if not 1 <= self.min_n <= self.max_n:
            raise ConfigError(f"speculative n-gram sizes (ngram:K:MIN_N:MAX_N) need 1 <= MIN_N <= MAX_N, got "
                              f"{self.min_n} and {self.max_n}")

    @classmethod
    def parse(cls, text: str | Speculation | None) -> Speculation | None:
        """`ngram`, `ngram:K` or `ngram:K:MIN_N:MAX_N` (None, "" or "off": none; a Speculation as it is)."""
        if text is None or isinstance(text, Speculation):
            return text
        if text in ("", "off"):
            return None
        method, *numbers = text.split(":")
        if method not in METHODS or len(numbers) not in (0, 1, 3):
            raise ConfigError(f"--speculative takes ngram, ngram:K or ngram:K:MIN_N:MAX_N (as ngram:4:2:4), "
                              f"got {text!r}")
        try:
            values = [int(n) for n in numbers]
        except ValueError:
            raise ConfigError(f"--speculative {text!r}: K, MIN_N and MAX_N are integers") from None
        return cls(*values)

    def __str__(self) -> str:
        return f"ngram:{self.k}:{self.min_n}:{self.max_n}"


def propose(history: jax.Array, positions: jax.Array, spec: Speculation) -> tuple[jax.Array, jax.Array]:
    """Drafts `[B, k]` and how many of them hold tokens `[B]` (0: no n-gram matched) for rows whose
    tokens by position are `history` `[B, S]`, the newest at `positions[b]` (< S). The match is the
    row's newest `n` tokens (n from `max_n` down to `min_n`: the longest that occurred before) at its
    latest earlier occurrence; the drafts are the tokens after it, only those already known."""
    batch, slots = history.shape
    at = jnp.arange(slots)
    suffix = jnp.take_along_axis(history, jnp.maximum(positions[:, None] - jnp.arange(spec.max_n), 0), axis=1)
    # run[b, j]: how many tokens ending at slot j equal the row's newest ones (up to max_n)
    run, alive = jnp.zeros((batch, slots), jnp.int32), jnp.ones((batch, slots), bool)
    for i in range(spec.max_n):
        earlier = jnp.pad(history, ((0, 0), (i, 0)))[:, :slots]  # history[j - i]
        alive &= (earlier == suffix[:, i:i + 1]) & (at >= i) & (positions[:, None] >= i)
        run += alive
    found = (run >= spec.min_n) & (at < positions[:, None])
    end = jnp.argmax(jnp.where(found, run * slots + at, -1), axis=1)  # the longest, then the latest
    count = jnp.where(found.any(axis=1), jnp.minimum(positions - end, spec.k), 0)
    drafts = jnp.take_along_axis(history, jnp.minimum(end[:, None] + 1 + jnp.arange(spec.k), slots - 1), axis=1)
    return drafts, count.astype(jnp.int32)


def backed_off(misses: jax.Array, rest: jax.Array, proposed: jax.Array, accepted: jax.Array,
               running: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's failures in a row and steps left to rest after a step: a row whose drafts all
    failed rests 1, 3, 7 .. MAX_REST steps (doubling with each failure in a row); any accepted draft
    clears its failures. `proposed`, `running` `[B]` bool; `accepted` `[B]` int."""
    failed = proposed & (accepted == 0)
    misses = jnp.where(failed, misses + 1, jnp.where(proposed, 0, misses))
    rest = jnp.where(failed, (1 << jnp.minimum(misses, _DOUBLINGS)) - 1,
                     jnp.where(running, jnp.maximum(rest - 1, 0), rest))
    return misses, rest
