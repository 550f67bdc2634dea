"""The offline training loop: `prefloop train {sft,rm,dpo,kto}` on an export file.

Reads like a recipe: read + check the export -> tokenise -> load the policy (LoRA on CPU by
default) -> reference log-probs once per dataset -> for each optimizer step, micro-batches
through the loss in training/losses.py -> checkpoint every `save_steps` -> final model. The same
loop runs under a DeepSpeed engine with `deepspeed=zero1|zero2|zero3`.

    python -c "from training.trainer import train_from_cli as t; t('dpo', data='pairs.jsonl',
        model='smollm2-135m-instruct', out='runs/dpo1', overrides=['max_steps=10'])"

Exactness: the sample order is a pure function of (seed, epoch), every micro-batch loss is divided
by the weight (or token) total of its whole optimizer batch, and checkpoints carry the optimizer,
scheduler and RNG state, so an interrupted-then-resumed run takes the same steps on the same
samples as an uninterrupted one. Launched on several processes (WORLD_SIZE > 1, DeepSpeed), each
rank trains on a disjoint shard of every micro-batch with the same global normaliser, so the
result equals the one-process run (see Ranks, shard, reference_plan).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from training import checkpoint as ckpt
from training import losses
from training.config import ConfigError, TrainConfig, load_config
from training.data import (
    CompletionExample,
    DataReport,
    Example,
    ListExample,
    PairExample,
    build_examples,
    collate_lists,
    collate_pairs,
    collate_sequences,
    collate_shared_prompt_pairs,
    read_export,
)
from training.logprobs import completion_logps, sequence_rewards, shared_prompt_pair_logps
from training.models import load_reward_backbone, load_tokenizer, resolve_model

log = logging.getLogger("prefloop.training")
StepCallback = Callable[[int, dict[str, float]], None]


class TrainingError(RuntimeError):
    """A run that cannot continue (e.g. resuming with a different config)."""


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    model_dir: Path
    steps: int
    data_sha256: str
    report: DataReport
    final_metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- hardware


def select_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off where the hardware has bf16 matmuls (AVX512-BF16/AMX, Ampere+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- model setup


def check_lora_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Raise ConfigError if a LoRA target module name does not occur in the model."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"LoRA target module(s) {missing} not found in the model; "
                          f"its linear layers are named {linear}")


# Longest sequence for which `attention = "auto"` picks eager attention on CPU. Measured with
# benchmarks/attention_cpu.py (forward + backward, bf16 autocast, 9 heads of 64, batch 4): eager
# is 4.2x faster than sdpa at 100 tokens and 1.7x at 256, and slower from about 512 (0.7x). Memory:
# eager keeps (B, heads, T, T) probabilities per layer for the backward. With 64-dim heads and an
# MLP about 3.5x the hidden size, that is heads * T / intermediate ~ T / 224 times what the MLP
# keeps per layer anyway, so at T <= 256 it at most about doubles the MLP's activations, for any
# model size (SmolLM2 DPO benchmark: peak 3472 MB against 3413 MB with sdpa).
EAGER_ATTENTION_MAX_LENGTH = 256


def attention_implementation(choice: str, device: torch.device, max_length: int) -> str:
    """The Hugging Face `attn_implementation` for a TrainConfig.attention setting."""
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" and max_length <= EAGER_ATTENTION_MAX_LENGTH else "sdpa"


def build_policy(config: TrainConfig, tokenizer: Any, device: torch.device) -> Any:
    """Load the model to train (causal LM, or scalar-head model for rm) and wrap it in LoRA."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(config.model)
    attention = attention_implementation(config.attention, device, config.max_length)
    model: Any
    if config.mode == "rm":
        model = load_reward_backbone(path, tokenizer.pad_token_id, dtype=torch.float32,
                                     attn_implementation=attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=attention)
    use_lora = config.lora == "on" or (config.lora == "auto" and device.type == "cpu")
    if use_lora:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, config.lora_target_modules)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            task_type="SEQ_CLS" if config.mode == "rm" else "CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # SEQ_CLS keeps the new `score` head trainable
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if use_lora:
            model.enable_input_require_grads()
    return model.to(device)


def _shares_prompt(config: TrainConfig) -> bool:
    return config.share_prompt and not config.gradient_checkpointing


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter")


# ----------------------------------------------------------------------------- sample order


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


def _barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def _sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (identity for one process)."""
    if not ranks.distributed:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then constant / linear decay / cosine decay to 0."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


# ----------------------------------------------------------------------------- reference


def _pair_logps(model: Any, batch: list[PairExample], pad_id: int,
                device: torch.device, share_prompt: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected summed log-probs ((B,), (B,)) plus lengths (2B, chosen first).

    share_prompt: prompt once through the KV cache, then both completions (see
    training.logprobs.shared_prompt_pair_logps); otherwise [chosen; rejected] full sequences in
    one forward pass.
    """
    if share_prompt and all(ex.prompt_ids for ex in batch):  # an empty prompt has no last token
        shared = {k: v.to(device) for k, v in collate_shared_prompt_pairs(batch, pad_id).items()}
        out = shared_prompt_pair_logps(model, shared["prompt_ids"], shared["prompt_mask"],
                                       shared["completion_ids"], shared["completion_mask"])
        return out.logps[0::2], out.logps[1::2], torch.cat([out.lengths[0::2],
                                                            out.lengths[1::2]])
    tensors = {k: v.to(device) for k, v in collate_pairs(batch, pad_id).items()}
    out = completion_logps(model, tensors["input_ids"], tensors["attention_mask"],
                           tensors["completion_mask"])
    chosen, rejected = out.logps.chunk(2)
    return chosen, rejected, out.lengths


def _completion_logps(model: Any, prompts: list[list[int]],
                      completions: list[list[int]], pad_id: int,
                      device: torch.device) -> tuple[torch.Tensor, Any]:
    tensors = {k: v.to(device) for k, v in collate_sequences(prompts, completions, pad_id).items()}
    out = completion_logps(model, tensors["input_ids"], tensors["attention_mask"],
                           tensors["completion_mask"])
    return out.logps, out


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


@torch.no_grad()
def reference_logps(
    mode: str, model: Any, examples: list[Example], batches: list[list[int]],
    pad_id: int, device: torch.device, bf16: bool, progress: bool = True,
    share_prompt: bool = False, owned: list[list[int]] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, torch.Tensor]:
    """Reference log-probs of the examples, computed once before training.

    Args:
        batches: micro-batches of example indices (see reference_plan).
        owned: for each batch, the indices whose values it sets (default: all of them, later
            batches overwriting earlier ones).
        ranks: in a multi-process run each rank scores its own batches; the tables are then summed
            over ranks (each example has one owner, the others contribute an exact 0).

    Returns:
        dpo: {"chosen", "rejected"}; kto: {"completion", "kl"} (the example's own and its
        mismatched completion); each (N,) float32, NaN for examples in no batch. The model is put
        in eval mode for the pass and restored afterwards.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    keys = ("chosen", "rejected") if mode == "dpo" else ("completion", "kl")
    table = {key: torch.full((len(examples),), float("nan")) for key in keys}
    # One autocast region for the whole pass: the weights do not change, so autocast's cache
    # casts each of them to bf16 once instead of once per micro-batch.
    with tqdm(total=len(batches), desc="reference log-probs", disable=not progress,
              leave=False) as bar, _autocast(device, bf16):
        for number, indices in enumerate(batches):
            chunk = [examples[i] for i in indices]
            if mode == "dpo":
                chosen, rejected, _ = _pair_logps(model, cast(list[PairExample], chunk),
                                                  pad_id, device, share_prompt)
                values = (chosen, rejected)
            else:
                items = cast(list[CompletionExample], chunk)
                prompts = [ex.prompt_ids for ex in items]
                own, _ = _completion_logps(model, prompts,
                                           [ex.completion_ids for ex in items], pad_id, device)
                kl, _ = _completion_logps(model, prompts,
                                          [ex.kl_completion_ids for ex in items], pad_id,
                                          device)
                values = (own, kl)
            keep = indices if owned is None else owned[number]
            rows = [indices.index(i) for i in keep]
            for key, value in zip(keys, values, strict=True):
                table[key][keep] = value.float().cpu()[rows]
            bar.update(1)
    model.train(was_training)
    if ranks is not None and ranks.distributed:
        import torch.distributed as dist

        for key in keys:
            scored = ~torch.isnan(table[key])
            merged = torch.stack([torch.where(scored, table[key], 0.0).double(),
                                  scored.double()])
            dist.all_reduce(merged)
            table[key] = torch.where(merged[1] > 0, merged[0], float("nan")).float()
    return table


# ----------------------------------------------------------------------------- one micro-batch


@dataclass
class Reference:
    """Where reference log-probs come from: a precomputed table, or a model run per step."""

    table: dict[str, torch.Tensor] | None = None
    model: Any = None
    use_disabled_adapter: bool = False

    @contextlib.contextmanager
    def policy_as_reference(self, policy: Any) -> Iterator[Any]:
        if self.use_disabled_adapter:
            with policy.disable_adapter():
                yield policy
        else:
            assert self.model is not None
            yield self.model


def micro_batch_loss(
    config: TrainConfig,
    model: Any,
    examples: list[Example],
    indices: list[int],
    reference: Reference,
    normaliser: float,
    pad_id: int,
    device: torch.device,
    *,
    ranks: Ranks | None = None,
    filler: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, already divided by the optimizer batch's normaliser.

    Args:
        indices: the examples of this micro-batch (this rank's shard of it in a multi-process run).
        ranks: in a multi-process run, the batch statistics that couple examples (KTO's reference
            point) are summed over the ranks' shards, so they equal the single-process values.
        filler: this rank has no example in the micro-batch; `indices` is a stand-in whose
            contribution to those shared statistics is zero (the caller zeroes its loss).

    Returns the loss (to backpropagate) and summed statistics for logging.
    """
    batch = [examples[i] for i in indices]
    weights = torch.tensor([ex.weight for ex in batch], device=device)
    stats: dict[str, float] = {"examples": float(len(batch))}
    if config.mode == "dpo":
        pairs = cast(list[PairExample], batch)
        chosen, rejected, lengths = _pair_logps(model, pairs, pad_id, device,
                                                _shares_prompt(config))
        chosen_len, rejected_len = lengths.chunk(2)
        ref_c = ref_r = None
        if config.needs_reference:
            if reference.table is not None:
                ref_c = reference.table["chosen"][indices].to(device)
                ref_r = reference.table["rejected"][indices].to(device)
            else:
                with torch.no_grad(), reference.policy_as_reference(model) as ref_model:
                    ref_c, ref_r, _ = _pair_logps(ref_model, pairs, pad_id, device,
                                                  _shares_prompt(config))
        per_pair = losses.preference_loss(
            cast(losses.PreferenceLossType, config.loss_type),
            chosen_logps=chosen, rejected_logps=rejected,
            ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
            chosen_lengths=chosen_len, rejected_lengths=rejected_len,
            beta=config.beta, label_smoothing=config.label_smoothing,
            simpo_gamma=config.simpo_gamma, rdpo_alpha=config.rdpo_alpha,
            orpo_lambda=config.orpo_lambda,
        )
        r_c, r_r = losses.implicit_rewards(chosen, rejected, ref_c, ref_r, config.beta)
        stats["rewards/accuracy"] = float((r_c > r_r).float().sum())
        stats["rewards/margin"] = float((r_c - r_r).sum())
        stats["rewards/chosen"] = float(r_c.sum())
        stats["rewards/rejected"] = float(r_r.sum())
        stats["tokens"] = float(sum(2 * len(e.prompt_ids) + len(e.chosen_ids)
                                    + len(e.rejected_ids) for e in pairs))
        loss = (per_pair * weights).sum() / normaliser
    elif config.mode == "rm" and config.loss_type == "bradley_terry":
        pairs = cast(list[PairExample], batch)
        tensors = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
        rewards = sequence_rewards(model, tensors["input_ids"], tensors["attention_mask"])
        r_c, r_r = rewards.chunk(2)
        margins = torch.tensor([ex.margin for ex in pairs], device=device)
        per_pair = losses.bradley_terry_loss(r_c, r_r, margins if bool(margins.any()) else None)
        stats["rewards/accuracy"] = float((r_c > r_r).float().sum())
        stats["rewards/margin"] = float((r_c - r_r).detach().sum())
        stats["tokens"] = float(tensors["attention_mask"].sum())
        loss = (per_pair * weights).sum() / normaliser
    elif config.mode == "rm":
        lists = cast(list[ListExample], batch)
        tensors = {k: v.to(device) for k, v in collate_lists(lists, pad_id).items()}
        flat = sequence_rewards(model, tensors["input_ids"], tensors["attention_mask"])
        valid, list_ranks = tensors["list_valid"], tensors["ranks"]
        rewards = torch.zeros(valid.shape, device=device, dtype=flat.dtype)
        rewards = rewards.masked_scatter(valid, flat)  # (B, K), row-major like the flat order
        per_list = losses.plackett_luce_loss(rewards, list_ranks, valid)
        # Pairwise view for logging: every (better, worse) pair of each list.
        better = ((list_ranks.unsqueeze(2) < list_ranks.unsqueeze(1)) & valid.unsqueeze(1)
                  & valid.unsqueeze(2))
        diff = (rewards.unsqueeze(2) - rewards.unsqueeze(1)).detach()
        n_pairs = better.sum(dim=(1, 2)).clamp(min=1)
        stats["rewards/accuracy"] = float((((diff > 0) & better).sum(dim=(1, 2)) / n_pairs).sum())
        stats["rewards/margin"] = float(((diff * better).sum(dim=(1, 2)) / n_pairs).sum())
        stats["tokens"] = float(tensors["attention_mask"].sum())
        loss = (per_list * weights).sum() / normaliser
    elif config.mode == "kto":
        items = cast(list[CompletionExample], batch)
        prompts = [ex.prompt_ids for ex in items]
        own = [ex.completion_ids for ex in items]
        mismatched = [ex.kl_completion_ids for ex in items]
        logps, _ = _completion_logps(model, prompts, own, pad_id, device)
        with torch.no_grad():
            kl_logps, _ = _completion_logps(model, prompts, mismatched, pad_id, device)
        if reference.table is not None:
            ref = reference.table["completion"][indices].to(device)
            ref_kl = reference.table["kl"][indices].to(device)
        else:
            with torch.no_grad(), reference.policy_as_reference(model) as ref_model:
                ref, _ = _completion_logps(ref_model, prompts, own, pad_id, device)
                ref_kl, _ = _completion_logps(ref_model, prompts, mismatched, pad_id, device)
        if ranks is not None and ranks.distributed:
            # z0 is the mean over the whole micro-batch, not over this rank's shard of it.
            kl_sum, count = _sum_over_ranks(
                [0.0, 0.0] if filler else [float((kl_logps - ref_kl).sum()), float(len(items))],
                ranks)
            z0 = torch.tensor(kl_sum / count, device=device).clamp(min=0)
        else:
            z0 = losses.kto_reference_point(kl_logps, ref_kl)
        desirable = torch.tensor([ex.desirable for ex in items], device=device)
        per_example = losses.kto_loss(logps, ref, desirable, z0, config.beta,
                                      config.desirable_weight, config.undesirable_weight)
        rewards = config.beta * (logps - ref).detach()
        correct = torch.where(desirable, rewards > config.beta * z0, rewards < config.beta * z0)
        stats["rewards/accuracy"] = float(correct.float().sum())
        stats["rewards/margin"] = float(torch.where(desirable, rewards, -rewards).sum())
        stats["kl"] = float(z0) * len(items)
        stats["tokens"] = float(sum(len(e.prompt_ids) + len(e.completion_ids) for e in items))
        loss = (per_example * weights).sum() / normaliser
    else:  # sft
        items = cast(list[CompletionExample], batch)
        _, out = _completion_logps(model, [ex.prompt_ids for ex in items],
                                   [ex.completion_ids for ex in items], pad_id, device)
        token_weights = out.mask * weights.unsqueeze(1)
        loss = losses.sft_loss(out.per_token, token_weights, num_tokens=normaliser)
        stats["tokens"] = float(sum(len(e.prompt_ids) + len(e.completion_ids) for e in items))
        stats["nll_sum"] = float(-(out.per_token.detach() * out.mask).sum())
        stats["completion_tokens"] = float(out.mask.sum())
    return loss, stats


def batch_normaliser(config: TrainConfig, examples: list[Example], indices: list[int]) -> float:
    """The divisor shared by all micro-batches of one optimizer batch.

    Preference/KTO/RM losses: the sum of example weights, so the optimizer batch's loss is a
    weighted mean whatever the micro-batch split. SFT: the number of completion tokens.
    """
    if config.mode == "sft":
        items = cast(list[CompletionExample], [examples[i] for i in indices])
        return float(sum(len(ex.completion_ids) for ex in items))
    return float(sum(examples[i].weight for i in indices))


# ----------------------------------------------------------------------------- the run


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _prepare_run_dir(config: TrainConfig, run_dir: Path) -> Path | None:
    """Create the run dir; return the checkpoint to resume from (or None)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt.latest_checkpoint(run_dir)
    saved = run_dir / "config.json"
    if not config.resume:
        if latest is not None or (run_dir / "model").exists():
            raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it "
                                "or choose another --out")
        return None
    if saved.exists():
        before = json.loads(saved.read_text())
        now = config.to_dict()
        ignored = {"resume", "progress", "save_steps", "keep_checkpoints", "logging_steps"}
        changed = sorted(k for k in now if k not in ignored and before.get(k) != now[k])
        if changed:
            raise TrainingError(f"cannot resume {run_dir}: config changed in {changed}")
    return latest


def _write_metrics(path: Path, record: dict[str, Any], truncate_after: int | None = None) -> None:
    if truncate_after is not None:
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
        path.write_text("".join(line + "\n" for line in kept))
        return
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _fused_adamw_applies(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _init_deepspeed(config: TrainConfig, model: torch.nn.Module, total_steps: int,
                    ranks: Ranks | None = None) -> Any:
    """Wrap the model in a DeepSpeed engine (one process, or one per rank after init_ranks).

    `batch_size` is the micro-batch over all ranks, so each rank's is batch_size / world_size and
    the optimizer batch is the same for any number of ranks.
    """
    ranks = ranks or Ranks()
    check_world_size(config, int(os.environ.get("WORLD_SIZE", "1")))
    if not ranks.distributed:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)  # otherwise DeepSpeed falls back to MPI discovery
    import deepspeed

    stage = int(config.deepspeed[-1])
    ds_config = {
        "train_micro_batch_size_per_gpu": config.batch_size // ranks.world_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": stage},
        # torch_adam avoids a JIT build of fused_adam (PLATFORM.md section 8).
        "optimizer": {"type": "AdamW", "params": {
            "lr": config.learning_rate, "betas": [config.adam_beta1, config.adam_beta2],
            "eps": config.adam_eps, "weight_decay": config.weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(config, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine, optimizer, scheduler


def train(mode: str, config: TrainConfig, *, on_step_end: StepCallback | None = None) -> RunResult:
    """Train `mode` as described by `config`; write the run directory; return a summary.

    Args:
        mode: sft, rm, dpo or kto (must equal config.mode).
        config: a validated TrainConfig (see training.config.load_config).
        on_step_end: optional callback(step, metrics) after each optimizer step.

    Raises:
        ConfigError, DataError, TrainingError: bad input, found before any training compute.
    """
    from tqdm.auto import tqdm

    if mode != config.mode:
        raise ConfigError(f"mode {mode!r} does not match config.mode {config.mode!r}")
    run_dir = Path(config.out)
    check_world_size(config, int(os.environ.get("WORLD_SIZE", "1")))  # before any compute
    torch.manual_seed(config.seed)

    # 1. Everything that can be wrong with the input is checked before a model is loaded.
    export = read_export(config.data)
    tokenizer = load_tokenizer(config.model)
    pad_id = tokenizer.pad_token_id
    examples, report = build_examples(
        mode, config.loss_type, export, tokenizer, max_length=config.max_length,
        overlong=config.overlong, conditional_sft=config.conditional_sft,
    )
    if report.truncated or report.skipped:
        log.warning("data: %s", report.describe())
    if config.needs_reference and config.ref_model not in ("initial", "none"):
        resolve_model(config.ref_model)  # fails early if the reference cannot be found
    ranks = init_ranks(config)
    resume_from = _prepare_run_dir(config, run_dir)
    _barrier(ranks)  # every rank has checked the run dir before rank 0 writes into it
    if ranks.is_main:
        config.save(run_dir / "config.json")

    device = select_device(config.device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(device))
    schedule = make_schedule(config, len(examples))

    # 2. The policy (and, when needed, the reference).
    model = build_policy(config, tokenizer, device)
    reference = Reference()
    reference_started = time.perf_counter()
    if config.needs_reference:
        ref_path = run_dir / "ref_logps.pt"
        if config.precompute_ref_logps and ref_path.exists() and resume_from is not None:
            saved = torch.load(ref_path, weights_only=False)
            if saved.get("data_sha256") != export.sha256:
                raise TrainingError("ref_logps.pt was computed on different data")
            reference.table = saved["logps"]
        else:
            ref_model: Any = None
            if config.ref_model != "initial":
                ref_model = build_policy(
                    TrainConfig(**{**config.to_dict(), "model": config.ref_model, "lora": "off",
                                   "lora_target_modules": tuple(config.lora_target_modules)}),
                    tokenizer, device).eval()
            elif not config.precompute_ref_logps:
                if _is_peft(model):
                    reference.use_disabled_adapter = True  # LoRA B = 0: base model = reference
                else:
                    ref_model = copy.deepcopy(model).eval()
            if config.precompute_ref_logps:
                # The checkpoint (if resuming) is loaded only after this, so the policy here is
                # still the initial one and *is* the reference: no second model in memory.
                plan = reference_plan(schedule, ranks)
                reference.table = reference_logps(
                    mode, ref_model or model, examples, [part for part, _ in plan], pad_id,
                    device, bf16, progress=config.progress and ranks.is_main,
                    share_prompt=_shares_prompt(config), owned=[own for _, own in plan],
                    ranks=ranks,
                )
                if ranks.is_main:
                    torch.save({"data_sha256": export.sha256, "logps": reference.table},
                               ref_path)
                ref_model = None
            reference.model = ref_model
            if ref_model is not None:
                for p in ref_model.parameters():
                    p.requires_grad_(False)

    reference_s = time.perf_counter() - reference_started

    # 3. Optimizer, schedule, optional DeepSpeed engine, resume.
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_step = 0
    state = ckpt.load_state(resume_from) if resume_from is not None else None
    if state is not None and "trainable" in state:
        missing = model.load_state_dict(state["trainable"], strict=False)
        if missing.unexpected_keys:
            raise TrainingError(f"checkpoint has unknown weights {missing.unexpected_keys[:3]}")
    if state is not None:
        start_step = int(state["step"])
    engine = None
    if config.deepspeed != "none":
        engine, optimizer, scheduler = _init_deepspeed(config, model, schedule.total_steps,
                                                       ranks)
        if resume_from is not None:
            # ZeRO partitions the optimizer state: DeepSpeed's own checkpoint restores it.
            engine.load_checkpoint(str(resume_from / "deepspeed"), tag="state",
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        forward_model: Any = engine
    else:
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps, weight_decay=config.weight_decay,
            # On CPU torch otherwise runs a Python loop of ~10 element-wise ops per parameter
            # tensor: 135M parameters make that a large share of a SmolLM2 step.
            fused=config.fused_optimizer and _fused_adamw_applies(trainable),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(config, schedule.total_steps))
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        forward_model = model
    if state is not None:
        torch.set_rng_state(state["rng"])

    def save_model(folder: Path) -> None:
        """Rank 0 writes the model; under ZeRO-3 every rank takes part in gathering it."""
        if engine is not None and config.deepspeed == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                if ranks.is_main:
                    folder.mkdir(parents=True, exist_ok=True)
                    model.save_pretrained(folder)
        elif ranks.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(folder)
        if ranks.is_main:
            tokenizer.save_pretrained(folder)

    def save_checkpoint_contents(folder: Path) -> None:
        save_model(folder)
        if engine is not None:
            engine.save_checkpoint(str(folder.parent / "deepspeed"), tag="state")

    def save(step: int) -> None:
        state: dict[str, Any] = {"step": step, "rng": torch.get_rng_state(),
                                 "data_sha256": export.sha256}
        if engine is None:  # (under DeepSpeed its own checkpoint holds weights and optimizer)
            state |= {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict()}
        if not ranks.distributed:
            ckpt.save_checkpoint(run_dir, step, save_checkpoint_contents, state,
                                 keep=config.keep_checkpoints)
            return
        # Rank 0 stages one folder; every rank writes its DeepSpeed shard (ZeRO partitions the
        # optimizer state) into it; rank 0 alone writes the model and publishes.
        staging = ckpt.shared_staging_folder(run_dir, step)
        if ranks.is_main:
            ckpt.begin_checkpoint(run_dir, step, staging)
        _barrier(ranks)
        save_checkpoint_contents(staging / "model")
        _barrier(ranks)
        if ranks.is_main:
            ckpt.publish_checkpoint(run_dir, step, staging, state, config.keep_checkpoints)
        _barrier(ranks)

    # 4. The loop.
    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if ranks.is_main:
        _write_metrics(metrics_path, {}, truncate_after=start_step)
        writer = _tensorboard(run_dir)
    run_info = {
        "mode": mode, "data": str(export.path), "data_sha256": export.sha256,
        "manifest": export.manifest, "data_report": report.__dict__, "git_sha": _git_sha(),
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "bf16": bf16, "lora": _is_peft(model), "deepspeed": config.deepspeed,
        "attention": attention_implementation(config.attention, device, config.max_length),
        "total_steps": schedule.total_steps, "resumed_from_step": start_step,
        "reference_logps_s": reference_s, "world_size": ranks.world_size,
    }
    if ranks.is_main:
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    model.train()
    last: dict[str, float] = {}
    bar = tqdm(total=schedule.total_steps, initial=start_step, desc=f"train {mode}",
               disable=not (config.progress and ranks.is_main), unit="step")
    loop_started = time.perf_counter()
    executed = 0
    for step in range(start_step, schedule.total_steps):
        started = time.perf_counter()
        indices = schedule.indices(step)
        normaliser = batch_normaliser(config, examples, indices)
        totals: dict[str, float] = {}
        loss_value = 0.0
        micro_batches = list(schedule.micro_batches(step))
        for position, micro in enumerate(micro_batches):
            part = shard(micro, ranks)
            # A rank with no example in a short last micro-batch still runs one (weight 0) so
            # that its backward takes part in the gradient all-reduce.
            filler = not part
            with _autocast(device, bf16):
                loss, stats = micro_batch_loss(config, forward_model, examples,
                                               part or micro[:1], reference, normaliser, pad_id,
                                               device, ranks=ranks, filler=filler)
            if filler:
                loss = loss * 0.0
                stats = dict.fromkeys(stats, 0.0)
            if engine is not None:
                # The step's last micro-batch is the accumulation boundary, also when an epoch's
                # last step has fewer micro-batches than grad_accum_steps.
                engine.set_gradient_accumulation_boundary(position == len(micro_batches) - 1)
                # DeepSpeed averages gradients over ranks; the loss is already divided by the
                # whole batch's normaliser, so undo the average to get the summed gradient.
                engine.backward(loss * ranks.world_size, scale_wrt_gas=False)
                engine.step()
            else:
                loss.backward()
            loss_value += float(loss.detach())
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        if ranks.distributed:  # metrics of the whole batch, not of this rank's shards
            names = sorted(totals)
            summed = _sum_over_ranks([loss_value] + [totals[k] for k in names], ranks)
            loss_value, totals = summed[0], dict(zip(names, summed[1:], strict=True))
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                trainable, config.max_grad_norm if config.max_grad_norm > 0 else float("inf")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        n = max(totals.get("examples", 1.0), 1.0)
        record: dict[str, Any] = {
            "step": step + 1,
            "epoch": step / schedule.steps_per_epoch,
            "train/loss": loss_value,
            "train/grad_norm": grad_norm,
            "train/lr": scheduler.get_last_lr()[0],
            "train/tokens_per_s": totals.get("tokens", 0.0) / elapsed,
            "train/samples_per_s": n / elapsed,
            "train/examples": n,
            "train/step_time_s": elapsed,
            "train/sample_ids": indices,
        }
        for key in ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
                    "kl"):
            if key in totals:
                record[f"train/{key}"] = totals[key] / n
        if "completion_tokens" in totals:
            record["train/nll"] = totals["nll_sum"] / max(totals["completion_tokens"], 1.0)
        last = {k: v for k, v in record.items() if isinstance(v, float | int)}
        if ranks.is_main and (
                (step + 1) % config.logging_steps == 0 or step + 1 == schedule.total_steps):
            _write_metrics(metrics_path, record)
            if writer is not None:
                for key, value in last.items():
                    writer.add_scalar(key, value, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}",
                        acc=f"{record.get('train/rewards/accuracy', float('nan')):.2f}",
                        margin=f"{record.get('train/rewards/margin', float('nan')):.3f}",
                        tok_s=f"{record['train/tokens_per_s']:.0f}")
        if config.save_steps and (step + 1) % config.save_steps == 0:
            save(step + 1)
        executed += 1
        if on_step_end is not None:
            on_step_end(step + 1, last)
    bar.close()
    loop_s = time.perf_counter() - loop_started
    if writer is not None:
        writer.close()

    # 5. Final artefacts: a last checkpoint, the model folder, then the run summary.
    steps_done = start_step + executed
    if steps_done != schedule.total_steps:  # verl#7401-style silent early exits are bugs
        raise TrainingError(f"ran {steps_done} steps, expected {schedule.total_steps}")
    _barrier(ranks)  # every rank sees the same checkpoints before deciding to save
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None or latest.name != f"step-{steps_done:08d}":
        save(steps_done)
    final_dir, tmp_dir = run_dir / "model", run_dir / ".tmp-model"
    if ranks.is_main:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    save_model(tmp_dir)
    if ranks.is_main:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        run_info["steps_done"] = steps_done
        run_info["train_loop_s"] = loop_s
        run_info["final_metrics"] = last
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    _barrier(ranks)  # no rank returns before the final model is in place
    return RunResult(run_dir, final_dir, steps_done, export.sha256, report, last)


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def train_from_cli(
    mode: str,
    *,
    data: str,
    model: str,
    out: str,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    deepspeed: str | None = None,
    resume: bool = False,
    on_step_end: StepCallback | None = None,
) -> RunResult:
    """What `prefloop train MODE --data --model --out [--config] [--set ...] [--deepspeed]
    [--resume]` calls: resolve the config (flags win over --set, which wins over the file)."""
    items = list(overrides or [])
    items += [f"data={data}", f"model={model}", f"out={out}"]
    if deepspeed is not None:
        items.append(f"deepspeed={deepspeed}")
    if resume:
        items.append("resume=true")
    config = load_config(mode, config_path, items)
    return train(mode, config, on_step_end=on_step_end)
