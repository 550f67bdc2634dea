"""Rollout engines by name, and inside Ray actors: what the online learners generate with.

`make_engine("hf" | "vllm", model)` builds a training.rollout.HFRolloutEngine or a
training.rollout_vllm.VLLMRolloutEngine in this process; `RayRolloutEngine` runs either inside a
Ray actor, so generation can sit on other cores or GPUs, and takes the learner's weights after
each update through `load_state_dict`.

    python -c "from training.rollout_ray import make_engine; \
print(make_engine('hf', 'smollm2-135m-instruct'))"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from training.rollout import HFRolloutEngine, PromptInput, Rollout, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    import torch


class _RolloutWorker:
    """The body of the rollout actor (wrapped with ray.remote in RayRolloutEngine)."""

    def __init__(self, kind: str, model: str, num_threads: int | None,
                 engine_kwargs: dict[str, Any]):
        import torch

        if num_threads:
            # Ray sets OMP_NUM_THREADS from the actor's num_cpus; generation and learning
            # alternate, so the rollout actor may use every core while it runs.
            torch.set_num_threads(num_threads)
        self.engine = make_engine(kind, model, **engine_kwargs)  # type: ignore[arg-type]

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[PromptInput], params: SamplingParams) -> list[list[Rollout]]:
        return self.engine.generate(prompts, params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.engine.load_state_dict(state)

    def load_weights_from(self, model_dir: str) -> None:
        self.engine.load_weights_from(model_dir)


class RayRolloutEngine:
    """A rollout engine living in a Ray actor; calls block until the actor answers, and an actor
    that died raises (ray.exceptions.RayActorError) instead of returning nothing.

    Args:
        kind: "hf" or "vllm".
        model: what the engine loads.
        num_cpus: CPUs reserved for the actor in Ray's scheduler (GPUs for vLLM go in
            engine_kwargs, see VLLMRolloutEngine).
        num_threads: torch threads inside the actor (None: Ray's default).
        engine_kwargs: passed to the engine (dtype, batch_size, device, ...).
    """

    def __init__(self, kind: Literal["hf", "vllm"], model: str, *, num_cpus: float = 1,
                 num_gpus: float = 0, num_threads: int | None = None, **engine_kwargs: Any):
        import ray

        worker: Any = ray.remote(_RolloutWorker)
        self.actor: Any = worker.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
            kind, model, num_threads, engine_kwargs)
        ray.get(self.actor.ready.remote())

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams
                 ) -> list[list[Rollout]]:
        import ray

        return ray.get(self.actor.generate.remote(list(prompts), params))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        import ray

        ray.get(self.actor.load_state_dict.remote(dict(state)))

    def load_weights_from(self, model_dir: str) -> None:
        import ray

        ray.get(self.actor.load_weights_from.remote(model_dir))

    def shutdown(self) -> None:
        """Stop the actor (its memory is freed)."""
        import ray

        ray.kill(self.actor)


def make_engine(kind: Literal["hf", "vllm"], model: str, **kwargs: Any) -> RolloutEngine:
    """Build an engine in this process: "hf" (transformers) or "vllm" (needs vllm installed)."""
    if kind == "hf":
        return HFRolloutEngine(model, **kwargs)
    if kind == "vllm":
        from training.rollout_vllm import VLLMRolloutEngine

        return VLLMRolloutEngine(model, **kwargs)
    raise ValueError(f"rollout engine must be 'hf' or 'vllm', got {kind!r}")


__all__ = ["RayRolloutEngine", "make_engine"]
