"""20 writer threads submit labels for the same tasks for 10 s: nothing lost, nothing duplicated.

Each thread plays annotators drawn from a shared pool, so threads collide on the same
(task, annotator) and on the same idempotency keys: a collision must end as a replay (same key,
same body), a conflict (another key) or a mismatch (same key, other body), never as a second row.
Every acknowledged submit is then checked against the database row by row.
"""

import functools
import random
import threading
import time
from collections import defaultdict

from sqlmodel import select

from store import repo
from store.errors import Conflict, IdempotencyMismatch
from store.models import AuditEvent, Label, TaskKind
from tests.store import factories

THREADS = 20
SECONDS = 10.0
N_TASKS = 30
N_ANNOTATORS = 8


def _submit(session, *, task_id, annotator_id, choice, key):
    return repo.submit_label(session=session, task_id=task_id, annotator_id=annotator_id,
                             value={"choice": choice}, idempotency_key=key)


def test_twenty_writers_for_ten_seconds_lose_and_duplicate_nothing(db):
    with db.write() as s:
        tasks = [factories.task(s, TaskKind.pairwise, prompt=f"prompt {i}").id
                 for i in range(N_TASKS)]
        annotators = [factories.annotator(s, f"annotator-{i}").id for i in range(N_ANNOTATORS)]
    acked: dict[tuple[int, int], set[tuple[int, str]]] = defaultdict(set)
    outcomes: dict[str, int] = defaultdict(int)
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            task_id, annotator_id = rng.choice(tasks), rng.choice(annotators)
            # The key is derived from (task, annotator), as a client retrying a submit would
            # reuse it; the body is random, so some collisions are mismatches.
            key = f"{task_id}-{annotator_id}"
            choice = rng.choice(["a", "b"])
            try:
                result = db.run_write(functools.partial(
                    _submit, task_id=task_id, annotator_id=annotator_id, choice=choice, key=key))
            except (Conflict, IdempotencyMismatch) as exc:
                with lock:
                    outcomes[type(exc).__name__] += 1
                continue
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                return
            with lock:
                acked[(task_id, annotator_id)].add((result.label.id, result.label.choice))
                outcomes["replayed" if result.replayed else "created"] += 1

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    with db.read() as s:
        rows = s.exec(select(Label)).all()
        creates = s.exec(select(AuditEvent).where(AuditEvent.action == "create")).all()
    stored = {(r.task_id, r.annotator_id): (r.id, r.choice) for r in rows}
    # No duplicates: one row per (task, annotator), and one create event per row.
    assert len(stored) == len(rows) == len(creates) == outcomes["created"]
    # Nothing lost: every acknowledged submit is the stored row, and every row was acknowledged.
    assert set(acked) == set(stored)
    for key, seen in acked.items():
        assert seen == {stored[key]}
    # The run really contended: every pair was hit and collisions were resolved, not dropped.
    assert outcomes["created"] == N_TASKS * N_ANNOTATORS
    assert outcomes["replayed"] + outcomes["Conflict"] + outcomes["IdempotencyMismatch"] > 0
