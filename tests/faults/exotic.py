"""An exception class that only a step body imports (R-28): a process that replays the step's
recorded failure must never import it, since the log names it (CVE-2021-23727)."""

from __future__ import annotations

import threading


class NeedyError(Exception):
    """Takes two required constructor arguments and carries attributes pickle refuses."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.guard = threading.Lock()
        self.callback = lambda: None
