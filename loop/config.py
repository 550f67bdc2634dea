"""The round config: what one training round does, from a TOML file plus `--set` overrides.

A `RoundConfig` is a frozen dataclass with one section per stage (`[task]`, `[generate]`,
`[label]`, `[dataset]`, `[train]`, `[evaluate]`), read with the one config reader
(training/config_reader.py: type-checked values, unknown keys refused, `section.key=value`
overrides). It is resolved once, stored on the round when it starts, and a resumed round reads
the stored copy back (`round_config_of`). Judge and training config paths are relative to the
TOML file's folder.

    python -c "from loop.config import load_round_config; print(load_round_config().algo)"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from store import rounds as store_rounds
from store.models import Round
from training.config_reader import ConfigError, SavableConfig, apply_overrides, build, read_toml

CONFIG_DIR = Path(__file__).parent / "configs"


class RoundConfigError(ConfigError):
    """A round config that does not validate (the message names the field)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RoundConfigError(message)


@dataclass(frozen=True)
class TaskSourceConfig:
    """Where a round's prompts come from."""

    kind: Literal["arithmetic", "store"] = "arithmetic"
    """arithmetic: the seeded verifiable task (training.tasks); store: prompts already stored."""
    dataset: str = "arithmetic"
    train_prompts: int = 48
    """New prompts per round (a fresh seeded sample every round)."""
    heldout_prompts: int = 32
    """Held-out prompts (the same set every round, so rewards are comparable)."""
    train_split: str = "train"
    heldout_split: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.kind in ("arithmetic", "store"), "task.kind must be arithmetic or store")
        _check(self.train_prompts >= 1 and self.heldout_prompts >= 1,
               "task.train_prompts and task.heldout_prompts must be >= 1")


@dataclass(frozen=True)
class GenerateConfig:
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    task_kind: Literal["pairwise", "listwise", "binary"] = "pairwise"
    max_pairs_per_prompt: int = 6
    """pairwise: most pairs kept per prompt among the C(K,2) (seeded choice)."""
    overlap: int = 1
    """Human annotators wanted per task (the annotator queue serves the round's tasks)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int = 32
    stop: tuple[str, ...] = ()
    """Stop strings, kept at the end of the text (e.g. "</answer>": nothing after the answer is
    sampled, judged or trained on). Also used by the evaluate stage."""

    def __post_init__(self) -> None:
        _check(all(self.stop), "generate.stop strings must be non-empty")
        _check(1 <= self.samples_per_prompt <= 16, "generate.samples_per_prompt must be 1-16")
        _check(self.task_kind in ("pairwise", "listwise", "binary"),
               "generate.task_kind must be pairwise, listwise or binary")
        _check(self.task_kind == "binary" or self.samples_per_prompt >= 2,
               "pairwise/listwise tasks need samples_per_prompt >= 2")
        _check(self.max_pairs_per_prompt >= 1 and self.overlap >= 1 and self.batch_size >= 1,
               "generate.max_pairs_per_prompt, overlap and batch_size must be >= 1")
        _check(self.max_new_tokens >= 1 and 0 <= self.temperature <= 2,
               "generate.max_new_tokens >= 1 and 0 <= temperature <= 2")


@dataclass(frozen=True)
class LabelConfig:
    judges: tuple[str, ...] = ()
    """Judge config files (feedback/config.py); rule and AI judges label at once."""
    ai_task_limit: int = 0
    """Most tasks an LLM judge labels per round (0: all); rule judges always label all."""
    human_quota: int = 0
    """Human labels to wait for on the round's tasks (0: do not wait)."""
    human_deadline_s: float = 0.0
    """Stop waiting for humans after this long (0 with a quota: wait forever)."""
    poll_s: float = 5.0
    calibrate_against: str | None = None
    """The annotator name of a judge in `judges` (e.g. the rule judge, exact on a verifiable
    task) that each LLM judge is calibrated against, live, on the tasks both labelled: the
    agreement is stored as the LLM judge's calibration, and the round's tasks where the two
    disagree or where an LLM label's confidence x agreement is below `route_min_confidence`
    are routed to humans (their priority raised to `route_priority`)."""
    route_min_confidence: float = 0.6
    route_priority: int = 10

    def __post_init__(self) -> None:
        _check(self.ai_task_limit >= 0 and self.human_quota >= 0 and self.human_deadline_s >= 0,
               "label limits must be >= 0")
        _check(0.0 <= self.route_min_confidence <= 1.0,
               "label.route_min_confidence must be in [0, 1]")


@dataclass(frozen=True)
class DatasetConfig:
    """The export filters of store/exporting.py applied to the round's tasks."""

    sources: tuple[str, ...] = ("rule", "human")
    min_agreement: float = 0.0
    min_judge_agreement: float = 0.0
    weight_ai_by_agreement: bool = False


@dataclass(frozen=True)
class TrainSection:
    config: str | None = None
    """A training TOML (training/configs/ or the online algorithms' configs)."""
    overrides: tuple[str, ...] = ()
    """`key=value` overrides for the trainer, like `prefloop train --set`."""
    reward_model: str | None = None
    """ppo: a reward-model folder, "round" (train one on this round's export), or none."""
    reward_model_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluateConfig:
    win_rate_threshold: float = 0.55
    """Promote when the gate judge's win rate of candidate vs deployed reaches this."""
    ties: Literal["half", "drop"] = "half"
    """How the gate's win rate counts ties (tie and both_bad): "half" = (wins + ties/2) / n, as
    AlpacaEval; "drop" = wins / (wins + losses), the decisive verdicts only, as Chatbot Arena's
    pairwise win fractions. With an exact rule judge most held-out pairs tie (both right or both
    wrong), and "half" then pulls every candidate towards 0.5 whatever its decisive record."""
    min_decisive: int = 0
    """Reject unless the gate judge reached at least this many decisive verdicts (wins +
    losses): a 1-0 record is not evidence."""
    gate_judge: str | None = None
    """The judge (annotator name) whose win rate gates promotion; default the first judge."""
    judges: tuple[str, ...] = ()
    """Judges of the evaluation; default the label judges."""
    ai_task_limit: int = 0
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy answers (the default); otherwise seeded samples."""
    kl_reference: Literal["base", "deployed"] = "base"
    """KL of the candidate to the base model (drift over rounds) or to the deployed policy."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.win_rate_threshold <= 1.0, "evaluate.win_rate_threshold in [0, 1]")
        _check(self.kl_reference in ("base", "deployed"), "evaluate.kl_reference: base|deployed")
        _check(self.ties in ("half", "drop"), "evaluate.ties: half|drop")
        _check(self.min_decisive >= 0, "evaluate.min_decisive must be >= 0")


@dataclass(frozen=True)
class RoundConfig(SavableConfig):
    """Everything one round needs; resolved once and stored on the round (frozen at start)."""

    algo: Literal["dpo", "kto", "ppo", "grpo", "rs"] = "dpo"
    base_model: str = "smollm2-135m-instruct"
    """The model a store with no deployed policy starts from (registered and deployed)."""
    seed: int = 0
    use_ray: bool = True
    """Run sampling, training and evaluation as Ray tasks (local Ray unless ray_address)."""
    ray_address: str | None = None
    ray_num_cpus: int = 2
    task: TaskSourceConfig = field(default_factory=TaskSourceConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        _check(self.algo in store_rounds.ALGOS,
               f"algo must be one of {', '.join(store_rounds.ALGOS)}")
        _check(bool(self.label.judges), "label.judges needs at least one judge config")
        _check(self.ray_num_cpus >= 1, "ray_num_cpus must be >= 1")


def round_config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None
                           ) -> RoundConfig:
    """Validate a config dict; judge/train paths resolve against `base_dir` (the TOML's folder)."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    if base_dir is not None:
        # Paths are resolved before the type check, so a stored config holds absolute paths.
        for name in ("label", "evaluate"):
            section = data.get(name)
            judges = section.get("judges") if isinstance(section, dict) else None
            if isinstance(judges, str):  # `--set label.judges=a.toml,b.toml`
                judges = [p.strip() for p in judges.split(",") if p.strip()]
            if isinstance(section, dict) and isinstance(judges, list | tuple):
                section["judges"] = [_resolve(base_dir, p) if isinstance(p, str) else p
                                     for p in judges]
        train = data.get("train")
        if isinstance(train, dict) and isinstance(train.get("config"), str) and train["config"]:
            train["config"] = _resolve(base_dir, train["config"])
    config: RoundConfig = build(RoundConfig, data, RoundConfigError, what="round config")
    return config


def _resolve(base_dir: Path, path: str) -> str:
    candidate = Path(path)
    if candidate.is_absolute():
        return str(candidate)
    for root in (base_dir, Path.cwd()):
        if (root / candidate).exists():
            return str((root / candidate).resolve())
    return str((base_dir / candidate).resolve())


def load_round_config(path: str | Path | None = None, *, algo: str | None = None,
                      overrides: Sequence[str] = ()) -> RoundConfig:
    """The file (default loop/configs/round.toml), then `section.key=value` overrides."""
    path = Path(path) if path is not None else CONFIG_DIR / "round.toml"
    if not path.is_file():
        raise RoundConfigError(f"round config {path} does not exist")
    data = apply_overrides(read_toml(path, RoundConfigError), overrides, RoundConfig,
                           RoundConfigError)
    if algo is not None:
        data["algo"] = algo
    return round_config_from_dict(data, base_dir=path.parent)


def round_config_of(rnd: Round) -> RoundConfig:
    """The config a round was started with (paths already absolute)."""
    return round_config_from_dict(rnd.config or {})


__all__ = ["CONFIG_DIR", "DatasetConfig", "EvaluateConfig", "GenerateConfig", "LabelConfig",
           "RoundConfig", "RoundConfigError", "TaskSourceConfig", "TrainSection",
           "load_round_config", "round_config_from_dict", "round_config_of"]
