"""The ``ct2mr`` engine's command lines and what its failures mean, in words for the user.

The engine runs as a background process (:mod:`CT2MRTranslationLib.runner`); this module builds its arguments
(``ct2mr translate INPUT -o OUT_DIR --progress json`` plus the options of
:class:`CT2MRTranslationLib.options.TranslationOptions`), reads what its ``done`` event and files report (the
analysis and anatomy JSON, the CT window) and turns an ``error`` event or stderr into a message that says what to do.
Out-of-memory recovery is the engine's own (it halves the window batch, then stitches in CPU memory): a
translation that still fails is reported, never restarted from here.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ANALYSIS_FILE",
    "ANATOMY_FILE",
    "DEFAULT_CT_WINDOW",
    "OOD_FILE",
    "oodWarningLine",
    "qaArguments",
    "ctWindowOf",
    "failureMessage",
    "isOutOfMemoryMessage",
    "modelsArguments",
    "readReportedJson",
    "translateArguments",
]

ANALYSIS_FILE = "analysis.json"
"""The engine's metrics table and histograms in OUT_DIR (``ct2mr translate --analysis``)."""

ANATOMY_FILE = "anatomy.json"
"""The warp check's anatomy metrics in OUT_DIR (``ct2mr translate --warp-check``)."""

OOD_FILE = "ood.json"
"""The out-of-distribution assessment in OUT_DIR (``ct2mr translate --ood``)."""

DEFAULT_CT_WINDOW = (-600.0, 1000.0)
"""CT window (HU) of the thesis (section 4), used only when an older engine's ``done`` event has none."""

_log = logging.getLogger(__name__)


def translateArguments(inputPath: str, outputDir: str, optionArguments: Sequence[str], overwrite: bool = False
                       ) -> list[str]:
    """The engine arguments of one translation, or of a batch.

    Args:
        inputPath: the CT written by the Logic (NRRD); for a batch, a list file (``.txt``, one CT per line): the
            engine then writes ``OUT_DIR/<case>/`` per CT (``<case>``: the file name without suffix) and
            ``OUT_DIR/translate_summary.json``, and reports ``case`` / ``case_done`` events per CT.
        outputDir: OUT_DIR.
        optionArguments: :meth:`TranslationOptions.engineArguments`.
        overwrite: replace outputs already in OUT_DIR (a folder the user chose and translates into again); the
            engine refuses such a folder otherwise (a batch: it would skip the cases already done there).

    Returns:
        ``["translate", INPUT, "-o", OUT_DIR, "--progress", "json", ["--overwrite",] *optionArguments]``.
    """
    return ["translate", str(inputPath), "-o", str(outputDir), "--progress", "json",
            *(["--overwrite"] if overwrite else []), *[str(a) for a in optionArguments]]


def modelsArguments(action: str, *arguments: str, registryFiles: Sequence[str] = ()) -> list[str]:
    """The engine arguments of ``ct2mr models [--registry FILE]... ACTION ARGUMENTS`` (list, download, import)."""
    result = ["models"]
    for path in registryFiles:
        result += ["--registry", str(path)]
    return [*result, action, *[str(a) for a in arguments]]


def isOutOfMemoryMessage(text: str | None) -> bool:
    """True when an engine error or stderr text reports that the device ran out of memory."""
    text = (text or "").lower()
    return "out of memory" in text or "outofmemoryerror" in text


def failureMessage(errorMessage: str | None, stderrTail: str, returnCode: int | None) -> str:
    """What to tell the user when a translation failed.

    Args:
        errorMessage: the engine's ``error`` event message, or ``None``.
        stderrTail: the last lines of its stderr.
        returnCode: its exit status.

    Returns:
        ``"CT to MR translation failed: <message>"`` and, where the cause is known, what to do (out of memory:
        the CPU or a smaller window; an engine without a flag or not installed: update or install it), then the
        stderr lines when the engine reported no error itself.
    """
    stderr = (stderrTail or "").strip()
    if errorMessage is not None:
        message = errorMessage
    elif stderr:
        message = stderr.splitlines()[-1]
    elif returnCode == 0:
        message = "the engine ended without reporting its outputs (no 'done' event)"
    else:
        message = f"the engine exited with code {returnCode}"
    text = f"CT to MR translation failed: {message}"
    if isOutOfMemoryMessage(message) or isOutOfMemoryMessage(stderr):
        text += ("\nThe device ran out of memory, also after the engine's own retries with fewer windows per pass and "
                 "stitching in CPU memory. Choose the CPU as device (slower, limited only by the computer's memory), "
                 "or a smaller window size in Advanced.")
    if "unrecognized arguments" in stderr:
        flags = stderr.rsplit("unrecognized arguments:", 1)[-1].strip().splitlines()[0] if (
            "unrecognized arguments:" in stderr) else ""
        text += (f"\nThe installed ct2mr engine does not know {flags or 'an option'}: it is older than this module. "
                 "Install the engine again (Dependencies > Install missing...), or turn the option off in Advanced.")
    if "No module named" in stderr and "ct2mr" in stderr:
        text += ("\nThe ct2mr engine is not installed in the Python that runs it: install it from the module's "
                 "Dependencies section (Install missing...).")
    if stderr and errorMessage is None:
        text += f"\n\nEngine output (stderr, last lines):\n{stderr}"
    return text


def readReportedJson(doneEvent: Mapping[str, Any] | None, key: str, outputDir: str, fileName: str
                     ) -> dict[str, Any]:
    """A JSON object the engine reports both in its ``done`` event and as a file in OUT_DIR.

    Args:
        doneEvent: the ``done`` event (or ``None``).
        key: its key in the event (``"analysis"``, ``"anatomy"``).
        outputDir: OUT_DIR.
        fileName: the file's name (:data:`ANALYSIS_FILE`, :data:`ANATOMY_FILE`).

    Returns:
        The event's object, else the file's, else ``{}`` (with a warning in the log when the file is unreadable).
    """
    reported = (doneEvent or {}).get(key)
    if isinstance(reported, dict):
        return dict(reported)
    path = os.path.join(outputDir, fileName)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, ValueError) as error:
        _log.warning("CT2MR: %s is unreadable (%s).", path, error)
        return {}
    if not isinstance(value, dict):
        _log.warning("CT2MR: %s is not a JSON object.", path)
        return {}
    return value


def ctWindowOf(doneEvent: Mapping[str, Any] | None) -> tuple[float, float]:
    """The CT window (HU) the engine used, from its ``done`` event (:data:`DEFAULT_CT_WINDOW` for older engines)."""
    window = (doneEvent or {}).get("ct_window")
    try:
        low, high = float(window[0]), float(window[1])
    except (TypeError, ValueError, IndexError):
        return DEFAULT_CT_WINDOW
    return (low, high) if high > low else DEFAULT_CT_WINDOW


def oodWarningLine(ood: Mapping[str, Any] | None) -> str:
    """The one-line warning of an out-of-distribution assessment that exceeded its threshold, else ``""``.

    Args:
        ood: the ``done`` event's ``ood`` block (or ``ood.json``; a flat event with ``ood_warning`` and ``score``
            works too): ``score``, ``threshold``, ``ood_warning``, ``top_features`` (most deviant first) and
            ``features`` (``{feature: {"value", "mean", "z"}}``).

    Returns:
        e.g. ``"Out-of-distribution warning: score 5.97 > 3 (cross_section_cm2 190 vs 671 in training, z 6.0):
        this CT differs from the model's training CTs; read the synthetic MR with care."``; ``""`` when
        ``ood_warning`` is not true.
    """
    if not ood or ood.get("ood_warning") is not True:
        return ""
    try:
        score = f"{float(ood.get('score')):.2f}"
    except (TypeError, ValueError):
        score = "?"
    threshold = ood.get("threshold")
    text = f"Out-of-distribution warning: score {score}" + (
        f" > {float(threshold):g}" if isinstance(threshold, (int, float)) else "")
    top = list(ood.get("top_features") or [])
    if top:
        name = str(top[0])
        row = (ood.get("features") or {}).get(name) or {}
        try:
            detail = (f"{name} {float(row['value']):.3g} vs {float(row['mean']):.3g} in training, "
                      f"z {float(row['z']):.1f}")
        except (KeyError, TypeError, ValueError):
            detail = name
        text += f" ({detail})"
    return text + ": this CT differs from the model's training CTs; read the synthetic MR with care."


def qaArguments(syntheticPath: str, referencePath: str, outputDir: str, ctPath: str | None = None) -> list[str]:
    """The engine arguments of QA against a reference (``ct2mr qa``, issue 16).

    Args:
        syntheticPath: the synthetic MR (normalised units) on the CT's grid.
        referencePath: the registered reference MR on the same grid.
        outputDir: OUT_DIR (``difference.nii.gz``, ``qa_metrics.json``, ``qa_metrics.md``).
        ctPath: the translated CT on the same grid (its body mask is the QA mask); ``None``: the reference's mask.

    Returns:
        ``["qa", SYNTHETIC, REFERENCE, "-o", OUT_DIR, "--progress", "json"[, "--ct", CT]]``.
    """
    return ["qa", str(syntheticPath), str(referencePath), "-o", str(outputDir), "--progress", "json",
            *(["--ct", str(ctPath)] if ctPath else [])]
