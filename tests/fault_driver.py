"""``python tests/fault_driver.py FAULT MAIN_FLAGS...``: ``rlaifv_jax.main`` with one injected
filesystem fault (test_faults.py): ``enospc:SUBSTRING`` makes atomic writes of paths containing
SUBSTRING fail with ENOSPC (a full disk); ``erofs`` makes every file creation fail with EROFS (a
read-only workdir); ``none`` injects nothing."""
import errno
import os
import sys

from absl import app

from rlaifv_jax import main
from rlaifv_jax.core import paths

fault, sys.argv = sys.argv[1], sys.argv[:1] + sys.argv[2:]
if fault.startswith("enospc:"):
    needle, atomic_write_file = fault.split(":", 1)[1], paths.atomic_write_file

    def full_disk(path, write):
        if needle in os.fspath(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return atomic_write_file(path, write)

    paths.atomic_write_file = full_disk
elif fault == "erofs":
    os_open, os_makedirs = os.open, os.makedirs

    def read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return os_open(path, flags, *args, **kwargs)

    def no_dirs(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    os.open, os.makedirs = read_only, no_dirs
app.run(main.main, flags_parser=main.parse_flags)
