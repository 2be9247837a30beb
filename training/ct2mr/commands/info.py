"""``ct2mr info [CHECKPOINT]``: what a checkpoint holds, as JSON (:func:`ct2mr.models.checkpoint.read_metadata`)."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

__all__ = ["NAME", "add_parser", "run"]

NAME = "info"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr info`` to ``subparsers`` and return its parser."""
    i = subparsers.add_parser(NAME, help="show what a checkpoint holds", description="Print a checkpoint's metadata "
                              "(architecture, preprocessing, training summary) as JSON. Without a path: the default "
                              "model.")
    i.add_argument("checkpoint", nargs="?", help="a ct2mr .safetensors checkpoint (default: the bundled model)")
    return i


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Print the metadata of ``args.checkpoint`` (default: the bundled model) with its path and SHA-256; returns 0.

    Raises:
        FileNotFoundError, CheckpointError: no such file, or not a ct2mr checkpoint.
    """
    from ct2mr.io.cache import sha256sum
    from ct2mr.models.checkpoint import default_model_path, read_metadata

    path = args.checkpoint or default_model_path()
    meta = read_metadata(path)
    meta["path"], meta["sha256"] = str(path), sha256sum(path)
    print(json.dumps(meta, indent=2))
    return 0
