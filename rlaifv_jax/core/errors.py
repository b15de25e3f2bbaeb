"""The project's own errors: what the user can fix (a field, a file, a command) or must know (the run
stopped). ``main`` prints their message alone (no traceback unless ``--debug`` / ``--verbosity=1``)
and exits with their ``exit_code``; every other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line, the config or the inputs; the message says what to change."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """One or more config fields are invalid (one line per field: value and allowed values)."""

    def __init__(self, problems: list[str] | str, header: str = "invalid config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(f"{header}: {self.problems[0]}")
        else:
            super().__init__(f"{header}:\n  " + "\n  ".join(self.problems))


class InputError(UserError, ValueError):
    """An input file or directory (data, prompts, checkpoint, workdir) cannot be used."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm; nothing from that step was saved."""

    exit_code = 3


class Preempted(UserError):
    """The run stopped on a signal after saving; rerunning the same command resumes it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


FAULT_EXIT = 3  # the machine or the filesystem failed, not the inputs; the rerun continues


class PeerLost(UserError):
    """Another process of a multi-process run died or stopped answering."""

    exit_code = FAULT_EXIT


_ERRNO_FAULTS = {  # errno -> (cause, what to do)
    28: ("the disk is full (No space left on device)", "free space (or move the workdir), then rerun the same "
         "command: finished stages are kept"),
    122: ("the disk quota is exceeded", "free space or raise the quota, then rerun the same command"),
    30: ("the file system is read-only", "use a writable --workdir (or remount it), then rerun the same command"),
    13: ("permission denied", "fix the permissions (or use another --workdir), then rerun the same command"),
    1: ("operation not permitted", "fix the permissions (or use another --workdir), then rerun the same command"),
}
_TEXT_FAULTS = (  # substrings of wrapped errors (Orbax, TensorStore, XLA) -> errno above
    ("No space left on device", 28), ("ENOSPC", 28), ("Disk quota exceeded", 122),
    ("Read-only file system", 30), ("EROFS", 30), ("Permission denied", 13),
)
_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "heartbeat", "Gloo", "gloo",
              "coordination service", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def fault_message(e: BaseException, multi_process: bool = False) -> str | None:
    """One line naming a machine/filesystem fault behind ``e`` (a full or read-only disk,
    permission denied, a lost peer process) and what to do, or None for any other error (a bug)."""
    for link in _chain(e):
        errno = getattr(link, "errno", None)
        if isinstance(link, OSError) and errno in _ERRNO_FAULTS:
            cause, todo = _ERRNO_FAULTS[errno]
            where = f" writing {link.filename}" if getattr(link, "filename", None) else ""
            return f"{cause}{where}; {todo}"
    text = "\n".join(str(link) for link in _chain(e))
    for needle, errno in _TEXT_FAULTS:
        if needle in text:
            cause, todo = _ERRNO_FAULTS[errno]
            return f"{cause}; {todo}"
    if multi_process and any(needle in text for needle in _PEER_TEXT):
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        return (f"lost contact with another process ({first[:120]}); check which process died, then rerun the "
                "same command on every host: finished stages are kept")
    return None
