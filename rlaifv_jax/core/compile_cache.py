"""JAX's persistent compilation cache for command-line runs, so a second run compiles nothing.

The cache directory is ``$RLAIFV_JAX_CACHE`` if set (empty: no cache), else ``jax`` under the user's
cache directory (``$XDG_CACHE_HOME/rlaifv_jax`` or ``~/.cache/rlaifv_jax``). A ``JAX_COMPILATION_CACHE_DIR``
or ``jax_compilation_cache_dir`` set by the user wins. Every program is cached, however quick to
compile: the toy runs consist of many sub-second compilations.
"""
from __future__ import annotations

import logging
import os

import jax

ENV = "RLAIFV_JAX_CACHE"
log = logging.getLogger(__name__)


def default_dir() -> str:
    """Where the cache goes unless ``$RLAIFV_JAX_CACHE`` says otherwise."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rlaifv_jax", "jax")


def enable() -> str | None:
    """Turn the persistent cache on (see the module docstring); returns its directory, or None when off."""
    if jax.config.jax_compilation_cache_dir:  # the user's own setting (flag, env var or code)
        return jax.config.jax_compilation_cache_dir
    path = os.environ.get(ENV, default_dir())
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s); set %s= to silence", path, e.strerror, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
