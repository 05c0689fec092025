"""`python -m phi4_jax` is the `phi4-jax` command."""

import sys

from phi4_jax.cli.main import main

sys.exit(main())
