"""The Python API: `load` a model folder, then `generate` / `stream_generate` text with it.

Text in, text out, over the engine (`engine/`), the weights (`checkpoints/`) and the tokenizer
(`text/`); the command lines are thin layers over these functions.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh

from phi4_jax import compilation_cache, platforms
from phi4_jax.checkpoints.hub import resolve
from phi4_jax.checkpoints.load import load_model
from phi4_jax.engine.engine import Engine
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import ConfigError
from phi4_jax.model.phi4 import Phi4ForCausalLM
from phi4_jax.text.stops import request_stop_ids
from phi4_jax.text.tokenizer import Tokenizer

Prompt = str | list[dict]  # raw text, or chat messages rendered with the model's chat template
STEPS_PER_CALL = 16  # decode steps per device call while streaming; the host looks in between


def load(path: str | os.PathLike, dtype=None, mesh: str | Mesh | None = None, progress: bool = True,
         attention: str = "auto", quantize: str | None = None) -> tuple[Phi4ForCausalLM, Tokenizer | None]:
    """Loads a model folder: Hugging Face (config.json + safetensors) or one written by
    `phi4-jax convert`; a repo id (`microsoft/phi-4`) is looked up in the HF cache. Turns on
    JAX's persistent compilation cache (`compilation_cache.enable`) unless it is set already, and
    where libtpu is installed but no TPU is, starts JAX on the CPU (`platforms.quiet_without_tpu`).

    Args:
      path: the folder or repo id.
      dtype: parameter and compute dtype, a name such as "float32" or a jnp dtype; None picks the
        backend's default (float32 on CPU, bfloat16 on GPU/TPU). Weights are cast as they are read.
      mesh: shard the model over a device mesh: a spec such as "data=2,tensor=4" (over the first
        devices it needs; see `parallel.mesh.make_mesh`) or a `jax.sharding.Mesh` with the axes
        data, fsdp, tensor, seq. Each device reads only its own block of each weight. When `tensor`
        does not divide the KV heads they are repeated (`parallel.heads.kv_repeat`), and
        `model.config` says how many there are. None: everything on the first device.
      progress: show a progress bar while reading HF weights.
      attention: the attention implementation: "auto" (cuDNN on a GPU in 16 bits, splash on a TPU
        for head_dim 128, else XLA), "xla", "cudnn" or "splash" (see `phi4_jax.model.attention`).
      quantize: "int8" quantizes the projections, the LM head and the embedding table as they are
        read (weight-only, a float32 scale per output channel: `phi4_jax.model.int8`); activations
        and the norms stay in `dtype`. A folder written by `phi4-jax convert --quantize int8` loads
        int8 without it. None: float weights (ConfigError for an unknown kind).
    Returns:
      `(model, tokenizer)`; the tokenizer is None when the folder has no tokenizer files.
    Raises:
      ModelNotFoundError, ConfigError (`MeshError` for a mesh that does not fit the devices or the
      model), CheckpointError (all `phi4_jax.errors.Phi4Error`), naming the file at fault.
    """
    platforms.quiet_without_tpu()
    compilation_cache.enable()
    model = load_model(path, dtype=dtype, mesh=mesh, progress=progress, attention=attention, quantize=quantize)
    folder = resolve(path).folder
    has_tokenizer = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model"))
    return model, Tokenizer(folder) if has_tokenizer else None


def load_tokenizer(path: str | os.PathLike, revision: str | None = None,
                   offline: bool | None = None) -> Tokenizer:
    """Loads the tokenizer of a model folder, or of an HF repo id (`microsoft/phi-4`) through the HF cache.

    Reads `tokenizer.json` (or, without it, SentencePiece `tokenizer.model`), tokenizer_config.json
    (chat template, special tokens, added tokens), chat_template.jinja when present (it wins over the
    config's template, as in transformers v5), and config.json / generation_config.json for the stop tokens.
    Nothing from the folder is ever executed (`auto_map` is ignored).

    Raises:
      ModelNotFoundError: no such folder, or a repo id that is not in the cache and cannot be downloaded.
      TokenizerError: no tokenizer.json / tokenizer.model in the folder, or one of its files is unreadable.
    """
    return Tokenizer(resolve(path, revision=revision, offline=offline).folder)




@dataclasses.dataclass(frozen=True)
class GenerationResponse:
    """One piece of a streamed generation."""

    text: str  # the new text (may be empty while a character or a possible stop string is held back)
    token: int | None  # the newest token (None for the final flush)
    finish_reason: str | None  # "stop" (stop token or string), "length", or None while running
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float  # prompt tokens per second of the prefill, its compiling left out
    generation_tps: float  # tokens per second of the decode steps after the first token, compiling left out
    compile_seconds: float  # tracing, lowering and compiling in this request (0 once compiled) ...
    compile_cache_seconds: float  # ... of it, loading programs from the persistent compilation cache
    peak_memory_gb: float | None  # the device's peak where the backend reports it (last response only)


class PromptCache:
    """Carries the KV cache from one `stream_generate` call to the next: when the next prompt
    extends the last sequence (a chat's next turn), only its new tokens are prefilled."""

    def __init__(self):
        self.generation = None  # the last finished Generation (its cache is reused, then consumed)

    def reset(self) -> None:
        self.generation = None


class _CompileClock:
    """Seconds JAX spends making programs (tracing, lowering, compiling or loading them from the
    persistent cache), summed from its monitoring events: `total`, and `cached` of it loading."""

    EVENTS = ("/jax/core/compile/backend_compile_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/jaxpr_trace_duration")
    CACHE_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"

    def __init__(self):
        self.total = self.cached = 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        # A cache load is also inside its backend-compile event: it counts in `total` once.
        with self._lock:
            if event in self.EVENTS:
                self.total += duration
            elif event == self.CACHE_EVENT:
                self.cached += duration


_compile_clock = _CompileClock()


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of raw text, or of chat messages through the chat template (generation prompt added)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    else:
        raise ConfigError(f"a prompt is a string or a list of chat messages (dicts), got {type(prompt).__name__}")
    if not ids:
        raise ConfigError("the prompt is empty")
    return ids


def _stop_ids(tokenizer: Tokenizer, params: SamplingParams) -> frozenset[int]:
    return request_stop_ids(tokenizer.eos_token_ids, params.ignore_eos, params.stop_token_ids)


def _peak_memory_gb() -> float | None:
    """The peak of this process's fullest device (None where the backend does not say, as on CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


def stream_generate(model: Phi4ForCausalLM | Engine, tokenizer: Tokenizer, prompt: Prompt,
                    sampling: SamplingParams | None = None, max_tokens: int | None = None,
                    steps_per_call: int = STEPS_PER_CALL, prompt_cache: PromptCache | None = None,
                    ) -> Iterator[GenerationResponse]:
    """Generates from one prompt, yielding a response per token with the text that became safe to
    show (whole characters, no part of a stop string; often empty). A last response (token None)
    flushes held-back text and carries the finish reason.

    Args:
      model: the model, or an `Engine` over it (reuse one to skip re-splitting the model).
      prompt: raw text, or chat messages (the chat template is applied).
      sampling: the sampling parameters (default greedy); `max_tokens` overrides its max_tokens.
      steps_per_call: decode steps per device call (the host looks in every `steps_per_call` tokens).
      prompt_cache: reuse the KV cache of the previous call through the same PromptCache for the
        prefix this prompt shares with that sequence (use one Engine for all such calls).
    """
    engine = model if isinstance(model, Engine) else Engine(model)
    params = sampling or SamplingParams()
    if max_tokens is not None:
        params = dataclasses.replace(params, max_tokens=max_tokens)
    ids = prompt_ids(tokenizer, prompt)
    stops = _stop_ids(tokenizer, params)
    decoder = tokenizer.stream(stop=params.stop, stop_ids=stops)
    compile_before, cached_before = _compile_clock.total, _compile_clock.cached
    start = time.perf_counter()
    previous = prompt_cache.generation if prompt_cache is not None else None
    if prompt_cache is not None:
        prompt_cache.generation = None  # its cache is consumed by the next start
    gen = engine.start([ids], params, [sorted(stops)], continuing=previous)
    new = gen.advance(0)[0]  # the prefill's token
    prefill_compile = _compile_clock.total - compile_before
    # The rates leave compiling out: a first request's would otherwise show its compile, not its speed.
    prefill_s = max(time.perf_counter() - start - prefill_compile, 1e-9)
    decode_start, decode_compile_before = time.perf_counter(), _compile_clock.total
    count = 0

    def response(text, token, reason):
        decode_s = max(time.perf_counter() - decode_start - (_compile_clock.total - decode_compile_before), 1e-9)
        return GenerationResponse(
            text=text, token=token, finish_reason=reason, prompt_tokens=len(ids), generation_tokens=count,
            # (the first token came with the prefill)
            prompt_tps=len(ids) / prefill_s, generation_tps=max(count - 1, 0) / decode_s,
            compile_seconds=_compile_clock.total - compile_before,
            compile_cache_seconds=_compile_clock.cached - cached_before,
            peak_memory_gb=_peak_memory_gb() if reason else None)  # asked of the device once, at the end

    while True:
        for token in new:
            count += 1
            text = decoder.add(token)
            if decoder.stopped:
                gen.stop([0])
                break
            yield response(text, token, None)
        if gen.finished:
            break
        new = gen.advance(steps_per_call)[0]
    if prompt_cache is not None:
        prompt_cache.generation = gen
    yield response(decoder.finish(), None, gen.finish_reasons()[0])


def generate(model: Phi4ForCausalLM | Engine, tokenizer: Tokenizer, prompt: Prompt | Sequence[Prompt],
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             max_tokens: int | None = None) -> str | list[str]:
    """The generated text of a prompt (raw text or chat messages), or of a batch (a list of
    prompts, each with its own SamplingParams if a list is given): rows generate together."""
    single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                         and all(isinstance(m, dict) for m in prompt))
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ConfigError("no prompts given")
    params = sampling or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if max_tokens is not None:
        params = [dataclasses.replace(p, max_tokens=max_tokens) for p in params]
    engine = model if isinstance(model, Engine) else Engine(model)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    stops = [_stop_ids(tokenizer, p) for p in params]
    decoders = [tokenizer.stream(stop=p.stop, stop_ids=s) for p, s in zip(params, stops)]
    gen = engine.start(ids, params, [sorted(s) for s in stops])
    new = gen.advance(0)
    while True:
        for b, tokens in enumerate(new):
            for token in tokens:
                decoders[b].add(token)
                if decoders[b].stopped:
                    gen.stop([b])
                    break
        if gen.finished:
            break
        # Stop strings are only seen by the host: look in every few steps when there are any.
        new = gen.advance(STEPS_PER_CALL if any(p.stop for p in params) else max(p.max_tokens for p in params))
    texts = []
    for decoder in decoders:
        decoder.finish()
        texts.append(decoder.text)
    return texts[0] if single else texts
