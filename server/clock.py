"""How long one step of a graph takes for a number of rows, learnt from the calls themselves.

Long feeds size their slices with it (sequence.onnx) and generation sizes its K (generate.onnx), so that
one call stays within its time budget whatever the machine and the model."""
from __future__ import annotations


def _bucket(rows: int) -> int:
    return 1 << (max(1, rows).bit_length() - 1)


class StepClock:
    """Seconds per time step by batch size, in power-of-two buckets, smoothed over the calls."""

    def __init__(self) -> None:
        self._per_step: dict[int, float] = {}  # rows bucket -> seconds per time step

    def estimate(self, rows: int) -> float | None:
        """Seconds per time step for `rows`: the nearest timed bucket at or below, scaled up linearly."""
        b = _bucket(rows)
        while b >= 1:
            if b in self._per_step:
                return self._per_step[b] * rows / b
            b //= 2
        return None

    def timed(self, rows: int, steps: int, seconds: float) -> None:
        """Learn from one call of `rows` x `steps` that took `seconds`."""
        b, per = _bucket(rows), seconds / max(1, steps)
        old = self._per_step.get(b)
        self._per_step[b] = per if old is None else 0.8 * old + 0.2 * per
