"""Judge configurations: frozen, validated, loaded from TOML or JSON files.

A judge config says what the judge is (an LLM behind an OpenAI-compatible endpoint, a set of
rule checks, a trained reward model, or an ensemble of other judges), how it is debiased, and
how the batch runner may call it. The judge's identity in the store (its annotator row) is
derived from the config: `ai:<model>:<rubric>@<version>`, `rule:<name>@<version>`,
`rm:<name>@<version>` or `ensemble:<name>@<version>`.

Files are read with the one config reader (training/config_reader.py): every value is checked
against its field's type, unknown keys are refused (a typo never silently falls back to a
default) and overrides use its `key=value` / `section.key=value` grammar. See docs/judges.md
for every field.

    python -c "from feedback.config import load_judge_config as l; \
print(l('judges/pairwise.toml', overrides=['limits.concurrency=4']))"
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from feedback.rubric import Rubric, load_rubric
from training.config_reader import ConfigError, apply_overrides, build, coerce_fields, read_toml
from training.verifiable import CheckConfig

TaskKindName = Literal["pairwise", "listwise", "binary"]
TASK_KINDS: tuple[str, ...] = ("pairwise", "listwise", "binary")


class JudgeConfigError(ConfigError):
    """A judge config that does not validate (the message names the field)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise JudgeConfigError(message)


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    _check(value in allowed, f"{what} must be one of {', '.join(allowed)}, not {value!r}")


@dataclass(frozen=True)
class RunLimits:
    """How the batch runner may call an endpoint (shared by LLM judges; rules ignore most)."""

    concurrency: int = 8
    """Most requests in flight at once."""
    rate_limit_rps: float = 10.0
    """Most request starts per second (every attempt counts, retries included)."""
    timeout_s: float = 60.0
    """Per-call deadline; a call that has not answered by then is abandoned and retried."""
    max_retries: int = 5
    """Retries per call on 429, 5xx, timeouts and dropped connections."""
    backoff_base_s: float = 0.5
    """First backoff; doubles per retry, with full jitter, unless the server sends Retry-After."""
    backoff_max_s: float = 30.0
    """Longest backoff (and the longest Retry-After honoured)."""
    write_batch: int = 50
    """Labels written per store transaction; a crash redoes at most one batch."""

    def __post_init__(self) -> None:
        _check(1 <= self.concurrency <= 1024, "concurrency must be between 1 and 1024")
        _check(self.rate_limit_rps > 0, "rate_limit_rps must be positive")
        _check(self.timeout_s > 0, "timeout_s must be positive")
        _check(0 <= self.max_retries <= 50, "max_retries must be between 0 and 50")
        _check(self.backoff_base_s >= 0 and self.backoff_max_s >= self.backoff_base_s,
               "backoff_base_s must be >= 0 and <= backoff_max_s")
        _check(1 <= self.write_batch <= 10_000, "write_batch must be between 1 and 10000")


@dataclass(frozen=True)
class RoutingConfig:
    """Which of this judge's tasks go to the human queue first (by raising Task.priority)."""

    min_confidence: float = 0.6
    """A label with a lower confidence routes its task to humans."""
    priority: int = 10
    """The priority routed tasks are raised to (higher is served first)."""
    on_flagged: Literal["route", "keep"] = "route"
    """A candidate flagged as an injection attempt: route the task to humans, or only flag it."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.min_confidence <= 1.0, "routing.min_confidence must be in [0, 1]")
        _check_choice(self.on_flagged, ("route", "keep"), "routing.on_flagged")


@dataclass(frozen=True)
class LLMJudgeConfig:
    """An LLM judge behind any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, prefloop)."""

    model: str
    rubric: Rubric
    base_url: str | None = None
    """Endpoint, e.g. http://127.0.0.1:8011/v1 (default: $OPENAI_BASE_URL, else OpenAI)."""
    name: str | None = None
    """Annotator name; default ai:<model>:<rubric>@<version>."""
    constitution: tuple[str, ...] = ()
    """Principles the judge must weigh, listed in the system message."""
    task_kinds: tuple[str, ...] = TASK_KINDS
    both_orders: bool = True
    """Pairwise: judge (A, B) and (B, A) and keep only verdicts that agree (MT-Bench)."""
    on_inconsistent: Literal["tie", "human"] = "tie"
    """Orders disagree: store a tie, or store no verdict (invalid) and route to humans."""
    listwise_shuffles: int = 3
    """Listwise: shown orders whose rankings are averaged (first is canonical, rest seeded)."""
    structured_output: Literal["auto", "json_schema", "json_object", "off"] = "auto"
    """auto: try OpenAI's json_schema, then llama.cpp's json_object + schema, then none (the
    strict parser always has the last word)."""
    logprobs: bool = True
    """Ask for token logprobs (confidence of the verdict token) where the endpoint gives them."""
    verdict: Literal["generate", "logprobs"] = "generate"
    """generate: parse a generated JSON verdict. logprobs: read the next-token probabilities of
    the labels ("A"/"B", "good"/"bad") and average both orders, as RLAIF does
    (feedback/label_logprobs.py): always a verdict with a confidence, even from a small model;
    needs an endpoint that returns top_logprobs; pairwise and binary tasks only."""
    top_logprobs: int = 20
    """logprobs verdicts: alternatives asked for per position (OpenAI allows up to 20)."""
    temperature: float = 0.0
    max_tokens: int = 512
    seed: int = 0
    """Seeds listwise shuffles (nonces stay random per call)."""
    price_input_per_mtok: float = 0.0
    """USD per million prompt tokens, for --budget-usd and the spend column."""
    price_output_per_mtok: float = 0.0
    limits: RunLimits = field(default_factory=RunLimits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    kind: Literal["llm"] = "llm"

    def __post_init__(self) -> None:
        _check(bool(self.model) and len(self.model) <= 150, "model must have 1-150 characters")
        _check(bool(self.task_kinds) and set(self.task_kinds) <= set(TASK_KINDS),
               f"task_kinds must be among {', '.join(TASK_KINDS)}")
        for kind in self.task_kinds:
            _check(kind in self.rubric.templates,
                   f"rubric {self.rubric.name} has no template for {kind} tasks")
        _check_choice(self.on_inconsistent, ("tie", "human"), "on_inconsistent")
        _check_choice(self.verdict, ("generate", "logprobs"), "verdict")
        if self.verdict == "logprobs":
            _check(set(self.task_kinds) <= {"pairwise", "binary"},
                   'verdict = "logprobs" reads label probabilities: task_kinds must be among '
                   "pairwise, binary")
            _check(self.logprobs, 'verdict = "logprobs" needs logprobs = true')
            _check(1 <= self.top_logprobs <= 20, "top_logprobs must be between 1 and 20")
        _check_choice(self.structured_output, ("auto", "json_schema", "json_object", "off"),
                      "structured_output")
        _check(1 <= self.listwise_shuffles <= 24, "listwise_shuffles must be between 1 and 24")
        _check(0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2")
        _check(16 <= self.max_tokens <= 32_768, "max_tokens must be between 16 and 32768")
        _check(self.price_input_per_mtok >= 0 and self.price_output_per_mtok >= 0,
               "prices must be >= 0")
        _check(all(isinstance(p, str) and p.strip() for p in self.constitution),
               "constitution must be a list of non-empty strings")

    @property
    def annotator_name(self) -> str:
        return self.name or f"ai:{self.model}:{self.rubric.name}@{self.rubric.version}"

    @property
    def rubric_version(self) -> str:
        return f"{self.rubric.name}@{self.rubric.version}"

    def identity(self) -> dict[str, Any]:
        """What the annotator row records; a change here under the same name is refused."""
        return {
            "kind": "llm", "model": self.model, "rubric": self.rubric.name,
            "rubric_version": self.rubric.version, "rubric_sha256": self.rubric.sha256,
            "constitution": list(self.constitution), "both_orders": self.both_orders,
            "on_inconsistent": self.on_inconsistent, "listwise_shuffles": self.listwise_shuffles,
            "temperature": self.temperature, "seed": self.seed,
            # Only when set, so the identities of existing generate-mode judges do not change.
            **({"verdict": "logprobs", "top_logprobs": self.top_logprobs}
               if self.verdict == "logprobs" else {}),
        }


@dataclass(frozen=True)
class RuleJudgeConfig:
    """A model-free judge: weighted rule checks, score in [0, 1] per response."""

    name: str
    checks: tuple[CheckConfig, ...]
    version: str = "1"
    pass_threshold: float = 0.5
    """binary: up when the score reaches it; pairwise: both below it is both_bad."""
    task_kinds: tuple[str, ...] = TASK_KINDS
    limits: RunLimits = field(default_factory=RunLimits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    kind: Literal["rule"] = "rule"

    def __post_init__(self) -> None:
        _check(bool(self.name) and ":" not in self.name, "rule judge name must be non-empty, "
               "without ':'")
        _check(bool(self.checks), "a rule judge needs at least one check")
        _check(0.0 <= self.pass_threshold <= 1.0, "pass_threshold must be in [0, 1]")
        _check(bool(self.task_kinds) and set(self.task_kinds) <= set(TASK_KINDS),
               f"task_kinds must be among {', '.join(TASK_KINDS)}")

    @property
    def annotator_name(self) -> str:
        return f"rule:{self.name}@{self.version}"

    @property
    def rubric_version(self) -> str:
        return self.version

    @property
    def model(self) -> str | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {"kind": "rule", "checks": [dataclasses.asdict(c) for c in self.checks],
                "pass_threshold": self.pass_threshold}


@dataclass(frozen=True)
class RewardModelJudgeConfig:
    """A judge that scores responses with a trained scalar reward model (a Hugging Face
    `AutoModelForSequenceClassification` folder with one label, as `prefloop train rm` saves)."""

    name: str
    model_path: str
    version: str = "1"
    tie_margin: float = 0.0
    """pairwise: |r_a - r_b| <= tie_margin is a tie."""
    binary_threshold: float = 0.0
    """binary: reward >= threshold is up."""
    max_length: int = 2048
    """Tokens kept per (prompt, response); longer inputs keep their end."""
    task_kinds: tuple[str, ...] = TASK_KINDS
    limits: RunLimits = field(default_factory=RunLimits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    kind: Literal["reward_model"] = "reward_model"

    def __post_init__(self) -> None:
        _check(bool(self.name) and ":" not in self.name, "reward model judge name must be "
               "non-empty, without ':'")
        _check(bool(self.model_path), "model_path is required")
        _check(self.tie_margin >= 0, "tie_margin must be >= 0")
        _check(16 <= self.max_length <= 131_072, "max_length must be between 16 and 131072")
        _check(bool(self.task_kinds) and set(self.task_kinds) <= set(TASK_KINDS),
               f"task_kinds must be among {', '.join(TASK_KINDS)}")

    @property
    def annotator_name(self) -> str:
        return f"rm:{self.name}@{self.version}"

    @property
    def rubric_version(self) -> str:
        return self.version

    @property
    def model(self) -> str | None:
        return self.model_path

    def identity(self) -> dict[str, Any]:
        return {"kind": "reward_model", "model_path": self.model_path,
                "tie_margin": self.tie_margin, "binary_threshold": self.binary_threshold,
                "max_length": self.max_length}


@dataclass(frozen=True)
class EnsembleConfig:
    """Several judges on the same tasks, combined by majority or weighted vote."""

    name: str
    members: tuple[JudgeConfig, ...]
    weights: tuple[float, ...]
    method: Literal["majority", "weighted"] = "majority"
    version: str = "1"
    task_kinds: tuple[str, ...] = TASK_KINDS
    limits: RunLimits = field(default_factory=RunLimits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    kind: Literal["ensemble"] = "ensemble"

    def __post_init__(self) -> None:
        _check(bool(self.name) and ":" not in self.name, "ensemble name must be non-empty, "
               "without ':'")
        _check(len(self.members) >= 2, "an ensemble needs at least two members")
        _check(len(self.weights) == len(self.members), "weights must match members")
        _check(all(w > 0 for w in self.weights), "weights must be positive")
        _check_choice(self.method, ("majority", "weighted"), "method")
        names = [m.annotator_name for m in self.members]
        _check(len(set(names)) == len(names), "ensemble members must be distinct judges")
        _check(not any(isinstance(m, EnsembleConfig) for m in self.members),
               "ensembles cannot be nested")

    @property
    def annotator_name(self) -> str:
        return f"ensemble:{self.name}@{self.version}"

    @property
    def rubric_version(self) -> str:
        return self.version

    @property
    def model(self) -> str | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {"kind": "ensemble", "members": [m.annotator_name for m in self.members],
                "weights": list(self.weights), "method": self.method}


JudgeConfig = LLMJudgeConfig | RuleJudgeConfig | RewardModelJudgeConfig | EnsembleConfig


# ---------------------------------------------------------------------------------------------
# Loading


_CLASSES: dict[str, type] = {"llm": LLMJudgeConfig, "rule": RuleJudgeConfig,
                             "reward_model": RewardModelJudgeConfig, "ensemble": EnsembleConfig}
_WHAT = {"llm": "llm judge", "rule": "rule judge", "reward_model": "reward model judge",
         "ensemble": "ensemble"}


def _list(value: Any, what: str) -> list[Any]:
    # Lists of tables or file names: a bare string here is a mistake, not a one-item list.
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise JudgeConfigError(f"{what} must be a list")
    return list(value)


def _constitution(data: dict[str, Any], base_dir: Path) -> tuple[str, ...]:
    """The principles listed inline plus those of `constitution_file` (one per line)."""
    principles = _list(data.pop("constitution", None), "constitution")
    constitution_file = data.pop("constitution_file", None)
    if constitution_file is not None:
        path = base_dir / str(constitution_file)
        if not path.is_file():
            raise JudgeConfigError(f"constitution_file {path} does not exist")
        principles += [line.strip().lstrip("-*").strip()
                       for line in path.read_text(encoding="utf-8").splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
    return tuple(principles)


def _ensemble(data: dict[str, Any], base_dir: Path, depth: int) -> EnsembleConfig:
    if depth:
        raise JudgeConfigError("ensembles cannot be nested")
    members: list[JudgeConfig] = []
    for i, member in enumerate(_list(data.pop("members", None), "members")):
        if isinstance(member, str):
            members.append(load_judge_config(base_dir / member, _depth=depth + 1))
        elif isinstance(member, dict):
            members.append(judge_config_from_dict(member, base_dir=base_dir, _depth=depth + 1))
        else:
            raise JudgeConfigError(f"members[{i}] must be a file path or a table")
    if not data.get("weights"):
        data["weights"] = [1.0] * len(members)
    # The members are configs already (the reader types tables, not a union of configs).
    values = coerce_fields(EnsembleConfig, data, JudgeConfigError, what="ensemble")
    try:
        return EnsembleConfig(**values, members=tuple(members))
    except TypeError as exc:
        raise JudgeConfigError(f"ensemble: {exc}") from None


def judge_config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None,
                           _depth: int = 0) -> JudgeConfig:
    """Build and validate a judge config; relative file paths resolve against `base_dir`."""
    base_dir = base_dir or Path.cwd()
    data = dict(data)
    kind = data.pop("kind", "llm")
    if kind not in _CLASSES:
        raise JudgeConfigError(
            f"kind must be llm, rule, reward_model or ensemble, not {kind!r}")
    for section in ("limits", "routing"):
        if section in data and not data[section]:
            del data[section]  # an empty or null section means the defaults
    if kind == "ensemble":
        return _ensemble(data, base_dir, _depth)
    if kind == "llm":
        rubric_ref = data.pop("rubric", "default_v1")
        if not isinstance(rubric_ref, str):
            raise JudgeConfigError("rubric must be a builtin rubric name or a file path")
        data["rubric"] = load_rubric(rubric_ref, base_dir=base_dir)
        data["constitution"] = _constitution(data, base_dir)
    elif kind == "rule":
        data["checks"] = _list(data.get("checks"), "checks")
    else:
        model_path = data.get("model_path")
        if (isinstance(model_path, str) and not Path(model_path).is_absolute()
                and (base_dir / model_path).exists()):
            data["model_path"] = str((base_dir / model_path).resolve())
    config: JudgeConfig = build(_CLASSES[kind], data, JudgeConfigError, what=_WHAT[kind])
    return config


def load_judge_config(path: str | Path, *, overrides: Sequence[str] = (),
                      _depth: int = 0) -> JudgeConfig:
    """Read a .toml or .json judge config, then apply `overrides`: `key=value` or
    `section.key=value` items (the one `--set` grammar, e.g. `limits.concurrency=4`)."""
    path = Path(path)
    if not path.is_file():
        raise JudgeConfigError(f"judge config {path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise JudgeConfigError(f"{path}: {exc}") from None
    else:
        data = read_toml(path, JudgeConfigError)
    if not isinstance(data, dict):
        raise JudgeConfigError(f"{path}: the config must be a table/object")
    if overrides:
        cls = _CLASSES.get(data.get("kind", "llm"), LLMJudgeConfig)
        data = apply_overrides(data, overrides, cls, JudgeConfigError)
    return judge_config_from_dict(data, base_dir=path.parent, _depth=_depth)


__all__ = ["TASK_KINDS", "EnsembleConfig", "JudgeConfig", "JudgeConfigError", "LLMJudgeConfig",
           "RewardModelJudgeConfig", "RoutingConfig", "RuleJudgeConfig", "RunLimits",
           "judge_config_from_dict", "load_judge_config"]
