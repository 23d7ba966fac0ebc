"""The eval loss: the first `training.eval_batches` micro-batches of the eval split, every
`training.eval_every_steps` steps and after the last.

Always the same rows, so eval losses of different steps (and of a resumed run) compare; the
pipeline runs them like a training step without backward, so every rank takes part.
"""

from __future__ import annotations

from typing import Any

from pipelora.trainer.data import eval_batches
from pipelora.trainer.plan import Plan


class Evaluation:
    """The eval split as this rank's stage needs it, and when to evaluate."""

    def __init__(self, plan_: Plan, engine: Any) -> None:
        self.plan: Plan = plan_
        self.engine: Any = engine
        self.enabled: bool = plan_.eval_rows > 0  # no eval split (dataset.eval_fraction 0): never evaluate
        self.data: Any = None  # only the first and last stages read rows
        if self.enabled and (plan_.is_first or plan_.is_last):
            from pipelora.dataprep import open_shards

            spec = plan_.spec
            self.data = open_shards(spec.layout.data, split="eval", endpoint_url=spec.storage.endpoint_url)

    def due(self, step: int) -> bool:
        t = self.plan.spec.training
        return self.enabled and (step % t.eval_every_steps == 0 or step == t.max_steps)

    def run(self) -> float:
        """The mean eval loss, the same on every rank."""
        p, t = self.plan.spec.parallel, self.plan.spec.training
        it = None
        if self.data is not None:
            it = eval_batches(self.data, dp_rank=self.plan.dp_rank, dp_size=p.data_parallel,
                              micro_batch_size=p.micro_batch_size, count=t.eval_batches,
                              inputs=self.plan.is_first, labels=self.plan.is_last)
        return float(self.engine.eval_batch(it, num_micro_batches=t.eval_batches))
