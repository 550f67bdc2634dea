"""`prefloop train {sft,rm,dpo,kto,ppo,grpo,rs,online-dpo,merge}` and `prefloop plot`: flags in,
one training call out.

    prefloop export --format trl-preference --out prefs.jsonl
    prefloop train dpo --data prefs.jsonl --model smollm2-135m-instruct --out runs/dpo1 \
        --set beta=0.1 --set max_steps=50
    prefloop train ppo --prompts prompts.jsonl --model smollm2-135m-instruct \
        --reward-model runs/rm1/model --colocate actor,ref --colocate critic,reward --out runs/ppo1
    prefloop train grpo --prompts prompts.jsonl --model smollm2-135m-instruct --out runs/grpo1 \
        --reward rule:format+accuracy
    prefloop plot runs/dpo1
    prefloop train merge --adapter runs/dpo1 --out models/dpo1-merged

torch, transformers, ray and deepspeed are imported inside the commands, so `prefloop --help`
stays fast. Bad input exits with code 2 and one `error:` line; a run that fails part-way (e.g. a
Ray role died, or the --ray-address cluster cannot be joined) exits with code 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

OFFLINE_MODES = ("sft", "rm", "dpo", "kto")
ONLINE_ALGOS = ("grpo", "rs", "online-dpo")
OFFLINE_HELP = {
    "sft": "Supervised fine-tuning on an `sft` export (completion-only loss).",
    "rm": "Train a scalar reward model on preference pairs or rankings.",
    "dpo": "Direct preference optimisation (and its variants) on preference pairs.",
    "kto": "Kahneman-Tversky optimisation on unpaired (thumbs up/down) labels.",
}
ONLINE_HELP = {
    "grpo": "GRPO: G samples per prompt, group-normalised advantages, no critic.",
    "rs": "Rejection sampling (best-of-n): sample, score, fine-tune on the best.",
    "online-dpo": "Iterative online DPO: sample K per prompt, score, build pairs, DPO, repeat.",
}

train_app = typer.Typer(
    help="Train a policy or reward model: offline on an export file (sft, rm, dpo, kto) or "
    "online with generation on Ray (ppo, grpo, rs, online-dpo).",
    no_args_is_help=True,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: a message may contain brackets (paths, JSON); soft_wrap keeps it on
    # one line for whoever greps the output.
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), message))
    return typer.Exit(code)


# Option types shared by the commands (Annotated aliases keep the signatures readable).
ModelOpt = Annotated[str, typer.Option(help="A registered name (smollm2-135m-instruct), a local "
                                       "Hugging Face folder, or a hub id.")]
OutOpt = Annotated[Path, typer.Option(help="The run folder: checkpoints, config.json, "
                                      "metrics.jsonl, the final model.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="A TOML config (training/configs/).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override one config key, e.g. --set beta=0.2 (repeatable; unknown keys are "
    "errors).")]
PromptsOpt = Annotated[Path, typer.Option(help="JSONL prompts: {\"prompt\": str | messages, "
                                          "\"answer\": optional reference}.")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="A Ray cluster to join: HOST:6379 (its GCS, from a machine inside the "
    "cluster), auto (the cluster this machine belongs to), or ray://HOST:10001 (Ray Client; "
    # (a backslash before [ escapes rich markup, which would take "[client]" for a style tag)
    "needs pip install \"ray\\[client]\"). Default: a local Ray.")]
RayTimeoutOpt = Annotated[float | None, typer.Option(
    "--ray-connect-timeout", min=0.1, help="Seconds to wait for the --ray-address cluster before "
    "failing (default: PREFLOOP_RAY_CONNECT_TIMEOUT, else 30).")]


def _set_ray_timeout(seconds: float | None) -> None:
    """The flag is the process's setting: every ensure_ray of this command reads it."""
    if seconds is not None:
        from training.raycluster import CONNECT_TIMEOUT_ENV

        os.environ[CONNECT_TIMEOUT_ENV] = repr(seconds)


# ------------------------------------------------------------------------------ offline


def _offline_command(mode: str) -> Callable[..., None]:
    def command(
        data: Annotated[Path, typer.Option(help="An export file (prefloop export), with its "
                                           "FILE.manifest.json when there is one.")],
        model: ModelOpt,
        out: OutOpt,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        deepspeed: Annotated[str | None, typer.Option(help="zero1 | zero2 | zero3: run the same "
                                                      "loop under a DeepSpeed engine.")] = None,
        resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint "
                                             "in --out.")] = False,
    ) -> None:
        from training.config_reader import ConfigError
        from training.data import DataError
        from training.models import ModelNotFoundError
        from training.run_files import TrainingError
        from training.trainer import train_from_cli

        try:
            result = train_from_cli(mode, data=str(data), model=model, out=str(out),
                                    config_path=config, overrides=list(set_ or []),
                                    deepspeed=deepspeed, resume=resume)
        except (ConfigError, DataError, ModelNotFoundError, TrainingError) as exc:
            raise _fail(str(exc)) from None
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final_metrics.items()))
        typer.echo(f"{result.run_dir}: {result.steps} steps on data {result.data_sha256[:16]}…; "
                   f"model in {result.model_dir}" + (f"; {metrics}" if metrics else ""))

    command.__doc__ = OFFLINE_HELP[mode]
    command.__name__ = f"train_{mode}"
    return command


# ------------------------------------------------------------------------------ online


def _report(result: Any) -> None:
    keys = ("ppo/score", "ppo/kl", "reward/mean", "train/loss")
    shown = ", ".join(f"{k}={result.metrics[k]:.4g}" for k in keys if k in result.metrics)
    typer.echo(f"{result.run_dir}: {result.steps} steps; model in {result.model_dir}"
               + (f"; {shown}" if shown else ""))


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise _fail(f"{what} file {path} does not exist")


def ppo_command(
    prompts: PromptsOpt,
    model: Annotated[str, typer.Option(help="The initial policy (actor and reference): a "
                                       "registered name, a folder or a hub id.")],
    out: OutOpt,
    reward_model: Annotated[str | None, typer.Option(
        help="A reward model folder (prefloop train rm). Or give --set reward=SPEC "
        "(rule:format, or a composition such as rm:PATH*0.5,rule:accuracy*0.5).")] = None,
    critic_init: Annotated[str | None, typer.Option(
        help="Critic weights (default: the reward model, else the policy).")] = None,
    colocate: Annotated[list[str] | None, typer.Option(
        help="Roles sharing one Ray actor: actor,ref and/or critic,reward (repeatable).")] = None,
    ray_address: RayAddressOpt = None,
    ray_connect_timeout: RayTimeoutOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """RM + PPO (InstructGPT): actor, critic, reward and reference as Ray actors."""
    from training.models import ModelNotFoundError
    from training.ppo import PPOError, run_ppo
    from training.ray_roles import RoleError
    from training.raycluster import RayConnectError

    _set_ray_timeout(ray_connect_timeout)
    _check_file(prompts, "prompts")
    if config is not None:
        _check_file(config, "config")
    try:
        result = run_ppo(prompts=str(prompts), model=model, reward_model=reward_model,
                         out=str(out), critic_init=critic_init,
                         config_path=str(config) if config else None,
                         overrides=list(set_ or []), colocate=list(colocate or []),
                         ray_address=ray_address)
    except (ValueError, ModelNotFoundError) as exc:
        # PPOConfigError, OnlineDataError (prompts), RewardSpecError: all ValueErrors
        raise _fail(str(exc)) from None
    except (PPOError, RoleError, RayConnectError) as exc:
        raise _fail(str(exc), code=1) from None
    _report(result)


def _online_command(algo: str) -> Callable[..., None]:
    def command(
        prompts: PromptsOpt,
        model: ModelOpt,
        out: OutOpt,
        reward: Annotated[str | None, typer.Option(
            help="Reward spec: rule:format, rule:accuracy, rule:format+accuracy, rm:PATH, or a "
            "weighted composition (rule:format*0.5,rm:PATH*0.5).")] = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        ray_address: RayAddressOpt = None,
        ray_connect_timeout: RayTimeoutOpt = None,
    ) -> None:
        from training.online import run_online

        _set_ray_timeout(ray_connect_timeout)
        _check_file(prompts, "prompts")
        if config is not None:
            _check_file(config, "config")
        overrides = list(set_ or []) + ([f"reward={reward}"] if reward else [])
        algo_name: Any = algo  # one of ONLINE_ALGOS, run_online's Literal
        try:
            result = run_online(algo_name, prompts=str(prompts), model=model, out=str(out),
                                config_path=str(config) if config else None,
                                overrides=overrides, ray_address=ray_address)
        except ValueError as exc:  # config and input errors (ConfigError & co. are ValueErrors)
            raise _fail(str(exc)) from None
        except FileNotFoundError as exc:  # e.g. ModelNotFoundError
            raise _fail(str(exc)) from None
        except RuntimeError as exc:  # incl. RayConnectError: the cluster cannot be joined
            raise _fail(str(exc), code=1) from None
        _report(result)

    command.__doc__ = ONLINE_HELP[algo]
    command.__name__ = f"train_{algo.replace('-', '_')}"
    return command


for _mode in OFFLINE_MODES:
    train_app.command(_mode)(_offline_command(_mode))
train_app.command("ppo")(ppo_command)
for _algo in ONLINE_ALGOS:
    train_app.command(_algo)(_online_command(_algo))


def _adapter_folder(source: Path) -> Path:
    """The adapter folder of a run folder (its model/) or the folder itself."""
    if (source / "adapter_config.json").is_file():
        return source
    if (source / "model" / "adapter_config.json").is_file():
        return source / "model"
    if (source / "model" / "config.json").is_file():
        raise _fail(f"{source / 'model'} is already a full model folder: nothing to merge")
    raise _fail(f"{source} is neither a LoRA adapter folder (adapter_config.json) nor a run "
                "folder whose model/ is one")


def merge_command(
    adapter: Annotated[Path, typer.Option(help="A LoRA run folder (prefloop train ... on CPU) "
                                          "or an adapter folder (adapter_config.json).")],
    out: Annotated[Path, typer.Option(help="The full Hugging Face folder to write (weights, "
                                      "config, tokenizer; no adapter_config.json).")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds files.")
                         ] = False,
) -> None:
    """Merge a LoRA adapter into its base: a full model folder for plain transformers or vLLM."""
    folder = _adapter_folder(adapter)
    target = out.resolve()
    if target == folder.resolve() or folder.resolve() in target.parents:
        raise _fail(f"--out {out} is inside the adapter folder {folder}; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise _fail(f"--out {out} already exists and is not empty (pass --overwrite to replace "
                    "it)")
    from training.models import ModelNotFoundError, merge_adapter, resolve_adapter_base

    try:
        base = resolve_adapter_base(folder)  # fails before anything is loaded or written
        merged = merge_adapter(folder, out)
    except ModelNotFoundError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{merged}: {folder} merged onto {base}")


train_app.command("merge")(merge_command)


def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by prefloop train.")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN_DIR/curves.png).")
                   ] = None,
) -> None:
    """Draw a run's loss and reward-margin curves to a PNG."""
    from training.plot import plot_run

    if not (run_dir / "metrics.jsonl").is_file():
        raise _fail(f"{run_dir} has no metrics.jsonl (is it a prefloop train run folder?)")
    typer.echo(str(plot_run(run_dir, out)))


def register(root: typer.Typer) -> None:
    root.add_typer(train_app, name="train")
    root.command("plot")(plot_command)
