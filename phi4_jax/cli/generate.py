"""`phi4-jax generate` and `phi4-jax chat`: generate text with a Phi-4 family model.

The prompt goes through the model's chat template (as a user message, after --system-prompt)
unless --ignore-chat-template; text streams to stdout, statistics go to stderr. `phi4-jax chat`
(or `generate --chat`) holds a conversation on stdin, each turn prefilling only what it adds.
`python -m phi4_jax.generate` is `phi4-jax generate`.

examples:
  phi4-jax generate --prompt "What is 482+37?"          # the built-in demo model
  phi4-jax generate --model ~/models/Phi-4-mini-instruct --prompt "Write a haiku about JAX"
  echo "What is 2+2?" | phi4-jax generate --model microsoft/phi-4 -p - --json
  phi4-jax chat --model ~/ckpt/phi-4-mini
  phi4-jax generate --model ~/models/phi-4 --prompt "Hello" --mesh tensor=8 --verbose
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from phi4_jax.api import PromptCache, stream_generate
from phi4_jax.cli import common as cli
from phi4_jax.engine.sampling import SamplingParams
from phi4_jax.errors import ConfigError, SamplingError

# Sampling fields -> the flags that set them, so a bad value names the flag the user typed.
_FLAG_OF = {"temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
            "repetition_penalty": "--repetition-penalty", "seed": "--seed", "max_tokens": "--max-tokens",
            "stop": "--stop", "stop_token_ids": "--extra-eos-token"}


HELP = "generate text for a prompt (streamed to stdout)"
CHAT_HELP = "chat with a model on stdin, turn by turn"


def add_arguments(p: argparse.ArgumentParser, chat: bool = False) -> None:
    """The flags of `generate` (with `chat`: of `chat`, which reads its prompts from stdin)."""
    p.add_argument("--model", default="demo",
                   help="an HF folder, a folder from `phi4-jax convert`, a repo id in the local HF cache, or "
                        "'demo': the built-in demo model (tiny; it does 1-3 digit addition and subtraction)")
    if not chat:
        p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' reads it from stdin")
    p.add_argument(*cli.flag("--system-prompt"), default=None, help="a system message before the prompt")
    p.add_argument(*cli.flag("--max-tokens"), "-m", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument(*cli.flag("--top-p"), type=float, default=1.0, help="nucleus sampling: keep this much probability")
    p.add_argument(*cli.flag("--top-k"), type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument(*cli.flag("--min-p"), type=float, default=0.0,
                   help="drop tokens less likely than this times the most likely one")
    p.add_argument(*cli.flag("--repetition-penalty"), type=float, default=1.0,
                   help="divide the logits of tokens already seen by this (HF semantics)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed; the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (not printed); repeatable")
    p.add_argument(*cli.flag("--extra-eos-token"), action="append", default=[],
                   help="another token (its text or id) that ends generation; repeatable")
    p.add_argument(*cli.flag("--ignore-eos"), action="store_true",
                   help="do not stop at the model's end-of-sequence tokens")
    p.add_argument(*cli.flag("--ignore-chat-template"), action="store_true",
                   help="feed the prompt as raw text, without the chat template")
    if not chat:
        p.add_argument("--chat", action="store_true",
                       help="interactive multi-turn chat on stdin ('q' quits, 'r' resets the conversation): "
                            "`phi4-jax chat`")
    cli.add_model_flags(p)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object per answer: {"text", "tokens", "prompt_tokens", "finish_reason", '
                        '"stats"}')
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--verbose", action="store_true",
                           help="also print the prompt as the model sees it, and the mesh layout of the weights")
    verbosity.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    if chat:
        p.set_defaults(chat=True, prompt=None)


def sampling_from(args, tokenizer) -> SamplingParams:
    extra = []
    for token in args.extra_eos_token:
        token_id = int(token) if token.isdigit() else tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"--extra-eos-token {token!r} is not a token of this model (give its text or id)")
        extra.append(token_id)
    try:
        return SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              max_tokens=args.max_tokens, stop=tuple(args.stop), stop_token_ids=tuple(extra),
                              ignore_eos=args.ignore_eos)
    except SamplingError as e:
        raise SamplingError(f"{_FLAG_OF.get(e.field, e.field)}: {e}", e.field) from None


def _prompt(args, tokenizer, text: str, history: list[dict]):
    if args.ignore_chat_template or tokenizer.chat_template is None:
        return text
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt and not history else [])
    return history + messages + [{"role": "user", "content": text}]


def _stats(last) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
            "generation_tokens": last.generation_tokens, "generation_tps": last.generation_tps,
            "peak_memory_gb": last.peak_memory_gb, "compile_seconds": last.compile_seconds,
            "compile_cache_seconds": last.compile_cache_seconds, "draft_tokens": last.draft_tokens,
            "accepted_tokens": last.accepted_tokens, "tokens_per_step": last.tokens_per_step}


def _print_stats(last) -> None:
    print("==========", file=sys.stderr)
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec", file=sys.stderr)
    if last.draft_tokens:
        print(f"Speculative: {last.accepted_tokens} of {last.draft_tokens} draft tokens accepted "
              f"({100 * last.accepted_tokens / last.draft_tokens:.0f}%), {last.tokens_per_step:.2f} tokens a step",
              file=sys.stderr)
    if last.peak_memory_gb is not None:
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB", file=sys.stderr)
    cached = f" ({last.compile_cache_seconds:.2f} s of it loading from the compilation cache)" \
        if last.compile_cache_seconds else ""
    print(f"Compile: {last.compile_seconds:.2f} s{cached}, left out of the rates above", file=sys.stderr)


def _run_once(args, engine, tokenizer, sampling, prompt, prompt_cache=None) -> tuple[str, object]:
    if args.verbose:
        shown = prompt if isinstance(prompt, str) else tokenizer.render_chat_template(prompt)
        print(f"==========\n{shown}\n==========", file=sys.stderr)
    pieces, tokens, last = [], [], None
    for response in stream_generate(engine, tokenizer, prompt, sampling, prompt_cache=prompt_cache):
        pieces.append(response.text)
        if response.token is not None:
            tokens.append(response.token)
        if not args.json:
            print(response.text, end="", flush=True)
        last = response
    text = "".join(pieces)
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "prompt_tokens": last.prompt_tokens,
                          "finish_reason": last.finish_reason, "stats": _stats(last)}, ensure_ascii=False))
    else:
        print()
    if not args.quiet:
        _print_stats(last)
    return text, last


def _chat(args, engine, tokenizer, sampling) -> None:
    history: list[dict] = []
    cache = PromptCache()  # each turn prefills only what the conversation added
    print("chat: 'q' quits, 'r' resets the conversation", file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line.strip() == "q":
            break
        if line.strip() == "r":
            history = []
            cache.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        prompt = _prompt(args, tokenizer, line, history)
        text, _ = _run_once(args, engine, tokenizer, sampling, prompt, cache)
        if not isinstance(prompt, str):
            history = prompt + [{"role": "assistant", "content": text}]


def run(args) -> int:
    """The command's body, from its parsed flags (`phi4_jax.cli.main` maps its errors to exit codes)."""
    if args.chat and args.prompt is not None:
        raise ConfigError("--chat reads its prompts from stdin; drop --prompt")
    if not args.chat and args.prompt is None:
        raise ConfigError("give a prompt: --prompt TEXT, or --prompt - to read stdin (or chat: phi4-jax chat)")
    if cli.join_multihost(args) and (args.chat or args.prompt == "-"):
        # Only one host's terminal (or srun task 0) has stdin; every process needs the prompt.
        raise ConfigError("a multi-host run reads no stdin: give every process the same --prompt TEXT")
    if not args.chat:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not text.strip():
            raise ConfigError("the prompt is empty")
    from phi4_jax.api import load
    from phi4_jax.engine.runner import ModelRunner
    from phi4_jax.parallel import distributed
    from phi4_jax.parallel.mesh import describe

    speculation = cli.speculation_from(args)  # (refused before the model is read)

    main_process = distributed.is_main_process()
    model, tokenizer = load(args.model, dtype=args.dtype, mesh=cli.mesh_from(args), progress=main_process,
                            attention=args.attention, quantize=args.quantize)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer files (tokenizer.json or tokenizer.model)")
    if args.verbose and args.mesh and main_process:
        from flax import nnx

        print(describe(nnx.to_pure_dict(nnx.state(model))), file=sys.stderr)
    sampling = sampling_from(args, tokenizer)
    engine = ModelRunner(model, max_context=args.max_context, speculative=speculation,
                         speculative_rows=args.speculative_rows)
    if args.chat:
        _chat(args, engine, tokenizer, sampling)
        return cli.EXIT_OK
    prompt = _prompt(args, tokenizer, text, [])
    if main_process:
        _run_once(args, engine, tokenizer, sampling, prompt)
    else:  # every process runs the same steps; only process 0 prints
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            _run_once(args, engine, tokenizer, sampling, prompt)
    return cli.EXIT_OK
