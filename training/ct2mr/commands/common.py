"""What several ``ct2mr`` sub-commands share: option declarations, progress displays, warnings, signals, OpenMP.

* The sliding-window options (``--device``, ``--overlap``, ``--roi-size``, ``--sw-batch-size``) are declared once,
  in :func:`add_window_arguments` (``translate``, ``evaluate``/``compare``, ``synthesize-dataset``), and read back
  into :class:`ct2mr.inference.translate.InferenceSettings` by :func:`inference_settings`; ``--precision`` and
  ``--progress`` by :func:`add_precision_argument` and :func:`add_progress_argument`. Each command keeps its own
  help text where it says something of its own.
* :class:`LazyBar`: a tqdm count bar (volumes, cases, steps) on stderr, opened at the first unit of work.
* :func:`plain_warnings`, :func:`interrupt_on_sigterm` and :func:`setup_openmp`.

Nothing here imports torch or numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterator

__all__ = [
    "OPENMP_WAIT_POLICY",
    "PROGRESS_CHOICES",
    "PROGRESS_HELP",
    "PROGRESS_HELP_LONG",
    "DEVICE_HELP",
    "PRECISION_CHOICES",
    "add_device_argument",
    "add_window_arguments",
    "add_precision_argument",
    "add_progress_argument",
    "inference_settings",
    "LazyBar",
    "plain_warnings",
    "interrupt_on_sigterm",
    "setup_openmp",
]

#: OpenMP's wait policy for the command's torch threads, unless the environment sets one (issue 13). Measured on the
#: 2-core machine (benchmarks/RESULTS.md, M1 width 8, 48^3, 2 threads): two training processes side by side take 4.4
#: s per step each with the default spinning threads and 2.8 s with PASSIVE (quiet: 1.38 s vs 1.68 s), so a run
#: degrades gracefully on a shared machine; OMP_WAIT_POLICY=ACTIVE gives back the quiet-machine 20 %.
OPENMP_WAIT_POLICY = "PASSIVE"

PROGRESS_CHOICES = ("bar", "json", "none")
#: ``--progress`` help of most commands.
PROGRESS_HELP = "progress display"
#: ``--progress`` help of ``preprocess`` and ``translate``.
PROGRESS_HELP_LONG = "bar for people, json (one object per stdout line) for programs (default: %(default)s)"
#: ``--device`` help where nothing more needs saying.
DEVICE_HELP = "auto, cpu, cuda or cuda:N (default: %(default)s)"
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

_OVERLAP_HELP = "sliding-window overlap (default: %(default)s)"
_ROI_HELP = "window size in voxels (default: the model's)"
_SW_BATCH_HELP = "windows per forward pass (default: chosen from the free GPU memory, 1 on the CPU)"


def add_device_argument(parser: argparse.ArgumentParser, help: str = DEVICE_HELP,
                        default: str | None = "auto") -> None:
    """Declare ``--device`` (auto, cpu, cuda, cuda:N) on ``parser``."""
    parser.add_argument("--device", default=default, help=help)


def add_window_arguments(parser: argparse.ArgumentParser, *, device_help: str = DEVICE_HELP,
                         overlap_help: str = _OVERLAP_HELP, roi_help: str = _ROI_HELP,
                         sw_batch_size: bool = True) -> None:
    """Declare the sliding-window options, in this order: ``--device``, ``--overlap``, ``--roi-size`` and (unless
    ``sw_batch_size`` is false) ``--sw-batch-size``; the help texts of the first three may be the command's own."""
    add_device_argument(parser, device_help)
    parser.add_argument("--overlap", type=float, default=0.25, help=overlap_help)
    parser.add_argument("--roi-size", type=int, nargs="+", metavar="N", help=roi_help)
    if sw_batch_size:
        parser.add_argument("--sw-batch-size", type=int, default=None, help=_SW_BATCH_HELP)


def add_precision_argument(parser: argparse.ArgumentParser, help: str,
                           default: str | None = "auto") -> None:
    """Declare ``--precision auto|fp32|bf16|fp16`` (autocast precision) on ``parser``."""
    parser.add_argument("--precision", default=default, choices=PRECISION_CHOICES, help=help)


def add_progress_argument(parser: argparse.ArgumentParser, help: str = PROGRESS_HELP,
                          default: str = "bar") -> None:
    """Declare ``--progress bar|json|none`` on ``parser``."""
    parser.add_argument("--progress", default=default, choices=PROGRESS_CHOICES, help=help)


def inference_settings(args: argparse.Namespace, **overrides: Any):
    """:class:`ct2mr.inference.translate.InferenceSettings` from the options of :func:`add_window_arguments` (and
    ``--precision`` where the command has it); ``overrides`` replace or add fields.

    Raises:
        ValueError: an invalid overlap, window size, window batch or precision.
    """
    from ct2mr.inference.translate import InferenceSettings

    values = {"roi_size": args.roi_size, "overlap": args.overlap,
              "sw_batch_size": getattr(args, "sw_batch_size", None), "precision": getattr(args, "precision", "auto"),
              "device": args.device}
    values.update(overrides)
    return InferenceSettings(**values)


class LazyBar:
    """A tqdm count bar on stderr (volumes, cases, steps) that :meth:`open` creates at the first unit of work, so that
    errors before any work stay one line; a context manager that closes it.

    Args:
        options: tqdm keywords (``unit``, ``desc``, ...), completed by those of :meth:`open`.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.bar = None

    def open(self, **options: Any):
        """The bar, created with ``options`` on the first call."""
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(file=sys.stderr, **self.options, **options)
        return self.bar

    def close(self) -> None:
        """Close the bar, if it was opened."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> LazyBar:  # noqa: PYI034
        """The bar holder (not yet opened)."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the bar, if it was opened."""
        self.close()


@contextlib.contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """Show Python warnings raised inside the block as one line each: ``ct2mr COMMAND: warning: MESSAGE``."""
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ct2mr {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a front end's Cancel) into KeyboardInterrupt, so that clean-up code (``finally``) runs."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def setup_openmp() -> None:
    """Set ``OMP_WAIT_POLICY`` to :data:`OPENMP_WAIT_POLICY` unless the environment sets one; call it before torch
    (and its OpenMP runtime) is loaded."""
    os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)
