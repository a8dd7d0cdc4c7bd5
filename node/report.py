"""What a node tells the person running it: a progress line every 30 s while it trains, and a
summary when it leaves. Pure functions of numbers the node keeps, so they are tested as text."""

from __future__ import annotations

from dataclasses import dataclass

STATUS_EVERY_S = 30.0


@dataclass
class Progress:
    """Counts at the last progress line: the next line's rates are over the time since."""

    at: float
    counted: int


def progress_line(
    stage: int,
    step: int,
    steps: int,
    counted: int,
    tokens_per_mb: int,
    last: Progress,
    now: float,
    loss: float | None = None,
    waiting: str | None = None,
) -> str:
    """`stage 1: step 333/800, loss 1.912, 5.2k tokens/s, 666 microbatches computed here`; with
    `waiting` (nothing moved since the last line, or a pause) what the step waits for."""
    rate = (counted - last.counted) * tokens_per_mb / max(now - last.at, 1e-9)
    parts = [f"stage {stage}: step {step}/{steps}"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    parts.append(f"{_human(rate)} tokens/s")
    parts.append(f"{counted} microbatches computed here")
    line = ", ".join(parts)
    return f"{line}; {waiting}" if waiting else line


def exit_summary(
    stage: int,
    step: int,
    steps: int,
    code: int,
    stats: dict[str, int],
    bytes_sent: int,
    errors: int,
    checkpoint: str | None,
) -> str:
    """One line when the node leaves: where, why, what it did, where its checkpoint is."""
    how = "finished" if step >= steps else "left" if code == 0 else f"failed (exit {code})"
    line = (
        f"stage {stage}: {how} at step {step}/{steps}: {stats.get('counted', 0)} microbatches "
        f"computed here ({stats.get('recomputed', 0)} recomputed for others), "
        f"{_human(bytes_sent)}B sent, {errors} error(s)"
    )
    return f"{line}; checkpoint in {checkpoint}" if checkpoint else line


def _human(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"
