"""fcn-jax's cache folder, and JAX's persistent compilation cache inside it.

Everything fcn-jax caches lives under ``$FCN_JAX_CACHE`` (default ``~/.cache/fcn_jax``): CamVid's index
masks and, for the ``fcn-jax`` command, compiled XLA programs. A second start of a command loads its
programs from there instead of compiling them again (a resumed run, a second evaluation, every host of a
slice that shares the folder).

:func:`use_compile_cache` turns JAX's own persistent cache on under ``$FCN_JAX_CACHE/xla/<host>``. The
``fcn-jax`` command calls it first thing; ``import fcn_jax`` does not. It does nothing where:

- ``FCN_JAX_COMPILE_CACHE=0`` is set (the switch that turns it off);
- ``JAX_COMPILATION_CACHE_DIR`` is set, or JAX's cache folder was configured otherwise (yours wins);
- the folder cannot be created (a warning says so, and programs are compiled as before).

Why it is safe:

- JAX keys each entry by the program, the jaxlib version, the backend and its version, ``XLA_FLAGS``, the
  compile options and the devices, so an upgrade or another flag compiles anew instead of loading a stale
  program. XLA:CPU compiles for the host's instruction set, which the key does not name, so the folder
  has one subfolder per CPU model and feature set (a home folder shared by different machines is safe).
- Entries are written once and never changed. Two runs that compile the same program at the same moment
  write the same bytes (XLA's compilation is deterministic for one program, version and machine); a run
  that reads an entry while it is being written, or one left short by a killed process, cannot decode it,
  and JAX then compiles the program again with a warning: a cache problem costs time, never correctness.
- The folder is not size-bounded: JAX's bounded mode rescans every entry on each write (measured: the
  suite's in-process tests 10x slower once the folder held thousands of entries). Delete it to reclaim the
  space; it is rebuilt as programs are compiled.
- In a multi-process run only process 0 writes entries; the others read what is there.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

from fcn_jax.notes import warn

SWITCH = "FCN_JAX_COMPILE_CACHE"


def cache_root() -> Path:
    """``$FCN_JAX_CACHE``, default ``~/.cache/fcn_jax``."""
    return Path(os.environ.get("FCN_JAX_CACHE", Path.home() / ".cache" / "fcn_jax"))


def compile_cache_dir() -> Path:
    """Where :func:`use_compile_cache` keeps this machine's compiled programs."""
    return cache_root() / "xla" / _host_fingerprint()


def use_compile_cache() -> Path | None:
    """Turn JAX's persistent compilation cache on (see the module docstring); the folder, or None if not.

    Works before or after ``import jax``: the settings go into the environment, which JAX reads when it is
    imported (and which child processes inherit), and into ``jax.config`` when JAX is already imported.
    """
    if os.environ.get(SWITCH, "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if "jax" in sys.modules and sys.modules["jax"].config.jax_compilation_cache_dir:
        return None
    folder = compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn("compilation cache off: cannot create %s (%s); set FCN_JAX_CACHE to a folder you can write to",
             folder, e.strerror or e)
        return None
    settings = {"jax_compilation_cache_dir": str(folder),
                # On CPU most of a start is many programs of 0.1-1 s each; JAX's default skips those under 1 s.
                "jax_persistent_cache_min_compile_time_secs": 0}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:
        for name, value in settings.items():
            sys.modules["jax"].config.update(name, value)
    return folder


def _host_fingerprint() -> str:
    """The machine architecture, CPU model and feature flags, hashed: programs for one CPU stay with it."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    fields = [platform.machine()]
    fields += sorted({line for line in cpuinfo.splitlines()
                      if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")})
    return f"{platform.machine()}-{hashlib.sha256(chr(10).join(fields).encode()).hexdigest()[:12]}"
