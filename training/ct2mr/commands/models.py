"""``ct2mr models list|download NAME|import FILE|clear``: the model list, the user cache, offline import
(:mod:`ct2mr.models.registry`). Light: reading the list imports neither torch nor numpy."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from ct2mr.commands.common import add_progress_argument, interrupt_on_sigterm

__all__ = ["NAME", "add_parser", "run"]

NAME = "models"

EXAMPLES = ("examples:\n  ct2mr models list\n  ct2mr models download ct2mr-m1 --version 1.0\n"
            "  ct2mr models import m1.safetensors --name ct2mr-m1 --version 1.0\n"
            "  ct2mr models clear ct2mr-m1 --keep-latest\n")

DESCRIPTION = (
    "The model list (name, version, description, training data, licence, URL, SHA-256, size; models/models.json and "
    "its JSON Schema, plus the lists in $CT2MR_MODEL_REGISTRY or --registry) and the models in the user cache "
    "(downloaded, SHA-256 checked, or imported from local files for offline machines). Old versions stay until "
    "cleared.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``ct2mr models`` and its actions (list, download, import, clear) to ``subparsers``; return its parser."""
    mo = subparsers.add_parser(NAME, help="list, download, import or clear models (the user cache)",
                               description=DESCRIPTION, epilog=EXAMPLES,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    mo.add_argument("--registry", action="append", metavar="JSON", help="a further model list (same format; "
                    "repeatable)")
    mosub = mo.add_subparsers(dest="action", metavar="ACTION", required=True)
    ml = mosub.add_parser("list", help="every known model version and whether it is local")
    ml.add_argument("--json", action="store_true", help="one JSON array (with paths) instead of a table")
    md = mosub.add_parser("download", help="download a listed model into the user cache (SHA-256 checked)")
    md.add_argument("name", help="model name")
    md.add_argument("--version", help="version (default: the newest listed)")
    add_progress_argument(md)
    mi = mosub.add_parser("import", help="copy a local checkpoint into the user cache (offline machines)")
    mi.add_argument("file", help="a ct2mr .safetensors checkpoint")
    mi.add_argument("--name", help="model name (default: the listed name for a known SHA-256, else the "
                    "checkpoint's training name)")
    mi.add_argument("--version", help="version (default: the listed one, else local-<SHA-256 prefix>)")
    mi.add_argument("--json", action="store_true", help="print the cached model as JSON")
    mc = mosub.add_parser("clear", help="remove cached model versions (never the bundled model)")
    mc.add_argument("name", nargs="?", help="model name (default: every cached model)")
    mc.add_argument("--version", help="only this version")
    mc.add_argument("--keep-latest", action="store_true", help="keep the newest version of each model")
    return mo


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the ``models`` action ``args.action``; returns 0.

    Raises:
        RegistryError: an unknown model or version, a bad model list, a file the cache already holds differently.
        ValueError, OSError: a bad ``clear`` request; the download or the cache failed (a partial download is
            removed).
    """
    from ct2mr.models import registry

    reg = registry.load_registry(args.registry)
    if args.action == "list":
        rows = registry.list_models(reg)
        print(json.dumps(rows, indent=2) if args.json else registry.models_table(rows))
    elif args.action == "download":
        _download(args, reg)
    elif args.action == "import":
        cached = registry.import_checkpoint(args.file, args.name, args.version)
        print(json.dumps({**cached.entry.to_dict(), "path": str(cached.path)}) if args.json
              else f"Imported {cached.entry.key}: {cached.path}")
    else:
        removed = registry.clear(args.name, args.version, args.keep_latest)
        print("\n".join(f"Removed {path}" for path in removed) or "Nothing to clear.")
    return 0


def _download(args: argparse.Namespace, reg) -> None:
    """``models download``: the listed model into the user cache, with progress; prints its path."""
    from ct2mr.models import registry
    from ct2mr.progress import make_reporter

    entry = reg.get(args.name, args.version)
    interrupt_on_sigterm()  # a front end's Cancel: the download removes its partial file itself
    reporter = make_reporter(args.progress)
    reporter.event("start", command="models download", model=entry.name, version=entry.version, url=entry.url,
                   size=entry.size)
    try:
        path = registry.download(entry, lambda done, total: reporter(
            "download", done / total if total else 0.0, f"{done / 1e6:.1f} of {total / 1e6:.1f} MB"))
    finally:
        reporter.close()
    reporter.event("done", path=str(path), model=entry.name, version=entry.version, sha256=entry.sha256)
    if args.progress != "json":
        print(path)
