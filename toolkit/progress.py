"""How library code tells its caller what happens, without printing: `Report`.

The CLI renders the events as progress bars and warnings; tests record them.
"""

from __future__ import annotations

import time
from typing import Callable


class Report:
    """How library code tells the caller what happens: `event(kind, **fields)`.

    Kinds: "stage" (name), "progress" (stage, done, total), "warning" (message),
    "epoch" (epoch, loss, val_loss, ...), "self_critical_epoch" (epoch, reward, dev_cider_d, ...), "reused"
    (what: a finished result taken instead of computed again), "resumed" (epoch, folder: training goes on
    from a stopped build's checkpoints). The CLI renders them; tests record them.
    Each stage's wall time, from its event to the next one's (or `end_stage`),
    is kept in `stage_seconds`.
    """

    def __init__(self, callback: Callable[..., None] | None = None):
        self.callback = callback
        self.warnings: list[str] = []
        self.stage_seconds: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def end_stage(self) -> None:
        if self._stage:
            name, since = self._stage
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - since, 1)
            self._stage = None

    def __call__(self, kind: str, **fields) -> None:
        if kind == "warning":
            self.warnings.append(fields["message"])
        elif kind == "stage":
            self.end_stage()
            self._stage = (fields["name"], time.perf_counter())
        if self.callback:
            self.callback(kind, **fields)
