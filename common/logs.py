"""Logging of a long-running process (node, coordinator): the terminal, and a rotating file.

A daemon started by systemd or docker has nobody watching its terminal, so with `--log-file` every
record also goes to a file that is appended to (a restart after a crash continues the same file)
and rotated by size, so a node that runs for weeks cannot fill its disk. Set-up is idempotent:
a process that sets it up again (a node re-executed for another stage, a test) replaces the
handlers it installed instead of adding a second copy of each.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

MAX_BYTES = 20 * 1024 * 1024  # per file
BACKUPS = 5  # node.log.1 .. node.log.5: at most ~120 MB per process
_OURS = "_resbm_handler"  # marks the handlers this module installed on the root logger


def setup_logging(
    level: str = "INFO",
    prefix: str = "",
    log_file: str | Path | None = None,
    hivemind: bool = False,
) -> None:
    """Log at `level` to stderr and, with `log_file`, append to that file too (rotated at
    MAX_BYTES, BACKUPS old files kept). `hivemind`: send hivemind's own records (the DHT,
    averaging) through the same handlers; it otherwise prints them on its own handler only."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        path = Path(log_file).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
                )
            )
        except OSError as err:
            raise ValueError(f"cannot open the log file {path} (--log-file): {err}") from None
    for handler in handlers:
        handler.setFormatter(fmt)
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    if hivemind:
        from hivemind.utils.logging import use_hivemind_log_handler

        # "nowhere": hivemind's records propagate to the root logger and go through our
        # handlers only ("in_root_logger" would swap our terminal handler for its own)
        use_hivemind_log_handler("nowhere")
    if log_file is not None:  # a crash's traceback must reach the file, not only the terminal
        sys.excepthook = _log_uncaught


def _log_uncaught(kind, value, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("uncaught").critical("uncaught exception", exc_info=(kind, value, tb))


class Repeats:
    """Logs a failure that keeps repeating (a redial of a neighbour that is down, every half
    second) the first time, then at doubling intervals up to `max_s`, each time with how many
    were left out, and once more when it stops: a line, not a flood.

    `failed(key, message)` for each failure, `recovered(key)` when it succeeded."""

    def __init__(self, log: logging.Logger, first_s: float = 1.0, max_s: float = 60.0, clock=None):
        import time

        self.log, self.first_s, self.max_s = log, first_s, max_s
        self.clock = clock or time.monotonic
        self._state: dict[str, tuple[float, float, int]] = {}  # key -> (next, interval, left out)

    def failed(self, key: str, message: str) -> bool:
        """Log `message` (its first line) if it is time; True if it was logged."""
        now = self.clock()
        first_line = message.strip().splitlines()[0] if message.strip() else message
        nxt, interval, left_out = self._state.get(key, (now, self.first_s / 2, 0))
        if now < nxt:
            self._state[key] = (nxt, interval, left_out + 1)
            return False
        interval = min(interval * 2, self.max_s)
        more = f" ({left_out} more since, next report in {interval:.0f}s)" if left_out else ""
        self.log.warning("%s%s", first_line, more)
        self._state[key] = (now + interval, interval, 0)
        return True

    def recovered(self, key: str, message: str | None = None) -> None:
        if self._state.pop(key, None) is not None and message:
            self.log.info("%s", message)
