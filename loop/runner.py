"""Training rounds: collect -> generate -> label -> build dataset -> train -> evaluate -> decide.

A round is a state machine stored in the `round` table (store/rounds.py is its write path). Each
stage is a function of (database, round) that reads what earlier stages recorded, computes (the
heavy parts as Ray tasks, feedback/stages.py), and then, in ONE write transaction, writes its rows
and advances the state with a compare-and-set. So a process killed anywhere either committed the
stage or left no trace of it, and `prefloop round resume` redoes at most the stage in flight:

- generate: completions and tasks are get-or-create keyed (same seed -> same samples), written
  with the advance; a rerun adds nothing twice;
- label: one label per (task, judge) is a database constraint; a rerun fills only what is missing;
- build dataset: the export file is written (by rename) before its snapshot row and the advance;
- train: the run folder resumes from its last complete checkpoint, and a finished run (marker
  file) is never trained again; the candidate is registered with the advance;
- evaluate: held-out completions and eval tasks are get-or-create keyed, judges idempotent;
- decide: promote / reject (store/deployments.py) with the final advance.

At most one round runs at a time: a lease in `round_lock`, renewed by a heartbeat thread.

    prefloop round run --algo dpo --config feedback/configs/demo.toml
    prefloop round resume
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session, col, select

from store import rounds as store_rounds
from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound
from store.models import (
    Annotator,
    AnnotatorKind,
    Label,
    LabelStatus,
    PolicyVersion,
    Prompt,
    Round,
    Task,
    TaskItem,
    TaskKind,
)

CONFIG_DIR = Path(__file__).parent / "configs"
Hook = Callable[[str, str], None]  # (event, stage): "computed" before the advance, "advanced"


class RoundConfigError(ValueError):
    """A round config that does not validate (the message names the field)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RoundConfigError(message)


# ---------------------------------------------------------------------------------------------
# Configuration


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

    def __post_init__(self) -> None:
        _check(self.ai_task_limit >= 0 and self.human_quota >= 0 and self.human_deadline_s >= 0,
               "label limits must be >= 0")


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
class RoundConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


_SECTIONS: dict[str, type] = {"task": TaskSourceConfig, "generate": GenerateConfig,
                              "label": LabelConfig, "dataset": DatasetConfig,
                              "train": TrainSection, "evaluate": EvaluateConfig}


def _build(cls: type, data: Mapping[str, Any], what: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    _check(not unknown, f"{what}: unknown keys {sorted(unknown)}")
    values = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise RoundConfigError(f"{what}: {exc}") from None


def round_config_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None
                           ) -> RoundConfig:
    """Validate a config dict; judge/train paths resolve against `base_dir` (the TOML's folder)."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    sections = {}
    for name, cls in _SECTIONS.items():
        section = data.pop(name, {}) or {}
        _check(isinstance(section, dict), f"[{name}] must be a table")
        if base_dir is not None:
            for key in ("judges",):
                if key in section:
                    section[key] = [_resolve(base_dir, p) for p in section[key]]
            if name == "train" and section.get("config"):
                section["config"] = _resolve(base_dir, section["config"])
        sections[name] = _build(cls, section, f"[{name}]")
    config: RoundConfig = _build(RoundConfig, {**data, **sections}, "round config")
    return config


def _resolve(base_dir: Path, path: str) -> str:
    candidate = Path(path)
    if candidate.is_absolute():
        return str(candidate)
    for root in (base_dir, Path.cwd()):
        if (root / candidate).exists():
            return str((root / candidate).resolve())
    return str((base_dir / candidate).resolve())


def _coerce(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value  # a bare string


def load_round_config(path: str | Path | None = None, *, algo: str | None = None,
                      overrides: Sequence[str] = ()) -> RoundConfig:
    """The file (default feedback/configs/round.toml), then `section.key=value` overrides."""
    path = Path(path) if path is not None else CONFIG_DIR / "round.toml"
    if not path.is_file():
        raise RoundConfigError(f"round config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RoundConfigError(f"{path}: {exc}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"--set expects section.key=value, got {item!r}")
        parts = key.strip().split(".")
        _check(len(parts) <= 2, f"--set {key}: at most one section level")
        target = data if len(parts) == 1 else data.setdefault(parts[0], {})
        target[parts[-1]] = _coerce(raw.strip())
    if algo is not None:
        data["algo"] = algo
    return round_config_from_dict(data, base_dir=path.parent)


def round_config_of(rnd: Round) -> RoundConfig:
    """The config a round was started with (paths already absolute)."""
    return round_config_from_dict(rnd.config or {})


# ---------------------------------------------------------------------------------------------
# Helpers on the store


def _labels_by_source(session: Session, task_ids: Sequence[int]) -> dict[str, int]:
    """Label counts on these tasks by annotator kind; invalid judge outputs counted apart."""
    counts: Counter[str] = Counter()
    for start in range(0, len(task_ids), 500):
        rows = session.exec(
            select(Annotator.kind, Label.status)
            .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(col(Label.task_id).in_(list(task_ids[start:start + 500])))
        ).all()
        for kind, status in rows:
            key = AnnotatorKind(kind).value
            counts[key if status == LabelStatus.submitted else f"{key}_invalid"] += 1
    return {k: counts.get(k, 0) for k in ("rule", "ai", "human", "ai_invalid")} | {
        k: v for k, v in counts.items() if k not in ("rule", "ai", "human", "ai_invalid")}


def round_task_ids(session: Session, round_id: int, source: str) -> list[int]:
    return list(session.exec(select(Task.id).where(Task.round_id == round_id,
                                                   Task.source == source)
                             .order_by(col(Task.id))).all())  # type: ignore[arg-type]


def _prompts(session: Session, ids: Sequence[int]) -> list[Prompt]:
    rows = {p.id: p for p in session.exec(select(Prompt).where(col(Prompt.id).in_(list(ids))))}
    return [rows[i] for i in ids]


def win_rates(session: Session, task_ids: Sequence[int], candidate_first: Mapping[int, bool],
              *, empty: Mapping[str, int] | None = None, judges: Sequence[str] = ()
              ) -> dict[str, dict[str, float]]:
    """Per judge: the candidate's wins, losses, ties (tie + both_bad), `win_rate` (ties count
    half) and `decisive_win_rate` (wins / (wins + losses), ties dropped) on the eval tasks.
    `candidate_first[task_id]` says whether canonical position a is the candidate. `empty` counts
    prompts where an answer was empty (not judged): an empty answer loses, two empty answers tie;
    they are added to every judge in `judges`."""
    tallies: dict[str, Counter[str]] = {name: Counter() for name in judges}
    for tally in tallies.values():
        tally["wins"] += (empty or {}).get("deployed_only", 0)
        tally["losses"] += (empty or {}).get("candidate_only", 0)
        tally["ties"] += (empty or {}).get("both", 0)
    for start in range(0, len(task_ids), 500):
        rows = session.exec(
            select(Label, Annotator.name)
            .join(Annotator, col(Annotator.id) == col(Label.annotator_id))
            .where(col(Label.task_id).in_(list(task_ids[start:start + 500])))
        ).all()
        for label, name in rows:
            tally = tallies.setdefault(name, Counter())
            if label.status != LabelStatus.submitted:
                tally["invalid"] += 1
                continue
            if label.choice in ("tie", "both_bad"):
                tally["ties"] += 1
                continue
            candidate_won = (label.choice == "a") == candidate_first[label.task_id]
            tally["wins" if candidate_won else "losses"] += 1
    out = {}
    for name, tally in sorted(tallies.items()):
        n = tally["wins"] + tally["losses"] + tally["ties"]
        decisive = tally["wins"] + tally["losses"]
        out[name] = {"wins": tally["wins"], "losses": tally["losses"], "ties": tally["ties"],
                     "invalid": tally["invalid"], "n": n,
                     "win_rate": (tally["wins"] + 0.5 * tally["ties"]) / n if n else 0.5,
                     "decisive_win_rate": tally["wins"] / decisive if decisive else 0.5}
    return out


def promotion_decision(win_rate: float | None, decisive: int, *, threshold: float,
                       min_decisive: int, ties: str) -> tuple[bool, str]:
    """The gate: promote iff there is a win rate, at least `min_decisive` decisive verdicts
    (wins + losses) behind it, and it reaches `threshold`. Returns (promote, reason)."""
    if win_rate is None:
        return False, "no valid eval verdicts"
    if decisive < min_decisive:
        return False, f"{decisive} decisive verdicts < min_decisive {min_decisive}"
    promote = win_rate >= threshold
    return promote, f"win rate {win_rate:.3f} (ties {ties}) {'>=' if promote else '<'} {threshold}"


def arithmetic_prompts(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """The seeded verifiable task's prompts as {"prompt", "answer", "id"} (training.tasks)."""
    from training.tasks import make_arithmetic_prompts

    return [{"prompt": row["prompt"], "answer": str(row["answer"]), "id": row["id"]}
            for row in make_arithmetic_prompts(n, seed, split)]


def ensure_deployed(session: Session, config: RoundConfig, base_dir: str, *, actor: str
                    ) -> PolicyVersion:
    """The deployed policy; on a store with none, `config.base_model` registered and deployed."""
    from store import deployments

    policy = deployments.deployed(session)
    if policy is not None:
        return policy
    policy = session.exec(select(PolicyVersion).where(
        PolicyVersion.name == config.base_model)).first()
    if policy is None:
        policy = deployments.register_policy(session, name=config.base_model,
                                             base_model=config.base_model, weights_uri=base_dir)
    return deployments.promote(session, policy_id=policy.id or 0, actor=actor)


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class StageResult:
    outputs: dict[str, Any]
    write: Callable[[Session], dict[str, Any]] | None = None
    """Rows to write in the advancing transaction; returns more outputs."""
    to: str | None = None
    """The next state when it is not simply the next stage (decide)."""


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the LLM judges of a run send their requests (overrides their config files)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    """None keeps each config's model; DEPLOYED_MODEL asks for the version deployed when the
    judge runs, named after it, so each policy version judges under its own identity."""


DEPLOYED_MODEL = "@deployed"


class RoundRunner:
    """Runs rounds against one store; at most one round at a time (the round lock).

    Args:
        db: the store.
        runs_dir: each round's artefacts go to runs_dir/round-<id>.
        hook: called as hook(event, stage) with event "computed" (work done, nothing of the
            stage committed) and "advanced" (committed); tests kill the process there.
        judge_endpoint: base URL (and key, model) for every LLM judge of the round.
        log: where progress lines go.
    """

    def __init__(self, db: Database, *, runs_dir: str | Path, hook: Hook | None = None,
                 judge_endpoint: JudgeEndpoint | None = None, lock_ttl_s: float = 600.0,
                 log: Callable[[str], None] | None = None, progress: bool = True):
        self.db = db
        self.runs_dir = Path(runs_dir)
        self.hook = hook
        self.judge_endpoint = judge_endpoint
        self.lock_ttl_s = lock_ttl_s
        self.log = log or (lambda _message: None)
        self.progress = progress
        self.holder = store_rounds.make_holder()
        self.trainer_calls = 0  # how many times this runner trained (tests assert on it)

    # -- public -----------------------------------------------------------------------------

    def start(self, config: RoundConfig, *, trigger: str = "manual") -> int:
        """Create a round (refused while another is unfinished); returns its id."""
        with self.db.write() as session:
            rnd = store_rounds.create_round(session, algo=config.algo, config=config.to_dict(),
                                            trigger=trigger)
            assert rnd.id is not None
            rnd.run_dir = str((self.runs_dir / f"round-{rnd.id:04d}").resolve())
            session.add(rnd)
            return rnd.id

    def run(self, round_id: int) -> Round:
        """Drive the round to promoted/rejected, resuming from wherever it stands."""
        with self.db.read() as session:
            current = store_rounds.lock_state(session).holder
        dead = current if store_rounds.holder_is_dead_here(current) else None
        with self.db.write() as session:
            if not store_rounds.acquire_lock(session, holder=self.holder, ttl_s=self.lock_ttl_s,
                                             round_id=round_id, steal_from=dead):
                state = store_rounds.lock_state(session)
                raise Conflict(f"another process runs a round ({state.holder}, round "
                               f"{state.round_id}, lease until {state.expires_at})")
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(round_id, stop), daemon=True,
                                     name="round-lock-heartbeat")
        heartbeat.start()
        try:
            return self._drive(round_id)
        finally:
            stop.set()
            heartbeat.join(timeout=5)
            with self.db.write() as session:
                store_rounds.release_lock(session, holder=self.holder)

    def resume(self) -> Round | None:
        """Finish the unfinished round, if there is one."""
        with self.db.read() as session:
            pending = store_rounds.unfinished_round(session)
        return None if pending is None else self.run(pending.id or 0)

    # -- machinery --------------------------------------------------------------------------

    def _heartbeat(self, round_id: int, stop: threading.Event) -> None:
        while not stop.wait(max(1.0, self.lock_ttl_s / 4)):
            try:
                with self.db.write() as session:
                    store_rounds.renew_lock(session, holder=self.holder, ttl_s=self.lock_ttl_s,
                                            round_id=round_id)
            except Exception:
                continue

    def _load(self, round_id: int) -> Round:
        with self.db.read() as session:
            rnd = session.get(Round, round_id)
        if rnd is None:
            raise NotFound(f"round {round_id} does not exist")
        return rnd

    def _drive(self, round_id: int) -> Round:
        stages: dict[str, Callable[[Round, RoundConfig], StageResult]] = {
            "collect": self._collect, "generate": self._generate, "label": self._label,
            "build_dataset": self._build_dataset, "train": self._train,
            "evaluate": self._evaluate, "decide": self._decide,
        }
        rnd = self._load(round_id)
        config = round_config_of(rnd)
        while not store_rounds.is_finished(rnd.state):
            stage = rnd.state
            self.log(f"round {round_id}: {stage}")
            started = time.perf_counter()
            try:
                result = stages[stage](rnd, config)
                if self.hook is not None:
                    self.hook("computed", stage)
                wall = time.perf_counter() - started
                timings = {**(rnd.metrics or {}).get("timings", {})}
                timings[stage] = round(timings.get(stage, 0.0) + wall, 3)

                def commit(session: Session, stage: str = stage, result: StageResult = result,
                           timings: dict[str, float] = timings) -> Round:
                    extra = result.write(session) if result.write is not None else {}
                    return store_rounds.advance(
                        session, round_id=round_id, expected=stage,
                        to=result.to or store_rounds.next_state(stage),
                        outputs={stage: {**result.outputs, **extra}, "timings": timings})

                rnd = self.db.run_write(commit)
            except BaseException as exc:
                if not isinstance(exc, KeyboardInterrupt | SystemExit):
                    with self.db.write() as session:
                        store_rounds.record_error(session, round_id=round_id,
                                                  error=f"{stage}: {type(exc).__name__}: {exc}")
                raise
            if self.hook is not None:
                self.hook("advanced", stage)
            self.log(f"round {round_id}: {stage} done in {time.perf_counter() - started:.1f} s")
        return rnd

    def _run_dir(self, rnd: Round) -> Path:
        path = Path(rnd.run_dir or self.runs_dir / f"round-{rnd.id:04d}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _compute(self, config: RoundConfig, fn: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> Any:
        from feedback.stages import run_compute

        return run_compute(fn, *args, use_ray=config.use_ray, ray_address=config.ray_address,
                           num_cpus=config.ray_num_cpus, **kwargs)

    # -- stages -----------------------------------------------------------------------------

    def _collect(self, rnd: Round, config: RoundConfig) -> StageResult:
        """The deployed policy (the base model on a fresh store) and the round's prompts."""
        from store import repo
        from training.models import resolve_model

        assert rnd.id is not None
        run_dir = self._run_dir(rnd)
        (run_dir / "round_config.json").write_text(json.dumps(rnd.config, indent=2) + "\n")
        base_dir = resolve_model(config.base_model)
        task = config.task
        if task.kind == "arithmetic":
            train = arithmetic_prompts(task.train_prompts, task.seed * 100_003 + rnd.id,
                                       task.train_split)
            heldout = arithmetic_prompts(task.heldout_prompts, task.seed, task.heldout_split)
        else:
            train, heldout = self._store_prompts(config, rnd.id)
        round_id = rnd.id

        def write(session: Session) -> dict[str, Any]:
            policy = ensure_deployed(session, config, base_dir, actor=f"round:{round_id}")
            ids: dict[str, list[int]] = {"train": [], "heldout": []}
            for split, rows, split_name in (("train", train, task.train_split),
                                            ("heldout", heldout, task.heldout_split)):
                for row in rows:
                    prompt = repo.get_or_create_prompt(
                        session=session, content=row["prompt"], dataset=task.dataset,
                        split=split_name, reference=row.get("answer") or None)
                    # A train prompt that is already stored under another split (e.g. held
                    # out) is not used for training: no leak from eval into training.
                    if prompt.split == split_name and prompt.id not in ids[split]:
                        ids[split].append(prompt.id or 0)
            return {"policy_id": policy.id, "policy_name": policy.name,
                    "policy_dir": policy.weights_uri, "base_dir": base_dir,
                    "train_prompt_ids": ids["train"], "heldout_prompt_ids": ids["heldout"],
                    "label_watermark": store_rounds.max_label_id(session)}

        return StageResult({"run_dir": str(run_dir)}, write)

    def _store_prompts(self, config: RoundConfig, round_id: int
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        task = config.task
        with self.db.read() as session:
            def rows(split: str) -> list[dict[str, Any]]:
                return [{"prompt": p.content, "answer": p.reference, "id": p.id}
                        for p in session.exec(select(Prompt).where(
                            Prompt.dataset == task.dataset, Prompt.split == split)
                            .order_by(col(Prompt.id))).all()]
            train, heldout = rows(task.train_split), rows(task.heldout_split)
        if not train or not heldout:
            raise InvalidInput(f"dataset {task.dataset!r} needs prompts in splits "
                               f"{task.train_split!r} and {task.heldout_split!r}")
        rng = random.Random(task.seed * 100_003 + round_id)
        return (rng.sample(train, min(task.train_prompts, len(train))),
                heldout[:task.heldout_prompts])

    def _generate(self, rnd: Round, config: RoundConfig) -> StageResult:
        """K samples per train prompt from the deployed policy; tasks over them."""
        from feedback.stages import sample_completions
        from store import repo

        assert rnd.id is not None
        collect = (rnd.metrics or {})["collect"]
        gen = config.generate
        with self.db.read() as session:
            prompts = _prompts(session, collect["train_prompt_ids"])
        seed = config.seed * 1_000_003 + rnd.id
        params = {"n": gen.samples_per_prompt, "temperature": gen.temperature,
                  "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens, "seed": seed,
                  "stop": list(gen.stop), "include_stop": True}
        started = time.perf_counter()
        samples = self._compute(config, sample_completions, collect["policy_dir"],
                                [p.content for p in prompts], params, dtype=gen.dtype,
                                batch_size=gen.batch_size)
        sample_s = time.perf_counter() - started
        policy_id, round_id = collect["policy_id"], rnd.id
        source = f"round:{round_id}"
        kind = TaskKind(gen.task_kind)

        def write(session: Session) -> dict[str, Any]:
            counts: Counter[str] = Counter()
            rng = random.Random(seed)
            for prompt, group in zip(prompts, samples, strict=True):
                ids: list[int] = []
                for index, sample in enumerate(group):
                    counts["samples"] += 1
                    if not sample["text"].strip():
                        counts["empty"] += 1
                        continue
                    completion = repo.get_or_create_completion(
                        session=session, prompt_id=prompt.id or 0, content=sample["text"],
                        origin=f"policy:{policy_id}", policy_version_id=policy_id,
                        generation={"round_id": round_id, "sample_index": index,
                                    "temperature": gen.temperature, "seed": seed,
                                    "finish_reason": sample["finish_reason"]})
                    if completion.id not in ids:
                        ids.append(completion.id or 0)
                counts["distinct"] += len(ids)
                groups: list[list[int]]
                if kind == TaskKind.binary:
                    groups = [[i] for i in ids]
                elif kind == TaskKind.listwise:
                    groups = [ids[:16]] if len(ids) >= 2 else []
                else:
                    pairs = [list(p) for p in combinations(ids, 2)]
                    rng.shuffle(pairs)
                    groups = pairs[:gen.max_pairs_per_prompt]
                for group_ids in groups:
                    _task, created = repo.get_or_create_task(
                        session=session, kind=kind, prompt_id=prompt.id or 0,
                        completion_ids=group_ids, round_id=round_id, overlap=gen.overlap,
                        source=source)
                    counts["tasks"] += 1
                    counts["tasks_created"] += int(created)
            return dict(counts)

        return StageResult({"sample_s": round(sample_s, 3), "seed": seed}, write)

    def _judge_configs(self, paths: Sequence[str]) -> list[Any]:
        from feedback.config import LLMJudgeConfig, load_judge_config
        from store import deployments

        configs = []
        endpoint = self.judge_endpoint
        model = endpoint.model if endpoint is not None else None
        if model == DEPLOYED_MODEL:
            with self.db.read() as session:
                current = deployments.deployed(session)
            model = current.name if current is not None else None
        for path in paths:
            judge = load_judge_config(path)
            if isinstance(judge, LLMJudgeConfig) and endpoint is not None:
                judge = dataclasses.replace(judge, base_url=endpoint.base_url,
                                            model=model or judge.model)
            configs.append(judge)
        return configs

    def _run_judges(self, judges: Sequence[Any], round_id: int, source: str, ai_limit: int
                    ) -> dict[str, Any]:
        """Each judge over the tasks of `source` it has not labelled; an LLM judge stops at
        `ai_limit` labels in all (counting earlier attempts), so a resume never exceeds it."""
        from feedback.batch import RichProgress, TaskFilter, ensure_annotator, run_judge

        stats: dict[str, Any] = {}
        api_key = self.judge_endpoint.api_key if self.judge_endpoint else None
        for judge in judges:
            limit = None
            if judge.kind == "llm" and ai_limit:
                with self.db.write() as session:
                    annotator = ensure_annotator(session, judge)
                with self.db.read() as session:
                    task_ids = round_task_ids(session, round_id, source)
                    done = session.exec(select(Label.id).where(
                        Label.annotator_id == annotator.id,
                        col(Label.task_id).in_(task_ids))).all() if task_ids else []
                limit = max(0, ai_limit - len(done))
                if limit == 0:
                    stats[judge.annotator_name] = {"written": 0, "skipped": "limit reached"}
                    continue
            task_filter = TaskFilter(round_id=round_id, source=source, limit=limit)
            kwargs: dict[str, Any] = {"task_filter": task_filter,
                                      "progress": RichProgress() if self.progress else None}
            if judge.kind == "llm":
                kwargs["api_key"] = api_key
            run = asyncio.run(run_judge(self.db, judge, **kwargs))
            stats[judge.annotator_name] = {
                "written": run.written, "valid": run.valid, "invalid": run.invalid,
                "failed": run.failed, "requests": run.requests,
                "elapsed_s": round(run.elapsed_s, 3)}
        return stats

    def _label(self, rnd: Round, config: RoundConfig) -> StageResult:
        """AI and rule judges label the round's tasks; then wait for the human quota, if any."""
        assert rnd.id is not None
        round_id = rnd.id
        source = f"round:{round_id}"
        label = config.label
        if "label_started_at" not in (rnd.metrics or {}).get("label_progress", {}):
            with self.db.write() as session:
                store_rounds.record_progress(session, round_id=rnd.id, expected="label",
                                             outputs={"label_progress": {
                                                 "label_started_at": time.time()}})
            rnd = self._load(rnd.id)
        started_at = float((rnd.metrics or {})["label_progress"]["label_started_at"])
        stats = self._run_judges(self._judge_configs(label.judges), round_id, source,
                                 label.ai_task_limit)
        waited = "none"
        while label.human_quota:
            with self.db.read() as session:
                counts = _labels_by_source(session, round_task_ids(session, round_id, source))
            if counts["human"] >= label.human_quota:
                waited = "quota"
                break
            if label.human_deadline_s and time.time() - started_at >= label.human_deadline_s:
                waited = "deadline"
                break
            time.sleep(label.poll_s)
        with self.db.read() as session:
            counts = _labels_by_source(session, round_task_ids(session, round_id, source))
        return StageResult({"judges": stats, "labels": counts, "human_wait": waited})

    def _build_dataset(self, rnd: Round, config: RoundConfig) -> StageResult:
        """Export the round's labels with its filters; record the manifest and snapshot."""
        from dataclasses import asdict

        from store import __version__, repo
        from store.exporting import ExportFilters, _write_atomically, build_rows
        from store.values import sha256_hex

        assert rnd.id is not None
        run_dir = self._run_dir(rnd)
        ds = config.dataset
        export_format: Any = "trl-unpaired" if config.algo == "kto" else "trl-preference"
        filters = ExportFilters(
            sources=ds.sources, min_agreement=ds.min_agreement, round_id=rnd.id,
            split=config.task.train_split, pairs_as_unpaired=config.algo == "kto",
            min_judge_agreement=ds.min_judge_agreement,
            weight_ai_by_agreement=ds.weight_ai_by_agreement)
        with self.db.read() as session:
            built = build_rows(session, export_format, filters)
            prompts = _prompts(session, (rnd.metrics or {})["collect"]["train_prompt_ids"])
        payload = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
                          for row in built.rows).encode()
        digest = sha256_hex(payload)
        out = run_dir / "dataset.jsonl"
        filters_dict = {**asdict(filters), "sources": list(filters.sources)}
        counts = dict(sorted(built.counts.items()))
        manifest = {"sha256": digest, "format": export_format, "filters": filters_dict,
                    "counts": counts, "rows": len(built.rows), "round_id": rnd.id,
                    "prefloop_version": __version__, "database": self.db.url,
                    "judge_agreements": built.judge_agreements}
        # Files first (atomic renames), rows and the advance after: a kill in between leaves
        # files that the rerun rewrites byte for byte, and no snapshot row.
        _write_atomically(out, payload)
        _write_atomically(out.with_name(out.name + ".manifest.json"),
                          (json.dumps(manifest, indent=2) + "\n").encode())
        prompt_rows = [{"prompt": p.content, "answer": p.reference or "", "id": str(p.id)}
                       for p in prompts]
        prompts_payload = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                  for r in prompt_rows).encode()
        _write_atomically(run_dir / "prompts.jsonl", prompts_payload)

        def write(session: Session) -> dict[str, Any]:
            snapshot = repo.record_export(session=session, sha256=digest, format=export_format,
                                          path=str(out), filters=filters_dict, counts=counts,
                                          rows=len(built.rows))
            return {"snapshot_id": snapshot.id}

        return StageResult({"path": str(out), "sha256": digest, "rows": len(built.rows),
                            "format": export_format, "counts": counts,
                            "prompts_path": str(run_dir / "prompts.jsonl"),
                            "prompts_sha256": sha256_hex(prompts_payload)}, write)

    def _train(self, rnd: Round, config: RoundConfig) -> StageResult:
        """Train the candidate from the deployed policy; register it as a candidate version."""
        from feedback.stages import train_policy, train_reward_model
        from store import deployments

        assert rnd.id is not None
        metrics = rnd.metrics or {}
        collect, dataset = metrics["collect"], metrics["build_dataset"]
        if config.algo in ("dpo", "kto") and dataset["rows"] == 0:
            return StageResult({"skipped": "the round's export has no training rows"})
        run_dir = self._run_dir(rnd)
        reward_model = config.train.reward_model
        if config.algo == "ppo" and reward_model == "round":
            reward_model = self._compute(
                config, train_reward_model, data=dataset["path"], model=collect["policy_dir"],
                run_dir=str(run_dir / "reward_model"),
                overrides=config.train.reward_model_overrides)
        kwargs = {"data": dataset["path"], "prompts": dataset["prompts_path"],
                  "model": collect["policy_dir"], "run_dir": str(run_dir / "policy_run"),
                  "config_path": config.train.config, "overrides": config.train.overrides,
                  "reward_model": reward_model, "online_ray_address": config.ray_address}
        if config.algo in ("dpo", "kto"):
            result = self._compute(config, train_policy, config.algo, **kwargs)
        else:  # the online algorithms place their own Ray actors
            result = train_policy(config.algo, **kwargs)
        self.trainer_calls += int(bool(result.get("trained")))
        round_id = rnd.id

        def write(session: Session) -> dict[str, Any]:
            candidate = deployments.register_policy(
                session, name=f"round-{round_id}", base_model=config.base_model,
                weights_uri=str(result["model_dir"]), parent_id=collect["policy_id"],
                round_id=round_id)
            return {"candidate_id": candidate.id, "candidate_name": candidate.name}

        outputs = {"model_dir": str(result["model_dir"]), "steps": result.get("steps"),
                   "train_metrics": result.get("metrics", {}),
                   "trained_in_this_attempt": bool(result.get("trained")),
                   "train_s": result.get("train_s"), "reward_model": reward_model}
        return StageResult(outputs, write)

    def _evaluate(self, rnd: Round, config: RoundConfig) -> StageResult:
        """Candidate vs deployed on the held-out prompts: judges' win rates (both orders for
        LLM judges), rule rewards, KL to the reference."""
        from feedback.config import RuleJudgeConfig
        from feedback.rules import score_response
        from feedback.stages import evaluate_policies
        from store import repo

        assert rnd.id is not None
        metrics = rnd.metrics or {}
        collect, train = metrics["collect"], metrics["train"]
        if "candidate_id" not in train:
            return StageResult({"skipped": train.get("skipped", "no candidate")})
        ev = config.evaluate
        with self.db.read() as session:
            prompts = _prompts(session, collect["heldout_prompt_ids"])
        reference_dir = collect["base_dir"] if ev.kl_reference == "base" else \
            collect["policy_dir"]
        params = {"max_new_tokens": ev.max_new_tokens, "seed": config.seed,
                  "temperature": ev.temperature, "stop": list(config.generate.stop),
                  "include_stop": True}
        result = self._compute(config, evaluate_policies, train["model_dir"],
                               collect["policy_dir"], reference_dir,
                               [p.content for p in prompts], params,
                               dtype=config.generate.dtype, batch_size=config.generate.batch_size)
        judge_paths = ev.judges or config.label.judges
        judges = self._judge_configs(judge_paths)
        rule = next((j for j in judges if isinstance(j, RuleJudgeConfig)), None)
        reward: dict[str, Any] = {}
        if rule is not None:
            for who in ("candidate", "deployed"):
                scores = [score_response(rule.checks, text, p.reference)
                          for text, p in zip(result[who], prompts, strict=True)]
                reward[who] = sum(s.score or 0.0 for s in scores) / len(scores)
                for i, check in enumerate(rule.checks):
                    applied = [v for s in scores if (v := s.per_check[i]) is not None]
                    reward[f"{who}/{check.type}_{i}"] = (sum(applied) / len(applied)
                                                         if applied else None)
        source = f"round:{rnd.id}:eval"
        round_id = rnd.id
        candidate_id, deployed_id = train["candidate_id"], collect["policy_id"]

        # An empty answer cannot be stored or judged: it loses to any answer, ties with another
        # empty one (counted here, outside the judges, and added to every judge's tally).
        empty: Counter[str] = Counter()
        for cand, dep in zip(result["candidate"], result["deployed"], strict=True):
            if not cand.strip() or not dep.strip():
                empty["both" if not cand.strip() and not dep.strip() else
                      "candidate_only" if not cand.strip() else "deployed_only"] += 1

        def write(session: Session) -> dict[int, bool]:
            order: dict[int, bool] = {}
            for index, (prompt, cand, dep) in enumerate(zip(prompts, result["candidate"],
                                                            result["deployed"], strict=True)):
                if not cand.strip() or not dep.strip():
                    continue
                c = repo.get_or_create_completion(
                    session=session, prompt_id=prompt.id or 0, content=cand,
                    origin=f"policy:{candidate_id}", policy_version_id=candidate_id,
                    generation={"round_id": round_id, "eval": True, "temperature": 0.0})
                d = repo.get_or_create_completion(
                    session=session, prompt_id=prompt.id or 0, content=dep,
                    origin=f"policy:{deployed_id}", policy_version_id=deployed_id,
                    generation={"round_id": round_id, "eval": True, "temperature": 0.0})
                # Alternate which policy is canonical position a (LLM judges also swap).
                first = index % 2 == 0
                ids = [c.id or 0, d.id or 0] if first else [d.id or 0, c.id or 0]
                task, _ = repo.get_or_create_task(session=session, kind=TaskKind.pairwise,
                                                  prompt_id=prompt.id or 0, completion_ids=ids,
                                                  round_id=round_id, source=source)
                stored = repo.task_completion_ids(session=session, task_id=task.id or 0)
                order[task.id or 0] = stored[0] == c.id
            return order

        candidate_first = self.db.run_write(write)
        judge_stats = self._run_judges(judges, rnd.id, source, ev.ai_task_limit)
        with self.db.read() as session:
            rates = win_rates(session, list(candidate_first), candidate_first, empty=empty,
                              judges=[j.annotator_name for j in judges])
        gate = ev.gate_judge or judges[0].annotator_name
        gate_stats = rates.get(gate, {})
        gate_rate = gate_stats.get("win_rate" if ev.ties == "half" else "decisive_win_rate")
        kls = result["kl"]
        outputs = {"win_rate": gate_rate, "gate_judge": gate, "ties": ev.ties,
                   "decisive": gate_stats.get("wins", 0) + gate_stats.get("losses", 0),
                   "win_rates": rates,
                   "reward": reward, "kl": sum(kls) / len(kls) if kls else 0.0,
                   "kl_reference": ev.kl_reference, "n_prompts": len(prompts),
                   "n_tasks": len(candidate_first), "judges": judge_stats,
                   "empty_answers": dict(empty),
                   "mean_tokens": sum(result["candidate_tokens"]) / max(len(prompts), 1),
                   "timings": result["timings"],
                   "samples": [{"prompt_id": p.id, "candidate": c[:300], "deployed": d[:300]}
                               for p, c, d in list(zip(prompts, result["candidate"],
                                                       result["deployed"], strict=True))[:3]]}
        return StageResult(outputs)

    def _decide(self, rnd: Round, config: RoundConfig) -> StageResult:
        """Promote the candidate if its win rate clears the threshold, else reject it."""
        from store import deployments

        metrics = rnd.metrics or {}
        train, evaluation = metrics.get("train", {}), metrics.get("evaluate", {})
        threshold = config.evaluate.win_rate_threshold
        if "candidate_id" not in train:
            return StageResult({"decision": "rejected", "reason": train.get("skipped")},
                               to="rejected")
        promote, reason = promotion_decision(
            evaluation.get("win_rate"), int(evaluation.get("decisive", 0)),
            threshold=threshold, min_decisive=config.evaluate.min_decisive,
            ties=config.evaluate.ties)
        candidate_id, actor = int(train["candidate_id"]), f"round:{rnd.id}"

        def write(session: Session) -> dict[str, Any]:
            if promote:
                deployments.promote(session, policy_id=candidate_id, actor=actor)
            else:
                deployments.reject(session, policy_id=candidate_id, actor=actor, reason=reason)
            now = deployments.deployed(session)
            return {"deployed_id": now.id if now else None}

        return StageResult({"decision": "promoted" if promote else "rejected",
                            "reason": reason, "threshold": threshold}, write,
                           to="promoted" if promote else "rejected")


# ---------------------------------------------------------------------------------------------
# Summaries (CLI table, demo, admin view)


@dataclass(frozen=True)
class RoundSummary:
    id: int
    algo: str
    state: str
    trigger: str | None
    labels: dict[str, int]
    win_rate: float | None
    reward_candidate: float | None
    reward_deployed: float | None
    kl: float | None
    train_rows: int | None
    wall_s: float
    timings: dict[str, float]
    error: str | None
    created_at: Any

    @classmethod
    def of(cls, rnd: Round) -> RoundSummary:
        m = rnd.metrics or {}
        ev = m.get("evaluate", {})
        reward = ev.get("reward", {})
        timings = {k: float(v) for k, v in m.get("timings", {}).items()}
        return cls(id=rnd.id or 0, algo=rnd.algo, state=rnd.state, trigger=rnd.trigger,
                   labels=m.get("label", {}).get("labels", {}), win_rate=ev.get("win_rate"),
                   reward_candidate=reward.get("candidate"),
                   reward_deployed=reward.get("deployed"), kl=ev.get("kl"),
                   train_rows=m.get("build_dataset", {}).get("rows"),
                   wall_s=sum(timings.values()), timings=timings, error=rnd.error,
                   created_at=rnd.created_at)


def summaries(db: Database, limit: int = 100) -> list[RoundSummary]:
    with db.read() as session:
        return [RoundSummary.of(r) for r in store_rounds.list_rounds(session, limit=limit)]


def round_task_counts(db: Database, round_id: int) -> dict[str, int]:
    """Rows a round owns (tests and `round status`): tasks, items, labels of train and eval."""
    with db.read() as session:
        out = {}
        for name, source in (("train", f"round:{round_id}"), ("eval", f"round:{round_id}:eval")):
            ids = round_task_ids(session, round_id, source)
            out[f"{name}_tasks"] = len(ids)
            out[f"{name}_labels"] = session.exec(select(Label.id).where(
                col(Label.task_id).in_(ids))).all().__len__() if ids else 0
            out[f"{name}_items"] = len(session.exec(select(TaskItem.id).where(
                col(TaskItem.task_id).in_(ids))).all()) if ids else 0
        return out
