"""The batch labeler: run a judge over the store's tasks, asynchronously and idempotently.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise,limit=500 \
        --concurrency 16 --max-requests 2000 --budget-usd 5

A thin shell around the pure core (feedback/judge.py, feedback/rules.py): it loads the tasks the
judge has not labelled yet, sends each call through a bounded semaphore, a rate limiter and a
per-call deadline, retries 429/5xx/timeouts with jittered backoff honouring Retry-After, and
hands the finished labels to one writer that stores them in batches through store.repo. One
label per (task, judge identity) is a database constraint, so a rerun or a resume after a crash
only fills what is missing and nothing is ever written twice; a crash loses at most the batch in
flight. Malformed outputs are stored as `invalid` labels and counted, never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlmodel import Session, col, select

from feedback.config import (
    ConfigError,
    JudgeConfig,
    LLMJudgeConfig,
    RewardModelJudgeConfig,
    RuleJudgeConfig,
)
from feedback.judge import (
    Decision,
    OrderResult,
    build_messages,
    combine_binary,
    combine_listwise,
    combine_pairwise,
    conversation_text,
    flag_injection,
    make_nonce,
    parse_verdict,
    permute,
    seeded_orders,
    token_confidence,
    verdict_schema,
)
from feedback.llm import CallFailed, CallResult, ChatEndpoint, EndpointUnusable, backoff_delay
from store import repo
from store.calibration import raise_task_priority
from store.db import Database
from store.errors import Conflict, IdempotencyMismatch, InvalidInput
from store.models import (
    Annotator,
    AnnotatorKind,
    Completion,
    Label,
    LabelStatus,
    Prompt,
    Task,
    TaskItem,
    TaskKind,
)
from store.values import content_text

# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class TaskView:
    """What a judge sees of a task: the prompt and the responses in canonical order."""

    task_id: int
    task_key: str
    kind: str
    question: str
    responses: tuple[str, ...]
    reference: str | None = None
    prompt: Any = None  # the raw prompt content (text or chat messages)


@dataclass(frozen=True)
class TaskFilter:
    """`--tasks` filter: comma-separated key=value, e.g. `kind=pairwise,dataset=math,limit=100`.

    Keys: kind, dataset, split, round, source, ids (a-b), limit, gold (1: only gold tasks),
    human (1: only tasks with a human label, i.e. a calibration set).
    """

    kinds: tuple[str, ...] = ()
    dataset: str | None = None
    split: str | None = None
    round_id: int | None = None
    source: str | None = None
    id_min: int | None = None
    id_max: int | None = None
    limit: int | None = None
    gold_only: bool = False
    human_labelled_only: bool = False

    @classmethod
    def parse(cls, text: str | None) -> TaskFilter:
        if not text:
            return cls()
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise InvalidInput(f"--tasks: expected key=value, got {part!r}")
            try:
                if key == "kind":
                    values["kinds"] = (*values.get("kinds", ()), *value.split("|"))
                elif key in ("dataset", "split", "source"):
                    values[key] = value
                elif key == "round":
                    values["round_id"] = int(value)
                elif key == "ids":
                    low, _, high = value.partition("-")
                    values["id_min"] = int(low) if low else None
                    values["id_max"] = int(high) if high else None
                elif key == "limit":
                    values["limit"] = int(value)
                elif key in ("gold", "human"):
                    flag = value.lower() in ("1", "true", "yes")
                    values["gold_only" if key == "gold" else "human_labelled_only"] = flag
                else:
                    raise InvalidInput(f"--tasks: unknown key {key!r}")
            except ValueError:
                raise InvalidInput(f"--tasks: bad value for {key}: {value!r}") from None
        unknown_kinds = set(values.get("kinds", ())) - {k.value for k in TaskKind}
        if unknown_kinds:
            raise InvalidInput(f"--tasks: unknown kind {sorted(unknown_kinds)}")
        return cls(**values)


def load_pending(session: Session, *, annotator_id: int, kinds: Sequence[str],
                 task_filter: TaskFilter) -> list[TaskView]:
    """Tasks of these kinds that pass the filter and this annotator has not labelled yet."""
    if task_filter.kinds:
        kinds = [k for k in kinds if k in task_filter.kinds]
    labelled = select(Label.task_id).where(Label.annotator_id == annotator_id)
    query = (select(Task, Prompt).join(Prompt, col(Prompt.id) == col(Task.prompt_id))
             .where(col(Task.kind).in_([TaskKind(k) for k in kinds]),
                    col(Task.id).not_in(labelled))
             .order_by(col(Task.id)))
    f = task_filter
    if f.dataset is not None:
        query = query.where(Prompt.dataset == f.dataset)
    if f.split is not None:
        query = query.where(Prompt.split == f.split)
    if f.round_id is not None:
        query = query.where(Task.round_id == f.round_id)
    if f.source is not None:
        query = query.where(Task.source == f.source)
    if f.id_min is not None:
        query = query.where(col(Task.id) >= f.id_min)
    if f.id_max is not None:
        query = query.where(col(Task.id) <= f.id_max)
    if f.gold_only:
        query = query.where(col(Task.gold).is_not(None))
    if f.human_labelled_only:
        humans = (select(Label.task_id).join(Annotator, col(Annotator.id) == col(
            Label.annotator_id)).where(Annotator.kind == AnnotatorKind.human))
        query = query.where(col(Task.id).in_(humans))
    if f.limit is not None:
        query = query.limit(f.limit)
    rows = session.exec(query).all()
    if not rows:
        return []
    texts: dict[int, list[str]] = {task.id or 0: [] for task, _ in rows}
    ids = list(texts)
    for start in range(0, len(ids), 500):
        for item, completion in session.exec(
            select(TaskItem, Completion)
            .join(Completion, col(Completion.id) == col(TaskItem.completion_id))
            .where(col(TaskItem.task_id).in_(ids[start:start + 500]))
            .order_by(col(TaskItem.task_id), col(TaskItem.position))
        ).all():
            texts[item.task_id].append(content_text(completion.content))
    return [TaskView(task_id=task.id or 0, task_key=task.task_key, kind=task.kind.value,
                     question=conversation_text(prompt.content),
                     responses=tuple(texts[task.id or 0]), reference=prompt.reference,
                     prompt=prompt.content)
            for task, prompt in rows]


def ensure_annotator(session: Session, config: JudgeConfig) -> Annotator:
    """The judge's annotator row; a different rubric/settings under the same name is refused."""
    kind = AnnotatorKind.rule if isinstance(config, RuleJudgeConfig) else AnnotatorKind.ai
    identity = json.loads(json.dumps(config.identity()))  # as stored: tuples become lists
    annotator = repo.get_or_create_annotator(
        session=session, name=config.annotator_name, kind=kind, model=config.model,
        rubric_version=config.rubric_version, config=identity)
    if annotator.config != identity:
        changed = sorted(k for k in set(identity) | set(annotator.config or {})
                         if (annotator.config or {}).get(k) != identity.get(k))
        raise ConfigError(
            f"judge {config.annotator_name!r} already exists with different settings "
            f"({', '.join(changed)}); bump the rubric/judge version or set a new name")
    return annotator


# ---------------------------------------------------------------------------------------------
# Plans: the calls one task needs, and how their outcomes become a label


@dataclass(frozen=True)
class CallSpec:
    shown_order: tuple[int, ...]
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    candidates: tuple[str, ...]  # shown order, for the copied-verdict check


def plan_calls(config: LLMJudgeConfig, view: TaskView, annotator_name: str) -> list[CallSpec]:
    k = len(view.responses)
    seed_material = f"{config.seed}|{annotator_name}|{view.task_key}"
    if view.kind == "pairwise":
        orders = seeded_orders(2, 2, seed_material=seed_material)
        if not config.both_orders:
            # One order, chosen by a seeded coin per task (AlpacaEval randomises the order).
            digest = hashlib.sha256(seed_material.encode()).digest()
            orders = [orders[digest[0] % 2]]
    elif view.kind == "listwise":
        orders = seeded_orders(k, config.listwise_shuffles, seed_material=seed_material)
    else:
        orders = [(0,)]
    specs = []
    for order in orders:
        shown = permute(view.responses, order)
        nonce = make_nonce()
        while any(nonce in text for text in shown) or nonce in view.question:
            nonce = make_nonce()
        messages = build_messages(config.rubric, view.kind, question=view.question,
                                  shown_texts=shown, nonce=nonce,
                                  principles=config.constitution, reference=view.reference)
        specs.append(CallSpec(tuple(order), messages, verdict_schema(view.kind, k),
                              tuple(shown)))
    return specs


def decide_llm(config: LLMJudgeConfig, view: TaskView, specs: Sequence[CallSpec],
               results: Sequence[CallResult]) -> Decision:
    orders = []
    for spec, result in zip(specs, results, strict=True):
        verdict = parse_verdict(view.kind, len(view.responses), result.text, spec.candidates)
        confidence = None
        if verdict.valid and result.tokens and result.text is not None:
            confidence = token_confidence(result.tokens, result.text, verdict.value_offset)
        orders.append(OrderResult(spec.shown_order, verdict, confidence))
    if view.kind == "pairwise":
        return combine_pairwise(orders, on_inconsistent=config.on_inconsistent)
    if view.kind == "listwise":
        return combine_listwise(orders)
    return combine_binary(orders)


# ---------------------------------------------------------------------------------------------
# Rate limiting and accounting


class RateLimiter:
    """At most `rate` starts per second, measured on the actual release times.

    Each acquire waits until 1/rate after the previous *release* (not after a planned slot), so
    a waiter that wakes late pushes the next one back instead of letting two go together: no
    window of length W ever holds more than floor(rate * W) + 1 starts. Waiters queue in FIFO
    order on the lock.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / rate
        self._clock = clock
        self._last: float | None = None
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            if self._last is not None:
                delay = self._last + self.interval - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            self._last = self._clock()


@dataclass
class RunStats:
    annotator_id: int = 0
    annotator_name: str = ""
    tasks_pending: int = 0
    written: int = 0  # labels stored (valid + invalid)
    valid: int = 0
    invalid: int = 0
    inconsistent: int = 0  # pairwise orders disagreed (tie or routed)
    flagged: int = 0  # tasks with a candidate flagged as an injection attempt
    routed: int = 0  # tasks whose priority was raised for humans
    already_labelled: int = 0  # another run wrote the label first
    failed: int = 0  # gave up (retries exhausted, request budget): left for a rerun
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spend_usd: float = 0.0
    max_call_s: float = 0.0
    elapsed_s: float = 0.0
    stopped: str | None = None  # why the run stopped early, if it did

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["errors"] = dict(self.errors)
        out["invalid_reasons"] = dict(self.invalid_reasons)
        return out


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def update(self, stats: RunStats) -> None: ...

    def stop(self) -> None: ...


class RichProgress:
    """A progress bar with rate, ETA, invalid count and spend (rich, on stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed_text]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("invalid {task.fields[invalid]}"),
            TextColumn("${task.fields[spend]:.4f}"), console=Console(stderr=True),
        )
        self._task: Any = None

    def start(self, total: int, description: str) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, invalid=0, spend=0.0,
                                        speed_text="")

    def update(self, stats: RunStats) -> None:
        done = stats.written + stats.already_labelled + stats.failed
        task = self._bar.tasks[0]
        speed = f"{task.speed:.1f} labels/s" if task.speed else ""
        self._bar.update(self._task, completed=done, invalid=stats.invalid,
                         spend=stats.spend_usd, speed_text=speed)

    def stop(self) -> None:
        self._bar.stop()


# ---------------------------------------------------------------------------------------------
# The runner


class _GiveUp(Exception):
    pass


class _Stop(Exception):
    pass


@dataclass
class _Budget:
    max_requests: int | None
    used: int = 0

    def take(self, n: int) -> bool:
        if self.max_requests is not None and self.used + n > self.max_requests:
            return False
        self.used += n
        return True


class BatchRunner:
    """One run of one judge over the pending tasks (see the module docstring)."""

    def __init__(self, db: Database, config: JudgeConfig, *, task_filter: TaskFilter | None = None,
                 concurrency: int | None = None, max_requests: int | None = None,
                 budget_usd: float | None = None, progress: Progress | None = None,
                 api_key: str | None = None, base_url: str | None = None,
                 model: str | None = None, rng: random.Random | None = None,
                 on_call: Callable[[float, float], None] | None = None):
        if isinstance(config, LLMJudgeConfig) and (base_url or model):
            from dataclasses import replace

            config = replace(config, base_url=base_url or config.base_url,
                             model=model or config.model)
        self.db = db
        self.config = config
        self.task_filter = task_filter or TaskFilter()
        self.concurrency = concurrency or config.limits.concurrency
        self.budget = _Budget(max_requests)
        self.budget_usd = budget_usd
        self.progress = progress
        self.api_key = api_key
        self.rng = rng or random.Random()
        self.on_call = on_call  # (start, end) of every attempt, for tests and benchmarks
        self.stats = RunStats()
        self._endpoint: ChatEndpoint | None = None
        self._scorer: Any = None  # RewardScorer, for reward-model judges
        self._stop: str | None = None

    # -- calls ------------------------------------------------------------------------------

    async def _call(self, spec: CallSpec, semaphore: asyncio.Semaphore,
                    limiter: RateLimiter) -> CallResult:
        assert self._endpoint is not None
        limits = self.config.limits
        attempt = 0
        while True:
            async with semaphore:
                await limiter.acquire()
                start = time.monotonic()
                try:
                    result = await self._endpoint.complete(spec.messages, spec.schema)
                    failure: CallFailed | None = None
                except CallFailed as exc:
                    result, failure = None, exc
                finally:
                    end = time.monotonic()
                    self.stats.requests += 1
                    self.stats.max_call_s = max(self.stats.max_call_s, end - start)
                    if self.on_call is not None:
                        self.on_call(start, end)
            if failure is None:
                assert result is not None
                self._account(result)
                return result
            self.stats.errors[failure.kind] += 1
            if not failure.retryable:
                raise failure
            attempt += 1
            if attempt > limits.max_retries:
                raise _GiveUp(f"retries exhausted ({failure.kind})")
            if not self.budget.take(1):  # the retry would exceed --max-requests
                self._stop = "max_requests"
                raise _GiveUp("max_requests")
            self.stats.retries += 1
            delay = 0.0 if failure.kind == "fallback" else backoff_delay(
                attempt, base_s=limits.backoff_base_s, max_s=limits.backoff_max_s,
                retry_after=failure.retry_after, rng=self.rng)
            await asyncio.sleep(delay)

    def _account(self, result: CallResult) -> None:
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.completion_tokens += result.completion_tokens
        if isinstance(self.config, LLMJudgeConfig):
            self.stats.spend_usd += (
                result.prompt_tokens * self.config.price_input_per_mtok
                + result.completion_tokens * self.config.price_output_per_mtok) / 1e6

    # -- one task ---------------------------------------------------------------------------

    async def _judge(self, view: TaskView, semaphore: asyncio.Semaphore, limiter: RateLimiter
                     ) -> Decision | None:
        config = self.config
        if isinstance(config, RuleJudgeConfig):
            from feedback.rules import decide

            return decide(config, view.kind, view.responses, view.reference)
        if isinstance(config, RewardModelJudgeConfig):
            from feedback.reward_model import decide_from_rewards

            assert self._scorer is not None
            rewards = await asyncio.to_thread(self._scorer.score, view.prompt, view.responses)
            return decide_from_rewards(view.kind, rewards, tie_margin=config.tie_margin,
                                       binary_threshold=config.binary_threshold)
        assert isinstance(config, LLMJudgeConfig)
        specs = plan_calls(config, view, self.stats.annotator_name)
        if not self.budget.take(len(specs)):
            self._stop = "max_requests"
            return None
        calls = [asyncio.create_task(self._call(s, semaphore, limiter)) for s in specs]
        try:
            try:
                results = await asyncio.gather(*calls)
            except BaseException:
                # One call failed for good: stop its siblings instead of paying for them.
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                raise
        except CallFailed as exc:  # the endpoint refuses this request for good
            return Decision(None, None, specs[0].shown_order,
                            {"reason": "request_rejected", "error": str(exc)})
        return decide_llm(config, view, specs, results)

    def _finish(self, view: TaskView, decision: Decision) -> tuple[Decision, bool]:
        """Add injection flags and the routing decision to a task's decision."""
        flags = {str(i): list(f) for i, text in enumerate(view.responses)
                 if (f := flag_injection(text))}
        details = dict(decision.details)
        if flags:
            details["flags"] = flags
        routing = self.config.routing
        route = decision.route
        if flags and routing.on_flagged == "route":
            route = True
        if decision.confidence is not None and decision.confidence < routing.min_confidence:
            route = True
        if route:
            details["routed"] = True
        return Decision(decision.value, decision.confidence, decision.shown_order, details,
                        route), bool(flags)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, batch: list[tuple[TaskView, Decision]]) -> tuple[list[bool], int]:
        """Store a batch in one transaction; which items were written, and priorities raised."""
        annotator_id = self.stats.annotator_id
        priority = self.config.routing.priority

        def write(session: Session) -> tuple[list[bool], int]:
            written: list[bool] = []
            routed: list[int] = []
            for view, decision in batch:
                try:
                    result = repo.submit_label(
                        session=session, task_id=view.task_id, annotator_id=annotator_id,
                        value=decision.value,
                        status=LabelStatus.submitted if decision.valid else LabelStatus.invalid,
                        shown_order=list(decision.shown_order) if decision.shown_order
                        and len(decision.shown_order) == len(view.responses) else None,
                        confidence=decision.confidence, details=decision.details,
                        idempotency_key=f"judge:{view.task_key}",
                    )
                except (Conflict, IdempotencyMismatch):  # another run labelled it first
                    written.append(False)
                    continue
                written.append(not result.replayed)  # replayed: the very same label, stored
                if result.replayed:
                    continue
                if decision.route:
                    routed.append(view.task_id)
            changed = raise_task_priority(session=session, task_ids=routed, priority=priority)
            return written, changed

        return self.db.run_write(write)

    async def _writer(self, queue: asyncio.Queue[tuple[TaskView, Decision] | None]) -> None:
        batch_size = self.config.limits.write_batch
        batch: list[tuple[TaskView, Decision]] = []
        done = False

        async def flush() -> None:
            nonlocal batch
            if not batch:
                return
            pending, batch = batch, []
            written, _ = await asyncio.to_thread(self._write, pending)
            for was_written, (_view, decision) in zip(written, pending, strict=True):
                if was_written:
                    self.stats.written += 1
                    self._count(decision)
                else:
                    self.stats.already_labelled += 1
            if self.progress is not None:
                self.progress.update(self.stats)

        try:
            while not done:
                item = await queue.get()
                if item is None:
                    done = True
                else:
                    batch.append(item)
                # Drain what is already waiting, up to a batch, then write.
                while not done and len(batch) < batch_size and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is None:
                        done = True
                    else:
                        batch.append(nxt)
                await flush()
        except asyncio.CancelledError:
            # Interrupted: store what was already paid for, then stop.
            while not queue.empty():
                nxt = queue.get_nowait()
                if nxt is not None:
                    batch.append(nxt)
            if batch:
                await asyncio.shield(asyncio.to_thread(self._write, batch))
            raise

    def _count(self, decision: Decision) -> None:
        if decision.valid:
            self.stats.valid += 1
        else:
            self.stats.invalid += 1
            reason = decision.details.get("reason", "invalid_output")
            errors = decision.details.get("errors") or [None]
            self.stats.invalid_reasons[f"{reason}:{errors[0]}" if errors[0] else reason] += 1
        if decision.details.get("consistent") is False:
            self.stats.inconsistent += 1
        if decision.details.get("flags"):
            self.stats.flagged += 1
        if decision.route:
            self.stats.routed += 1

    async def _worker(self, views: asyncio.Queue[TaskView], out: asyncio.Queue[Any],
                      semaphore: asyncio.Semaphore, limiter: RateLimiter) -> None:
        while self._stop is None:
            try:
                view = views.get_nowait()
            except asyncio.QueueEmpty:
                return
            if self.budget_usd is not None and self.stats.spend_usd >= self.budget_usd:
                self._stop = "budget_usd"
                return
            try:
                decision = await self._judge(view, semaphore, limiter)
            except _GiveUp:
                self.stats.failed += 1
                continue
            if decision is None:  # out of request budget before starting
                return
            final, _ = self._finish(view, decision)
            await out.put((view, final))

    async def run(self) -> RunStats:
        started = time.monotonic()
        config = self.config
        with self.db.write() as session:
            annotator = ensure_annotator(session, config)
            self.stats.annotator_id = annotator.id or 0
            self.stats.annotator_name = annotator.name
        with self.db.read() as session:
            views = load_pending(session, annotator_id=self.stats.annotator_id,
                                 kinds=config.task_kinds, task_filter=self.task_filter)
        self.stats.tasks_pending = len(views)
        if isinstance(config, LLMJudgeConfig):
            self._endpoint = ChatEndpoint(
                model=config.model, base_url=config.base_url, api_key=self.api_key,
                timeout_s=config.limits.timeout_s, structured_output=config.structured_output,
                logprobs=config.logprobs, temperature=config.temperature,
                max_tokens=config.max_tokens, max_connections=self.concurrency)
        if isinstance(config, RewardModelJudgeConfig) and views:
            from feedback.reward_model import RewardScorer

            self._scorer = await asyncio.to_thread(RewardScorer, config.model_path,
                                                   max_length=config.max_length)
        if self.progress is not None:
            self.progress.start(len(views), config.annotator_name)
        queue: asyncio.Queue[TaskView] = asyncio.Queue()
        for view in views:
            queue.put_nowait(view)
        out: asyncio.Queue[tuple[TaskView, Decision] | None] = asyncio.Queue()
        semaphore = asyncio.Semaphore(self.concurrency)
        limiter = RateLimiter(config.limits.rate_limit_rps)
        writer = asyncio.create_task(self._writer(out))
        n_workers = min(len(views), self.concurrency if isinstance(config, LLMJudgeConfig)
                        else 1)
        workers = [asyncio.create_task(self._worker(queue, out, semaphore, limiter))
                   for _ in range(n_workers)]
        try:
            results = await asyncio.gather(*workers, return_exceptions=True)
            fatal = [r for r in results if isinstance(r, BaseException)]
            await out.put(None)
            await writer
            if fatal:
                raise fatal[0]
        except BaseException:
            for task in (*workers, writer):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*workers, writer, return_exceptions=True)
            raise
        finally:
            if self._endpoint is not None:
                await self._endpoint.aclose()
            if self.progress is not None:
                self.progress.stop()
            self.stats.elapsed_s = time.monotonic() - started
        self.stats.stopped = self._stop
        return self.stats


async def run_judge(db: Database, config: JudgeConfig, **kw: Any) -> RunStats:
    """Run `config` over the pending tasks; see BatchRunner for the keyword arguments."""
    if config.kind == "ensemble":
        from feedback.ensemble import run_ensemble

        return await run_ensemble(db, config, **kw)
    return await BatchRunner(db, config, **kw).run()


__all__ = ["BatchRunner", "EndpointUnusable", "RunStats", "TaskFilter", "TaskView",
           "load_pending", "run_judge"]
