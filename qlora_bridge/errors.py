"""Errors the user can act on, and the exit codes the CLI maps them to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected library failure: the traceback is shown
EXIT_BAD_INPUT = 2  # the user's input (a file, a folder, a flag) is wrong; the message says how to fix it
EXIT_CHECK_FAILED = 3  # the work ran, but a check it must pass did not (a gate, a fingerprint, a signature)


class BridgeError(Exception):
    """A problem with the user's input: names the file and the field, and says how to fix it."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problem: str, *, file=None, field: str | None = None, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.field = field
        self.fix = fix

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.problem}" if where else self.problem
        return f"{text}\n  fix: {self.fix}" if self.fix else text

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "problem": self.problem, "file": self.file,
                "field": self.field, "fix": self.fix, "exit_code": self.exit_code}


class CheckFailed(BridgeError):
    """The work ran but its result failed a check that protects the user (never a silent success)."""

    exit_code = EXIT_CHECK_FAILED
