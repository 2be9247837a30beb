#!/usr/bin/env python
"""Write the out-of-distribution reference statistics of a model's training CTs (issue 16, :mod:`ct2mr.inference.ood`).

For checkpoints trained before the trainer recorded ``training["ct_statistics"]``: reads the CTs named in the
checkpoint's training summary (``ct_volumes``) from the given folders, preprocesses them with the checkpoint's own
parameters, and writes ``ct2mr.inference.ood.training_ct_statistics`` of them next to the model as
``<model file stem>.ct_statistics.json``, with the command that made it.

The bundled default model's file was made from the repository root with:

    .venv/bin/python training/scripts/ct_reference_statistics.py ../shared/data/ct

Arguments: CT folders or files to search (default ``../shared/data/ct``); ``--model`` (default: the bundled model);
``--out`` (default: beside the model).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ct2mr.models.checkpoint import default_model_path, load_checkpoint
from ct2mr.io.images import image_suffix, list_images, write_json
from ct2mr.inference.ood import training_ct_statistics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", default=["../shared/data/ct"], help="CT files or folders to search")
    parser.add_argument("--model", help="checkpoint (default: the bundled default model)")
    parser.add_argument("--out", help="output JSON (default: <model stem>.ct_statistics.json beside the model)")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model else default_model_path()
    checkpoint = load_checkpoint(path)
    wanted = list(checkpoint.training.get("ct_volumes") or [])
    if not wanted:
        parser.error(f"{path} names no training CTs (training summary 'ct_volumes').")
    found = {}
    for candidate in list_images(args.inputs):
        suffix = image_suffix(candidate)
        stem = candidate.name[: -len(suffix)] if suffix else candidate.name
        if stem in wanted:
            found[stem] = candidate
    missing = [name for name in wanted if name not in found]
    if missing:
        parser.error(f"training CTs not found in {args.inputs}: {', '.join(missing)}")
    stats = training_ct_statistics([found[name] for name in wanted], checkpoint.preprocessing)
    stats["names"] = wanted
    stats["model"] = {"name": checkpoint.name, "sha256": checkpoint.sha256}
    stats["command"] = "training/scripts/ct_reference_statistics.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                  else argv)
    out = Path(args.out) if args.out else path.with_name(path.name.removesuffix(".safetensors")
                                                          + ".ct_statistics.json")
    write_json(out, stats)
    print(json.dumps({"written": str(out), "volumes": stats["volumes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
