"""What the subcommands share: exit codes, error reporting, help formatting, mesh, multi-host and quantize flags."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Callable

from phi4_jax.errors import (CheckpointError, ConfigError, ModelNotFoundError, OutOfResourcesError,
                             OutputExistsError, SamplingError, TokenizerError)

EXIT_OK = 0
EXIT_FAILED = 1  # the server's engine failed and could not go on
EXIT_USAGE = 2  # bad flags or input: missing model/file, invalid config.json, output exists
EXIT_CORRUPT = 3  # the model's files are broken: truncated, tensors missing or misshapen, pickle only
EXIT_RESOURCES = 4  # out of disk space or memory
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    serve: the engine failed and could not go on (the log says why)
  {EXIT_USAGE}    usage or input error: bad flags or sampling values, model or file not found,
       invalid config.json or tokenizer, prompt empty or longer than the context, output exists
       (without --overwrite), the command's extra not installed
  {EXIT_CORRUPT}    corrupt model: unreadable or truncated safetensors, tensors missing, unexpected
       or of the wrong shape/dtype, only pickle weights (never unpickled), an Orbax folder of
       another format version (convert it again)
  {EXIT_RESOURCES}    out of resources: not enough disk space or memory
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); nothing partial is left behind"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows each flag's default."""


def token_count(text: str) -> int:
    """An argparse type: "16k" -> 16384, "128K" -> 131072, "4096" -> 4096."""
    text = text.strip().lower()
    try:
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count such as 4096 or 16k") from None


def flag(*names: str) -> list[str]:
    """`--dry-run` plus its underscore spelling `--dry_run`, both accepted."""
    spellings = []
    for name in names:
        spellings.append(name)
        if name.startswith("--") and "-" in name[2:]:
            spellings.append("--" + name[2:].replace("-", "_"))
    return spellings


def add_mesh_flags(p: argparse.ArgumentParser, multihost: bool = True) -> None:
    """--mesh and --devices, and (`multihost`) the flags that join a multi-host run (see `join_multihost`)."""
    p.add_argument("--mesh", default=None,
                   help="shard over a device mesh, e.g. 'tensor=8' or 'data=2,fsdp=2,tensor=2' (axes data, "
                        "fsdp, tensor, seq; it spans the first devices it needs, all of them in a multi-host "
                        "run); default: one device")
    p.add_argument("--devices", default=None,
                   help="the devices the mesh spans, as indices into jax.devices(): a range '4-7' or a list "
                        "'0,2,4,6' (default: the first the mesh needs)")
    if not multihost:
        return
    group = p.add_argument_group("multi-host (one process per host, same command on each)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-host run (needs --mesh over all hosts' devices); on TPU pod slices, "
                            "Slurm and Open MPI nothing else is needed")
    group.add_argument(*flag("--coordinator-address"), default=None,
                       help="process 0's HOST:PORT, the same on every process (implies --distributed; or set "
                            "JAX_COORDINATOR_ADDRESS)")
    group.add_argument(*flag("--num-processes"), type=int, default=None,
                       help="how many processes in all (implies --distributed; or set JAX_NUM_PROCESSES)")
    group.add_argument(*flag("--process-id"), type=int, default=None,
                       help="this process's index, 0 .. num-processes - 1 (implies --distributed; or set "
                            "JAX_PROCESS_ID)")


DTYPES = ("float32", "bfloat16", "float16")  # the compute dtypes --dtype takes


def add_model_flags(p: argparse.ArgumentParser, multihost: bool = True) -> None:
    """What `generate` and `serve` share about the model they run: --max-context, --dtype, the mesh
    flags (`add_mesh_flags`), --quantize, --speculative (and --speculative-rows) and --attention."""
    from phi4_jax.model.attention import IMPLEMENTATIONS

    p.add_argument(*flag("--max-context"), type=int, default=None,
                   help="longest prompt + generation (default: the model's max_position_embeddings)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter and compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    add_mesh_flags(p, multihost)
    add_quantize_flag(p)
    p.add_argument("--speculative", default=None, metavar="ngram[:K[:MIN_N:MAX_N]]",
                   help="prompt-lookup speculative decoding: where the last MIN_N to MAX_N tokens (default 2 to "
                        "4) occurred before in the prompt or answer, propose the K tokens that followed them "
                        "(default 6) and check them in one step. The same tokens, greedy or seeded; faster "
                        "where the answer repeats its input (quoting, editing code). Default: off")
    p.add_argument(*flag("--speculative-rows"), type=int, default=None,
                   help="speculate only in decode batches of at most this many rows (default: 2 on a CPU, where "
                        "a wider step is bound by compute; any number on a GPU/TPU)")
    p.add_argument("--attention", default="auto", choices=list(IMPLEMENTATIONS),
                   help="attention kernel: 'auto' (cuDNN flash attention on an NVIDIA GPU in bfloat16/float16, "
                        "splash attention on a TPU for head_dim 128, else XLA), 'xla' (the reference, any "
                        "backend), 'cudnn' or 'splash' (TPU; prefill only, decode by XLA)")


def add_quantize_flag(p: argparse.ArgumentParser) -> None:
    """--quantize: weight-only int8 as the weights are read (`phi4_jax.load(quantize=)`)."""
    from phi4_jax.model.int8 import KINDS

    p.add_argument("--quantize", default=None, choices=list(KINDS),
                   help="quantize the weights as they are read: int8 projections, LM head and embedding table "
                        "with a float32 scale per output channel (about half the bf16 memory and bytes per "
                        "decode step; activations stay in --dtype). A folder converted with "
                        "phi4-jax convert --quantize int8 is int8 without it. Default: float weights")


def speculation_from(args):
    """The `Speculation` that --speculative asks for (None: off); ConfigError for a bad value."""
    from phi4_jax.engine.speculative import Speculation

    if args.speculative_rows is not None and args.speculative_rows < 1:
        raise ConfigError(f"--speculative-rows must be at least 1, got {args.speculative_rows}")
    return Speculation.parse(args.speculative)


def mesh_from(args):
    """The `Mesh` that --mesh and --devices ask for, or None without --mesh."""
    if args.devices and not args.mesh:
        raise ConfigError("--devices picks the devices of a mesh: give --mesh too (e.g. --mesh tensor=4)")
    if not args.mesh:
        return None
    import jax

    from phi4_jax.parallel.mesh import make_mesh, parse_devices

    devices = jax.devices()
    if args.devices:
        devices = [devices[i] for i in parse_devices(args.devices, len(devices))]
    return make_mesh(args.mesh, devices)


def join_multihost(args) -> bool:
    """Joins the multi-host run that the flags of `add_mesh_flags`, or the environment variables
    they name, ask for (before any device is used). Returns whether it did."""
    import os

    from phi4_jax.parallel import distributed

    asked = (args.distributed or args.coordinator_address or args.num_processes or args.process_id is not None
             or any(os.environ.get(var) for var in distributed.ENV.values()))
    if asked:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return bool(asked)


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Refuses, before any work, a command whose optional dependencies are not installed, naming the
    extra that installs them (exit code 2 through `run`)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"phi4-jax {command} needs {', '.join(missing)} (the {extra} extra): "
                          f"pip install 'phi4-jax[{extra}]'")


def run(main: Callable[[], int | None]) -> int:
    """Runs a command's body; maps phi4_jax's typed errors to exit codes and one-line messages.
    Where libtpu is installed and no TPU is, the CPU is started first (`platforms`), so that libtpu
    prints no start-up errors."""
    from phi4_jax import platforms

    platforms.quiet_without_tpu()
    try:
        return main() or EXIT_OK
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ModelNotFoundError, ConfigError, OutputExistsError, SamplingError, TokenizerError) as e:
        return _fail(e, EXIT_USAGE)
    except CheckpointError as e:
        return _fail(e, EXIT_CORRUPT)
    except (OutOfResourcesError, MemoryError) as e:
        return _fail(str(e) or "out of memory", EXIT_RESOURCES)  # MemoryError() has no message
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
            return _fail(e, EXIT_RESOURCES)
        raise


def _fail(error, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code
