"""Async jobs under real process faults (DESIGN "Two contracts": execution at least once, the
recorded result exactly one): workers SIGKILLed at random, a worker hung by SIGSTOP, a queue node
SIGKILLed and restarted on its SQLite store, and one of two queue nodes sharing PostgreSQL dying.

Every test asserts that no job is lost and none is recorded twice, and prints its counts (run
pytest with -s to see them)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from casola.client import Client, Result
from casola.jobview import JobView
from casola.queue.jobs import JobsConfig
from casola.store import JobStatus
from casola.wire import Frame
from tests.e2e.procs import Edge, Keys, Poller, Procs, free_port, wait_listening, wait_outcome, write_queue_config
from tests.e2e.stack import Stack, run_uvloop
from tests.require import missing

PG_DSN = os.environ.get("CASOLA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _report(name: str, **counts: object) -> None:
    print(f"\n[{name}] " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


def _payload(out: Result | JobView) -> bytes | None:
    return out.payload if isinstance(out, Result) else None


def _steps_answer(out: Result | JobView) -> dict[str, Any]:
    assert isinstance(out, Result), f"completed without a result: {out}"
    answer: dict[str, Any] = msgspec.json.decode(out.payload)
    return answer


async def _poll(pred: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    """Until `pred()` (sync or async) returns something truthy; that value."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"{what} (after {timeout} s)")
        await asyncio.sleep(every)


# -- 1. workers SIGKILLed at random ------------------------------------------------------------------


def test_jobs_survive_random_worker_sigkills(tmp_path: Path) -> None:
    n_jobs, n_workers, capacity = 200, 4, 3
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)

    async def main() -> None:
        cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", lease_s=3, sweep_interval=0.2, max_attempts=20)
        stack = await Stack(tmp_path, queue={"jobs": cfg, "models": ["echo"]}).start()
        jobs = stack.node.jobs
        assert jobs is not None
        alive: list[subprocess.Popen[bytes]] = []
        serial = iter(range(1_000_000))
        kills = 0
        t0 = time.monotonic()

        def spawn() -> None:
            alive.append(stack.spawn_worker(f"w-{next(serial)}", capacity))

        def registered() -> int:
            return int(stack.node.registry.snapshot()["echo"]["workers"])

        async def killer() -> None:
            nonlocal kills
            end = time.monotonic() + 25
            while jobs.stats["completed"] < n_jobs and time.monotonic() < end:
                await asyncio.sleep(rng.uniform(0.3, 0.5))
                if jobs.stats["completed"] >= n_jobs or registered() < 2:  # keep one alive
                    continue
                victim = rng.choice([p for p in alive if p.poll() is None])
                victim.send_signal(signal.SIGKILL)
                alive.remove(victim)
                kills += 1
                spawn()

        kill_task: asyncio.Task[None] | None = None
        try:
            for _ in range(n_workers):
                spawn()
            await stack.wait_workers(n_workers)
            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key) as c:
                kill_task = asyncio.ensure_future(killer())
                gate = asyncio.Semaphore(64)

                async def submit(i: int) -> JobView:
                    async with gate:
                        return await c.submit("echo", b"job-%d" % i, params={"delay-ms": rng.randint(50, 200)})

                views = await asyncio.gather(*(submit(i) for i in range(n_jobs)))
                deadline = time.monotonic() + 35
                outcomes = [await wait_outcome(c, v.request_id, deadline) for v in views]
                await kill_task
                finals = [await c.job(v.request_id) for v in views]
            elapsed = time.monotonic() - t0
            right = sum(isinstance(o, Result) and o.payload == b"job-%d" % i for i, o in enumerate(outcomes))
            failed = [f for f in finals if f.status != "COMPLETED" or f.error_type]
            counts = await jobs.store.counts()
            redispatched = sum(f.attempt > 1 for f in finals)
            _report(
                "worker-sigkills",
                jobs=n_jobs,
                completed=jobs.stats["completed"],
                right_results=right,
                lost=n_jobs - right,
                duplicated=jobs.stats["completed"] - n_jobs,
                store_completed=counts.get(JobStatus.COMPLETED.value),
                kills=kills,
                redispatched=redispatched,
                max_attempt=max(f.attempt for f in finals),
                requeued=jobs.stats["requeued"],
                stale_refused=jobs.stats["stale_refused"],
                dispatched=jobs.stats["dispatched"],
                seed=seed,
                seconds=round(elapsed, 1),
            )
            assert not failed, failed[:3]
            assert right == n_jobs
            assert counts == {"IN_QUEUE": 0, "IN_PROGRESS": 0, "COMPLETED": n_jobs}, counts
            assert jobs.stats["completed"] == n_jobs and jobs.stats["submitted"] == n_jobs, jobs.stats
            assert kills >= 3, f"only {kills} workers were killed while jobs ran"
            assert len({v.request_id for v in views}) == n_jobs
        finally:
            if kill_task is not None and not kill_task.done():
                kill_task.cancel()
            await stack.stop()

    run_uvloop(main, timeout=80)


# -- 2. a hung worker (SIGSTOP) -----------------------------------------------------------------------


def test_a_hung_worker_loses_its_lease(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = JobsConfig(store=f"sqlite:///{tmp_path}/jobs.db", lease_s=1.5, sweep_interval=0.2)
        queue = {"jobs": cfg, "models": ["steps"], "worker_ping_timeout": 30.0}
        stack = await Stack(tmp_path, queue=queue).start()
        jobs = stack.node.jobs
        assert jobs is not None
        hung = stack.spawn_worker("w-hung", 1, models="steps")
        stopped = False
        try:
            await stack.wait_workers(1, "steps")
            entry = next(w for w in stack.node.registry.workers if w.node_id == "w-hung")
            # The configured timeout reaches the node's link to the worker: 30 s, far beyond the
            # lease, so that what frees the job below is the lease's expiry, never a dropped link.
            assert entry.link.conn.limits.ping_timeout == 30.0
            late: list[str] = []  # what the hung worker sent after SIGCONT
            resumed = [False]
            inner = entry.link.on_events

            def spy(link: Any, events: list[Any]) -> None:
                if resumed[0]:
                    late.extend(ev.type.name if type(ev) is Frame else type(ev).__name__ for ev in events)
                inner(link, events)

            entry.link.on_events = spy
            async with await Client.connect(f"127.0.0.1:{stack.frames_port}", stack.api_key) as c:
                view = await c.submit("steps", b"input", params={"steps": 20, "step-ms": 100})

                async def checkpoints() -> int:
                    job = await jobs.store.get(view.request_id, None)
                    return job.checkpoint_seq if job is not None and job.checkpoint_seq >= 2 else 0

                await _poll(checkpoints, 15, "the first worker made no two checkpoints")
                hung.send_signal(signal.SIGSTOP)
                stopped, stopped_at = True, time.monotonic()
                at_stop = await jobs.store.get(view.request_id, None)
                assert at_stop is not None and at_stop.fence == 1
                stack.spawn_worker("w-second", 1, models="steps")

                async def redispatched() -> bool:
                    job = await jobs.store.get(view.request_id, None)
                    return job is not None and job.fence == 2

                await _poll(redispatched, 30, "the job was not dispatched again", every=0.02)
                hung_link_at_redispatch = entry.link.is_up and entry in stack.node.registry.workers
                redispatch_s = time.monotonic() - stopped_at
                out = await wait_outcome(c, view.request_id, time.monotonic() + 30)
                hung_link_at_outcome = entry.link.is_up and entry in stack.node.registry.workers
                answer = _steps_answer(out)
                before = await jobs.store.get(view.request_id, None)
                assert before is not None
                stale_before = jobs.stats["stale_refused"]

                # The hung worker wakes up: whatever it still sends is under the old fence.
                resumed[0] = True
                hung.send_signal(signal.SIGCONT)
                stopped = False

                def woke() -> bool:  # two heartbeats (1 s apart): what it sent on waking came before
                    return late.count("HEARTBEAT") >= 2 or not entry.link.is_up

                await _poll(woke, 15, "the continued worker neither sent heartbeats nor went away")
                after = await jobs.store.get(view.request_id, None)
                final = await c.job(view.request_id)
                again = await c.job_result(view.request_id)
            _report(
                "hung-worker",
                checkpoint_at_stop=at_stop.checkpoint_seq,
                resumed_at=answer["resumed_at"],
                redispatch_s=round(redispatch_s, 2),
                hung_link_up_at_redispatch=hung_link_at_redispatch,
                hung_link_up_at_outcome=hung_link_at_outcome,
                ran=len(answer["ran"]),
                answer_attempt=answer["attempt"],
                job_attempt=before.attempt,
                fence=before.fence,
                owner=before.lease_owner,
                completed=jobs.stats["completed"],
                requeued=jobs.stats["requeued"],
                stale_refused=jobs.stats["stale_refused"],
                stale_refused_after_sigcont=jobs.stats["stale_refused"] - stale_before,
                late_frames=",".join(late) or "-",
                lost=0 if isinstance(out, Result) else 1,
                duplicated=jobs.stats["completed"] - 1,
            )
            # The lease (1.5 s) took the job back while the hung worker's link was still up, and it
            # stayed up until the outcome: no dropped connection freed it.
            assert hung_link_at_redispatch and hung_link_at_outcome
            assert answer["resumed_at"] >= 2 and answer["attempt"] == 1
            assert answer["ran"] == list(range(answer["resumed_at"] + 1, 21))
            assert before.status is JobStatus.COMPLETED and not before.error_type
            assert (before.attempt, before.fence) == (2, 2) and before.lease_owner.endswith("/w-second")
            assert after == before, "a late frame from the hung worker changed the recorded job"
            assert final.status == "COMPLETED" and _payload(again) == _payload(out)
            assert jobs.stats["completed"] == 1, jobs.stats
            assert jobs.stats["stale_refused"] >= 1, jobs.stats  # the expired lease, refused
        finally:
            if stopped:
                hung.send_signal(signal.SIGCONT)
            await stack.stop()

    run_uvloop(main, timeout=80)


def test_a_hung_worker_is_dropped_after_the_configured_ping_timeout(tmp_path: Path) -> None:
    """`[queue] worker_ping_timeout = 0.5`: the node pings each worker every second, so a SIGSTOPped
    worker is gone within about 1.5 s (10 s and more while the setting did not reach the links)."""
    timeout = 0.5

    async def main() -> None:
        stack = await Stack(tmp_path, queue={"worker_ping_timeout": timeout}).start()
        try:
            hung = stack.spawn_worker("w-hung", 1)
            await stack.wait_workers(1)
            entry = next(w for w in stack.node.registry.workers if w.node_id == "w-hung")
            hung.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()

            def dropped() -> bool:
                return not entry.link.is_up and entry not in stack.node.registry.workers

            await _poll(dropped, 20, "the hung worker was not dropped", every=0.01)
            dropped_s = time.monotonic() - t0
            _report("ping-timeout", worker_ping_timeout=timeout, dropped_s=round(dropped_s, 2))
            # At most one ping interval (1 s) before a ping is outstanding, then the timeout; slack
            # for a loaded machine, far below the 10 s that was in force before.
            assert dropped_s < 1.0 + timeout + 1.0, dropped_s
        finally:
            await stack.stop()

    run_uvloop(main, timeout=60)


# -- 3. the queue node SIGKILLed and restarted (SQLite) ------------------------------------------------


def _sqlite_jobs(path: Path) -> dict[str, tuple[str, bytes | None, int, str]]:
    """id -> (status, checkpoint, attempt, lease_owner), read without the store (the node is dead)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, status, checkpoint, attempt, lease_owner FROM casola_jobs").fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def test_queue_node_restart_resumes_jobs_sqlite(tmp_path: Path) -> None:
    n_steps, n_echo = 40, 20

    async def main() -> None:
        keys = Keys(tmp_path)
        procs = Procs(keys)
        port = free_port()
        addr = f"127.0.0.1:{port}"
        db = tmp_path / "jobs.db"
        config = write_queue_config(tmp_path / "queue.toml", lease_s=2.0, sweep_interval=0.2, max_attempts=20)

        def start_node() -> subprocess.Popen[bytes]:
            return procs.queue_node(port, store=f"sqlite:///{db}", config=config)

        edge: Edge | None = None
        poller: Poller | None = None
        t0 = time.monotonic()
        try:
            node = start_node()
            await wait_listening(port, node)
            for i in range(2):
                procs.worker([addr], f"w-{i}", capacity=8)
            edge = await Edge(keys, [addr]).start()
            poller = Poller(edge.frames_port, keys.api_key)
            c = await poller.get()
            steps_ids, echo_ids = [], []
            for i in range(n_steps):
                params = {"steps": 5, "step-ms": 100}
                v = await c.submit("steps", b"steps-%d" % i, params=params, idempotency_key=f"s{i}")
                steps_ids.append(v.request_id)
            for i in range(n_echo):
                v = await c.submit("echo", b"echo-%d" % i, params={"delay-ms": 300}, idempotency_key=f"e{i}")
                echo_ids.append(v.request_id)

            async def mid_run() -> bool:
                views = [await c.job(j) for j in steps_ids]
                return sum(v.status == "IN_PROGRESS" and v.progress > 0 for v in views) >= 5

            await _poll(mid_run, 20, "no steps jobs made progress")
            node.send_signal(signal.SIGKILL)
            node.wait(10)
            killed_at = time.monotonic()
            at_kill = _sqlite_jobs(db)
            node = start_node()
            await wait_listening(port, node)
            deadline = time.monotonic() + 35
            outcomes = {j: await wait_outcome(poller, j, deadline) for j in [*steps_ids, *echo_ids]}
            recovered_s = time.monotonic() - killed_at
            c = await poller.get()
            finals = {j: await c.job(j) for j in outcomes}
        finally:
            if poller is not None:
                await poller.close()
            if edge is not None:
                await edge.stop()
            procs.stop_all()
        final_rows = _sqlite_jobs(db)
        resumed = exact = running_at_kill = 0
        for j in steps_ids:
            answer = _steps_answer(outcomes[j])
            assert answer["ran"] == list(range(answer["resumed_at"] + 1, 6)) and answer["steps"] == 5
            status, ckpt, _, _ = at_kill[j]
            stored = int(ckpt) if ckpt is not None else 0
            if status == "IN_PROGRESS":
                running_at_kill += 1
            if status != "COMPLETED":  # resumed from the checkpoint stored when the node died, or later
                assert answer["resumed_at"] >= stored, (j, answer, at_kill[j])
                exact += answer["resumed_at"] == stored > 0
            resumed += answer["resumed_at"] > 0
        right_echo = sum(_payload(outcomes[j]) == b"echo-%d" % i for i, j in enumerate(echo_ids))
        statuses = [r[0] for r in final_rows.values()]
        _report(
            "queue-node-restart-sqlite",
            jobs=n_steps + n_echo,
            store_rows=len(final_rows),
            store_completed=statuses.count("COMPLETED"),
            completed_at_kill=sum(r[0] == "COMPLETED" for r in at_kill.values()),
            running_at_kill=sum(r[0] == "IN_PROGRESS" for r in at_kill.values()),
            steps_running_at_kill=running_at_kill,
            steps_resumed_from_checkpoint=resumed,
            resumed_exactly_at_kill_checkpoint=exact,
            redispatched=sum(f.attempt > 1 for f in finals.values()),
            echo_right=right_echo,
            lost=n_steps + n_echo - statuses.count("COMPLETED"),
            duplicated=len(final_rows) - (n_steps + n_echo),
            client_retries=poller.retries if poller is not None else -1,
            recovered_s=round(recovered_s, 1),
            seconds=round(time.monotonic() - t0, 1),
        )
        assert all(f.status == "COMPLETED" and not f.error_type for f in finals.values()), finals
        assert right_echo == n_echo
        assert len(final_rows) == n_steps + n_echo and statuses.count("COMPLETED") == n_steps + n_echo
        assert running_at_kill >= 1 and resumed >= 1

    run_uvloop(main, timeout=80)


# -- 4. two queue nodes on PostgreSQL, one dies --------------------------------------------------------


async def _pg_or_skip() -> None:
    import asyncpg  # type: ignore[import-untyped]

    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = f"PostgreSQL not reachable at {PG_DSN} ({exc!r}); set CASOLA_TEST_PG_DSN"
        missing("postgresql", reason)
    await conn.close()


def test_two_queue_nodes_share_postgres_one_dies(tmp_path: Path) -> None:
    n_jobs = 60

    async def main() -> None:
        import asyncpg

        await _pg_or_skip()
        schema = f"casola_t_{uuid.uuid4().hex[:12]}"
        store = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"
        keys = Keys(tmp_path)
        procs = Procs(keys)
        port_a, port_b = free_port(), free_port()
        addr_a, addr_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
        config = write_queue_config(tmp_path / "queue.toml", lease_s=2.0, sweep_interval=0.2, max_attempts=20)
        edges: list[Edge] = []
        pollers: list[Poller] = []
        pg = None
        t0 = time.monotonic()

        async def rows() -> list[Any]:
            assert pg is not None
            return list(
                await pg.fetch(
                    "SELECT id, status, checkpoint, attempt, fence, lease_owner, error_type, result FROM casola_jobs"
                )
            )

        try:
            node_a = procs.queue_node(port_a, store=store, config=config, node_id="queue-a", region="ra")
            await wait_listening(port_a, node_a)  # A creates the schema; B starts on it
            node_b = procs.queue_node(port_b, store=store, config=config, node_id="queue-b", region="rb")
            await wait_listening(port_b, node_b)
            pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
            for i in range(3):  # 12 slots, shared by the two nodes: most jobs wait in the queue at first
                procs.worker([addr_a, addr_b], f"w-{i}", capacity=4)
            edge_a = await Edge(keys, [addr_a], "ingress-a").start()
            edge_b = await Edge(keys, [addr_b], "ingress-b").start()
            edges += [edge_a, edge_b]
            via_a = Poller(edge_a.frames_port, keys.api_key)
            via_b = Poller(edge_b.frames_port, keys.api_key)
            pollers += [via_a, via_b]
            ca = await via_a.get()
            ids = []
            for i in range(n_jobs):
                params = {"steps": 6, "step-ms": 100}
                v = await ca.submit("steps", b"job-%d" % i, params=params, idempotency_key=f"k{i}")
                ids.append(v.request_id)

            async def a_busy() -> bool:  # A has finished some jobs and holds others with checkpoints
                by_a = [r for r in await rows() if r["lease_owner"].startswith("queue-a/")]
                held = [r for r in by_a if r["status"] == "IN_PROGRESS" and r["checkpoint"]]
                return len(held) >= 3 and any(r["status"] == "COMPLETED" for r in by_a)

            await _poll(a_busy, 20, "node A completed nothing or holds no checkpointed jobs")
            node_a.send_signal(signal.SIGKILL)
            node_a.wait(10)
            killed_at = time.monotonic()
            at_kill = {r["id"]: r for r in await rows()}
            deadline = time.monotonic() + 35
            outcomes = {j: await wait_outcome(via_b, j, deadline) for j in ids}
            recovered_s = time.monotonic() - killed_at
            cb = await via_b.get()
            finals = {j: await cb.job(j) for j in ids}
            final_rows = {r["id"]: r for r in await rows()}
        finally:
            for p in pollers:
                await p.close()
            for e in edges:
                await e.stop()
            procs.stop_all()
            if pg is None:  # the nodes may have made the schema before the test failed
                pg = await asyncpg.connect(PG_DSN, timeout=5)
            try:
                await pg.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await pg.close()
        held_by_a = {
            j for j, r in at_kill.items() if r["status"] == "IN_PROGRESS" and r["lease_owner"][:8] == "queue-a/"
        }
        queued_at_kill = [j for j, r in at_kill.items() if r["status"] == "IN_QUEUE"]
        resumed = 0
        for i, j in enumerate(ids):
            answer = _steps_answer(outcomes[j])
            assert answer["ran"] == list(range(answer["resumed_at"] + 1, 7)), answer
            assert answer["input_bytes"] == len(b"job-%d" % i) and final_rows[j]["result"] == _payload(outcomes[j])
            # Redispatched (a new fence) jobs that A held resume from their checkpoint. One whose fence
            # did not change was completed by A itself: its last commit reached PostgreSQL before the
            # kill but became visible after the snapshot.
            redispatched = final_rows[j]["fence"] != at_kill[j]["fence"]
            if j in held_by_a and at_kill[j]["checkpoint"] and redispatched:
                assert answer["resumed_at"] >= int(at_kill[j]["checkpoint"]), (answer, dict(at_kill[j]))
                resumed += answer["resumed_at"] > 0
        statuses = [r["status"] for r in final_rows.values()]
        _report(
            "two-nodes-postgres",
            jobs=n_jobs,
            store_rows=len(final_rows),
            store_completed=statuses.count("COMPLETED"),
            completed_at_kill=sum(r["status"] == "COMPLETED" for r in at_kill.values()),
            completed_by_a_before_kill=sum(
                r["status"] == "COMPLETED" and r["lease_owner"].startswith("queue-a/") for r in at_kill.values()
            ),
            leased_by_a_at_kill=len(held_by_a),
            leased_by_b_at_kill=sum(
                r["status"] == "IN_PROGRESS" and r["lease_owner"].startswith("queue-b/") for r in at_kill.values()
            ),
            queued_at_kill=len(queued_at_kill),
            a_jobs_resumed_from_checkpoint=resumed,
            finished_by_b=sum(r["lease_owner"].startswith("queue-b/") for r in final_rows.values()),
            redispatched=sum(f.attempt > 1 for f in finals.values()),
            max_attempt=max(f.attempt for f in finals.values()),
            lost=n_jobs - statuses.count("COMPLETED"),
            duplicated=len(final_rows) - n_jobs,
            client_retries=via_b.retries,
            recovered_s=round(recovered_s, 1),
            seconds=round(time.monotonic() - t0, 1),
        )
        assert all(f.status == "COMPLETED" and not f.error_type for f in finals.values()), [
            f for f in finals.values() if f.error_type
        ][:3]
        assert len(final_rows) == n_jobs and statuses.count("COMPLETED") == n_jobs
        assert all(not r["error_type"] for r in final_rows.values())
        assert len(held_by_a) >= 1 and resumed >= 1

    run_uvloop(main, timeout=80)
