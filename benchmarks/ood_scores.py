"""Out-of-distribution scores (issue 16, :mod:`ct2mr.inference.ood`) of the shared CTs, as the README's table reports them.

For every CT of ``../shared/data/ct`` and three derived volumes (a head-sized 150 x 195 x 210 mm crop of the thorax
CT and of the abdomen/pelvis CT, and the thorax CT scanned 20 % shorter), prints the score and its most deviant
feature against

* the bundled default model's reference (its four documented training CTs,
  ``training/ct2mr/models/ct2mr-default-v0.2.ct_statistics.json``),
* the two full-field chest CTs (``thorax_cta_1p5mm``, ``chest_ct_lung2``): the references of a chest-trained model,

then leave-one-out scores within each reference set (each CT against the others). Nothing is written.

Usage, from the repository root (about half a minute on one CPU core)::

    .venv/bin/python benchmarks/ood_scores.py [--data ../shared/data/ct]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import SimpleITK as sitk

from ct2mr.models.checkpoint import load_checkpoint
from ct2mr.io.images import read_image
from ct2mr.inference.ood import OOD_THRESHOLD, ct_statistics, ood_score, reference_for, training_ct_statistics
from ct2mr.preprocessing.pipeline import preprocess

CTS = ("thorax_cta_1p5mm.nii.gz", "chest_ct_lung2.nrrd", "thorax_cta_heart_crop_1p5mm.nii.gz",
       "abdomen_pelvis_ct_3mm.nii.gz", "upper_abdomen_ct_dicom")
CHEST = ("thorax_cta_1p5mm.nii.gz", "chest_ct_lung2.nrrd")
DEFAULT_TRAINING = ("abdomen_pelvis_ct_3mm.nii.gz", "thorax_cta_1p5mm.nii.gz", "thorax_cta_heart_crop_1p5mm.nii.gz",
                    "upper_abdomen_ct_dicom")


def head_sized(image: sitk.Image, mm: tuple[float, float, float] = (150.0, 195.0, 210.0)) -> sitk.Image:
    """A box of about ``mm`` (x, y, z) from the middle of the axial plane and the top of the volume."""
    size = [min(n, int(round(m / s))) for n, m, s in zip(image.GetSize(), mm, image.GetSpacing())]
    x0, y0 = (image.GetSize()[0] - size[0]) // 2, (image.GetSize()[1] - size[1]) // 2
    z1 = image.GetSize()[2]
    return image[x0:x0 + size[0], y0:y0 + size[1], z1 - size[2]:z1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ct", help="folder of the shared CTs")
    args = parser.parse_args()
    data = Path(args.data)
    images = {name: read_image(data / name) for name in CTS}
    thorax, abdomen = images["thorax_cta_1p5mm.nii.gz"], images["abdomen_pelvis_ct_3mm.nii.gz"]
    images["head-sized crop of the thorax CT"] = head_sized(thorax)
    images["head-sized crop of the abdomen CT"] = head_sized(abdomen)
    depth = thorax.GetSize()[2]
    images["thorax CT 20 % shorter"] = thorax[:, :, depth // 10:depth - depth // 10]
    stats = {}
    for name, image in images.items():
        pre = preprocess(image, "ct")
        stats[name] = ct_statistics(pre.array, pre.record)
    default_reference, note = reference_for(load_checkpoint(None))
    chest_reference = training_ct_statistics([images[name] for name in CHEST])
    print(f"threshold {OOD_THRESHOLD:g}; default reference: {note}\n")
    print(f"| CT | vs default model's training CTs | vs the 2 full-field chest CTs |\n|---|---|---|")
    for name in images:
        cells = []
        for reference in (default_reference, chest_reference):
            result = ood_score(stats[name], reference)
            flag = " **warning**" if result["ood_warning"] else ""
            cells.append(f"{result['score']:.2f} ({result['top_features'][0]}){flag}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    for label, names in (("chest CTs", CHEST), ("default model's training CTs", DEFAULT_TRAINING)):
        print(f"\nleave-one-out within the {label}:")
        for name in names:
            others = [images[o] for o in names if o != name]
            result = ood_score(stats[name], training_ct_statistics(others))
            print(f"  {name}: {result['score']:.2f} ({result['top_features'][0]}) against {len(others)}")


if __name__ == "__main__":
    main()
