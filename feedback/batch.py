"""The batch labeler: run a judge over the store's tasks, asynchronously and idempotently.

    prefloop judge run --judge judges/pairwise.toml --tasks kind=pairwise,limit=500 \
        --concurrency 16 --max-requests 2000 --budget-usd 5

A thin shell around the pure core (feedback/judge.py, feedback/plans.py, feedback/rules.py): it
loads the tasks the judge has not labelled yet (feedback/tasks.py), sends each call through a
bounded semaphore, a rate limiter and a per-call deadline, retries 429/5xx/timeouts with
jittered backoff honouring Retry-After, and hands the finished decisions to one writer task that
stores them in batches through the store's judge-label writer (store/judge_labels.py). One label
per (task, judge identity) is a database constraint, so a rerun or a resume after a crash only
fills what is missing and nothing is ever written twice; a crash loses at most the batch in
flight. Malformed outputs are stored as `invalid` labels and counted, never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from feedback.config import (
    EnsembleConfig,
    JudgeConfig,
    LLMJudgeConfig,
    RewardModelJudgeConfig,
    RuleJudgeConfig,
)
from feedback.ensemble import combine_ensemble
from feedback.judge import Decision, flag_injection
from feedback.label_logprobs import LABEL_MAX_TOKENS
from feedback.llm import CallFailed, CallResult, ChatEndpoint, backoff_delay
from feedback.plans import CallSpec, decide_llm, plan_calls
from feedback.progress import Progress, RunStats
from feedback.tasks import JudgeTask, TaskFilter, ensure_annotator, load_pending
from store.db import Database
from store.judge_labels import JudgeLabel, record_judge_labels

# ---------------------------------------------------------------------------------------------
# Rate limiting


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


# ---------------------------------------------------------------------------------------------
# The runner


class _GiveUp(Exception):
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

    async def _judge(self, view: JudgeTask, semaphore: asyncio.Semaphore, limiter: RateLimiter
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

    def _finish(self, view: JudgeTask, decision: Decision) -> tuple[Decision, bool]:
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

    def _write(self, batch: list[tuple[JudgeTask, Decision]]) -> list[bool]:
        """Store a batch in one transaction through the store's judge-label writer; which of
        its labels were written now."""
        labels = [JudgeLabel(
            task_id=view.task_id, task_key=view.task_key, value=decision.value,
            confidence=decision.confidence, details=decision.details, route=decision.route,
            # Only a full permutation is a shown order (a single-order call shows one item).
            shown_order=list(decision.shown_order) if decision.shown_order
            and len(decision.shown_order) == len(view.responses) else None)
            for view, decision in batch]
        annotator_id, priority = self.stats.annotator_id, self.config.routing.priority
        return self.db.run_write(lambda session: record_judge_labels(
            session=session, annotator_id=annotator_id, labels=labels,
            priority=priority)).written

    async def _writer(self, queue: asyncio.Queue[tuple[JudgeTask, Decision] | None]) -> None:
        batch_size = self.config.limits.write_batch
        batch: list[tuple[JudgeTask, Decision]] = []
        done = False

        async def flush() -> None:
            nonlocal batch
            if not batch:
                return
            pending, batch = batch, []
            written = await asyncio.to_thread(self._write, pending)
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

    async def _worker(self, views: asyncio.Queue[JudgeTask], out: asyncio.Queue[Any],
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
            by_logprobs = config.verdict == "logprobs"
            self._endpoint = ChatEndpoint(
                model=config.model, base_url=config.base_url, api_key=self.api_key,
                timeout_s=config.limits.timeout_s,
                # A log-prob verdict is one label token: no JSON schema, a few tokens at most.
                structured_output="off" if by_logprobs else config.structured_output,
                logprobs=config.logprobs, temperature=config.temperature,
                max_tokens=LABEL_MAX_TOKENS if by_logprobs else config.max_tokens,
                max_connections=self.concurrency,
                top_logprobs=config.top_logprobs if by_logprobs else 0)
        if isinstance(config, RewardModelJudgeConfig) and views:
            from feedback.reward_model import RewardScorer

            self._scorer = await asyncio.to_thread(RewardScorer, config.model_path,
                                                   max_length=config.max_length)
        if self.progress is not None:
            self.progress.start(len(views), config.annotator_name)
        queue: asyncio.Queue[JudgeTask] = asyncio.Queue()
        for view in views:
            queue.put_nowait(view)
        out: asyncio.Queue[tuple[JudgeTask, Decision] | None] = asyncio.Queue()
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
    """Run `config` over the pending tasks; see BatchRunner for the keyword arguments.

    An ensemble runs each member first (each one idempotent under its own identity), then
    combines their stored labels (feedback/ensemble.py).
    """
    if isinstance(config, EnsembleConfig):
        members = [await BatchRunner(db, member, **kw).run() for member in config.members]
        return await combine_ensemble(db, config, members)
    return await BatchRunner(db, config, **kw).run()


__all__ = ["BatchRunner", "RateLimiter", "run_judge"]
