"""The Python API: `load` a model folder, then `generate` / `stream_generate` text with it.

Text in, text out, over the engine (`engine/`), the weights (`checkpoints/`) and the tokenizer
(`text/`); the command lines are thin layers over these functions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh

from phi4_jax import compilation_cache, platforms
from phi4_jax.checkpoints.hub import resolve
from phi4_jax.checkpoints.load import load_model
from phi4_jax.engine.engine import Engine, RequestOutput
from phi4_jax.engine.runner import ModelRunner
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.engine.speculative import Speculation
from phi4_jax.errors import ConfigError, GenerationError
from phi4_jax.model.phi4 import Phi4ForCausalLM
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
    prompt_tps: float  # prompt tokens per second of the prefill (reused ones not counted), its compiling left out
    generation_tps: float  # tokens per second of the decode steps after the first token, compiling left out
    compile_seconds: float  # tracing, lowering and compiling in this request (0 once compiled) ...
    compile_cache_seconds: float  # ... of it, loading programs from the persistent compilation cache
    peak_memory_gb: float | None  # the device's peak where the backend reports it (last response only)
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused from the previous turn
    draft_tokens: int = 0  # speculative decoding: draft tokens verified ...
    accepted_tokens: int = 0  # ... and accepted (tokens made without a step of their own)
    tokens_per_step: float = 1.0  # tokens made per decode step after the first token


class PromptCache:
    """Carries the KV cache from one `stream_generate` call to the next: when the next prompt
    extends the last sequence (a chat's next turn), only its new tokens are prefilled. It holds the
    engine those calls run on (made by the first call)."""

    def __init__(self):
        self.model = self.engine = None  # the model (or runner) given, and the Engine over it

    def reset(self) -> None:
        self.model = self.engine = None


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


def _peak_memory_gb() -> float | None:
    """The peak of this process's fullest device (None where the backend does not say, as on CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / 1e9 if peaks else None


def _runner(model: Phi4ForCausalLM | ModelRunner, speculative: str | Speculation | None = None) -> ModelRunner:
    """A runner of the model (a runner given as it is); with `speculative`, one that speculates so."""
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
    return runner if speculative is None else runner.speculating(speculative)


def _outputs(engine: Engine) -> Iterator[RequestOutput]:
    """Steps `engine` until it holds nothing, yielding the outputs; a failed request raises its error."""
    try:
        for out in engine.outputs():
            if out.finish_reason == "error":
                raise GenerationError(out.error)
            yield out
    finally:
        for request_id in engine.request_ids():  # the caller stopped reading: end what runs
            engine.abort(request_id)
        for _ in engine.outputs():
            pass


def stream_generate(model: Phi4ForCausalLM | ModelRunner, tokenizer: Tokenizer, prompt: Prompt,
                    sampling: SamplingParams | None = None, max_tokens: int | None = None,
                    steps_per_call: int = STEPS_PER_CALL, prompt_cache: PromptCache | None = None,
                    speculative: str | Speculation | None = None) -> Iterator[GenerationResponse]:
    """Generates from one prompt, yielding a response per token with the text that became safe to
    show (whole characters, no part of a stop string; often empty). A last response (token None)
    flushes held-back text and carries the finish reason.

    Args:
      model: the model, or a `ModelRunner` over it (reuse one to skip re-splitting the model).
      prompt: raw text, or chat messages (the chat template is applied).
      sampling: the sampling parameters (default greedy); `max_tokens` overrides its max_tokens.
      steps_per_call: decode steps per device call (the host looks in every `steps_per_call` tokens).
      prompt_cache: reuse the KV cache of the previous call through the same PromptCache for the
        prefix this prompt shares with that sequence.
      speculative: prompt-lookup speculative decoding, as "ngram:6" (`engine.speculative`): the same
        tokens, fewer decode steps where the answer repeats the prompt; None: the runner's setting.
    """
    params = sampling or SamplingParams()
    if max_tokens is not None:
        params = dataclasses.replace(params, max_tokens=max_tokens)
    ids = prompt_ids(tokenizer, prompt)
    engine = prompt_cache.engine if prompt_cache is not None and prompt_cache.model is model else None
    if engine is None:
        engine = Engine(_runner(model, speculative), tokenizer, max_batch=1, steps_per_call=steps_per_call)
        if prompt_cache is not None:
            prompt_cache.model, prompt_cache.engine = model, engine
    engine.add_request("stream", ids, params)
    for out in _outputs(engine):
        n = len(out.token_ids)
        for k, token in enumerate(out.token_ids):  # a response per token; the text comes with the last
            text = out.text if k == n - 1 and not out.finished else ""
            yield _response(out, text, token, None, count=out.stats.generation_tokens - (n - 1 - k))
        if out.finished:
            yield _response(out, out.text, None, out.finish_reason, count=out.stats.generation_tokens, final=True)


def _response(out: RequestOutput, text: str, token: int | None, reason: str | None, count: int,
              final: bool = False) -> GenerationResponse:
    s = out.stats
    return GenerationResponse(
        text=text, token=token, finish_reason=reason, prompt_tokens=s.prompt_tokens, generation_tokens=count,
        prompt_tps=s.prompt_tps, generation_tps=s.generation_tps,
        compile_seconds=s.compile_seconds, compile_cache_seconds=s.compile_cache_seconds,
        peak_memory_gb=_peak_memory_gb() if final else None, cached_tokens=s.cached_tokens,
        draft_tokens=s.spec_draft_tokens, accepted_tokens=s.spec_accepted_tokens, tokens_per_step=s.tokens_per_step)


def generate(model: Phi4ForCausalLM | ModelRunner, tokenizer: Tokenizer, prompt: Prompt | Sequence[Prompt],
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             max_tokens: int | None = None, max_batch: int = 16,
             speculative: str | Speculation | None = None) -> str | list[str]:
    """The generated text of a prompt (raw text or chat messages), or of a batch (a list of
    prompts, each with its own SamplingParams if a list is given): up to `max_batch` rows generate
    together, each new prompt joining as a row finishes (continuous batching). `speculative`: as
    in `stream_generate`."""
    single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                         and all(isinstance(m, dict) for m in prompt))
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ConfigError("no prompts given")
    params = sampling or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts need as many SamplingParams; got {len(params)}")
    if max_tokens is not None:
        params = [dataclasses.replace(p, max_tokens=max_tokens) for p in params]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    # Stop strings are seen only by the host, and waiting prompts join only between calls: then look
    # in every few steps; else each row may run to its end in one call.
    few = any(p.stop for p in params) or len(prompts) > max_batch
    engine = Engine(_runner(model, speculative), tokenizer, max_batch=max_batch, max_queue=len(prompts),
                    steps_per_call=STEPS_PER_CALL if few else max(p.max_tokens for p in params))
    engine.add_requests([(str(i), p_ids, p) for i, (p_ids, p) in enumerate(zip(ids, params))])
    texts = [""] * len(prompts)
    for out in _outputs(engine):
        texts[int(out.request_id)] += out.text
    return texts[0] if single else texts
