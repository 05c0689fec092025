"""Rooflines: what a step of the model must do, and the time a chip allows a compiled step.

What a step must do is counted from the model's shape: the bytes a decode step reads (every
weight once, the KV cache it attends over) and the matmul FLOPs of a prefill or a decode step.
Utilisation is then work / time / peak: model-bandwidth utilisation (MBU) for decode, bound by
reading the weights and the KV cache once per step, and model-FLOP utilisation (MFU) for prefill,
bound by its matmuls. `chip_roofline` reads a step compiled for an accelerator
(`planner.plan.plan` on `planner.targets` devices) against that chip's published peaks.
"""

from __future__ import annotations

from phi4_jax.config import Phi4Config
from phi4_jax.planner import targets
from phi4_jax.planner.plan import USABLE


def decode_step_bytes(config: Phi4Config, batch: int, context: float, weight_bytes: int,
                      cache_bytes: int | None = None) -> float:
    """Bytes one decode step must move: every weight once (the input embedding one row per
    sequence; the head, or the tied table, whole), each sequence's `context` cached keys and
    values read (no more than its sliding window) and its new ones written."""
    e = config.hidden_size
    if config.window is not None:
        context = min(context, config.window - 1)
    # Every parameter, but of an untied input table only the rows looked up.
    weights = config.num_parameters - (0 if config.tie_word_embeddings else (config.vocab_size - batch) * e)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return weights * weight_bytes + batch * (context + 1) * kv_per_token * (cache_bytes or weight_bytes)


def prefill_flops(config: Phi4Config, batch: int, length: int) -> float:
    """Matmul FLOPs of prefilling `batch` prompts of `length` tokens from position 0 (causal
    attention counts only the scores it keeps; logits only at each row's last token)."""
    e, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
    projections = 2 * (config.layer_parameters - 2 * e)  # the norms are no matmul
    pairs = length * (length + 1) / 2  # (query, key) pairs a causal prompt scores
    if config.window is not None and config.window < length:
        w = config.window
        pairs = w * (w + 1) / 2 + (length - w) * w
    attention = 2 * 2 * n * d * pairs  # scores and the weighted sum of values
    per_row = config.num_hidden_layers * (projections * length + attention) + 2 * e * config.vocab_size
    return batch * per_row


def decode_step_flops(config: Phi4Config, batch: int, context: float) -> float:
    """Matmul FLOPs of one decode step of `batch` rows, each with `context` cached tokens (no more
    than its sliding window) plus the new one: the projections, the scores and weighted values,
    and the logits."""
    e, n, d = config.hidden_size, config.num_attention_heads, config.head_dim
    keys = context + 1 if config.window is None else min(context + 1, config.window)
    projections = 2 * (config.layer_parameters - 2 * e)
    per_row = config.num_hidden_layers * (projections + 2 * 2 * n * d * keys) + 2 * e * config.vocab_size
    return batch * per_row


def chip_roofline(config: Phi4Config, r: dict, topology: str, devices: list) -> dict:
    """What one chip allows each compiled step (record fields): the step time at the slower of its
    FLOPs at the bf16 peak and its main-memory bytes at the HBM bandwidth, the tokens/s that
    follow, MBU (what a step must read: the weights, less an untied embedding table, and the whole
    KV cache, once) and MFU (the prefill's model FLOPs) at that time; and whether the steps' memory
    fits the chip with the planner's headroom (a step the compiler refused does not). The FLOPs are
    the larger of the program's matmul FLOPs (its loops counted as they run) and XLA's count (all
    operations, each loop body once): both fall short of the work, neither exceeds it."""
    chip, per_chip = targets.chip(topology), targets.devices_per_chip(devices)
    peak, bandwidth, capacity = (chip.bf16_flop_per_s / per_chip, chip.hbm_bytes_per_s / per_chip,
                                 chip.hbm_bytes // per_chip)
    d, steps = r["per_device"], r["steps"]
    compiled = {name: step for name, step in steps.items() if "refused" not in step}
    for name, step in compiled.items():
        step["flops"] = max(step["matmul_flops"], step["xla_flops"] or 0)
        # A decode call runs its steps in a loop: a step reads what the loop does (what the call does
        # once around it, such as a relayout of the cache, is `per_call_bytes`).
        looped = name in ("decode", "speculative")
        step["step_bytes"] = step["main_memory_bytes_in_loops"] if looped else step["main_memory_bytes"]
        step["per_call_bytes"] = step["main_memory_bytes"] - step["step_bytes"]
        compute, memory = step["flops"] / peak, step["step_bytes"] / bandwidth
        step.update(roofline_s=max(compute, memory), bound="flops" if compute >= memory else "bandwidth")
    if "decode" in compiled:
        decode, must_read = compiled["decode"], d["decode_reads_bytes"]
        decode.update(tokens_per_s_bound=r["batch"] / decode["roofline_s"],
                      mbu_bound=must_read / bandwidth / decode["roofline_s"],
                      bytes_over_must_read=decode["step_bytes"] / must_read)
    if "speculative" in compiled and "decode" in compiled:
        # Its loop holds a drafting step beside a plain step (the decode step), each counted once.
        spec, plain = compiled["speculative"], compiled["decode"]
        drafting = spec["step_bytes"] - plain["step_bytes"]
        spec.update(drafting_step_bytes=drafting, plain_bytes_per_token=plain["step_bytes"] / r["batch"],
                    bytes_per_token_all_accepted=drafting / (r["batch"] * (spec["drafts"] + 1)))
    if "prefill" in compiled:
        prefill, work = compiled["prefill"], prefill_flops(config, r["batch"], r["context"]) / r["devices"]
        prefill.update(tokens_per_s_bound=r["batch"] * r["context"] / prefill["roofline_s"],
                       mfu_bound=work / peak / prefill["roofline_s"])
    return {"chip": {"name": chip.name, "bf16_flop_per_s": peak, "hbm_bytes_per_s": bandwidth,
                     "hbm_bytes": capacity, "devices_per_chip": per_chip, "source": chip.source},
            "fits": len(compiled) == len(steps) and d["needed_bytes"] <= USABLE * capacity}
