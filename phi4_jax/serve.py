"""`python -m phi4_jax.serve` is `phi4-jax serve`: the OpenAI-compatible server (the serve extra)."""

import sys


def main(argv: list[str] | None = None) -> int:
    """`phi4-jax serve` with `argv` (flags only); returns the exit code once the server has stopped."""
    from phi4_jax.cli.main import main as phi4_jax

    return phi4_jax(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
