"""``ct2mr synthesize-dataset --images CT... --labels SEG... --out DIR``: label transfer (thesis 1.2, E3), labelled
CTs -> a synthetic-MR training set with the same labels (:func:`ct2mr.inference.labeltransfer.synthesize_dataset`)."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from ct2mr.commands.common import LazyBar, add_progress_argument, add_window_arguments, inference_settings

__all__ = ["NAME", "add_parser", "run"]

NAME = "synthesize-dataset"

EXAMPLES = ("examples:\n  ct2mr synthesize-dataset --images ct/ --labels seg/ --out Dataset501_SynMR\n"
            "  ct2mr synthesize-dataset --images ct/ --labels seg/ --out ds/ --format monai --augment 2 "
            "--label-names names.json\n  torchrun --nproc-per-node 4 -m ct2mr synthesize-dataset --images "
            "ct/ --labels seg/ --out ds/ --device cuda\n")

DESCRIPTION = (
    "Label transfer (thesis 1.2, E3): translate every CT, copy its label map unchanged (the synthetic MR keeps the "
    "CT's voxel grid, so the labels stay valid) and write an nnU-Net v2 raw dataset (imagesTr/<case>_0000.nii.gz, "
    "labelsTr/<case>.nii.gz, dataset.json with channel 'MR') or a MONAI datalist. CTs and label maps are paired by "
    "case id (file name without suffix and without _0000); unmatched files are reported. Finished cases are skipped "
    "on a rerun. Under torchrun the cases are shared among the processes. ct2mr_dataset.json records the model "
    "(name, version, SHA-256), the preprocessing and inference parameters and the ct2mr version.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr synthesize-dataset`` to ``subparsers`` and return its parser."""
    s = subparsers.add_parser(NAME, help="labelled CTs -> synthetic-MR training set with the same labels",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--images", nargs="+", required=True, metavar="PATH", help="CT files or folders (HU)")
    s.add_argument("--labels", nargs="+", required=True, metavar="PATH", help="label-map files or folders")
    s.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created if missing)")
    s.add_argument("--model", metavar="PATH", help="ct2mr checkpoint (default: the bundled model)")
    s.add_argument("--format", default="nnunet", choices=("nnunet", "monai"), help="layout (default: %(default)s)")
    s.add_argument("--label-names", metavar="JSON", help='label names, {"lung": 1, ...} or {"1": "lung", ...} '
                   "(default: label_<value> for every value found)")
    s.add_argument("--name", default="CT2MRSynthetic", help="dataset name (default: %(default)s)")
    s.add_argument("--augment", type=int, default=0, metavar="N", help="N extra synthetic MRs per CT with a random "
                   "bias field and Rician noise (default: 0)")
    add_window_arguments(s, device_help="auto, cpu, cuda or cuda:N (default: %(default)s; under torchrun auto uses "
                         "cuda:LOCAL_RANK)", sw_batch_size=False)
    add_progress_argument(s)
    return s


def _progress(args: argparse.Namespace, bar: LazyBar) -> Callable | None:
    """The per-case callback of ``--progress``: the case bar, one JSON object per case, or ``None``."""
    if args.progress == "bar":
        shown = bar.open(unit="case", desc="synthesize")

        def progress(done: int, total: int, case: str) -> None:
            shown.total = total
            shown.update(1)
            shown.set_postfix_str(case)
        return progress
    if args.progress == "json":
        from ct2mr.progress import JsonReporter

        events = JsonReporter()

        def progress(done: int, total: int, case: str) -> None:
            events.event("progress", stage="case", fraction=done / total, case=case)
        return progress
    return None


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Write the dataset into ``args.out`` and print its summary (or a JSON ``done`` event).

    Returns:
        0, or 1 when any case failed (the others are written).

    Raises:
        FileNotFoundError, ValueError, OSError: no inputs, bad label names or an unwritable folder.
    """
    from ct2mr.inference.labeltransfer import synthesize_dataset
    from ct2mr.inference.translate import cluster_device

    settings = inference_settings(args, device=cluster_device(args.device))
    with LazyBar() as bar:
        report = synthesize_dataset(args.images, args.labels, args.out, args.model, args.format, args.label_names,
                                    settings, args.augment, args.name, _progress(args, bar))
    if args.progress == "json":
        from ct2mr.progress import JsonReporter

        JsonReporter().event("done", index=str(report.index), failed=[r.case for r in report.failed],
                             unmatched_images=report.unmatched_images, unmatched_labels=report.unmatched_labels)
    else:
        print(report.summary())
    return 1 if report.failed else 0
