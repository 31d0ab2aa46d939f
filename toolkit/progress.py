"""How library code tells its caller what happens, without printing: `Report`.

The CLI renders the events as progress bars and warnings; tests record them.
"""

from __future__ import annotations

from typing import Callable


class Report:
    """How library code tells the caller what happens: `event(kind, **fields)`.

    Kinds: "stage" (name), "progress" (stage, done, total), "warning" (message),
    "epoch" (epoch, loss, val_loss, ...). The CLI renders them; tests record them.
    """

    def __init__(self, callback: Callable[..., None] | None = None):
        self.callback = callback
        self.warnings: list[str] = []

    def __call__(self, kind: str, **fields) -> None:
        if kind == "warning":
            self.warnings.append(fields["message"])
        if self.callback:
            self.callback(kind, **fields)
