"""`phi4-jax`: the one installed command, a subcommand per job (generate, chat, serve, convert, export, plan).

Every subcommand parses its flags with argparse and runs through `main(argv)`, the function the
console script calls: what the tests call is what users run. Typed errors become one line on
stderr and an exit code (`phi4-jax COMMAND --help` lists them).
"""

from __future__ import annotations

import argparse
import sys

from phi4_jax.cli import common, convert, export, generate, plan, serve

DESCRIPTION = """Microsoft's Phi-4 family (phi-4, Phi-4-mini, Phi-3/3.5-mini) in JAX: generate, chat, serve,
convert and plan, from the Hugging Face folders you already have.

examples:
  phi4-jax generate --prompt "What is 482+37?"                 # the built-in demo model
  phi4-jax chat --model ~/models/Phi-4-mini-instruct
  phi4-jax serve --model ~/models/Phi-4-mini-instruct          # needs pip install 'phi4-jax[serve]'
  phi4-jax convert --model ~/models/phi-4 --output ~/ckpt/phi-4
  phi4-jax export --model ~/ckpt/phi-4 --output ~/models/phi-4-export
  phi4-jax plan --model phi-4 --mesh tensor=8 --context 16k --batch 8

`phi4-jax COMMAND --help` explains each command's flags."""

# name -> (one-line help, the module whose docstring describes it, adds its flags, runs it)
COMMANDS = {
    "generate": (generate.HELP, generate, generate.add_arguments, generate.run),
    "chat": (generate.CHAT_HELP, generate, lambda p: generate.add_arguments(p, chat=True), generate.run),
    "serve": (serve.HELP, serve, serve.add_arguments, serve.run),
    "convert": (convert.HELP, convert, convert.add_arguments, convert.run),
    "export": (export.HELP, export, export.add_arguments, export.run),
    "plan": (plan.HELP, plan, plan.add_arguments, plan.run),
}


def build_parser() -> argparse.ArgumentParser:
    from phi4_jax import __version__

    p = argparse.ArgumentParser(prog="phi4-jax", description=DESCRIPTION, formatter_class=common.HelpFormatter)
    p.add_argument("--version", action="version", version=f"phi4-jax {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, module, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=module.__doc__, epilog=common.EXIT_CODES_HELP,
                                  formatter_class=common.HelpFormatter)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs `phi4-jax` with `argv` (default: the process's arguments, without the program name);
    returns the exit code: 0 for --help and --version, 2 for a usage error argparse reported."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return common.EXIT_OK if e.code in (0, None) else common.EXIT_USAGE
    return common.run(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
