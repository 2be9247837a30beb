"""Out-of-distribution score of an input CT against the model's training CTs (issue 16, trust signals).

A chest model given a head CT, an abdomen or a small field of view still produces a plausible-looking synthetic MR.
This module gives a **cheap, documented** warning: a few summary statistics of a CT (:data:`FEATURES`), recorded over
the training CTs in the checkpoint at training time (:func:`training_ct_statistics`), and the largest standardised
deviation of the input from them (:func:`ood_score`).

Features (:func:`ct_statistics`), all computed on the **network grid** of :func:`ct2mr.preprocessing.pipeline.preprocess`
(RAS, 1 mm, CT clipped to the model's window, [-600, 1000] HU by default), so that they are the same whether the
trainer read raw CTs or ``ct2mr preprocess`` HDF5 files, and taken every :data:`STRIDE`-th voxel per axis (2 mm) so
that a 512 x 512 x 600 CT costs about a second:

* ``lung_fraction``: share of the voxels inside the body mask (:func:`ct2mr.preprocessing.masks.body_mask`: above -500 HU, axial
  holes filled, largest component; padding excluded) that lie below -500 HU: lungs, airways, bowel gas.
* the body's other voxels ("tissue", >= -500 HU): ``fat_fraction`` (share in -200..-30 HU), ``dense_fraction``
  (share above 300 HU: bone, iodinated contrast, metal), ``tissue_mean_hu``, ``tissue_sd_hu`` and ``tissue_p95_hu``.
  Values are clipped to the CT window (so bone saturates at its upper end). Means, shares and a tail percentile
  rather than central percentiles of the whole body: those sit in the valley between the lung and soft-tissue
  modes of a chest CT and jump by hundreds of HU when a few slices more or less are scanned.
* ``extent_lr_mm``, ``extent_ap_mm``, ``extent_si_mm``: bounding box of the body mask along the patient's
  left-right, anterior-posterior and superior-inferior axes (mm); limited by the field of view.
* ``axial_area_cm2``: mean cross-section of the body mask over the axial slices that contain it (cm^2).
* ``slice_thickness_mm``: the input's spacing along its axis closest to superior-inferior (mm, from the record).

Score (:func:`ood_score`): for each feature ``f`` with training mean ``m_f`` and standard deviation ``s_f`` (ddof 1;
0 for one volume), ``z_f = |x_f - m_f| / sqrt(s_f^2 + t_f^2)``, where ``t_f`` is a fixed tolerance per feature
(:data:`TOLERANCES`: about the spread between adult scans of one body region, e.g. 40 HU for the tissue mean, 0.05
for the lung share (inspiration, habitus), 0.06 for the fat share, 50 mm for a lateral extent). The tolerance keeps
a small training set (a handful of CTs, ``s_f`` poorly estimated or 0) from flagging every new scan. The score is
``max_f z_f``; above :data:`OOD_THRESHOLD` (3: three combined standard deviations on the most deviant feature)
``ood_warning`` is true.
The threshold was checked on the public CTs of ``../shared/data`` (see the README, "Trust signals"): chest CTs
against chest references stay below it, an abdomen/pelvis CT and a head-sized crop exceed it. With so few CTs this
is a sanity check, not a calibrated false-alarm rate.

Checkpoints store the statistics in their training summary (``training["ct_statistics"]``, written by the trainer
through :func:`training_ct_statistics`). For checkpoints without them, :func:`reference_for` falls back to the
statistics of the bundled default model's documented training CTs (``models/<file>.ct_statistics.json``, made by
``training/scripts/ct_reference_statistics.py``) when the checkpoint *is* that model, and otherwise returns ``None``
with a note: no score is given rather than one against the wrong reference.

Arrays are NumPy (z, y, x).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "FEATURES",
    "TOLERANCES",
    "OOD_THRESHOLD",
    "STRIDE",
    "STATISTICS_VERSION",
    "OOD_NAME",
    "ct_statistics",
    "training_ct_statistics",
    "ood_score",
    "reference_for",
    "assess",
    "describe",
    "OodCheck",
]

#: Version of the statistics layout stored in checkpoints (bumped when a feature's definition changes).
STATISTICS_VERSION = 1
#: File written by ``ct2mr translate --ood``.
OOD_NAME = "ood.json"
#: Feature names, in the order reported.
FEATURES = ("lung_fraction", "fat_fraction", "dense_fraction", "tissue_mean_hu", "tissue_sd_hu", "tissue_p95_hu",
            "extent_lr_mm", "extent_ap_mm", "extent_si_mm", "axial_area_cm2", "slice_thickness_mm")
#: Fixed tolerance per feature (the feature's units), added in quadrature to the training spread.
TOLERANCES = {"lung_fraction": 0.05, "fat_fraction": 0.06, "dense_fraction": 0.03, "tissue_mean_hu": 40.0,
              "tissue_sd_hu": 40.0, "tissue_p95_hu": 80.0, "extent_lr_mm": 50.0, "extent_ap_mm": 50.0,
              "extent_si_mm": 80.0, "axial_area_cm2": 80.0, "slice_thickness_mm": 1.5}
#: ``ood_warning`` when the score (max standardised deviation) exceeds this.
OOD_THRESHOLD = 3.0
#: Statistics use every STRIDE-th voxel of the 1 mm network grid per axis.
STRIDE = 2
#: :func:`training_ct_statistics` uses at most this many training CTs (evenly spaced).
MAX_VOLUMES = 200
#: HU below which a body-mask voxel counts as lung/air (the rest is "tissue"), above which as dense (bone, contrast).
LUNG_HU = -500.0
DENSE_HU = 300.0
#: HU range of fat.
FAT_HU = (-200.0, -30.0)


def _slice_thickness(grid: Mapping[str, Any]) -> float:
    """Spacing (mm) of the input's index axis closest to the superior-inferior (LPS z) direction."""
    direction = np.asarray(grid["direction"], float).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))  # column i = physical direction of index axis i; row 2 = z (S)
    return float(grid["spacing"][axis])


def ct_statistics(array: np.ndarray, record: Any, stride: int = STRIDE) -> dict[str, float]:
    """The :data:`FEATURES` of one preprocessed CT.

    Args:
        array: (z, y, x) float32 network-grid CT in [-1, 1] (:func:`ct2mr.preprocessing.pipeline.preprocess`, modality
            ``"ct"``; RAS, so z = inferior->superior, y = posterior->anterior, x = left->right).
        record: its :class:`ct2mr.preprocessing.pipeline.PreprocessRecord` (or the dict of one): the CT window
            (``intensity_range``), padding, target spacing and input grid.
        stride: take every ``stride``-th voxel per axis (2: 2 mm on the 1 mm grid).

    Returns:
        ``{feature: value}`` in HU, fractions in [0, 1], mm, cm^2. A volume without any body-mask voxel gives the
        whole (unpadded) volume as its mask (:func:`ct2mr.preprocessing.masks.body_mask`).

    Raises:
        ValueError: a non-3D array or a record of another modality.
    """
    from ct2mr.preprocessing.masks import body_mask, valid_mask

    rec = record if isinstance(record, Mapping) else record.to_dict()
    if rec.get("modality", "ct") != "ct":
        raise ValueError(f"ct_statistics needs a CT, got a record of modality {rec.get('modality')!r}.")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"ct_statistics needs a (z, y, x) volume, got shape {array.shape}.")
    lo, hi = (float(v) for v in rec.get("intensity_range") or rec["config"]["ct_window"])
    step = int(stride)
    valid = valid_mask(array.shape, rec["pad_before"], rec["pad_after"])[::step, ::step, ::step]
    sub = np.ascontiguousarray(array[::step, ::step, ::step], dtype=np.float32)
    hu = (sub + 1.0) * (0.5 * (hi - lo)) + lo
    mask = body_mask(hu, "ct", normalised=False, valid=valid)
    values = hu[mask]
    voxel_mm = float(rec["config"].get("target_spacing", 1.0)) * step
    tissue = values[values >= LUNG_HU]
    if tissue.size == 0:  # a body of air only: keep the statistics defined
        tissue = np.array([LUNG_HU], np.float32)
    stats = {"lung_fraction": float(np.mean(values < LUNG_HU)),
             "fat_fraction": float(np.mean((tissue >= FAT_HU[0]) & (tissue <= FAT_HU[1]))),
             "dense_fraction": float(np.mean(tissue > DENSE_HU)),
             "tissue_mean_hu": float(tissue.mean(dtype=np.float64)),
             "tissue_sd_hu": float(tissue.std(dtype=np.float64)),
             "tissue_p95_hu": float(np.percentile(tissue, 95))}
    idx = np.nonzero(mask)
    extent = [(int(i.max()) - int(i.min()) + 1) * voxel_mm for i in idx]  # (z, y, x) = (S, A, R)
    stats["extent_si_mm"], stats["extent_ap_mm"], stats["extent_lr_mm"] = (float(e) for e in extent)
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    stats["axial_area_cm2"] = float(per_slice[per_slice > 0].mean() * voxel_mm ** 2 / 100.0)
    stats["slice_thickness_mm"] = _slice_thickness(rec["input_grid"])
    return {name: stats[name] for name in FEATURES}


def _as_preprocessed(volume: Any, config: Any) -> tuple[str, np.ndarray, Any]:
    """``(name, array, record)`` from a DomainVolume/PreprocessedVolume, a SimpleITK image or a path."""
    import SimpleITK as sitk

    if hasattr(volume, "array") and hasattr(volume, "record"):
        return str(getattr(volume, "name", "") or ""), volume.array, volume.record
    from ct2mr.preprocessing.pipeline import preprocess

    if isinstance(volume, (str, os.PathLike)):
        from ct2mr.io.images import read_image

        name = Path(volume).name
        volume = read_image(volume)
    elif isinstance(volume, sitk.Image):
        name = ""
    else:
        raise TypeError(f"training_ct_statistics takes preprocessed volumes, SimpleITK images or paths, got "
                        f"{type(volume).__name__}.")
    pre = preprocess(volume, "ct", config)
    return name, pre.array, pre.record


def training_ct_statistics(volumes: Iterable[Any], config: Any = None, stride: int = STRIDE,
                           max_volumes: int | None = MAX_VOLUMES) -> dict[str, Any]:
    """Summary statistics of the training CTs, for the checkpoint's training summary (``"ct_statistics"``).

    Call it once in the trainer on the CT volumes of the training split and store the result in the training summary
    passed to :func:`ct2mr.models.checkpoint.save_checkpoint`; :func:`reference_for` reads it back at translation time.
    About 0.5 s per chest CT on one CPU core (the strided 1 mm grid); above ``max_volumes`` an evenly spaced subset
    is used.

    Args:
        volumes: the training CTs: :class:`ct2mr.preprocessing.collections.DomainVolume` / :class:`ct2mr.preprocessing.pipeline.PreprocessedVolume`
            (used as they are), or SimpleITK images in HU or paths (preprocessed here with ``config``).
        config: :class:`ct2mr.preprocessing.pipeline.PreprocessingConfig` for images and paths (``None``: thesis defaults).
        stride: voxel stride of :func:`ct_statistics`.
        max_volumes: use at most this many volumes, evenly spaced over the sequence (``None``: all).

    Returns:
        JSON-ready ``{"version", "volumes" (count used), "names" (at most 50), "stride", "features": {feature:
        {"mean", "std" (ddof 1, 0 for one volume), "min", "max"}}}``: a few kB whatever the number of volumes.

    Raises:
        ValueError: no volume.
        TypeError: an object that is neither a preprocessed volume, an image nor a path.
    """
    volumes = list(volumes)
    if max_volumes is not None and len(volumes) > int(max_volumes):
        keep = np.unique(np.linspace(0, len(volumes) - 1, int(max_volumes)).round().astype(int))
        volumes = [volumes[i] for i in keep]
    rows, names = [], []
    for volume in volumes:
        name, array, record = _as_preprocessed(volume, config)
        rows.append(ct_statistics(array, record, stride))
        names.append(name)
    if not rows:
        raise ValueError("training_ct_statistics needs at least one CT volume.")
    features = {}
    for f in FEATURES:
        v = np.array([r[f] for r in rows], float)
        features[f] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                       "min": float(v.min()), "max": float(v.max())}
    return {"version": STATISTICS_VERSION, "volumes": len(rows), "names": names[:50], "stride": int(stride),
            "features": features}


def ood_score(statistics: Mapping[str, float], reference: Mapping[str, Any], threshold: float = OOD_THRESHOLD
              ) -> dict[str, Any]:
    """How far one CT's statistics lie from the training CTs': the largest standardised deviation.

    ``z_f = |x_f - mean_f| / sqrt(std_f^2 + t_f^2)`` with ``t_f`` = :data:`TOLERANCES` ``[f]``; ``score = max_f z_f``.

    Args:
        statistics: ``{feature: value}`` of the input (:func:`ct_statistics`).
        reference: a :func:`training_ct_statistics` result.
        threshold: the warning threshold (default :data:`OOD_THRESHOLD`).

    Returns:
        ``{"score", "threshold", "ood_warning", "top_features" (the three largest z, largest first),
        "features": {feature: {"value", "mean", "std", "tolerance", "z"}}}``; features missing from the reference are
        skipped.

    Raises:
        ValueError: a reference of another :data:`STATISTICS_VERSION`, or none of the features in common.
    """
    if int(reference.get("version", -1)) != STATISTICS_VERSION:
        raise ValueError(f"Reference statistics of version {reference.get('version')} cannot be compared with version "
                         f"{STATISTICS_VERSION}; recompute them with this ct2mr.")
    rows = {}
    for f in FEATURES:
        ref = (reference.get("features") or {}).get(f)
        if ref is None or f not in statistics:
            continue
        scale = math.hypot(float(ref["std"]), TOLERANCES[f])
        z = abs(float(statistics[f]) - float(ref["mean"])) / scale
        rows[f] = {"value": round(float(statistics[f]), 4), "mean": round(float(ref["mean"]), 4),
                   "std": round(float(ref["std"]), 4), "tolerance": TOLERANCES[f], "z": round(z, 3)}
    if not rows:
        raise ValueError("The reference statistics share no feature with the input's.")
    top = sorted(rows, key=lambda f: -rows[f]["z"])
    score = rows[top[0]]["z"]
    return {"score": score, "threshold": float(threshold), "ood_warning": bool(score > threshold),
            "top_features": top[:3], "features": rows}


def _bundled_reference(sha256: str) -> tuple[dict[str, Any] | None, str]:
    from ct2mr.models.checkpoint import MODELS_DIR, registry_entry

    entry = registry_entry(sha256) if sha256 else None
    if entry and entry.get("file"):
        path = MODELS_DIR / (Path(entry["file"]).name.removesuffix(".safetensors") + ".ct_statistics.json")
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return data, (f"bundled reference statistics of {entry['name']}'s documented training CTs "
                          f"({', '.join(data.get('names') or [])}; {path.name}), not stored in the checkpoint")
    return None, ""


def reference_for(checkpoint: Any) -> tuple[dict[str, Any] | None, str]:
    """The training-CT statistics to compare inputs with, and where they come from.

    Args:
        checkpoint: a loaded :class:`ct2mr.models.checkpoint.Checkpoint`.

    Returns:
        ``(statistics or None, note)``: the checkpoint's own ``training["ct_statistics"]``; else, for a listed model
        with a bundled ``<file>.ct_statistics.json`` (the default model), those; else ``None`` and a note saying that
        no score can be given and how to get one.
    """
    stored = (checkpoint.training or {}).get("ct_statistics")
    if stored:
        return stored, f"training CTs recorded in the checkpoint ({stored.get('volumes')} volumes)"
    bundled, note = _bundled_reference(getattr(checkpoint, "sha256", ""))
    if bundled is not None:
        return bundled, note
    return None, (f"{checkpoint.name} holds no training-CT statistics (trained before they were recorded); no "
                  "out-of-distribution score. Retrain with a ct2mr that records them.")


def assess(array: np.ndarray, record: Any, checkpoint: Any, threshold: float = OOD_THRESHOLD) -> dict[str, Any]:
    """Statistics and score of one preprocessed input CT against ``checkpoint``'s training CTs.

    Args:
        array: (z, y, x) network-grid CT in [-1, 1] (:func:`ct2mr.preprocessing.pipeline.preprocess` with the checkpoint's
            preprocessing).
        record: its preprocessing record.
        checkpoint: the loaded checkpoint (:func:`reference_for`).
        threshold: warning threshold.

    Returns:
        ``{"score" (None without reference), "threshold", "ood_warning" (None without reference), "top_features",
        "features", "statistics" (the input's), "reference" (note), "reference_volumes", "definition"}``.
    """
    stats = ct_statistics(array, record)
    reference, note = reference_for(checkpoint)
    result: dict[str, Any] = {"score": None, "threshold": float(threshold), "ood_warning": None, "top_features": [],
                              "features": {}}
    if reference is not None:
        try:
            result = ood_score(stats, reference, threshold)
        except ValueError as exc:
            note = f"{note}; not comparable: {exc}"
    result.update({"statistics": {k: round(v, 4) for k, v in stats.items()}, "reference": note,
                   "reference_volumes": (reference or {}).get("volumes"),
                   "definition": ("score = max over features of |x - mean| / sqrt(std^2 + tolerance^2), features of "
                                  "the 1 mm network-grid CT (body mask, every 2nd voxel), ct2mr.inference.ood; warning above "
                                  f"{threshold:g}")})
    return result


def describe(result: Mapping[str, Any]) -> str:
    """One line for people: the score, the warning and the most deviant features, or why there is no score."""
    if result.get("score") is None:
        return f"Out-of-distribution score: not available ({result.get('reference')})"
    parts = ", ".join(f"{f} {result['features'][f]['value']:g} (training {result['features'][f]['mean']:g}, "
                      f"z {result['features'][f]['z']:.1f})" for f in result["top_features"][:2])
    flag = "WARNING: the input differs from the model's training CTs" if result["ood_warning"] else "within range"
    return f"Out-of-distribution score: {result['score']:.2f} (threshold {result['threshold']:g}; {flag}; {parts})"


class OodCheck:
    """The ``--ood`` step of :func:`ct2mr.inference.translate.translate_file` (its ``extensions``).

    Before the networks run, computes the input's statistics on the network grid already prepared for them and
    scores them against the checkpoint's training CTs (:func:`assess`), so that the score is known (and reported
    through ``on_result``) before the long part; after the translation, ``ood.json`` joins the all-or-nothing write.

    Args:
        threshold: warning threshold (default :data:`OOD_THRESHOLD`).
        on_result: called with the :func:`assess` result as soon as it is known (the command line prints it and
            emits an ``ood`` event).
    """

    key = "ood"
    names = (OOD_NAME,)

    def __init__(self, threshold: float = OOD_THRESHOLD, on_result: Any = None) -> None:
        if not math.isfinite(float(threshold)) or float(threshold) <= 0:
            raise ValueError(f"The out-of-distribution threshold must be a positive number, got {threshold}.")
        self.threshold, self.on_result, self.result = float(threshold), on_result, None

    def before(self, image: Any, checkpoint: Any, preprocessed: Any, progress: Any) -> None:
        """Score the input (cheap: the strided network grid) and hand the result to ``on_result``."""
        import time

        started = time.perf_counter()
        self.result = assess(preprocessed.array, preprocessed.record, checkpoint, self.threshold)
        self.result["seconds"] = round(time.perf_counter() - started, 3)
        if self.on_result is not None:
            self.on_result(self.result)

    def after(self, image: Any, checkpoint: Any, preprocessed: Any, result: Any, progress: Any
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns ``(the assessment, {OOD_NAME: the assessment})``."""
        return self.result, {OOD_NAME: self.result}
