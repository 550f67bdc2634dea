"""Which examples each optimizer step and each process uses in the offline loop.

The sample order is a pure function of (seed, epoch): `Schedule.indices(step)` is the same on
every run and every rank, so a resumed run takes the same steps on the same samples. Launched on
several processes (WORLD_SIZE > 1, under DeepSpeed), each rank trains on a disjoint `shard` of
every micro-batch with the same global normaliser, so the result equals the one-process run;
`reference_plan` says which rank scores which example's reference log-probs.

    python -c "from training.data_parallel import Schedule; \
print(Schedule(10, 2, 2, seed=0, total_steps=3).indices(0))"
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from training.run_files import TrainingError

if TYPE_CHECKING:
    from training.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step uses: a pure function of (seed, epoch, step)."""

    num_examples: int
    batch_size: int
    grad_accum_steps: int
    seed: int
    total_steps: int

    @property
    def optimizer_batch(self) -> int:
        return self.batch_size * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.optimizer_batch)

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_examples,
                               generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[k * self.optimizer_batch : (k + 1) * self.optimizer_batch].tolist()

    def micro_batches(self, step: int) -> Iterator[list[int]]:
        idx = self.indices(step)
        for start in range(0, len(idx), self.batch_size):
            yield idx[start : start + self.batch_size]


def make_schedule(config: TrainConfig, num_examples: int) -> Schedule:
    per_epoch = math.ceil(num_examples / (config.batch_size * config.grad_accum_steps))
    total = config.max_steps or config.epochs * per_epoch
    return Schedule(num_examples, config.batch_size, config.grad_accum_steps, config.seed, total)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel job: rank 0 of 1 unless launched with WORLD_SIZE > 1
    (torchrun, the deepspeed launcher, or the env vars of PLATFORM.md section 8)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """Raise TrainingError for a multi-process launch this config cannot run exactly.

    Each rank takes a disjoint 1/world_size of every micro-batch (see shard), so the micro-batch
    (`batch_size`, counted over all ranks) must split evenly; DeepSpeed is what all-reduces the
    gradients, so the plain loop stays single-process.
    """
    if world_size <= 1:
        return
    if config.deepspeed == "none":
        raise TrainingError(f"WORLD_SIZE={world_size}: multi-process training runs under "
                            "DeepSpeed; pass --deepspeed zero1|zero2|zero3 (or run one process)")
    if config.batch_size % world_size:
        raise TrainingError(
            f"WORLD_SIZE={world_size}: batch_size={config.batch_size} is the micro-batch summed "
            f"over all ranks and must be divisible by the number of ranks; use a multiple of "
            f"{world_size}")


def shard(micro_batch: list[int], ranks: Ranks) -> list[int]:
    """This rank's part of a micro-batch: every world_size-th example from position `rank`.

    Disjoint across ranks and together the whole micro-batch, so the gradient summed over ranks is
    the single-process one; a pure function of the (seed, epoch)-determined micro-batch, so resume
    stays exact. A short last micro-batch can leave a rank with nothing (see train's filler).
    """
    return micro_batch[ranks.rank :: ranks.world_size]


def init_ranks(config: TrainConfig) -> Ranks:
    """Read RANK/WORLD_SIZE; for a multi-process launch, start torch.distributed via DeepSpeed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_size(config, world_size)
    if world_size <= 1:
        return Ranks()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TrainingError(f"WORLD_SIZE={world_size} but {missing} not set; start the ranks "
                            "with the deepspeed launcher or torchrun")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed()  # gloo on CPU, nccl on CUDA (the accelerator's backend)
    return Ranks(int(os.environ["RANK"]), world_size)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (identity for one process)."""
    if not ranks.distributed:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def reference_plan(schedule: Schedule, ranks: Ranks | None = None,
                   ) -> list[tuple[list[int], list[int]]]:
    """This rank's reference micro-batches, each with the examples whose values it owns.

    Walking the training schedule until every used example has been seen means each example is
    scored in the very micro-batch (same padding, same tensor shapes) where the policy first meets
    it - owned by the rank whose shard that is - so at step 1 policy and reference agree to the last
    bit even under bf16 autocast (DPO's first loss is exactly ln 2), and examples that max_steps
    never reaches are not scored at all. Every rank walks the same global schedule, so the owners
    are disjoint and agree without communication.

    Returns:
        [(micro-batch shard, the indices in it first met there)], in schedule order.
    """
    ranks = ranks or Ranks()
    seen: set[int] = set()
    plan = []
    for step in range(schedule.total_steps):
        for micro in schedule.micro_batches(step):
            for rank in range(ranks.world_size):
                part = shard(micro, Ranks(rank, ranks.world_size))
                fresh = [i for i in dict.fromkeys(part) if i not in seen]
                if fresh and rank == ranks.rank:
                    plan.append((part, fresh))
                seen.update(fresh)
        if len(seen) == schedule.num_examples:
            break
    return plan


def reference_batches(schedule: Schedule) -> list[list[int]]:
    """The micro-batches in which a single process computes the reference log-probs (see
    reference_plan)."""
    return [part for part, _ in reference_plan(schedule)]


__all__ = ["Ranks", "Schedule", "barrier", "check_world_size", "init_ranks", "make_schedule",
           "reference_batches", "reference_plan", "shard", "sum_over_ranks"]
