"""Training data: volumes through the preprocessing chain, train/val/test splits, and random 3D patch streams.

Inputs may also be outputs of ``ct2mr preprocess`` (HDF5 files with ``ct2mr_preprocessed`` = 1): those are used as
they are (their stored record included), and the ones flagged flat are skipped.

CT and MR collections are independent (unpaired, thesis section 5): each training step draws as many CT patches
as MR patches (balanced draws), each from a volume of its own domain. Optional registered pairs (Jin et al. 2019)
give aligned (CT, MR) patches cropped at the same place. Patches are (B, 1, D, H, W) float32 tensors in [-1, 1].

Reproducibility across processes: the patch stream is cut into *slots*, one per sample of the global batch. Slot
``s`` owns the random generator ``numpy.random.default_rng([seed, s])``; a process draws the slots it is given
(with torchrun, rank r of a run with per-process batch b holds slots ``r*b .. r*b + b - 1``). One process with
batch 2 therefore sees exactly the patches two processes with batch 1 see together, and every stream's state can
be saved and restored exactly (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from ct2mr.io.images import list_images, write_json
from ct2mr.io.preprocessed import is_preprocessed, read_preprocessed
from ct2mr.preprocessing.collections import DomainVolume

__all__ = [
    "random_patch",
    "UnpairedPatchSampler",
    "PairedPatchSampler",
    "PatchSource",
    "TrainingBatches",
    "PatchPrefetcher",
    "pair_volumes",
    "source_groups",
    "make_split",
    "read_split",
    "write_split",
    "SPLITS",
]

logger = logging.getLogger(__name__)

#: Split names of a split file.
SPLITS = ("train", "val", "test")
#: Normalised background level: CT below -600 HU and MR below its 1st percentile map to -1 (thesis section 4.3).
BACKGROUND = -1.0
#: Voxels above ``BACKGROUND + FOREGROUND_MARGIN`` count as foreground.
FOREGROUND_MARGIN = 0.05
#: Foreground voxel indices kept per volume for foreground-centred sampling (evenly strided subsample).
MAX_FOREGROUND_INDEX = 200_000


def pair_volumes(ct: Sequence[DomainVolume], mr: Sequence[DomainVolume]) -> list[tuple[DomainVolume, DomainVolume]]:
    """Match registered CT and MR volumes by order for paired training (Jin et al. 2019).

    Args:
        ct: CT volumes (preprocessed).
        mr: MR volumes, the i-th registered to the i-th CT.

    Returns:
        ``[(ct_i, mr_i), ...]``.

    Raises:
        ValueError: different counts, or a pair whose preprocessed arrays are not on one grid (same shape):
            register and resample the MR onto the CT's grid first.
    """
    if len(ct) != len(mr) or not ct:
        raise ValueError(f"Paired training needs the same number of registered CT and MR volumes, got {len(ct)} CT "
                         f"and {len(mr)} MR (4D series count once per phase).")
    for a, b in zip(ct, mr):
        if a.array.shape != b.array.shape:
            raise ValueError(f"Pair {a.name} / {b.name} is not on one voxel grid after preprocessing "
                             f"({a.array.shape} vs {b.array.shape} voxels (z, y, x)). Register and resample the MR "
                             "onto the CT grid first (e.g. with SimpleITK or 3D Slicer's BRAINSFit).")
    return list(zip(ct, mr))


# ---- patches ------------------------------------------------------------------------------------------------
def _foreground_index(array: np.ndarray) -> np.ndarray:
    """Flat indices of foreground voxels, an evenly strided subsample of at most :data:`MAX_FOREGROUND_INDEX`."""
    index = np.flatnonzero(array.reshape(-1) > BACKGROUND + FOREGROUND_MARGIN)
    if index.size > MAX_FOREGROUND_INDEX:
        index = index[:: math.ceil(index.size / MAX_FOREGROUND_INDEX)]
    return index


def random_patch(array: np.ndarray, size: Sequence[int], rng: np.random.Generator, foreground: float = 0.2,
                 background: float = BACKGROUND, tries: int = 10, foreground_bias: float = 0.0,
                 foreground_index: np.ndarray | None = None, others: Sequence[np.ndarray] = ()
                 ) -> np.ndarray | tuple[np.ndarray, ...]:
    """Crop a random (D, H, W) patch, preferring patches with enough foreground.

    Args:
        array: (z, y, x) volume in [-1, 1]; axes shorter than the patch are padded with ``background``.
        size: patch size (D, H, W) voxels.
        rng: random generator.
        foreground: wanted fraction of voxels above ``background + 0.05``; after ``tries`` draws the last is kept.
        background: the normalised background value.
        tries: draws before giving up on the foreground criterion.
        foreground_bias: probability, per draw, of centring the patch on a random foreground voxel (from
            ``foreground_index``) instead of placing it uniformly.
        foreground_index: flat indices of foreground voxels of ``array`` (see ``_foreground_index``).
        others: arrays on the same grid cropped at the same place (the MR of a registered pair).

    Returns:
        A float32 (D, H, W) patch, or a tuple (patch, *patches of ``others``) when ``others`` is given.
    """
    size = [int(s) for s in size]
    shape = array.shape
    pad = [(0, max(0, s - n)) for s, n in zip(size, shape)]
    if any(p[1] for p in pad):
        array = np.pad(array, pad, constant_values=background)
        others = [np.pad(o, pad, constant_values=background) for o in others]
    start = [0, 0, 0]
    for _ in range(max(1, tries)):
        if foreground_bias > 0 and foreground_index is not None and foreground_index.size and \
                rng.random() < foreground_bias:
            centre = np.unravel_index(int(foreground_index[int(rng.integers(0, foreground_index.size))]), shape)
            start = [int(min(max(0, c - s // 2), n - s)) for c, s, n in zip(centre, size, array.shape)]
        else:
            start = [int(rng.integers(0, n - s + 1)) for n, s in zip(array.shape, size)]
        window = tuple(slice(a, a + s) for a, s in zip(start, size))
        if foreground <= 0 or np.mean(array[window] > background + FOREGROUND_MARGIN) >= foreground:
            break
    window = tuple(slice(a, a + s) for a, s in zip(start, size))
    patch = np.ascontiguousarray(array[window], dtype=np.float32)
    if not others:
        return patch
    return (patch, *(np.ascontiguousarray(o[window], dtype=np.float32) for o in others))


class _Drawer:
    """Chooses volume indices of one domain for one slot: i.i.d., or shuffled rounds over volumes or groups."""

    def __init__(self, groups: Sequence[str], balance: str) -> None:
        self.balance = balance
        self.n = len(groups)
        keys = list(dict.fromkeys(groups))
        self.members = [[i for i, g in enumerate(groups) if g == k] for k in keys]
        self.order: list[int] = []
        self.pos = 0

    def draw(self, rng: np.random.Generator) -> int:
        if self.balance == "none":
            return int(rng.integers(0, self.n))
        units = self.n if self.balance == "volume" else len(self.members)
        if self.pos >= len(self.order):
            self.order = [int(i) for i in rng.permutation(units)]
            self.pos = 0
        unit = self.order[self.pos]
        self.pos += 1
        if self.balance == "volume":
            return unit
        members = self.members[unit]
        return members[int(rng.integers(0, len(members)))] if len(members) > 1 else members[0]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "pos": int(self.pos)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.order = [int(i) for i in state["order"]]
        self.pos = int(state["pos"])


class _Slot:
    def __init__(self, seed: int, slot: int, stream: int, drawers: Sequence[_Drawer]) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(slot), int(stream)]))
        self.drawers = list(drawers)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "drawers": [d.state_dict() for d in self.drawers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["rng"])
        for drawer, sub in zip(self.drawers, state["drawers"]):
            drawer.load_state_dict(sub)


class PatchSource(Protocol):
    """What :class:`PatchPrefetcher` consumes: a sampler with exact, restorable state."""

    def sample(self) -> dict[str, torch.Tensor]:
        """The next batch."""

    def state_dict(self) -> dict[str, Any]:
        """The state that reproduces every later batch."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""


class _SlotSampler:
    """Shared machinery: per-slot generators, foreground indices, state."""

    stream = 0

    def __init__(self, patch_size: Sequence[int], batch_size: int, seed: int, foreground: float,
                 slots: Sequence[int] | None, foreground_tries: int, foreground_bias: float, balance: str) -> None:
        from ct2mr.training.config import BALANCE_MODES

        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}; got {balance!r}.")
        self.patch_size = tuple(int(s) for s in patch_size)
        self.slots = [int(s) for s in (slots if slots is not None else range(int(batch_size)))]
        if not self.slots:
            raise ValueError("A sampler needs at least one slot (batch_size >= 1).")
        self.batch_size = len(self.slots)
        self.seed = int(seed)
        self.foreground = float(foreground)
        self.tries = int(foreground_tries)
        self.bias = float(foreground_bias)
        self.balance = balance
        self._fg: dict[int, np.ndarray] = {}

    def _index(self, array: np.ndarray) -> np.ndarray | None:
        if self.bias <= 0:
            return None
        key = id(array)
        if key not in self._fg:
            self._fg[key] = _foreground_index(array)
        return self._fg[key]

    def _make_slots(self, domains: Sequence[Sequence[DomainVolume]]) -> dict[int, _Slot]:
        return {s: _Slot(self.seed, s, self.stream, [_Drawer([v.group for v in vols], self.balance)
                                                   for vols in domains]) for s in self.slots}

    def state_dict(self) -> dict[str, Any]:
        """Per-slot generator and drawing state, keyed by global slot index (JSON-compatible)."""
        return {"slots": {int(s): slot.state_dict() for s, slot in self._slot_map.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state of this sampler's slots (``state`` may hold more slots, e.g. of other processes).

        Raises:
            KeyError: a slot of this sampler is missing from ``state``.
        """
        stored = {int(k): v for k, v in state["slots"].items()}
        for s, slot in self._slot_map.items():
            if s not in stored:
                raise KeyError(f"The saved sampler state has no slot {s} (it holds {sorted(stored)}); resume with "
                               "the same global batch size.")
            slot.load_state_dict(stored[s])


class UnpairedPatchSampler(_SlotSampler):
    """Draw unpaired, balanced batches of CT and MR patches (the same number of each per step).

    Args:
        ct: preprocessed CT volumes.
        mr: preprocessed MR volumes.
        patch_size: (D, H, W) voxels.
        batch_size: patches per domain per draw (slots ``0 .. batch_size - 1``) when ``slots`` is not given.
        seed: seed of the slots' generators.
        foreground: see :func:`random_patch`.
        slots: global batch slots this process draws (see the module docstring).
        foreground_tries: see :func:`random_patch`.
        foreground_bias: see :func:`random_patch`.
        balance: ``"none"``, ``"volume"`` or ``"source"`` (see :data:`ct2mr.training.config.BALANCE_MODES`).

    Raises:
        ValueError: no CT or no MR volume; an unknown ``balance``.
    """

    def __init__(self, ct: Sequence[DomainVolume], mr: Sequence[DomainVolume], patch_size: Sequence[int],
                 batch_size: int = 1, seed: int = 0, foreground: float = 0.2, *, slots: Sequence[int] | None = None,
                 foreground_tries: int = 10, foreground_bias: float = 0.0, balance: str = "none") -> None:
        if not ct or not mr:
            raise ValueError("Training needs at least one CT and one MR volume.")
        super().__init__(patch_size, batch_size, seed, foreground, slots, foreground_tries, foreground_bias, balance)
        self.ct, self.mr = list(ct), list(mr)
        self._slot_map = self._make_slots([self.ct, self.mr])

    def _patch(self, volume: DomainVolume, rng: np.random.Generator) -> np.ndarray:
        return random_patch(volume.array, self.patch_size, rng, self.foreground, tries=self.tries,  # type: ignore
                            foreground_bias=self.bias, foreground_index=self._index(volume.array))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ct_batch, mr_batch)``, each (B, 1, D, H, W) float32 in [-1, 1], B = number of slots."""
        ct, mr = [], []
        for s in self.slots:
            slot = self._slot_map[s]
            ct.append(self._patch(self.ct[slot.drawers[0].draw(slot.rng)], slot.rng))
            mr.append(self._patch(self.mr[slot.drawers[1].draw(slot.rng)], slot.rng))
        return torch.from_numpy(np.stack(ct)[:, None]), torch.from_numpy(np.stack(mr)[:, None])


class PairedPatchSampler(_SlotSampler):
    """Draw aligned (CT, MR) patches from registered pairs, cropped at the same place (Jin et al. 2019).

    Args:
        pairs: ``[(ct, mr), ...]`` on one grid each (see :func:`pair_volumes`).
        patch_size, batch_size, seed, foreground, slots, foreground_tries, foreground_bias, balance: as
            :class:`UnpairedPatchSampler`; the foreground criterion is evaluated on the CT.
    """

    stream = 1

    def __init__(self, pairs: Sequence[tuple[DomainVolume, DomainVolume]], patch_size: Sequence[int],
                 batch_size: int = 1, seed: int = 0, foreground: float = 0.2, *, slots: Sequence[int] | None = None,
                 foreground_tries: int = 10, foreground_bias: float = 0.0, balance: str = "none") -> None:
        if not pairs:
            raise ValueError("Paired training needs at least one registered CT/MR pair.")
        super().__init__(patch_size, batch_size, seed, foreground, slots, foreground_tries, foreground_bias, balance)
        self.pairs = list(pairs)
        self._slot_map = self._make_slots([[ct for ct, _ in self.pairs]])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ct_batch, mr_batch)`` of aligned patches, each (B, 1, D, H, W) float32 in [-1, 1]."""
        ct, mr = [], []
        for s in self.slots:
            slot = self._slot_map[s]
            a, b = self.pairs[slot.drawers[0].draw(slot.rng)]
            x, y = random_patch(a.array, self.patch_size, slot.rng, self.foreground, tries=self.tries,
                                foreground_bias=self.bias, foreground_index=self._index(a.array), others=[b.array])
            ct.append(x)
            mr.append(y)
        return torch.from_numpy(np.stack(ct)[:, None]), torch.from_numpy(np.stack(mr)[:, None])


class TrainingBatches:
    """The batches of one training step: unpaired CT and MR, plus aligned pairs when paired mode is on.

    Args:
        unpaired: the unpaired sampler.
        paired: the paired sampler, or ``None``.
    """

    def __init__(self, unpaired: UnpairedPatchSampler, paired: PairedPatchSampler | None = None) -> None:
        self.unpaired, self.paired = unpaired, paired

    def sample(self) -> dict[str, torch.Tensor]:
        """``{"ct", "mr"}`` and, in paired mode, ``{"paired_ct", "paired_mr"}``: (B, 1, D, H, W) tensors."""
        ct, mr = self.unpaired.sample()
        out = {"ct": ct, "mr": mr}
        if self.paired is not None:
            out["paired_ct"], out["paired_mr"] = self.paired.sample()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"unpaired": self.unpaired.state_dict(),
                "paired": self.paired.state_dict() if self.paired is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unpaired.load_state_dict(state["unpaired"])
        if self.paired is not None:
            if state.get("paired") is None:
                raise KeyError("The saved sampler state has no paired stream; resume with the same paired setting.")
            self.paired.load_state_dict(state["paired"])


class PatchPrefetcher:
    """Prepare batches ahead in a background thread, keeping the source's state exact for checkpoints.

    The thread draws batches in order and records the source's state right after each draw; :meth:`state_dict`
    returns the state after the last batch handed out, so a checkpoint restores precisely the next batch the
    training loop would have received.

    Args:
        source: a :class:`PatchSource`.
        depth: batches prepared ahead; 0 draws synchronously in :meth:`next`.
        pin_memory: pin the tensors (faster host-to-GPU copies).
    """

    def __init__(self, source: PatchSource, depth: int = 2, pin_memory: bool = False) -> None:
        self.source, self.depth, self.pin = source, int(depth), bool(pin_memory)
        self._state = source.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _draw(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        batch = self.source.sample()
        if self.pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, self.source.state_dict()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._draw()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the training loop
            self._error = exc
            self._queue.put(None)

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch (``{"ct", "mr", ...}`` tensors).

        Raises:
            Exception: whatever drawing the batch raised.
        """
        if self.depth == 0:
            batch, self._state = self._draw()
            return batch
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ct2mr-patches", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is None:
            raise self._error  # type: ignore[misc]
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The source's state after the last batch handed out."""
        return self._state

    def close(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ---- splits -------------------------------------------------------------------------------------------------
def source_groups(inputs: str | Path | Iterable[str | Path]) -> dict[str, list[str]]:
    """Group input paths by the acquisition they come from (for splits that never split a patient's series).

    Raw files and DICOM folders are their own group; ``ct2mr preprocess`` outputs are grouped by the file they were
    made from (the phases of a 4D series land in one group).

    Args:
        inputs: files and folders (see :func:`ct2mr.io.images.list_images`).

    Returns:
        ``{group: [path, ...]}`` in sorted order.

    Raises:
        FileNotFoundError, ct2mr.io.images.ImageReadError: as :func:`ct2mr.io.images.list_images`.
    """
    groups: dict[str, list[str]] = {}
    for path in list_images(inputs):
        key = str(path.resolve())
        if is_preprocessed(path):
            key = str(read_preprocessed(path, load_array=False).attrs.get("source_abspath") or key)
        groups.setdefault(key, []).append(str(path.resolve()))
    return dict(sorted(groups.items()))


def make_split(ct: Iterable[str | Path], mr: Iterable[str | Path], val_fraction: float = 0.2,
               test_fraction: float = 0.0, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Split the CT and MR inputs into train/val/test by source (thesis section 7.1: 80 % / 20 %), reproducibly.

    Per modality, ``floor(fraction * groups)`` source groups go to validation (and to test), chosen by a
    permutation seeded with ``seed``; at least one group stays in training, so small collections may have no
    validation volume.

    Args:
        ct: CT files or folders.
        mr: MR files or folders.
        val_fraction: share of groups held out for validation.
        test_fraction: share of groups held out for testing.
        seed: seed of the permutation.

    Returns:
        ``{"ct": {"train": [...], "val": [...], "test": [...]}, "mr": {...}}`` with absolute paths.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {val_fraction}, "
                         f"{test_fraction}.")
    out: dict[str, dict[str, list[str]]] = {}
    for k, (modality, inputs) in enumerate((("ct", list(ct)), ("mr", list(mr)))):
        groups = list(source_groups(inputs).values()) if inputs else []
        n = len(groups)
        n_val, n_test = int(math.floor(val_fraction * n)), int(math.floor(test_fraction * n))
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 7919, k])).permutation(n)
        chosen = {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test])}
        split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for i, paths in enumerate(groups):
            name = "val" if i in chosen["val"] else "test" if i in chosen["test"] else "train"
            split[name] += paths
        out[modality] = split
    return out


def read_split(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read a split file; relative paths are taken relative to the file's folder.

    Accepted formats:

    * JSON ``{"ct": {"train": [...], "val": [...], "test": [...]}, "mr": {...}}`` (what ``split.json`` of a run
      holds), or JSON ``{"train": {"ct": [...], "mr": [...]}, "val": {...}, "test": {...}}``;
    * CSV with a header naming the columns ``path``, ``modality`` (ct/mr) and ``split`` (train/val/test).

    Args:
        path: the split file (``.json`` or ``.csv``).

    Returns:
        ``{"ct": {"train", "val", "test"}, "mr": {...}}`` lists of absolute paths (missing lists are empty).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown format, modality or split name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No split file at {path}.")
    out = {m: {s: [] for s in SPLITS} for m in ("ct", "mr")}

    def add(modality: str, split: str, item: str) -> None:
        modality, split = str(modality).strip().lower(), str(split).strip().lower()
        if modality not in out or split not in SPLITS:
            raise ValueError(f"{path}: unknown modality {modality!r} or split {split!r} (modality ct or mr; split "
                             f"{', '.join(SPLITS)}).")
        item_path = Path(str(item).strip())
        out[modality][split].append(str(item_path if item_path.is_absolute() else (path.parent / item_path).resolve()))

    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            if not {"path", "modality", "split"} <= set(columns):
                raise ValueError(f"{path}: a split CSV needs the columns path, modality and split; found "
                                 f"{reader.fieldnames}.")
            for row in reader:
                add(row[columns["modality"]], row[columns["split"]], row[columns["path"]])
        return out
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); a split file is JSON or CSV.") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a split file holds a JSON object.")
    for outer, inner in doc.items():
        if not isinstance(inner, dict):
            continue  # free-form fields (seed, fractions)
        for key, items in inner.items():
            modality, split = (outer, key) if str(outer).lower() in out else (key, outer)
            for item in items:
                add(modality, split, item)
    return out


def write_split(path: str | Path, split: Mapping[str, Mapping[str, Sequence[str]]], **info: Any) -> Path:
    """Write a split (``{"ct": {"train": ...}, "mr": ...}``) as JSON, atomically and verified
    (:func:`ct2mr.io.images.write_json`); ``info`` fields are added."""
    return write_json(path, {**{m: {s: list(v) for s, v in d.items()} for m, d in split.items()}, **info})
