"""`prefloop train {sft,rm,dpo,kto}` and `prefloop plot`: flags in, one training call out.

    prefloop export --format trl-preference --out prefs.jsonl
    prefloop train dpo --data prefs.jsonl --model smollm2-135m-instruct --out runs/dpo1 \
        --set beta=0.1 --set max_steps=50
    prefloop plot runs/dpo1

torch, transformers and deepspeed are imported inside the commands, so `prefloop --help` stays
fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MODES = ("sft", "rm", "dpo", "kto")


def _fail(message: str) -> typer.Exit:
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: a message may contain brackets (paths, JSON); soft_wrap keeps it on
    # one line for whoever greps the output.
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), message))
    return typer.Exit(2)


def train_command(
    mode: Annotated[str, typer.Argument(help="sft | rm | dpo | kto")],
    data: Annotated[Path, typer.Option(help="An export file (prefloop export), with its "
                                       "FILE.manifest.json when there is one.")],
    model: Annotated[str, typer.Option(help="A registered name (smollm2-135m-instruct), a "
                                       "local Hugging Face folder, or a hub id.")],
    out: Annotated[Path, typer.Option(help="The run folder: checkpoints, config.json, "
                                      "metrics.jsonl, the final model.")],
    config: Annotated[Path | None, typer.Option(help="A TOML config (training/configs/).")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override one config key, e.g. --set beta=0.2 (repeatable; unknown "
        "keys are errors).")] = None,
    deepspeed: Annotated[str | None, typer.Option(help="zero1 | zero2 | zero3: run the same "
                                                  "loop under a DeepSpeed engine.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint in "
                                         "--out.")] = False,
) -> None:
    """Train a policy (sft, dpo, kto) or a reward model (rm) on an export file."""
    if mode not in MODES:
        raise _fail(f"mode must be one of {', '.join(MODES)}")
    from training.config import ConfigError
    from training.data import DataError
    from training.models import ModelNotFoundError
    from training.trainer import TrainingError, train_from_cli

    try:
        result = train_from_cli(mode, data=str(data), model=model, out=str(out),
                                config_path=config, overrides=list(set_ or []),
                                deepspeed=deepspeed, resume=resume)
    except (ConfigError, DataError, ModelNotFoundError, TrainingError) as exc:
        raise _fail(str(exc)) from None
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.final_metrics.items()))
    typer.echo(f"{result.run_dir}: {result.steps} steps on data {result.data_sha256[:16]}…; "
               f"model in {result.model_dir}" + (f"; {metrics}" if metrics else ""))


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
    root.command("train")(train_command)
    root.command("plot")(plot_command)
