"""`python convert/hf_to_orbax.py` in a checkout is `phi4-jax convert` (HF folder -> Orbax folder)."""

import sys

from phi4_jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
