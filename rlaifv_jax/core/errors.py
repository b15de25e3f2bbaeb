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
