"""Entry point: ``python -m rlaifv_jax.main --config configs/<name>.py[:arg] --workdir DIR``.

``--config.field=value`` overrides any field (an unknown field is refused with a suggestion).
The config's ``mode`` picks the job: ``online`` (the RLAIF-V loop) or ``offline_dpo``.
Multi-host: ``--distributed`` (Cloud TPU, Slurm auto-detection), or explicit
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (any machines, also several
processes on one machine); every process runs the same command.

The console: our own log lines at INFO, every library at WARNING, progress bars. ``--verbosity``
(absl) is honoured: ``-1`` hides our INFO lines, ``1`` adds our DEBUG lines and library INFO lines,
``2`` library DEBUG lines. Mistakes in the command, config or inputs end with a one-line message
and exit code 2 (``core.errors``); machine faults (a full, read-only or forbidden workdir, a lost
peer process) with a one-line cause and what to do, exit code 3; ``--debug`` or ``--verbosity>=1``
shows their traceback. One run per workdir (``core.lock``): a second is refused with exit code 2.
"""
from __future__ import annotations

import os

# Before any library is imported: no "PyTorch was not found"-style advice from transformers (its
# warnings stay on), no TensorFlow C++ INFO lines (tfds), no gRPC chatter from multi-host start-up.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import difflib  # noqa: E402
import logging  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
from absl.logging import converter  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output; rerun with the same one to resume.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed with cluster auto-detection "
                                 "(Cloud TPU slice, Slurm).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of configuration and input errors.")
flags.mark_flags_as_required(["config", "workdir"])

OURS = "rlaifv_jax"


# ------------------------------------------------------------------------------------------ errors
def _debug_requested(argv: list[str]) -> bool:
    for a in argv:
        if a in ("--debug", "--debug=true", "--debug=True", "--debug=1"):
            return True
        for prefix in ("--verbosity=", "-v="):
            if a.startswith(prefix) and a[len(prefix):].lstrip("-").isdigit() and int(a[len(prefix):]) >= 1:
                return True
    return False


def _fail(message: str, exit_code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def _flatten(d: Any, prefix: str = "") -> list[str]:
    if hasattr(d, "items"):
        return [k for key, v in d.items() for k in _flatten(v, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(argv: list[str]) -> tuple[str, Any] | None:
    """``(path, config)`` of the ``--config`` file, loaded as ml_collections will (None if it fails:
    absl's parsing then reports the config file's own error)."""
    spec = _config_arg(argv)
    if not spec:
        return None
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        _fail(f"--config={spec}: {path} is not a file")
    try:
        get_config = runpy.run_path(path)["get_config"]
        return path, (get_config(arg) if arg else get_config())
    except Exception:  # noqa: BLE001
        return None


def _renamed_arg(arg: str, renamed: dict[str, str]) -> str:
    name, sep, value = arg[len("--config."):].partition("=")
    return f"--config.{renamed[name]}{sep}{value}"


def check_overrides(argv: list[str], refuse_unknown: bool = True) -> list[str]:
    """Refuse ``--config.FIELD`` overrides naming no field of the config, in one line with the
    closest field names (ml_collections would raise an AttributeError deep in flag parsing; with
    ``refuse_unknown=False``, as under ``--debug``, it is left to do so).
    Returns ``argv`` with deprecated field names renamed (``core.vocabulary``)."""
    names = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    loaded = _load_config(argv) if names else None
    if loaded is None:
        return argv
    path, config = loaded
    fields = _flatten(config.to_dict())
    from rlaifv_jax.core import vocabulary
    renamed = {n: vocabulary.rename_override(n, set(fields)) for n in names}
    if any(n != new for n, new in renamed.items()):
        print("warning: deprecated --config names (read for one more release): "
              + ", ".join(f"{n} -> {new}" for n, new in renamed.items() if n != new), file=sys.stderr)
        argv = [_renamed_arg(a, renamed) if a.startswith("--config.") else a for a in argv]
        names = list(renamed.values())
    if not refuse_unknown:
        return argv
    groups = {f.rsplit(".", i)[0] for f in fields for i in range(1, f.count(".") + 1)}
    for name in names:
        if name in fields:
            continue
        if name in groups:
            _fail(f"--config.{name}: {name} is a group of fields, set one of them (e.g. --config."
                  f"{next(f for f in fields if f.startswith(name + '.'))}=...)")
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
        tail = difflib.get_close_matches(name.rsplit(".", 1)[-1], [f.rsplit(".", 1)[-1] for f in fields], n=1)
        close = close or [f for f in fields if tail and f.endswith("." + tail[0])][:3]
        hint = f"; did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
        _fail(f"--config.{name}: {path} has no field {name!r}{hint}")
    return argv


def _expected_type(argv: list[str], message: str) -> str:
    """``"; dpo.beta takes a float (e.g. 0.2)"`` for a bad ``--config.dpo.beta`` value, else ""."""
    if not message.startswith("flag --config."):
        return ""
    field = message[len("flag --config."):].split("=", 1)[0]
    loaded = _load_config(argv)
    if loaded is None:
        return ""
    value: Any = loaded[1]
    for part in field.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    if value is None:
        return ""
    kind = {bool: "True or False", int: "an integer", float: "a float", str: "a string"}.get(type(value),
                                                                                           type(value).__name__)
    return f"; {field} takes {kind} (e.g. {value!r})"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (unknown config fields, values of the wrong type)."""
    debug = _debug_requested(argv)
    argv = check_overrides(argv, refuse_unknown=not debug)
    sys.argv = list(argv)  # ml_collections reads --config.FIELD overrides from sys.argv itself
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if debug:
            raise
        message = str(e)
        if "Error whilst parsing config file" in message:  # get_config raised: its own last line
            message = f"--config={_config_arg(argv)}: " + message.strip().splitlines()[-1]
        _fail(f"{message}{_expected_type(argv, message)}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised inside config overrides
        if debug:
            raise
        _fail(f"bad --config override: {str(e).strip(chr(39))}")
    return []


# ----------------------------------------------------------------------------------------- logging
class _ConsoleHandler(logging.Handler):
    """Our log lines above any progress bar (``tqdm.write``): INFO plain, others with the level."""

    def emit(self, record: logging.LogRecord) -> None:
        import tqdm
        try:
            text = self.format(record)
            if record.levelno != logging.INFO:
                text = f"{record.levelname}: {text}"
            tqdm.tqdm.write(text, file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure_logging() -> None:
    """Our logger at INFO, every library at WARNING; an explicit ``--verbosity`` moves both."""
    verbosity = flags.FLAGS["verbosity"]
    explicit = verbosity.present
    v = verbosity.value if explicit else 0
    ours = converter.absl_to_standard(min(v, 1)) if explicit else logging.INFO
    libraries = logging.WARNING if v <= 0 else logging.INFO if v == 1 else logging.DEBUG
    logging.getLogger().setLevel(libraries)
    logger = logging.getLogger(OURS)
    logger.setLevel(ours)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.propagate = False
    logging.captureWarnings(True)  # Python warnings go through logging (shown at WARNING, once each)
    try:
        import transformers
        transformers.logging.set_verbosity(libraries)
        for handler in logging.getLogger("transformers").handlers:  # its own handler (it does not propagate)
            handler.addFilter(_drop_torchvision_notice)
    except ImportError:
        pass


def _drop_torchvision_notice(record: logging.LogRecord) -> bool:
    """transformers 5 says once per image processor class that torchvision is missing and it uses the
    PIL backend; that is this project's setup (torchvision does not work with CPU torch), not news."""
    return "requires torchvision (not installed)" not in record.getMessage()


def skip_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` extra, also used for ahead-of-time planning) JAX tries the
    TPU backend first, and on a machine without TPU chips libtpu prints C++ errors to stderr before
    falling back. When ``JAX_PLATFORMS`` is unset and neither a TPU chip nor an NVIDIA GPU is on this
    machine (JAX's own PCI / device-file checks, which load nothing), use the CPU directly."""
    if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME"):
        return
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        return
    import jax
    from jax._src import hardware_utils  # no public API for "is a TPU attached"
    if jax.config.jax_platforms or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 \
            or hardware_utils.has_visible_nvidia_gpu():
        return
    jax.config.update("jax_platforms", "cpu")


# -------------------------------------------------------------------------------------------- main
def run(config, workdir: str) -> None:
    """Start multi-host (if asked) and run the config's job."""
    from rlaifv_jax.core import distributed, paths
    from rlaifv_jax.core.errors import ConfigError, InputError
    try:
        workdir = paths.check_workdir(workdir)
    except ValueError as e:
        raise InputError(str(e)) from None
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise InputError(f"--workdir={workdir} is a file, not a directory")
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value)
    except ValueError as e:
        raise ConfigError(str(e), header="bad multi-host flags") from None
    if config.mode not in ("online", "offline_dpo"):
        raise ConfigError(f"mode={config.mode!r} must be one of 'online', 'offline_dpo'")
    import jax
    from rlaifv_jax.core import hardware
    mismatch = hardware.slice_mismatch(config.get("slice", ""), jax.devices()[0].device_kind, jax.device_count())
    if mismatch and jax.process_index() == 0:
        logging.getLogger(OURS).warning(mismatch)
    from rlaifv_jax.core import lock
    with lock.hold_once(workdir):  # one run per workdir (process 0 takes it for all)
        if config.mode == "online":
            from rlaifv_jax.pipelines import online
            online.run(config, workdir)
        else:
            from rlaifv_jax.pipelines import offline
            offline.run(config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging()
    skip_absent_tpu()
    from rlaifv_jax.core import compile_cache
    compile_cache.enable()
    from rlaifv_jax.core.errors import UserError
    debug = _DEBUG.value or flags.FLAGS["verbosity"].value >= 1
    from rlaifv_jax.core import distributed
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        distributed.mark_exit(False, f" (exit {e.exit_code})")
        if debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        distributed.mark_exit(False, " (interrupted)")
        _fail("interrupted; rerun the same command to resume (finished stages are kept)", 130)
    except Exception as e:  # noqa: BLE001 - a machine fault ends in one line; anything else is a bug
        import jax
        from rlaifv_jax.core.errors import FAULT_EXIT, fault_message
        multi = jax.process_count() > 1
        message = fault_message(e, multi_process=multi)
        if message is None:
            distributed.mark_exit(False, f" ({type(e).__name__})")
            raise
        if debug:
            traceback.print_exc()
        if multi:  # names a lost peer; no shutdown barrier (it would wait for the lost peer)
            distributed.exit_after_fault(message, FAULT_EXIT)
        _fail(message, FAULT_EXIT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
