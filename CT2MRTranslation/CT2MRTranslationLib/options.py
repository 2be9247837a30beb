"""One typed options object for a translation, whose vocabularies, ranges and defaults the engine defines.

The engine owns each option of ``ct2mr translate`` once, in ``ct2mr/translate_options.json`` (its ``ct2mr.options``
module; DESIGN.md: "Each option ... is defined once, in the engine"). This module reads that JSON file without
importing the engine (which may not be installed yet, and whose import must never pull torch into Slicer's
process): from the engine bundled with the module (a ``ct2mr-*.whl`` in ``Resources/Engine``, or the repository's
``training/`` folder), else from the installed ``ct2mr`` package. :class:`TranslationOptions` is the typed object
the Logic, the parameter node (:mod:`CT2MRTranslationLib.parameters`) and the panel (``.ui``) share;
:meth:`TranslationOptions.engineArguments` turns it into ``ct2mr translate`` flags.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = [
    "KEYWORD_ALIASES",
    "SCHEMA_FILE_NAME",
    "SINGLE_CT_OPTIONS",
    "UNCERTAINTY_OPTIONS",
    "OptionSpec",
    "TranslationOptions",
    "camelCase",
    "findSchemaFile",
    "loadSchema",
    "optionSpec",
    "schemaDefault",
]

SCHEMA_FILE_NAME = "translate_options.json"
"""Name of the engine's options schema inside the ``ct2mr`` package."""

KEYWORD_ALIASES = {"computeMetrics": "analysis"}
"""Older keyword names still accepted by :meth:`TranslationOptions.fromKeywords`."""

UNCERTAINTY_OPTIONS = ("uncertainty", "uncertainty_passes")
"""Engine options passed only when the uncertainty map is on."""

SINGLE_CT_OPTIONS = ("uncertainty", "ood")
"""Options the engine runs on one CT at a time (its batch mode refuses them): :attr:`TranslationOptions.singleCT`."""

_TYPES = {"string": str, "number": float, "integer": int, "boolean": bool}
_cache: dict[str, Any] = {}


def camelCase(name: str) -> str:
    """``"roi_size"`` -> ``"roiSize"``: the front end's name of an engine option."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclass(frozen=True)
class OptionSpec:
    """One option of the engine's schema.

    Attributes:
        name: engine name (``"roi_size"``).
        flag: ``ct2mr translate`` flag (``"--roi-size"``).
        type: ``"string"``, ``"number"``, ``"integer"`` or ``"boolean"``.
        default: default value; ``None``: the engine decides.
        choices: accepted strings, or ``None``.
        pattern: regular expression accepting further strings (``cuda:N``), or ``None``.
        minimum: smallest accepted number (inclusive), or ``None``.
        maximum: largest accepted number (inclusive), or ``None``.
        multipleOf: accepted numbers are multiples of it, or ``None``.
        step: a spin box's increment, or ``None``.
        needsReference: choices that need a reference MR.
        description: what it means.
    """

    name: str
    flag: str
    type: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    pattern: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    multipleOf: int | None = None
    step: float | None = None
    needsReference: tuple[str, ...] = ()
    description: str = ""

    @property
    def attribute(self) -> str:
        """The front end's (camelCase) name, e.g. ``"roiSize"``."""
        return camelCase(self.name)

    def check(self, value: Any) -> Any:
        """Validate ``value`` and return it converted to the option's type (``None`` when the default is ``None``).

        Raises:
            ValueError: wrong type, not among the choices, outside [minimum, maximum] or not a multiple of
                ``multipleOf``; the message names what is allowed.
        """
        label = self.attribute
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{label} needs a value (default {self.default!r}).")
        kind = _TYPES[self.type]
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, (bool, int)):
                raise ValueError(f"{label} must be true or false, got {value!r}.")
            return bool(value)
        try:
            converted = kind(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label} must be a {'whole ' if kind is int else ''}number, got {value!r}."
                             if kind is not str else f"{label} must be text, got {value!r}.") from error
        if kind is int and float(value) != converted:
            raise ValueError(f"{label} must be a whole number, got {value!r}.")
        if kind is float and not math.isfinite(converted):
            raise ValueError(f"{label} must be a finite number, got {value!r}.")
        if self.choices is not None and converted not in self.choices and not (
                self.pattern and re.fullmatch(self.pattern, str(converted))):
            more = " or cuda:N (GPU number N)" if self.pattern and "cuda" in self.pattern else ""
            raise ValueError(f"{label} must be one of {', '.join(self.choices)}{more}; got {converted!r}.")
        if (self.minimum is not None and converted < self.minimum) or (
                self.maximum is not None and converted > self.maximum):
            raise ValueError(f"{label} must be in [{self.minimum:g}, {self.maximum:g}]; got {converted!r}.")
        if self.multipleOf and converted % self.multipleOf:
            raise ValueError(f"{label} must be a multiple of {self.multipleOf}; got {converted!r}.")
        return converted

    def nearestValid(self, value: float) -> Any:
        """The accepted number nearest to ``value`` (clamped to the range, rounded to ``multipleOf``): what a spin
        box shows after the user typed a value in between."""
        number = float(value)
        if self.multipleOf:
            number = round(number / self.multipleOf) * self.multipleOf
        if self.minimum is not None:
            number = max(number, self.minimum)
        if self.maximum is not None:
            number = min(number, self.maximum)
        return int(number) if self.type == "integer" else number


def _specFrom(document: dict[str, Any]) -> OptionSpec:
    return OptionSpec(
        name=document["name"], flag=document["flag"], type=document["type"], default=document.get("default"),
        choices=tuple(document["choices"]) if document.get("choices") is not None else None,
        pattern=document.get("pattern"), minimum=document.get("minimum"), maximum=document.get("maximum"),
        multipleOf=document.get("multiple_of"), step=document.get("step"),
        needsReference=tuple(document.get("needs_reference") or ()), description=document.get("description", ""),
    )


def findSchemaFile(moduleDirectory: str | os.PathLike | None = None) -> tuple[Path, str | None] | None:
    """Where the engine's options schema is: the bundled engine first (it ships with this module), then the
    installed ``ct2mr`` package.

    Args:
        moduleDirectory: the module's folder (``CT2MRTranslation/``); ``None``: this file's parent's parent.

    Returns:
        ``(path, None)`` for a plain file, ``(wheel, member)`` for a file inside a wheel; ``None`` when not found.
    """
    moduleDirectory = Path(moduleDirectory) if moduleDirectory else Path(__file__).resolve().parents[1]
    for wheel in sorted((moduleDirectory / "Resources" / "Engine").glob("ct2mr-*.whl"), reverse=True):
        try:
            with zipfile.ZipFile(wheel) as archive:
                if f"ct2mr/{SCHEMA_FILE_NAME}" in archive.namelist():
                    return wheel, f"ct2mr/{SCHEMA_FILE_NAME}"
        except (OSError, zipfile.BadZipFile):
            continue
    for folder in (moduleDirectory.parent / "training", moduleDirectory / "Resources" / "Engine" / "training"):
        candidate = folder / "ct2mr" / SCHEMA_FILE_NAME
        if candidate.is_file():
            return candidate, None
    try:
        spec = importlib.util.find_spec("ct2mr")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SCHEMA_FILE_NAME
        if candidate.is_file():
            return candidate, None
    return None


def loadSchema(location: tuple[Path, str | None] | str | os.PathLike | None = None) -> dict[str, OptionSpec]:
    """Read the engine's options schema.

    Args:
        location: a schema file, ``(wheel, member)``, or ``None`` for :func:`findSchemaFile` (read once, cached).

    Returns:
        ``{engine name: OptionSpec}`` in the schema's order.

    Raises:
        FileNotFoundError: no schema found (the bundled engine is missing: reinstall the extension).
        ValueError: the file is not a schema of ``ct2mr translate`` options.
    """
    cached = location is None
    if cached and "schema" in _cache:
        return _cache["schema"]
    if location is None:
        location = findSchemaFile()
        if location is None:
            raise FileNotFoundError(
                f"The ct2mr engine's {SCHEMA_FILE_NAME} was found neither in the module's Resources/Engine nor in an "
                "installed ct2mr package: reinstall the CT2MRTranslation extension.")
    if not isinstance(location, tuple):
        location = (Path(location), None)
    path, member = location
    if member:
        with zipfile.ZipFile(path) as archive:
            document = json.loads(archive.read(member).decode("utf-8"))
    else:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    if document.get("command") != "translate" or not isinstance(document.get("options"), list):
        raise ValueError(f"{path} is not a schema of ct2mr translate options.")
    schema = {item["name"]: _specFrom(item) for item in document["options"]}
    if cached:
        _cache["schema"] = schema
    return schema


def optionSpec(name: str) -> OptionSpec:
    """One option of the schema by engine (``"roi_size"``) or front-end (``"roiSize"``) name.

    Raises:
        KeyError: unknown option.
    """
    schema = loadSchema()
    for spec in schema.values():
        if name in (spec.name, spec.attribute):
            return spec
    raise KeyError(f"Unknown translation option {name!r}; known: {', '.join(s.attribute for s in schema.values())}.")


def schemaDefault(name: str) -> Any:
    """The engine's default of an option (``None``: the engine decides)."""
    return optionSpec(name).default


@dataclass
class TranslationOptions:
    """Everything that decides how one CT is translated (the ``ct2mr translate`` options of the schema, plus the
    model and extra flags). Defaults come from the engine's schema.

    Attributes:
        modelPath: checkpoint file; ``None``: the engine's default model.
        device: ``"auto"``, ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        overlap: sliding-window overlap (fraction).
        roiSize: window side in voxels of the 1 mm grid; ``None``: the model's.
        swBatchSize: windows per forward pass; ``None``: the engine sizes it.
        precision: autocast precision.
        harmonize: post-hoc harmonisation (thesis 7.6).
        warpCheck: the anatomy warp check (displacement map, thesis 5 P1/E2).
        analysis: the engine computes the metrics table and histograms (shown as table and plot nodes).
        uncertainty: ``"none"`` or ``"tta"``: the uncertainty map (``uncertainty.nii.gz``, the spread of G(x) under
            test-time augmentation, issue 16); ``"ensemble"`` needs several models and is refused here.
        uncertaintyPasses: augmented passes of ``tta``: the map costs this many extra passes of G.
        ood: the engine's out-of-distribution check (a score against the model's training CTs, about a second).
        extraArguments: further ``ct2mr translate`` flags, passed as they are.
    """

    modelPath: str | None = None
    device: str = field(default_factory=lambda: schemaDefault("device"))
    overlap: float = field(default_factory=lambda: schemaDefault("overlap"))
    roiSize: int | None = field(default_factory=lambda: schemaDefault("roi_size"))
    swBatchSize: int | None = field(default_factory=lambda: schemaDefault("sw_batch_size"))
    precision: str = field(default_factory=lambda: schemaDefault("precision"))
    harmonize: str = field(default_factory=lambda: schemaDefault("harmonize"))
    warpCheck: bool = field(default_factory=lambda: schemaDefault("warp_check"))
    analysis: bool = field(default_factory=lambda: schemaDefault("analysis"))
    uncertainty: str = field(default_factory=lambda: schemaDefault("uncertainty"))
    uncertaintyPasses: int = field(default_factory=lambda: schemaDefault("uncertainty_passes"))
    ood: bool = field(default_factory=lambda: schemaDefault("ood"))
    extraArguments: tuple[str, ...] = ()

    @classmethod
    def fromKeywords(cls, options: TranslationOptions | None = None, **values: Any) -> TranslationOptions:
        """A copy of ``options`` (or the defaults) with some values changed, e.g. ``device="cpu"``.

        Raises:
            TypeError: an unknown keyword (the message lists the known ones).
        """
        base = options if options is not None else cls()
        known = {f.name for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            key = KEYWORD_ALIASES.get(key, key)
            if key not in known:
                raise TypeError(f"Unknown translation option {key!r}; known: {', '.join(sorted(known))}.")
            changes[key] = tuple(str(a) for a in value) if key == "extraArguments" else value
        return replace(base, **changes)

    def validated(self) -> TranslationOptions:
        """Check every value against the engine's schema and the model file.

        Returns:
            A copy with values converted to their types (``"0.5"`` -> 0.5), the model path made absolute, and
            ``roiSize``/``swBatchSize`` of 0 read as ``None`` (the parameter node's "engine decides").

        Raises:
            ValueError: a value outside the schema (the message names what is allowed); ``uncertainty="ensemble"``
                (it needs several models, which the module does not pass).
            FileNotFoundError: ``modelPath`` does not exist.
        """
        checked = {}
        for spec in loadSchema().values():
            value = getattr(self, spec.attribute)
            if spec.attribute in ("roiSize", "swBatchSize") and value in (0, "0", ""):
                value = None
            checked[spec.attribute] = spec.check(value)
        if checked.get("uncertainty") == "ensemble":
            raise ValueError("uncertainty 'ensemble' needs several models (ct2mr translate --model A --model B "
                             "--uncertainty ensemble on the command line); choose 'tta' or 'none'.")
        modelPath = self.modelPath or None
        if modelPath:
            modelPath = os.path.abspath(os.path.expanduser(str(modelPath)))
            if not os.path.isfile(modelPath):
                raise FileNotFoundError(
                    f"Model file {modelPath} does not exist: choose a checkpoint file, or leave the path empty to use "
                    "the default model.")
        return replace(self, modelPath=modelPath, extraArguments=tuple(str(a) for a in self.extraArguments),
                       **checked)

    @property
    def singleCT(self) -> bool:
        """The uncertainty map or the OOD check is on: the engine runs them on one CT at a time (not in its batch
        mode), so a batch of these options translates one volume."""
        return self.uncertainty != "none" or bool(self.ood)

    @property
    def needsReference(self) -> bool:
        """The chosen harmonisation needs a reference MR (histogram, nyul)."""
        return self.harmonize in optionSpec("harmonize").needsReference

    def engineArguments(self, referencePath: str | None = None) -> list[str]:
        """The ``ct2mr translate`` flags of these options (validated first).

        Args:
            referencePath: the reference MR file, passed as ``--reference-mr`` (harmonisation, histogram and W1).

        Returns:
            e.g. ``["--device", "cuda", "--overlap", "0.5", "--precision", "auto", "--harmonize", "none",
            "--analysis"]``: every option with a value (``None`` is left to the engine), booleans as flags when
            on, then ``--model``, ``--reference-mr`` and the extra arguments. ``--uncertainty`` and
            ``--uncertainty-passes`` only when the uncertainty map is on (an older engine without them still runs).

        Raises:
            ValueError, FileNotFoundError: see :meth:`validated`.
        """
        options = self.validated()
        arguments: list[str] = []
        for spec in loadSchema().values():
            value = getattr(options, spec.attribute)
            if value is None or value is False:
                continue
            if spec.name in UNCERTAINTY_OPTIONS and options.uncertainty == "none":
                continue
            if value is True:
                arguments.append(spec.flag)
            else:
                arguments += [spec.flag, f"{value:g}" if isinstance(value, float) else str(value)]
        if options.modelPath:
            arguments += ["--model", options.modelPath]
        if referencePath:
            arguments += ["--reference-mr", str(referencePath)]
        return arguments + list(options.extraArguments)
