"""Tracing a dataset of records, optionally sharded over the ranks of a ``torch.distributed`` group.

Launch with ``torchrun --nproc-per-node N -m negtrace.cli trace ...`` (or call
:func:`patch_dataset` inside your own process group). Record ``i`` is traced by rank
``i % world`` (rank ``r`` takes indices ``r::world``: each record exactly once, the same way
on every run), per-example results are gathered to every rank in the original order with
``all_gather_object``, and only rank 0 writes files. Without an initialised process group
everything runs in this process. Noise corruption draws example ``i`` from a generator
seeded ``seed + i`` (``i`` the record index), so sharding and batching leave results as
they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..models.hooked import HookedVLM
from .result import CTEResult


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """The indices rank ``rank`` traces: ``indices[rank::world]`` (disjoint, covering, deterministic)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world} processes")
    return list(indices)[rank::world]


@contextmanager
def launched_group(backend: str = "gloo") -> Iterator[tuple[int, int]]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    if no group is initialised yet; leave it on exit if it was joined here. Yields (rank, world).

    ``gloo`` suffices: only Python objects (results) travel between ranks."""
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend=backend)
        joined = True
    try:
        yield rank_and_world()
    finally:
        if joined:
            dist.destroy_process_group()


def broadcast_from_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its value on every rank; an exception raised there is
    raised on every rank (so no rank waits forever for a failed one)."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _gather(local: dict[int, CTEResult]) -> dict[int, CTEResult]:
    _, world = rank_and_world()
    if world == 1:
        return dict(local)
    parts: list[dict[int, CTEResult] | None] = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[int, CTEResult] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def _batches(records: Sequence, indices: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive runs of ``indices`` of at most ``batch_size`` whose records agree on having an image."""
    batch: list[int] = []
    for i in indices:
        if batch and (len(batch) == batch_size or (records[batch[0]].image is None) != (records[i].image is None)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _images(model: HookedVLM, records: Sequence, batch: list[int], base: Path) -> torch.Tensor | None:
    if records[batch[0]].image is None:
        return None
    from PIL import Image

    if model.preprocess is None:
        raise TypeError("records name images, but this model has no preprocess function to read them")
    out = []
    for i in batch:
        ref = records[i].image
        path = base / ref if (base / ref).is_file() else Path(ref)
        out.append(model.preprocess(Image.open(path).convert("RGB")))
    return torch.stack(out)


def patch_dataset(model: HookedVLM, records: Sequence, *, indices: Sequence[int] | None = None,
                  base: str | Path = ".", corrupt: str = "pair", batch_size: int = 32, seed: int = 0,
                  progress: bool | None = None, on_result: Callable[[int, CTEResult], None] | None = None,
                  **patch_kwargs) -> list[CTEResult]:
    """Trace ``records`` (``TraceRecord``: clean, corrupted, image) on the text tower, sharded over ranks.

    ``indices``: which records to trace (default all). Each rank traces ``indices[rank::world]``
    in batches of ``batch_size`` (:func:`negtrace.patch`'s other options pass through
    ``patch_kwargs``), calling ``on_result(index, result)`` on the rank that computed it as soon
    as its batch is done. Returns the results for ``indices``, in that order, on every rank.
    A record's image path is relative to ``base`` (or absolute).
    """
    from .engine import patch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    wanted = list(range(len(records))) if indices is None else [int(i) for i in indices]
    bad = [i for i in wanted if not 0 <= i < len(records)]
    if bad:
        raise IndexError(f"record indices {bad[:5]} are out of range for {len(records)} records")
    rank, world = rank_and_world()
    mine = shard_indices(wanted, rank, world)
    local: dict[int, CTEResult] = {}
    bar = tqdm(total=len(mine), desc=f"tracing (rank {rank}/{world})" if world > 1 else "tracing", unit="example",
               disable=(rank != 0) or (progress is False) or (progress is None and len(mine) < 2))
    for batch in _batches(records, mine, batch_size):
        recs = [records[i] for i in batch]
        corrupted = [r.corrupted for r in recs] if corrupt == "pair" and any(r.corrupted for r in recs) else None
        out = patch(model, clean=[r.clean for r in recs], corrupted=corrupted, images=_images(model, records, batch,
                    Path(base)), corrupt=corrupt, seed=[seed + i for i in batch], batch_size=batch_size,
                    progress=False, **patch_kwargs)
        for i, res in zip(batch, out, strict=True):
            local[i] = res
            if on_result is not None:
                on_result(i, res)
        bar.update(len(batch))
    bar.close()
    merged = _gather(local)
    return [merged[i] for i in wanted]
