"""`python convert/orbax_to_hf.py` in a checkout is `phi4-jax export` (Orbax folder -> HF folder)."""

import sys

from phi4_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
