"""The command lines: `phi4-jax` and its subcommands, each a thin layer over the library."""
