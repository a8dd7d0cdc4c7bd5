"""A node's event log: one JSON object per line (ready, step, error, exit).

`resbm simulate` tails these files for its progress bar and summary; a person can `tail -f` them.
Each line is written whole and flushed, so a reader never sees half an event.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete events so far (a partial last line is left for the next read)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
