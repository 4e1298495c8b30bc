"""The one out-of-memory splitter: run work over rows in chunks, halving the chunk on CUDA OOM.

Chunks already finished are kept, so finished samples are never lost to an out-of-memory; only CUDA
out-of-memory errors are retried (any other error is raised at once), down to chunks of one row.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def is_oom(e: BaseException) -> bool:
    """True for a CUDA out-of-memory error (or any error whose message says out of memory)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_in_chunks(fn: Callable[[int, int], T], total: int, batch_size: int, device, stats: dict[str, int],
                  done: Callable[[int], None] | None = None) -> tuple[list[T], int]:
    """``fn(start, stop)`` over ``range(total)`` in chunks of at most ``batch_size`` rows.

    On CUDA out-of-memory the failing chunk is retried at half the size (counted in ``stats["splits"]``);
    ``done(rows)`` is called after each finished chunk. Returns ``(results of the chunks in order, the chunk
    size it ended at)``.
    """
    outs: list[T] = []
    start, bs = 0, max(1, int(batch_size))
    while start < total:
        stop = min(total, start + bs)
        try:
            outs.append(fn(start, stop))
        except Exception as e:  # noqa: BLE001 - only CUDA OOM is retried
            if not is_oom(e) or bs == 1:
                raise
            stats["splits"] = stats.get("splits", 0) + 1
            bs = max(1, bs // 2)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            continue
        if done is not None:
            done(stop - start)
        start = stop
    return outs, bs


def map_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device,
               stats: dict[str, int], to=None) -> tuple[torch.Tensor, int]:
    """``fn`` over ``x`` ``[N,...]`` in chunks moved to ``device`` (results moved to ``to``), split on OOM.

    Returns ``(results [N,...] concatenated, the chunk size it ended at)``.
    """
    def chunk(start: int, stop: int) -> torch.Tensor:
        y = fn(x[start:stop].to(device))
        return y if to is None else y.to(to)

    outs, bs = run_in_chunks(chunk, x.shape[0], batch_size, device, stats)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), bs
