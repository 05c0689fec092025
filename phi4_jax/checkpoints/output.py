"""Output folders written atomically: into a hidden sibling, renamed onto the output at the very end.

An interrupted or failed run leaves the output absent (or the previous one intact, when
overwriting); the next run removes what killed runs left beside it. Disk space is checked first,
and a full disk is a typed error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator

from phi4_jax.errors import ModelNotFoundError, OutOfResourcesError, OutputExistsError


@contextlib.contextmanager
def atomic_folder(output: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh hidden sibling of `output` to write into; renames it onto `output` when the
    block finishes, and removes it when the block raises. With `overwrite`, a previous `output`
    is kept until the new one is complete."""
    output = check_output(output, overwrite)
    parent, name = os.path.split(output)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(output):
            os.rename(output, old)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(output):
            os.rename(old, output)
        raise
    _remove(old)


def check_output(output: str, overwrite: bool, source: str | None = None, clean: bool = True) -> str:
    """The absolute output path, once it is known that it can be written (and would not replace
    or sit inside `source`). With `clean`, first removes what killed runs left beside it (putting
    back an old output that one had moved aside)."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    if not os.path.isdir(parent):
        raise ModelNotFoundError(f"the parent folder of {output} does not exist")
    if clean:
        _remove_leftovers(parent, name)
    if source is not None:
        src = os.path.realpath(source)
        real = os.path.realpath(output)
        if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
            raise OutputExistsError(f"{output} would overwrite or nest in the source {source}; "
                                    "choose another output folder")
    if os.path.lexists(output) and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it (it is kept "
                                "until the new one is complete)")
    return output


def _remove_leftovers(parent: str, name: str) -> None:
    """Removes what runs killed mid-way left beside `name` (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)$")
    for entry in sorted(os.listdir(parent)):
        match = pattern.match(entry)
        if not match or _alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(os.path.join(parent, name)):
            os.rename(path, os.path.join(parent, name))  # killed between the two renames
        else:
            _remove(path)


def _remove(path: str) -> None:
    """Removes a folder tree, or the file or link an overwritten OUTPUT was (never a link's target)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(folder: str, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutOfResourcesError(f"{folder} has {gb(free)} free; the output needs about {gb(needed)}")


@contextlib.contextmanager
def disk_full_is_typed(where: str):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfResourcesError(f"no space left while writing {where}") from None
        raise


def gb(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
