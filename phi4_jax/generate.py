"""`python -m phi4_jax.generate` is `phi4-jax generate`; `phi4_jax.generate(...)` stays the API function.

After `import phi4_jax.generate` the package attribute `phi4_jax.generate` is this module, so the
module is made callable: calling it calls `phi4_jax.api.generate`.
"""

import sys
import types

from phi4_jax.api import generate as _generate


def main(argv: list[str] | None = None) -> int:
    """`phi4-jax generate` with `argv` (flags only); returns the exit code."""
    from phi4_jax.cli.main import main as phi4_jax

    return phi4_jax(["generate", *(sys.argv[1:] if argv is None else argv)])


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
