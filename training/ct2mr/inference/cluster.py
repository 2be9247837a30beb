"""Work split over processes: which share of a case list this process takes under ``torchrun`` or a job array.

Both batch commands (``ct2mr translate`` over many CTs, :mod:`ct2mr.inference.batch`; ``ct2mr synthesize-dataset``,
:mod:`ct2mr.inference.labeltransfer`) sort their cases the same way on every process and keep every
``world_size``-th one from ``rank`` on. No process group is created and no process waits for another, so any launcher
that sets ``RANK`` and ``WORLD_SIZE`` works (``torchrun``, a SLURM array, a shell loop). Standard library only.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

__all__ = ["shard_position", "shard"]

T = TypeVar("T")


def shard_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the arguments, else ``RANK``/``WORLD_SIZE`` from the environment.

    Args:
        rank: this process's 0-based index; ``None``: ``RANK`` from the environment, else 0.
        world_size: number of processes sharing the work; ``None``: ``WORLD_SIZE`` from the environment, else 1.

    Returns:
        The pair, as ints (not checked: :func:`shard` refuses a rank outside the world size).

    Raises:
        ValueError: ``RANK`` or ``WORLD_SIZE`` is set to something that is not an integer.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return rank, world_size


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This process's share of ``items`` under ``torchrun`` (``RANK``/``WORLD_SIZE``): ``items[rank::world_size]``.

    Args:
        items: the whole work list, in the same order on every process.
        rank, world_size: as :func:`shard_position` (default: from the environment, else all items).

    Returns:
        The items of this process, in their order.

    Raises:
        ValueError: ``rank`` is not in ``0 .. world_size - 1``.
    """
    rank, world_size = shard_position(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}.")
    return list(items)[rank::world_size]
