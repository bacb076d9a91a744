"""Running offloaded jobs: replay each queued request to its upstream and store the answer.

Runs inside `sidecar run` (unless `jobs.workers: false`) and as `sidecar worker`, on any
number of machines sharing Redis. Per configured queue a process keeps `concurrency` loops;
each loop takes a cluster-wide slot and the next job of the lowest priority lane that has one
in one step (JobService.take), runs it under its attempt timeout, and records a success in one
more (JobService.complete). Failures, retries with exponential backoff and jitter, and aborts
go through saq's queue, whose records these are; saq's upkeep per lane moves due retries and
re-queues jobs whose worker stopped heart-beating (crash recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
import uuid
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from saq.job import Job, Status
from saq.worker import Worker

from ..aio import cancel_and_wait
from ..core.jobs import SWEPT_ERROR, client_error, lane, replay_head
from ..crypto import SealError
from ..errors import UpstreamError
from ..pipeline import ProxyResponse
from ..stores.dedup import SharedResult
from ..stores.subscriber import REDIS_ERRORS
from .queue import (
    CANCELLED_BY_CLIENT,
    REPLAY,
    SCHEDULE_EVERY,
    HandOff,
    JobService,
    SidecarQueue,
    Taken,
)

if TYPE_CHECKING:
    from ..balancer import Upstream
    from ..config import Config
    from ..tracing import Trace, Tracing

log = logging.getLogger("sidecar.jobs")

IDLE_POLL = 1.0  # the first loop of a queue looks for due retries this often when idle
IDLE_POLL_OTHERS = 15.0  # the other loops rely on wake-ups
HEARTBEAT_PATIENCE = 2.0  # the longest a finished attempt waits for a heartbeat under way
ABORT_CHECK = 1.0  # how often a worker looks whether a job it runs was cancelled
CANCEL_PATIENCE = 5.0  # the longest a cancelled attempt is waited for


class _HidesJobs(logging.Filter):
    """saq logs whole job records (with their request heads: credentials) on errors, and one
    line per job at INFO. The runner logs what matters itself, without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.exc_info and isinstance(record.exc_info[1], REDIS_ERRORS):
            return False  # an outage: the runner says so once, not every second per lane
        return record.levelno >= logging.WARNING and not any(
            isinstance(a, Job) or (isinstance(a, str) and a.startswith("Job<")) for a in args)


_saq_log = logging.getLogger("saq")
_saq_log.addFilter(_HidesJobs())
# saq's info lines ("Processing ...", one per job) repeat what "job finished" says: their
# records cost about 2% of a worker's CPU for nothing.
_saq_log.setLevel(logging.WARNING)


class JobHost(Protocol):
    """What the runner needs from the process it runs in."""

    @property
    def config(self) -> Config: ...

    @property
    def pools(self) -> Mapping[str, Upstream]: ...

    def progress_base(self) -> str: ...

    @property
    def tracing(self) -> Tracing | None: ...


class JobFailure(Exception):
    """An attempt failed; the message is what the job's `error` tells the client."""


class _Attempt:
    """A job running here: its task, and why it was aborted once it is."""

    __slots__ = ("aborted", "job", "task")

    def __init__(self, job: Job, task: asyncio.Task[Any]) -> None:
        self.job = job
        self.task = task
        self.aborted: str | None = None


class _Asleep:
    """A loop waiting for a wake-up, or for a job handed to it by an enqueue in this process
    (`token` its slot token; None for a loop that may not run jobs now). Once `reserved` for a
    hand-off it waits for the enqueue's answer however long its nap was meant to be: the job
    may be marked active for it."""

    __slots__ = ("future", "reserved", "token")

    def __init__(self, future: asyncio.Future[Taken | None], token: str | None) -> None:
        self.future = future
        self.token = token
        self.reserved = False


class LaneWorker(Worker):  # type: ignore[type-arg]
    """saq's worker for one lane, for its upkeep only (due retries, the sweep, worker info):
    the runner's loops take and run the jobs."""

    def __init__(self, runner: JobRunner, queue: SidecarQueue) -> None:
        jobs = runner.host.config.jobs
        super().__init__(
            queue, functions=[(REPLAY, runner.replay)], concurrency=1, dequeue_timeout=-1,
            timers={"schedule": SCHEDULE_EVERY, "abort": 1,  # type: ignore[arg-type]
                    "sweep": max(1, round(jobs.sweep_interval)), "worker_info": 10},
            id=f"{runner.worker_id}:{queue.name}",
        )
        self.runner = runner
        self.lane = queue  # saq types `queue` as its base class
        self.upkeep_tasks: list[asyncio.Task[Any]] = []

    async def schedule(self, lock: int = 1) -> None:
        # Retries waiting out their backoff become due here: wake this queue's loops.
        if await self.queue.schedule(lock):
            self.runner.wake(self.queue.name.split(".")[1])


class JobRunner:
    def __init__(self, host: JobHost, service: JobService) -> None:
        self.host = host
        self.service = service
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lanes: dict[str, dict[int, LaneWorker]] = {}  # queue -> priority -> worker
        self.running = 0
        self._loops: dict[str, list[asyncio.Task[None]]] = {}
        self._idle: dict[str, deque[_Asleep]] = {}  # queue -> loops asleep
        self._held: dict[str, set[str]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._attempts: dict[str, _Attempt] = {}  # job key -> the attempt running here
        self._missed: set[str] = set()  # queues woken while none of their loops slept
        self._stopping = False
        self._redis_down = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.service.on_wake(self._on_wake)
        self.service.on_hand_off(self.hand_off)
        self._tasks.append(asyncio.create_task(self._maintain(), name="jobs-maintain"))
        self._tasks.append(asyncio.create_task(self._watch_aborts(), name="jobs-aborts"))
        log.info("job worker started", extra={"worker_id": self.worker_id,
                                              "queues": sorted(self.host.config.queues)})

    async def stop(self) -> None:
        """Stop taking jobs; a job running now goes back to its queue at once, to run again
        on another worker."""
        self._stopping = True
        loops = [task for tasks in self._loops.values() for task in tasks]
        await cancel_and_wait(loops, patience=5.0)
        upkeep = []
        for lanes in self.lanes.values():
            for worker in lanes.values():
                worker.event.set()
                upkeep += worker.upkeep_tasks
                worker.pool.shutdown(wait=False)
        await cancel_and_wait([*upkeep, *self._tasks])

    # -- lanes and wake-ups ---------------------------------------------------------------------

    def wake(self, queue: str) -> None:
        """Wake one idle loop of `queue`. One is enough: a loop that takes a job wakes the
        next (_attempt), so a burst of n jobs wakes about n loops, while waking every
        loop for each job made each one race for the same job (dozens of dequeues per job)."""
        idle = self._idle.get(queue)
        while idle:
            asleep = idle.popleft()
            if not asleep.future.done():
                asleep.future.set_result(None)
                return
        # Every loop is busy: the next one about to sleep looks again first. (A loop sleeps
        # after a job when none was waiting as it finished; one queued just after would
        # otherwise wait for the idle poll.)
        self._missed.add(queue)

    def _on_wake(self, name: str) -> None:
        if name == "*":
            for queue in list(self._idle):
                self.wake(queue)
            return
        if name.startswith("sidecar."):  # a lane: sidecar.<queue>.p<priority>
            _, queue, priority = name.split(".")
            if queue in self.host.config.queues:
                self._add_lane(queue, int(priority[1:]))
            self.wake(queue)
        else:
            self.wake(name)

    async def _sleep(self, queue: str, seconds: float, token: str | None = None
                     ) -> Taken | None:
        """Wait for a wake-up or `seconds`; a job handed to this loop (`token`) by an enqueue
        in this process comes back, already marked active for it."""
        if queue in self._missed:
            self._missed.discard(queue)
            return None
        asleep = _Asleep(asyncio.get_running_loop().create_future(), token)
        idle = self._idle.setdefault(queue, deque())
        idle.append(asleep)
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(asleep.future)
        except TimeoutError:
            if asleep.reserved:  # an enqueue under way may have marked a job active for us
                return await asyncio.shield(asleep.future)
            return None
        finally:
            if not asleep.future.done() and not asleep.reserved:
                asleep.future.cancel()
                idle.remove(asleep)

    def hand_off(self, queue: str, priority: int) -> HandOff | None:
        """An idle loop of `queue` that may run a job this process is enqueueing: the
        enqueue's script then marks the job active for it in the same step, when nothing else
        waits and a slot is free, sparing the wake-up and the look (two round trips). The
        enqueue must answer `HandOff.give` whatever happens."""
        config = self.host.config.queues.get(queue)
        idle = self._idle.get(queue)
        if config is None or not idle or self._stopping:
            return None
        for asleep in idle:
            if asleep.token is not None and not asleep.future.done():
                idle.remove(asleep)
                asleep.reserved = True
                self._add_lane(queue, priority)
                return HandOff(asleep.token, asleep.future, config.concurrency,
                               self.host.config.jobs.visibility_timeout, config.rate,
                               f"{self.worker_id}:{lane(queue, priority)}")
        return None

    def _add_lane(self, queue: str, priority: int) -> None:
        lanes = self.lanes.setdefault(queue, {})
        if priority in lanes or self._stopping:
            return
        worker = lanes[priority] = LaneWorker(self, self.service.queue(lane(queue, priority)))
        worker.upkeep_tasks = []

        async def start_upkeep() -> None:
            worker.upkeep_tasks.extend(await worker.upkeep())

        worker.upkeep_tasks.append(asyncio.create_task(start_upkeep()))
        self.lanes[queue] = dict(sorted(lanes.items()))

    async def _maintain(self) -> None:
        """Find lanes other processes created, keep `concurrency` loops per queue, and renew
        the slots held here."""
        while True:
            config = self.host.config
            lease = config.jobs.visibility_timeout
            try:
                for name, queue_config in config.queues.items():
                    for priority in await self.service.lanes(name):
                        self._add_lane(name, priority)
                    loops = self._loops.setdefault(name, [])
                    while len(loops) < queue_config.concurrency:
                        loops.append(asyncio.create_task(self._loop(name, len(loops)),
                                                         name=f"jobs-{name}-{len(loops)}"))
                for name, held in self._held.items():
                    await self.service.renew_slots(name, list(held), lease)
                if self._redis_down:
                    log.info("job queue reachable again")
                self._redis_down = False
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
            await asyncio.sleep(min(2.0, lease / 3))

    def _redis_failed(self, exc: BaseException) -> None:
        if not self._redis_down:
            log.warning("job queue unreachable (redis); jobs wait until it is back",
                        extra={"error": str(exc) or type(exc).__name__})
        self._redis_down = True

    # -- the loops ------------------------------------------------------------------------------

    async def _loop(self, queue: str, index: int) -> None:
        token = f"{self.worker_id}:{index}"
        held = self._held.setdefault(queue, set())
        idle = IDLE_POLL if index == 0 else IDLE_POLL_OTHERS
        handed: Taken | None = None  # a job an enqueue here took for this loop (hand_off)
        while not self._stopping:
            queue_config = self.host.config.queues.get(queue)
            if handed is None and (queue_config is None or index >= queue_config.concurrency):
                await self._sleep(queue, IDLE_POLL_OTHERS)  # removed or shrunk by a reload
                continue
            lanes = self.lanes.get(queue)
            if handed is None and not lanes:
                handed = await self._sleep(queue, idle, token)
                continue
            limit = queue_config.concurrency if queue_config is not None else 1
            try:
                held.add(token)  # renewed by _maintain while the job runs
                try:
                    taken = handed or await self.service.take(
                        queue, list(lanes or ()), token, limit=limit,
                        lease=self.host.config.jobs.visibility_timeout,
                        rate=queue_config.rate if queue_config else None,
                        worker_id=self.worker_id)
                    handed = None
                    more = taken.job is not None and await self._attempt(
                        queue, token, limit, taken)
                finally:
                    held.discard(token)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("job loop failed; going on", extra={"queue": queue})
                await asyncio.sleep(1.0)
                continue
            if more:
                continue
            if taken.held == "rate":  # no message says when the window has room again
                await asyncio.sleep(min(taken.rate_wait, IDLE_POLL_OTHERS))
                continue
            # Nothing queued, no slot free, or paused: a wake-up says when to look.
            handed = await self._sleep(queue, idle, token)
            if handed is not None and handed.job is None:
                handed = None
        if handed is not None and handed.job is not None:  # handed as this worker stopped
            with contextlib.suppress(*REDIS_ERRORS):
                await handed.job.get_queue().retry(handed.job, "cancelled")
                await self.service.release_slot(queue, token, wake=True)

    # -- one job --------------------------------------------------------------------------------

    async def _attempt(self, queue: str, token: str, limit: int, taken: Taken) -> bool:
        """Run one attempt of a job this loop took (marked active, its slot held by `token`)
        and record how it ended. A success is recorded with the slot's release in one round
        trip; a failure, a retry or an abort through saq's queue, then the slot given back.
        Whether jobs may be waiting still: after a success, what the record's script counted
        (none: the loop sleeps until a wake-up, instead of one more look to find nothing)."""
        job = taken.job
        assert job is not None
        if taken.left > 0:
            self.wake(queue)  # more are waiting: let another loop look
        ctx: dict[str, Any] = {"job": job, "body": taken.body, "started": job.started}
        self.running += 1
        attempt: _Attempt | None = None
        released = False
        more = True
        try:
            task = asyncio.create_task(self.replay(ctx, **(job.kwargs or {})))
            attempt = self._attempts[job.key] = _Attempt(job, task)
            try:
                async with asyncio.timeout(job.timeout or None):
                    result = await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                raise
            if attempt.aborted is None:
                released = True  # the script gives the slot back, or the sweep will
                more = await self._succeeded(job, ctx, result, token, limit)
            else:  # cancelled as it ended: the cancellation stands
                await self._aborted(job, attempt.aborted)
        except asyncio.CancelledError:
            if attempt is None:
                raise
            if attempt.aborted is not None:
                await self._aborted(job, attempt.aborted)
            else:  # this worker is stopping: the job goes back to its queue
                await cancel_and_wait([attempt.task], patience=CANCEL_PATIENCE)
                await job.get_queue().retry(job, "cancelled")
            task_now = asyncio.current_task()
            if task_now is not None and task_now.cancelling():
                raise
        except Exception:
            error = traceback.format_exc()
            if attempt is not None:
                await cancel_and_wait([attempt.task], patience=CANCEL_PATIENCE)
            if job.retryable:
                await job.get_queue().retry(job, error)
            else:
                await job.get_queue().finish(job, Status.FAILED, error=error)
        finally:
            self.running -= 1
            if attempt is not None and self._attempts.get(job.key) is attempt:
                del self._attempts[job.key]
            if not released:
                await self._settled(job, ctx)
                await self.service.release_slot(queue, token, wake=True)
        return more

    async def _succeeded(self, job: Job, ctx: dict[str, Any], result: Any, token: str,
                         limit: int) -> bool:
        duration = max(0, int(time.time() * 1000) - job.started) if job.started else None
        try:
            waiting = await self.service.complete(
                job, ctx["result"], token=token, limit=limit, duration_ms=duration,
                started=ctx.get("started"))
        except REDIS_ERRORS as exc:
            # Not recorded: the job stays active, the sweep runs it again (at least once).
            self._redis_failed(exc)
            return True
        job.result = result
        log.info("job finished", extra={"job_id": job.key, "attempt": job.attempts,
                                        "worker_id": self.worker_id, "outcome": "succeeded",
                                        "duration_ms": duration, "error": None})
        return waiting > 0

    async def _aborted(self, job: Job, reason: str) -> None:
        queue = job.get_queue()
        await queue.finish(job, Status.ABORTED, error=reason)
        await self.service.client.delete(job.abort_id)

    async def _watch_aborts(self) -> None:
        """Cancel the attempts running here whose job was cancelled (its record says
        aborting): one read of their records per ABORT_CHECK."""
        while True:
            await asyncio.sleep(ABORT_CHECK)
            attempts = list(self._attempts.values())
            if not attempts:
                continue
            try:
                records = await self.service.client.mget([a.job.id for a in attempts])
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
                continue
            for attempt, record in zip(attempts, records, strict=True):
                stored = attempt.job.get_queue().deserialize(record) if record else None
                if stored is None or stored.status not in (Status.ABORTING, Status.ABORTED):
                    continue
                if attempt.aborted is None and not attempt.task.done():
                    log.info("job cancelled while it ran", extra={"job_id": attempt.job.key})
                    attempt.aborted = stored.error or "abort"
                    attempt.task.cancel()

    async def _settled(self, job: Job, ctx: dict[str, Any]) -> None:
        """Log and count how an attempt that did not succeed ended."""
        status = job.status
        fields = {"job_id": job.key, "attempt": job.attempts, "worker_id": self.worker_id}
        try:
            if status == Status.QUEUED:  # retried: a failed attempt, or a worker stopping
                if self._stopping:
                    log.info("job put back in its queue: this worker is stopping", extra=fields)
                else:
                    log.warning("job attempt failed; it will run again", extra={
                        **fields, "error": client_error("failed", job.error)})
                await self.service.count_retry(job, ctx.get("started"))
                return
            if status == Status.ABORTED and job.error != SWEPT_ERROR:
                outcome = "cancelled"
            elif status in (Status.FAILED, Status.ABORTED):
                outcome = "failed"
            else:
                return
            duration = job.duration("process")
            log.info("job finished", extra={**fields, "outcome": outcome,
                                            "duration_ms": duration,
                                            "error": client_error(outcome, job.error)})
            await self.service.finished(job, outcome, duration, ctx.get("started"))
        except REDIS_ERRORS as exc:
            self._redis_failed(exc)

    async def replay(self, ctx: dict[str, Any], **spec: Any) -> dict[str, Any]:
        """The job function: send the stored request, store the upstream's whole answer.
        Heartbeats start only once the job has run one interval: most jobs end before, and
        a task per job for them cost about 6% of a lone job's CPU."""
        job: Job = ctx["job"]
        interval = max(0.3, job.heartbeat / 3) if job.heartbeat else 10.0
        done = asyncio.Event()
        beating: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            interval, lambda: beating.append(
                asyncio.create_task(self._heartbeat(job, done, interval))))
        try:
            return await self._replay(job, spec, ctx)
        finally:
            timer.cancel()
            # A heartbeat under way is let finish, not cut: cancelled once its write (the whole
            # record, "active") was sent, that write could still land after the job's final
            # record and undo it, leaving the job "running" for ever.
            done.set()
            for heartbeat in beating:
                with contextlib.suppress(Exception):  # its errors are not the attempt's
                    await asyncio.wait_for(heartbeat, HEARTBEAT_PATIENCE)  # cancels it late

    async def _heartbeat(self, job: Job, done: asyncio.Event, interval: float) -> None:
        """A beat now (the job has run `interval`), then one every `interval` until done."""
        while not done.is_set():
            try:
                await job.update()
            except REDIS_ERRORS as exc:
                self._redis_failed(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await done.wait()

    async def _replay(self, job: Job, spec: dict[str, Any], ctx: dict[str, Any]
                      ) -> dict[str, Any]:
        pool = self.host.pools.get(spec["upstream"])
        if pool is None:
            self._give_up(job, f"upstream {spec['upstream']!r} is no longer in the config")
        body: bytes | None = None
        try:
            if spec["has_body"]:
                body = self.service.open_body(job.key, ctx.get("body"))  # read by the take
                if body is None:
                    self._give_up(job, "the request body is gone (older than jobs.max_age)")
            client_head = self.service.request_field(job, "head")
        except SealError as exc:
            self._give_up(job, f"the job's request cannot be read: {exc}; add the key it was "
                               "sealed with to redis.encryption_keys")
        progress_url = f"{self.host.progress_base()}/internal/jobs/{job.key}/progress"
        head = replay_head(client_head.encode("latin-1"), job.key, progress_url,
                           spec["progress_token"], len(body) if body is not None else None)
        tracing = self.host.tracing
        trace = (tracing.job_attempt(spec.get("traceparent"), job.key, job.key.split(".", 1)[0],
                                     job.attempts) if tracing is not None else None)
        if trace is None:
            return await self._send(job, spec, ctx, pool, head, body, None)
        failure: str | None = None
        try:
            return await self._send(job, spec, ctx, pool, head, body, trace)
        except BaseException as exc:
            failure = str(exc)[:200] or type(exc).__name__
            raise
        finally:
            trace.finish(spec["route"], failure)

    async def _send(self, job: Job, spec: dict[str, Any], ctx: dict[str, Any], pool: Upstream,
                    head: bytes, body: bytes | None, trace: Trace | None) -> dict[str, Any]:
        span = None
        if trace is not None:
            span, head = trace.upstream(spec["upstream"], head)
        try:
            upstream = await pool.request(head, body, timeout=float(job.timeout or 600),
                                          is_head=spec["method"] == "HEAD")
            response = ProxyResponse.from_upstream(upstream)
            data = await response.read_whole(spec["max_body"])
        except UpstreamError as exc:
            if trace is not None and span is not None:
                trace.end_upstream(span, None, exc.code)
            raise JobFailure(f"{exc.code}: {exc.detail}") from None
        if trace is not None and span is not None:
            trace.end_upstream(span, upstream.status)
        if data is None:
            if response.stream is not None:
                response.stream.close()
            self._give_up(job, "the upstream's response is larger than offload.max_body "
                               f"({spec['max_body']} bytes)")
        if upstream.status >= 500:
            raise JobFailure(f"upstream answered {upstream.status} {upstream.reason}")
        # Stored with the job's final state (JobService.complete), in the same round trip.
        ctx["result"] = SharedResult(upstream.status, upstream.reason, tuple(upstream.headers),
                                     data)
        return {"status": upstream.status, "bytes": len(data)}

    @staticmethod
    def _give_up(job: Job, message: str) -> NoReturn:
        """Fail this job now: another attempt would fail the same way."""
        job.retries = job.attempts
        raise JobFailure(message)


__all__ = ["CANCELLED_BY_CLIENT", "JobFailure", "JobHost", "JobRunner"]
