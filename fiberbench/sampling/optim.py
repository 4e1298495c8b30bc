"""Per-sample optimisation: Adam whose rows are independent, and the guard that retries non-finite rows."""
from __future__ import annotations

from typing import Sequence

import torch

from .problem import FiberProblem, finite_rows


class RowAdam:
    """Adam on a batched tensor ``[M,...]`` whose rows (samples) each have their own state, step count and lr.

    The arithmetic is ``torch.optim.Adam``'s (its single-tensor path, no weight decay), so rows that are never
    reset step bit for bit as a batched ``torch.optim.Adam`` would; unlike it, one row can be given a fresh
    state (moments 0, step count 0: its next step is a first Adam step again) and its own learning rate
    without touching the others. ``param`` is updated in place.
    """

    def __init__(self, param: torch.Tensor, lr: Sequence[float], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, [float(v) for v in lr], betas, eps
        self.m = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.v = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = [0] * param.shape[0]

    def reset(self, rows: torch.Tensor, lr: Sequence[float]) -> None:
        """Fresh state for the rows in ``rows`` ([M] bool) and new learning rates ``lr`` (one per row, all M)."""
        with torch.no_grad():
            self.m[rows] = 0
            self.v[rows] = 0
        for r in rows.nonzero().flatten().tolist():
            self.steps[r] = 0
            self.lr[r] = float(lr[r])

    @torch.no_grad()
    def step(self, grad: torch.Tensor, rows: torch.Tensor) -> None:
        """One Adam step with ``grad`` ``[M,...]`` for the rows in ``rows`` ([M] bool); other rows stay as they are."""
        b1, b2 = self.betas
        idx = rows.nonzero().flatten().tolist()
        if not idx:
            return
        full = len(idx) == self.param.shape[0]
        if full:
            self.m.lerp_(grad, 1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        else:
            sel = torch.tensor(idx, device=self.param.device)
            self.m[sel] = self.m[sel].lerp_(grad[sel], 1 - b1)
            self.v[sel] = self.v[sel].mul_(b2).addcmul_(grad[sel], grad[sel], value=1 - b2)
        groups: dict[tuple[int, float], list[int]] = {}
        for r in idx:
            self.steps[r] += 1
            groups.setdefault((self.steps[r], self.lr[r]), []).append(r)
        for (step, lr), members in groups.items():
            step_size = lr / (1 - b1 ** float(step))
            bc2_sqrt = (1 - b2 ** float(step)) ** 0.5
            if full and len(groups) == 1:  # the common case: every row alike, no copies
                denom = (self.v.sqrt() / bc2_sqrt).add_(self.eps)
                self.param.addcdiv_(self.m, denom, value=-step_size)
            else:
                sel = torch.tensor(members, device=self.param.device)
                denom = (self.v[sel].sqrt() / bc2_sqrt).add_(self.eps)
                self.param[sel] = self.param[sel].addcdiv_(self.m[sel], denom, value=-step_size)


def guard(problem: FiberProblem, step: int, cost: torch.Tensor, grad: torch.Tensor, param: torch.Tensor,
           last_ok: torch.Tensor, opt: RowAdam, base_lr: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Find the samples whose ``cost`` ``[M]`` or ``grad`` ``[M,...]`` is non-finite and retry them smaller.

    Each such sample is booked (:meth:`FiberProblem.fault`), its ``param`` row goes back to ``last_ok`` (its
    last iterate with a finite cost and gradient), its optimiser state is reset and its learning rate becomes
    ``base_lr * problem.step_scales()``. Their gradient rows (and those of samples given up) are zeroed.
    ``rows`` (``[M]`` bool): the samples evaluated this time (default all); the others are left alone.
    Returns ``[M]`` bool: the samples that take this optimiser step.
    """
    live = problem.live() if rows is None else problem.live() & rows
    finite_cost = torch.isfinite(cost.detach())
    finite_grad = finite_rows(grad)
    ok = finite_cost & finite_grad & live
    bad = live & ~ok
    if bad.any():
        problem.fault(bad & ~finite_cost, "loss", step)
        problem.fault(bad & finite_cost & ~finite_grad, "gradient", step)
        with torch.no_grad():
            param[bad] = last_ok[bad]
        opt.reset(bad, [base_lr * sc for sc in problem.step_scales()])
    grad[~ok] = 0
    problem.finite(ok)
    return ok
