"""The sub-commands of ``ct2mr`` (:mod:`ct2mr.cli`), one module each.

Layout: the module ``ct2mr.commands.<name>`` holds one sub-command:

* ``NAME``: the word on the command line (``synthesize_dataset`` is ``synthesize-dataset``);
* ``add_parser(subparsers) -> argparse.ArgumentParser``: its options, help text and examples;
* ``run(args, argv) -> int``: the handler; it calls the library, prints the result and returns the exit status.
  Errors the user can act on (``FileNotFoundError``, ``ValueError``, ``RuntimeError``, ``OSError`` ...) propagate to
  :func:`ct2mr.cli.main`, which prints them as one line (and a JSON ``error`` event with ``--progress json``);
* optionally ``accept_unknown(args, extra) -> bool`` for arguments argparse did not place (``train``: ``KEY=VALUE``
  overrides anywhere on the line).

:mod:`ct2mr.commands.common` holds what several commands share (the sliding-window, precision and progress options,
the count bar, plain warnings, SIGTERM handling, the OpenMP setup). Module top levels import only the standard library
and other command modules; the science (torch, numpy, SimpleITK) is imported inside ``run``, so that ``ct2mr
models``, ``ct2mr info --help`` or ``ct2mr qc --help`` do not load torch. (``translate``'s parser reads its defaults
from :mod:`ct2mr.inference.ood` and :mod:`ct2mr.inference.uncertainty`, which load numpy.)

:data:`COMMANDS` lists the modules in the order of ``ct2mr --help``.
"""

from __future__ import annotations

from types import ModuleType

from ct2mr.commands import (compare, demo, evaluate, info, models, preprocess, qa, qc, synthesize_dataset, train,
                            translate)

__all__ = ["COMMANDS", "command"]

#: The sub-command modules, in the order of ``ct2mr --help``.
COMMANDS: tuple[ModuleType, ...] = (preprocess, qc, translate, train, demo, synthesize_dataset, evaluate, compare, qa,
                                    info, models)


def command(name: str) -> ModuleType:
    """The module of the sub-command ``name`` (as typed: ``synthesize-dataset``).

    Raises:
        KeyError: no such sub-command.
    """
    for module in COMMANDS:
        if module.NAME == name:
            return module
    raise KeyError(f"Unknown ct2mr command {name!r}; known: {', '.join(m.NAME for m in COMMANDS)}.")
