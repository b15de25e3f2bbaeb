"""One path layer for local folders and cloud buckets (``gs://...``), over ``etils.epath``.

Every function takes a path string. Local paths go straight to the OS (same behaviour and speed as
``os``); ``scheme://`` paths go through ``epath``, whose Google Cloud Storage backend is ``gcsfs``
(or TensorFlow's gfile when TensorFlow is installed). Writes are atomic either way: a local file is
written to a hidden temp file beside it, fsynced and ``os.replace``d; a cloud object only appears
once its upload completes. :func:`check_workdir` fails at start, in one line and without creating
anything, when a cloud path cannot be used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from typing import IO, Callable

from etils import epath

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 24


def is_remote(path: str) -> bool:
    """Whether ``path`` names a cloud object (``gs://bucket/...``) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: str) -> epath.Path:
    """``path`` as an ``epath.Path`` (local or cloud)."""
    return epath.Path(os.fspath(path))


def abspath(path: str) -> str:
    """Absolute local path; cloud paths unchanged (``os.path.abspath('gs://b')`` would be wrong)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of directory ``path``."""
    return [p.name for p in as_path(path).iterdir()] if is_remote(path) else os.listdir(path)


def makedirs(path: str) -> None:
    """Create ``path`` and its parents if missing (a no-op for cloud prefixes, which need no folders)."""
    if is_remote(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    if is_remote(path):
        as_path(path).unlink()
    else:
        os.remove(path)


def open_file(path: str, mode: str = "r") -> IO:
    """Open ``path`` for reading or (non-atomic) writing; text modes use UTF-8."""
    if is_remote(path):
        return as_path(path).open(mode)
    return open(path, mode, encoding=None if "b" in mode else "utf-8")


def read_text(path: str) -> str:
    with open_file(path) as f:
        return f.read()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str, write: Callable[[str], None]) -> None:
    """Put the file that ``write(local_tmp_path)`` produces at ``path``, atomically.

    Local: the temp file is ``.tmp-NAME.PID`` in the same directory, fsynced, then ``os.replace``d.
    Cloud: the temp file is local and is uploaded in one object write.
    """
    path = os.fspath(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = os.path.join(tmp_dir, os.path.basename(path))
            write(tmp)
            with open(tmp, "rb") as src, as_path(path).open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        return
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{name}.{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory or ".")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write_file(path, write)


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` (either may be a cloud path), atomically at ``dst``."""
    def write(tmp: str) -> None:
        with open_file(src, "rb") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out, _CHUNK)
    atomic_write_file(dst, write)


def _cache_dir() -> str:
    return os.environ.get("RLAIFV_CACHE") or os.path.join(tempfile.gettempdir(), "rlaifv_jax_cache")


def local_file(path: str) -> str:
    """A local path holding the file ``path``: itself when local, else a cached download.

    The cache (``$RLAIFV_CACHE``, default ``$TMPDIR/rlaifv_jax_cache``) is keyed by path, size and
    modification time, so a changed object is downloaded again.
    """
    if not is_remote(path):
        return os.fspath(path)
    stat = as_path(path).stat()
    key = hashlib.sha1(f"{path}|{stat.length}|{stat.mtime}".encode()).hexdigest()[:16]
    local = os.path.join(_cache_dir(), key, os.path.basename(path))
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        copy_file(path, local)
    return local


_BACKENDS = ("gcsfs", "tensorflow")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def check_workdir(path: str) -> str:
    """The workdir ``path`` ready to use (local: absolute), or a one-line ``ValueError``.

    A cloud path needs a storage backend (``gcsfs``, or TensorFlow) and a bucket that the current
    credentials can see. Nothing is created, locally or remotely.
    """
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.abspath(path)
    scheme, rest = path.split("://", 1)
    if scheme != "gs":
        raise ValueError(f"workdir {path}: unsupported scheme {scheme}://; use a local path or gs://BUCKET/...")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"workdir {path}: no bucket name; expected gs://BUCKET/PATH")
    if not any(importlib.util.find_spec(m) for m in _BACKENDS):
        raise ValueError(f"workdir {path}: no Google Cloud Storage backend is installed "
                         "(pip install gcsfs); nothing was written")
    try:
        visible = as_path(f"gs://{bucket}").exists()
    except Exception as e:  # noqa: BLE001 - any backend/credential failure becomes the one-line error
        raise ValueError(f"workdir {path}: cannot access gs://{bucket} ({_one_line(e)}); check the "
                         "credentials (gcloud auth application-default login)") from None
    if not visible:
        raise ValueError(f"workdir {path}: bucket gs://{bucket} does not exist or is not visible with "
                         "the current credentials")
    return path


def resolve_under(path: str, root: str, allow_outside_root: bool = False) -> str | None:
    """``path`` (relative: to ``root``; absolute: as it is), or None when it resolves (symlinks
    followed) outside ``root`` and ``allow_outside_root`` is false: a file downloaded from elsewhere
    must not make the run open ``../../x`` or ``/etc/...``."""
    full = path if os.path.isabs(path) else os.path.join(root, path)
    if allow_outside_root:
        return full
    real, real_root = os.path.realpath(full), os.path.realpath(root)
    return full if os.path.commonpath([real, real_root]) == real_root else None
