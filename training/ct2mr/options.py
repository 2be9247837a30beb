"""The options of ``ct2mr translate`` that front ends offer, defined once (``translate_options.json``).

The 3D Slicer module reads the same JSON file (without importing the engine) for its panel, its parameter node and the
engine command line it builds; ``training/tests/test_options.py`` keeps this file, ``ct2mr translate``'s argument
parser and :class:`ct2mr.inference.translate.InferenceSettings` in agreement. Each option is a JSON object with ``name``
(snake_case), ``flag`` (the command-line flag), ``type`` (``"string"``, ``"number"``, ``"integer"`` or
``"boolean"``), ``default`` (``null``: the engine decides), and, as they apply, ``choices``, ``pattern`` (a regular
expression accepting further strings, e.g. ``cuda:N``), ``minimum``/``maximum`` (inclusive), ``multiple_of``,
``step`` (a front end's increment) and ``needs_reference`` (choices that need ``--reference-mr``).

This module imports only the standard library: reading the schema never loads torch.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["TRANSLATE_OPTIONS_FILE", "check_option", "translate_option", "translate_options"]

TRANSLATE_OPTIONS_FILE = Path(__file__).with_name("translate_options.json")
"""The schema of the ``ct2mr translate`` options front ends offer."""

_TYPES = {"string": str, "number": float, "integer": int, "boolean": bool}


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, Any], ...]:
    document = json.loads(TRANSLATE_OPTIONS_FILE.read_text(encoding="utf-8"))
    options = tuple(document["options"])
    for option in options:
        if option.get("type") not in _TYPES or not str(option.get("flag", "")).startswith("--"):
            raise ValueError(f"{TRANSLATE_OPTIONS_FILE}: option {option.get('name')!r} needs a flag and a type of "
                             f"{', '.join(_TYPES)}.")
    return options


def translate_options() -> list[dict[str, Any]]:
    """Every option of the schema, in order (copies: changing them changes nothing here).

    Returns:
        One dictionary per option (see the module docstring for the keys).
    """
    return [dict(option) for option in _load()]


def translate_option(name: str) -> dict[str, Any]:
    """One option of the schema by its name (``"overlap"``, ``"roi_size"``, ...).

    Raises:
        KeyError: no such option (the message lists the known ones).
    """
    for option in _load():
        if option["name"] == name:
            return dict(option)
    raise KeyError(f"Unknown translate option {name!r}; known: {', '.join(o['name'] for o in _load())}.")


def check_option(name: str, value: Any) -> Any:
    """Validate one value against the schema and return it converted to the option's type.

    ``None`` is accepted for options whose default is ``None`` (the engine decides).

    Args:
        name: the option's name.
        value: the value to check.

    Returns:
        The value as ``str``, ``float``, ``int`` or ``bool`` (or ``None``).

    Raises:
        KeyError: unknown option.
        ValueError: wrong type, not among the choices, outside [minimum, maximum] or not a multiple of
            ``multiple_of``; the message names what is allowed.
    """
    option = translate_option(name)
    if value is None:
        if option.get("default") is None:
            return None
        raise ValueError(f"{name} needs a value (default {option['default']!r}).")
    kind = _TYPES[option["type"]]
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}.")
        return value
    try:
        converted = kind(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be of type {option['type']}, got {value!r}.") from error
    if kind is int and float(value) != converted:
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if kind is float and not math.isfinite(converted):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    choices = option.get("choices")
    if choices is not None and converted not in choices and not (
            option.get("pattern") and re.fullmatch(option["pattern"], str(converted))):
        more = f" (or {option['pattern']})" if option.get("pattern") else ""
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}{more}; got {converted!r}.")
    low, high = option.get("minimum"), option.get("maximum")
    if (low is not None and converted < low) or (high is not None and converted > high):
        raise ValueError(f"{name} must be in [{low}, {high}]; got {converted!r}.")
    step = option.get("multiple_of")
    if step and converted % step:
        raise ValueError(f"{name} must be a multiple of {step}; got {converted!r}.")
    return converted
