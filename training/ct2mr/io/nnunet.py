"""Training-set layouts for segmenters: nnU-Net v2 raw datasets and MONAI datalists (torch-free).

nnU-Net v2 raw layout (Isensee et al., nnU-Net v2 documentation, "dataset format")::

    DatasetXXX_Name/
        imagesTr/<case>_0000.nii.gz    channel 0 (here: the synthetic MR)
        labelsTr/<case>.nii.gz         integer label map on the same voxel grid
        dataset.json                   channel_names, labels, numTraining, file_ending

MONAI datalist: ``{"training": [{"image": "imagesTr/<case>_0000.nii.gz", "label": "labelsTr/<case>.nii.gz"}, ...]}``
(the format ``monai.data.load_decathlon_datalist`` reads).

This module does no translation and imports no torch, so the Slicer front end can use it to export one pair.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "FORMATS",
    "NNUNET_REQUIRED_KEYS",
    "case_id",
    "image_name",
    "label_name",
    "parse_label_names",
    "dataset_json",
    "validate_dataset_json",
    "write_json_atomic",
    "write_layout_index",
]

FORMATS = ("nnunet", "monai")
NNUNET_REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
FILE_ENDING = ".nii.gz"
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def case_id(path: str | os.PathLike) -> str:
    """The case identifier of an image or label path: the file name without its image suffix and without an
    nnU-Net channel suffix ``_0000``; a DICOM folder's name.

    Args:
        path: a file or folder path.

    Returns:
        e.g. ``"lung_001"`` for ``lung_001_0000.nii.gz``, ``lung_001.nrrd`` or a folder ``lung_001/``.
    """
    from ct2mr.io.images import image_suffix

    path = Path(path)
    name = path.name
    suffix = image_suffix(path) if path.suffix or name.endswith(".nii.gz") else ""
    stem = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
    return _CHANNEL_SUFFIX.sub("", stem)


def image_name(case: str, channel: int = 0) -> str:
    """nnU-Net image file name of ``case`` (``<case>_0000.nii.gz``)."""
    return f"{case}_{channel:04d}{FILE_ENDING}"


def label_name(case: str) -> str:
    """nnU-Net label file name of ``case`` (``<case>.nii.gz``)."""
    return f"{case}{FILE_ENDING}"


def parse_label_names(source: str | os.PathLike | Mapping[str, Any] | None, values: Iterable[int] = ()
                      ) -> dict[str, int]:
    """Label names as nnU-Net wants them: ``{"background": 0, "lung": 1, ...}``.

    Args:
        source: a JSON file or mapping, either name -> value (``{"lung": 1}``) or value -> name (``{"1": "lung"}``);
            ``None`` names every value found in the label maps ``label_<value>``.
        values: the label values present in the label maps (used when ``source`` is ``None``, and to check it).

    Returns:
        Name -> integer value, sorted by value, with ``background`` = 0.

    Raises:
        ValueError: a malformed mapping, or label values present in the maps that the mapping does not name.
    """
    values = sorted({int(v) for v in values})
    if source is None:
        names = {("background" if v == 0 else f"label_{v}"): v for v in values}
    else:
        data = json.loads(Path(source).read_text()) if isinstance(source, (str, os.PathLike)) else dict(source)
        names = {}
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                names[str(key)] = int(value)
            elif str(key).lstrip("-").isdigit() and isinstance(value, str):
                names[value] = int(key)
            else:
                raise ValueError(f"Label names must map name -> integer or integer -> name; got {key!r}: {value!r}.")
        missing = sorted(set(values) - set(names.values()) - {0})
        if missing:
            raise ValueError(f"The label maps hold values {missing} that the label names do not name. Add them to "
                             "the label-names JSON.")
    if 0 not in names.values():
        names = {"background": 0, **names}
    return dict(sorted(names.items(), key=lambda item: item[1]))


def dataset_json(labels: Mapping[str, int], num_training: int, name: str = "CT2MRSynthetic",
                 description: str = "", channel_name: str = "MR", extra: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The ``dataset.json`` of an nnU-Net v2 raw dataset.

    Args:
        labels: name -> value, with background 0.
        num_training: number of training cases (image/label pairs).
        name: dataset name.
        description: free text (model and provenance).
        channel_name: name of channel 0; ``"MR"`` makes nnU-Net use per-image z-score normalisation.
        extra: further keys (e.g. ``reference``, ``licence``).

    Returns:
        The dict, ready for JSON.
    """
    data = {"channel_names": {"0": channel_name}, "labels": dict(labels), "numTraining": int(num_training),
            "file_ending": FILE_ENDING, "name": name, "description": description}
    data.update(extra or {})
    return data


def validate_dataset_json(data: Mapping[str, Any], root: str | os.PathLike | None = None) -> list[str]:
    """Check a dataset.json against nnU-Net v2's expectations; return the problems found (empty when valid).

    Checked: the required keys, ``channel_names`` keyed by consecutive channel indices, ``labels`` with
    ``background`` = 0 and consecutive integer values, ``file_ending``, and, when ``root`` is given, that
    ``numTraining`` matches the pairs in ``imagesTr``/``labelsTr`` and that every label has its images.

    Args:
        data: the parsed dataset.json.
        root: the dataset folder, to check the files too.

    Returns:
        Human-readable problems.
    """
    problems = [f"missing key {key!r}" for key in NNUNET_REQUIRED_KEYS if key not in data]
    channels = data.get("channel_names", {})
    if sorted(channels) != [str(i) for i in range(len(channels))] or not channels:
        problems.append(f"channel_names must be keyed '0', '1', ...; got {sorted(channels)}")
    labels = data.get("labels", {})
    if labels.get("background") != 0:
        problems.append("labels must map 'background' to 0")
    values = sorted(v for v in labels.values() if isinstance(v, int))
    if values != list(range(len(values))):
        problems.append(f"label values must be consecutive integers from 0; got {values}")
    if data.get("file_ending") != FILE_ENDING:
        problems.append(f"file_ending must be {FILE_ENDING!r} here; got {data.get('file_ending')!r}")
    if root is not None:
        root = Path(root)
        label_files = sorted((root / "labelsTr").glob(f"*{FILE_ENDING}"))
        if len(label_files) != data.get("numTraining"):
            problems.append(f"numTraining is {data.get('numTraining')} but labelsTr holds {len(label_files)} files")
        for label in label_files:
            case = label.name[: -len(FILE_ENDING)]
            for channel in range(len(channels)):
                if not (root / "imagesTr" / image_name(case, channel)).is_file():
                    problems.append(f"case {case}: imagesTr/{image_name(case, channel)} is missing")
    return problems


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON to ``path`` atomically and verified (:func:`ct2mr.io.images.write_json`), creating its folder."""
    from ct2mr.io.images import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, data)


def write_layout_index(root: str | os.PathLike, cases: Iterable[str], labels: Mapping[str, int], fmt: str,
                       name: str = "CT2MRSynthetic", description: str = "",
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write the index file of a dataset folder: ``dataset.json`` (nnU-Net) or ``datalist.json`` (MONAI).

    Args:
        root: the dataset folder holding ``imagesTr`` and ``labelsTr``.
        cases: the case ids present.
        labels: name -> value.
        fmt: ``"nnunet"`` or ``"monai"``.
        name, description, extra: see :func:`dataset_json`.

    Returns:
        The written path.

    Raises:
        ValueError: unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    root = Path(root)
    cases = sorted(set(cases))
    if fmt == "nnunet":
        return write_json_atomic(dataset_json(labels, len(cases), name, description, extra=extra),
                                 root / "dataset.json")
    datalist = {"name": name, "description": description, "labels": dict(labels), "modality": {"0": "MR"},
                "training": [{"image": f"imagesTr/{image_name(c)}", "label": f"labelsTr/{label_name(c)}"}
                             for c in cases]}
    datalist.update(extra or {})
    return write_json_atomic(datalist, root / "datalist.json")
