"""Files that are never left half-written, never written over a command's own inputs, and created like any
other file of the process (its umask decides who may read them)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from fcn_jax.errors import ConfigError, OutputError, first_line


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (changing it, even for an instant,
    would race with files that background threads create, such as checkpoint writers)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to: renamed to ``path`` when the block completes (a rename
    within one folder is atomic; the folder is created if missing), removed when it fails, so that ``path``
    holds the old file or the whole new one. The file gets the permissions a plain ``open(path, "w")`` would
    (some writers create 0600 files). A place that cannot be written is an
    :class:`~fcn_jax.errors.OutputError` naming ``path``; a failure to remove the temporary file never hides
    the error that made the write fail."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # hosts may share the folder
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {first_line(e)}; choose a folder you can write to, with space "
                          f"left") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


Named = Iterable[tuple[str, "os.PathLike | str"]]


def refuse_overwriting(outputs: Named, inputs: Named) -> None:
    """A ConfigError, before any work, when one of the files a command is about to write (``(what, path)``
    pairs) is one of its inputs (``(what, path)`` pairs): the same path, or the same file through a link."""
    def same(a: Path, b: Path) -> bool:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        with contextlib.suppress(OSError):
            return a.exists() and b.exists() and os.path.samefile(a, b)
        return False

    inputs = list(inputs)
    for out_what, out in outputs:
        for in_what, source in inputs:
            if same(Path(out), Path(source)):
                raise ConfigError(f"{out_what} {out} would overwrite {in_what} {source}: write to another file")
