"""The one error type users see.

Every failure a user can cause or fix (a bad file, a missing pack, a wrong
flag) is raised as `CapkitError`; the CLI prints its message and hint and
exits non-zero, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations


class CapkitError(Exception):
    """A user-facing failure: what went wrong, and what to do about it.

    >>> raise CapkitError("captions.txt:3: no caption id", hint="expected IMG.jpg#N<TAB>text")
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
