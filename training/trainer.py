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

import copy
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import checkpoint as ckpt
from training import dpo, kto, reward_model, sft
from training.config import TrainConfig, load_config
from training.config_reader import ConfigError
from training.data import DataReport, Example, build_examples, read_export
from training.data_parallel import (
    Ranks,
    barrier,
    check_world_size,
    init_ranks,
    make_schedule,
    reference_plan,
    shard,
    sum_over_ranks,
)
from training.models import (
    load_reward_backbone,
    load_tokenizer,
    record_adapter_base,
    resolve_model,
)
from training.offline_batch import MicroBatch, Reference, reference_logps
from training.optim import lr_schedule, optimizer_step
from training.policy import (
    freeze,
    hold_frozen_linears_in_bf16,
    is_peft,
    load_causal_lm,
    trainable_parameters,
    trainable_state,
    uses_lora,
    with_lora,
)
from training.run_files import (
    TrainingError,
    append_jsonl,
    changed_config_keys,
    git_sha,
    truncate_jsonl,
)
from training.runtime import attention_implementation, autocast, select_device, uses_bf16

log = logging.getLogger("prefloop.training")
StepCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    model_dir: Path
    steps: int
    data_sha256: str
    report: DataReport
    final_metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- model setup


def build_policy(config: TrainConfig, tokenizer: Any, device: torch.device) -> Any:
    """Load the model to train (causal LM, or scalar-head model for rm) and wrap it in LoRA."""
    attention = attention_implementation(config.attention, device, config.max_length)
    model: Any
    if config.mode == "rm":
        model = load_reward_backbone(resolve_model(config.model), tokenizer.pad_token_id,
                                     dtype=torch.float32, attn_implementation=attention)
    else:
        model = load_causal_lm(config.model, attention)
    lora = uses_lora(config.lora, device)
    if lora:
        model = with_lora(model, config, "SEQ_CLS" if config.mode == "rm" else "CAUSAL_LM")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if lora:
            model.enable_input_require_grads()
    return model.to(device)


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then constant / linear decay / cosine decay to 0 (training.optim)."""
    return lr_schedule(warmup_steps=config.warmup_steps, total_steps=total_steps,
                       schedule=config.lr_schedule)


# ----------------------------------------------------------------------------- one micro-batch


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
    batch = MicroBatch([examples[i] for i in indices], indices, normaliser, pad_id, device)
    if config.mode == "dpo":
        loss, stats = dpo.micro_batch_loss(config, model, batch, reference)
    elif config.mode == "rm":
        loss, stats = reward_model.micro_batch_loss(config, model, batch)
    elif config.mode == "kto":
        loss, stats = kto.micro_batch_loss(config, model, batch, reference, ranks=ranks,
                                           filler=filler)
    else:
        loss, stats = sft.micro_batch_loss(model, batch)
    return loss, {"examples": float(len(batch.examples)), **stats}


def batch_normaliser(config: TrainConfig, examples: list[Example], indices: list[int]) -> float:
    """The divisor shared by all micro-batches of one optimizer batch.

    Preference/KTO/RM losses: the sum of example weights, so the optimizer batch's loss is a
    weighted mean whatever the micro-batch split. SFT: the number of completion tokens.
    """
    if config.mode == "sft":
        return sft.normaliser(examples, indices)
    return float(sum(examples[i].weight for i in indices))


# ----------------------------------------------------------------------------- the run


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
    changed = changed_config_keys(saved, config.to_dict(), {
        "resume", "progress", "save_steps", "keep_checkpoints", "logging_steps"})
    if changed:
        raise TrainingError(f"cannot resume {run_dir}: config changed in {changed}")
    return latest


def _fused_adamw_applies(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


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
    barrier(ranks)  # every rank has checked the run dir before rank 0 writes into it
    if ranks.is_main:
        config.save(run_dir / "config.json")

    device = select_device(config.device)
    bf16 = uses_bf16(config.precision, device)
    schedule = make_schedule(config, len(examples))

    # 2. The policy (and, when needed, the reference).
    model = build_policy(config, tokenizer, device)
    if bf16 and is_peft(model) and config.deepspeed == "none":
        hold_frozen_linears_in_bf16(model)  # every forward below runs under bf16 autocast
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
                if is_peft(model):
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
                    share_prompt=dpo.shares_prompt(config), owned=[own for _, own in plan],
                    ranks=ranks,
                )
                if ranks.is_main:
                    torch.save({"data_sha256": export.sha256, "logps": reference.table},
                               ref_path)
                ref_model = None
            reference.model = None if ref_model is None else freeze(ref_model)

    reference_s = time.perf_counter() - reference_started

    # 3. Optimizer, schedule, optional DeepSpeed engine, resume.
    trainable = trainable_parameters(model)
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
            record_adapter_base(folder)  # a LoRA folder that still loads once moved

    def save_checkpoint_contents(folder: Path) -> None:
        save_model(folder)
        if engine is not None:
            engine.save_checkpoint(str(folder.parent / "deepspeed"), tag="state")

    def save(step: int) -> None:
        state: dict[str, Any] = {"step": step, "rng": torch.get_rng_state(),
                                 "data_sha256": export.sha256}
        if engine is None:  # (under DeepSpeed its own checkpoint holds weights and optimizer)
            state |= {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
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
        barrier(ranks)
        save_checkpoint_contents(staging / "model")
        barrier(ranks)
        if ranks.is_main:
            ckpt.publish_checkpoint(run_dir, step, staging, state, config.keep_checkpoints)
        barrier(ranks)

    # 4. The loop.
    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    if ranks.is_main:
        truncate_jsonl(metrics_path, start_step)
        writer = _tensorboard(run_dir)
    run_info = {
        "mode": mode, "data": str(export.path), "data_sha256": export.sha256,
        "manifest": export.manifest, "data_report": report.__dict__, "git_sha": git_sha(),
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "bf16": bf16, "lora": is_peft(model), "deepspeed": config.deepspeed,
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
            with autocast(device, bf16):
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
            summed = sum_over_ranks([loss_value] + [totals[k] for k in names], ranks)
            loss_value, totals = summed[0], dict(zip(names, summed[1:], strict=True))
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = optimizer_step(trainable, optimizer, config.max_grad_norm, scheduler)
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
            append_jsonl(metrics_path, [record])
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
    barrier(ranks)  # every rank sees the same checkpoints before deciding to save
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
    barrier(ranks)  # no rank returns before the final model is in place
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
