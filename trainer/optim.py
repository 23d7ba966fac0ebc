"""The optimizer every stage runs: AdamW after clipping by the norm of the whole model's gradient."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips by the global gradient norm over all pipeline stages.

    DeepSpeed's own clipping reduces the norm over the tensor-parallel group only, so each stage
    would clip by its own norm; here the squared norms of every rank are summed (the replicas
    hold equal, already averaged gradients, hence the division by the data-parallel size).
    """

    def __init__(self, params: Iterable[torch.Tensor], *, max_norm: float, data_parallel: int, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_norm: float = max_norm
        self.data_parallel: int = data_parallel
        self.last_grad_norm: float = 0.0  # before clipping, over the whole model: what progress reports

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        import torch.distributed as dist

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        squared = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
        for g in grads:
            squared += g.double().pow(2).sum()
        if dist.is_initialized():
            dist.all_reduce(squared)
            squared /= self.data_parallel
        norm = float(squared.sqrt())
        self.last_grad_norm = norm
        if self.max_norm > 0 and norm > self.max_norm:
            scale = self.max_norm / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        return super().step(closure)
