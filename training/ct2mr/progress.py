"""Progress for people (a tqdm bar on stderr) and for programs (one JSON object per stdout line).

The JSON lines are the contract with front ends such as the Slicer module's runner:

* ``{"event": "start", "command": "translate", "input": ..., "model": ..., "device": ...}``
* ``{"event": "progress", "stage": "preprocess"|"G"|"F"|"postprocess"|"write", "fraction": overall 0..1,
  "stage_fraction": 0..1, "message": ...}`` (``translate --uncertainty`` adds the stage ``"uncertainty"`` before
  ``"write"``)
* ``{"event": "ood", "score": ..., "ood_warning": ..., ...}`` (``translate --ood``, before the networks run)
* ``{"event": "warning", "message": ...}``
* ``{"event": "done", "outputs": {...}, "seconds": ..., ...}``
* ``{"event": "error", "message": ...}`` (and a non-zero exit code)

A batch (``ct2mr translate`` over several CTs, :mod:`ct2mr.inference.batch`) reports, between its ``start``
(``"mode": "batch"``) and ``done`` (``"mode": "batch"``, ``"summary"``, counts per status) events, per case:

* ``{"event": "case", "index": i, "total": n, "case": ..., "input": ..., "status": "running", ...}`` when it starts,
  then the case's ``progress`` (and ``warning``) events;
* for a finished case ``{"event": "case_done", "index", "total", "case", "input", "status": "done"|"skipped",
  "seconds", "outputs": {...}, "output_dir", "device", "precision", "model", "mean_error_hu", "stage_seconds", ...,
  "anatomy", "ct_window", "analysis"}`` (what the single-CT ``done`` event reports, for that case), then
* ``{"event": "case", ..., "status": "done"|"skipped"|"failed", "error": ..., "outputs": {...}}`` (a failed case
  has no ``case_done``; the batch goes on).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

__all__ = ["STAGE_WEIGHTS", "ProgressReporter", "JsonReporter", "BarReporter", "NullReporter", "make_reporter"]

#: Share of the whole translation each stage takes, for the overall fraction.
STAGE_WEIGHTS = {"preprocess": 0.1, "G": 0.4, "F": 0.4, "postprocess": 0.05, "write": 0.05}


def _overall(stage: str, fraction: float, weights: dict[str, float] | None = None) -> float:
    done = 0.0
    for name, weight in (weights or STAGE_WEIGHTS).items():
        if name == stage:
            return min(1.0, done + weight * max(0.0, min(1.0, fraction)))
        done += weight
    return min(1.0, fraction)


class ProgressReporter:
    """Base reporter: ``reporter(stage, fraction, message)`` and ``event(name, **fields)``."""

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        """Report ``fraction`` (0..1) of ``stage`` done."""

    def event(self, name: str, **fields: Any) -> None:
        """Report a named event (start, warning, done, error)."""

    def close(self) -> None:
        """Release the display."""

    @contextmanager
    def capture_warnings(self) -> Iterator[None]:
        """Route Python warnings raised inside the block to :meth:`event` as ``warning`` events."""
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            self.event("warning", message=str(message), category=category.__name__)

        warnings.showwarning = show
        try:
            yield
        finally:
            warnings.showwarning = previous


class NullReporter(ProgressReporter):
    """Reports nothing (``--progress none``); warnings still go to stderr."""

    def event(self, name: str, **fields: Any) -> None:
        """Print warnings and errors to stderr only."""
        if name in ("warning", "error"):
            print(f"ct2mr: {name}: {fields.get('message', '')}", file=sys.stderr)


class JsonReporter(ProgressReporter):
    """One JSON object per line on ``stream`` (stdout), throttled to changes of at least ``min_step``.

    Args:
        stream: where to write (default stdout).
        min_step: smallest change of the overall fraction that produces a new line.
    """

    def __init__(self, stream: TextIO | None = None, min_step: float = 0.01,
                 weights: dict[str, float] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.min_step = min_step
        self.weights = weights
        self._last = (None, -1.0)

    def _emit(self, payload: dict[str, Any]) -> None:
        self.stream.write(json.dumps(payload) + "\n")
        self.stream.flush()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        """Emit a ``progress`` line when the stage changes or the overall fraction moved enough."""
        overall = _overall(stage, fraction, self.weights)
        last_stage, last_overall = self._last
        if stage != last_stage or overall - last_overall >= self.min_step or fraction >= 1.0:
            self._last = (stage, overall)
            self._emit({"event": "progress", "stage": stage, "fraction": round(overall, 4),
                        "stage_fraction": round(float(fraction), 4), "message": message})

    def event(self, name: str, **fields: Any) -> None:
        """Emit ``{"event": name, **fields}``."""
        self._emit({"event": name, **fields})


class BarReporter(ProgressReporter):
    """A tqdm progress bar on stderr with the current stage as description."""

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        from tqdm.auto import tqdm

        self.weights = weights

        self.bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="{desc:<28} {percentage:3.0f}%|{bar}| "
                        "{elapsed}<{remaining}")
        self._start = time.perf_counter()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        """Move the bar to the overall fraction."""
        self.bar.set_description_str(message[:28] or stage)
        self.bar.n = round(100 * _overall(stage, fraction, self.weights), 1)
        self.bar.refresh()

    def event(self, name: str, **fields: Any) -> None:
        """Write warnings and errors above the bar."""
        if name in ("warning", "error"):
            self.bar.write(f"ct2mr: {name}: {fields.get('message', '')}", file=sys.stderr)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def make_reporter(kind: str, weights: dict[str, float] | None = None) -> ProgressReporter:
    """Build the reporter for ``--progress bar|json|none``.

    Args:
        kind: ``"bar"``, ``"json"`` or ``"none"``.
        weights: share of the whole run per stage, in stage order (default :data:`STAGE_WEIGHTS`; a translation
            with an uncertainty map adds the ``"uncertainty"`` stage: :func:`ct2mr.inference.uncertainty.stage_weights`).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "json":
        return JsonReporter(weights=weights)
    if kind == "bar":
        return BarReporter(weights)
    if kind == "none":
        return NullReporter()
    raise ValueError(f"Unknown progress kind {kind!r}; choose bar, json or none.")
