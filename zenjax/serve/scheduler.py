"""The scheduler: one thread that owns the engine and multiplexes requests onto its batch slots.

Walk of the flow (front-end handlers on the left: gRPC threads or HTTP tasks, both through
zenjax/serve/service.py; the scheduler thread on the right):

    handler: tokenize + validate -> Request --submit()--> waiting queue (bounded; full -> QueueFull)
                                                          |
    scheduler loop, one iteration:                        v
      1. reap     cancelled requests: waiting ones are dropped, running ones released (slot freed)
      2. admit    waiting -> free slots, FIFO: engine.start(slot, ids, params)
      3. prefill  ONE chunk of ONE prefilling slot, round-robin over the prefilling slots
                  -> Progress event; after the last chunk the first token -> Delta event
      4. decode   ONE device call of n steps for every slot past prefill -> one Delta per token; a
                  finished sequence gets its Finished event and its slot is released (tokens the call made
                  past a stop string are dropped). n = 1 while a prompt is prefilling or a request waits
                  for a slot, else engine.decode_block (16): see `_decode_steps`
    handler: reads its Request.events queue and turns each event into its protocol's message.

Why round-robin and one chunk per iteration: a decode step costs about as much as a tiny prefill, a
prefill chunk much more. Running one chunk and then one decode step bounds every running sequence's
inter-token gap by one chunk, and round-robin bounds a newly admitted prompt's wait by one chunk per
other prefilling prompt. Worked example, prefill_chunk = 512: a 1M-token prompt (2048 chunks) is being
prefilled in slot 0 when a 100-token chat arrives in slot 1. Iteration i: chunk i of slot 0, iteration
i+1: the chat's single chunk -> its first token; from then on every iteration is one chunk of slot 0
plus one decode step of the chat. The chat finishes long before the 1M prompt's first token, and the 1M
prompt is slowed by one decode step per chunk (small next to a 512-token chunk).

KV memory is reserved, not paged: the engine's cache holds max_batch x max_model_len tokens, and a
request admitted to a slot owns max_model_len of them until it finishes. The handler rejects requests
with prompt + max_new_tokens > max_model_len before they are queued, so an admitted request can never
run out of cache mid-generation.

The engine is not thread-safe, so only this thread calls its slot API (start, prefill_next, decode,
release). Handlers talk to it through `submit` / `Request.cancel` (a lock + condition variable) and
read results from per-request queues. An exception raised for one request fails that request only.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
import traceback
from typing import Callable, Sequence

from zenjax.sampling import SamplingParams
from zenjax.serve.errors import QueueFull, Unavailable

__all__ = ["Delta", "Failed", "Finished", "Progress", "QueueFull", "Request", "Scheduler", "ShuttingDown",
           "Usage"]

log = logging.getLogger("zenjax.serve")


# ---------------------------------------------------------------- events (scheduler -> handler)
@dataclasses.dataclass(frozen=True)
class Progress:
    prefilled: int
    total: int


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    queue_s: float
    total_s: float


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str            # "stop" | "length" | "cancelled"
    usage: Usage


@dataclasses.dataclass(frozen=True)
class Failed:
    code: str              # an errors.ServiceError code: "invalid_request" | "unavailable" | "internal"
    message: str


class ShuttingDown(Unavailable):
    """The server stopped admitting requests (SIGTERM)."""


# the status a finished request is logged and counted with, by how it was cancelled (None: not cancelled)
_CANCEL_STATUS = {None: "OK", "shutdown": "OK", "client": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}


class Request:
    """One generation request, shared by its handler thread and the scheduler thread.

    The handler creates it and reads `events`; the scheduler fills in the timing fields and writes
    events. `cancel()` is safe from any thread and idempotent.
    """

    def __init__(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                 arrival: float | None = None, events=None):
        self.id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        # anything with a thread-safe put(event): a SimpleQueue for thread handlers, an asyncio bridge
        # for the HTTP front end (zenjax/serve/http_api.py)
        self.events = queue.SimpleQueue() if events is None else events
        self.t_arrival = time.monotonic() if arrival is None else arrival
        self.t_admitted: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.generated = 0
        self.slot: int | None = None
        self.seq = None                       # the engine's SequenceState while in a slot
        self.done = False
        self._cancel_reason: str | None = None  # "client" | "deadline" | "shutdown"
        self._scheduler: Scheduler | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel_reason is not None

    def cancel(self, reason: str = "client") -> None:
        if self._cancel_reason is None and not self.done:
            self._cancel_reason = reason
            if self._scheduler is not None:
                self._scheduler.wake()

    @property
    def decoding(self) -> bool:
        return self.t_first is not None


class Scheduler:
    """Owns the engine's slot API; see the module docstring for the loop."""

    def __init__(self, engine, *, max_queue: int, metrics=None,
                 on_finish: Callable[[Request, str, str], None] | None = None):
        self.engine = engine
        self.max_batch = int(engine.max_batch)
        self.max_model_len = int(engine.engine_config.max_model_len)
        self.max_queue = max_queue
        self.metrics = metrics
        self.on_finish = on_finish            # (request, finish reason or error code, status) -> None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[Request | None] = [None] * self.max_batch
        self._rr = -1                         # slot of the last prefill chunk (round-robin cursor)
        self._admitting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0                        # loop iterations that did engine work (for tests/logs)

    # ---------------------------------------------------------------- called from other threads
    def submit(self, req: Request) -> None:
        with self._cond:
            if not self._admitting:
                raise ShuttingDown("server is shutting down; not admitting new requests")
            # requests in _waiting that a free slot will take at the next iteration do not count:
            # only those beyond the free slots really wait
            really_waiting = len(self._waiting) - self._slots.count(None)
            if really_waiting >= self.max_queue:
                raise QueueFull(f"waiting queue is full ({self.max_queue} requests); retry later")
            req._scheduler = self
            self._waiting.append(req)
            self._cond.notify()
        self._gauges()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zenjax-scheduler", daemon=True)
        self._thread.start()

    def stop_admitting(self) -> None:
        """SIGTERM step 1: refuse new requests; waiting (never started) ones get UNAVAILABLE so
        their clients can retry elsewhere; running ones continue."""
        with self._cond:
            self._admitting = False
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify()
        for req in waiting:
            self._fail(req, "unavailable", "server is shutting down before this request started; retry")
        self._gauges()

    def cancel_running(self) -> None:
        """SIGTERM step 2 (grace period over): every running sequence ends with reason 'cancelled'."""
        with self._cond:
            running = [r for r in self._slots if r is not None]
        for req in running:
            req.cancel("shutdown")

    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and all(r is None for r in self._slots)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": sum(r is not None for r in self._slots)}

    # ---------------------------------------------------------------- the loop (scheduler thread)
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and all(r is None for r in self._slots):
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception:  # a bug in the loop itself: log it, keep serving the others
                log.error("scheduler step failed:\n%s", traceback.format_exc())
                time.sleep(0.01)
        # stopping: whatever is left ends now so no handler waits forever
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            self._fail(req, "unavailable", "server stopped before this request started; retry")
        for s, req in enumerate(self._slots):
            if req is not None:
                self._end(s, "cancelled")

    def step(self) -> None:
        """One iteration: reap, admit, one prefill chunk, one decode step."""
        self._reap()
        self._admit()
        worked = False
        slot = self._next_prefill_slot()
        if slot is not None:
            self._prefill(slot)
            worked = True
        decoding = [s for s, r in enumerate(self._slots) if r is not None and r.decoding]
        if decoding:
            self._decode(decoding)
            worked = True
        self.steps += worked
        self._gauges()

    def _reap(self) -> None:
        with self._cond:
            dropped = [r for r in self._waiting if r.cancelled]
            if dropped:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for req in dropped:
            self._finish_unstarted(req)
        for s, req in enumerate(self._slots):
            if req is not None and req.cancelled:
                self._end(s, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or None not in self._slots:
                    return
                req = self._waiting.popleft()
                slot = self._slots.index(None)
                self._slots[slot] = req
            req.slot, req.t_admitted = slot, time.monotonic()
            try:
                req.seq = self.engine.start(slot, req.prompt_ids, req.params)
            except ValueError as e:
                self._slots[slot] = None
                self._release(slot)
                self._fail(req, "invalid_request", str(e))
            except Exception as e:
                self._slots[slot] = None
                self._release(slot)
                self._fail_internal(req, "start", e)

    def _next_prefill_slot(self) -> int | None:
        n = self.max_batch
        for k in range(1, n + 1):
            s = (self._rr + k) % n
            req = self._slots[s]
            if req is not None and not req.decoding:
                self._rr = s
                return s
        return None

    def _prefill(self, slot: int) -> None:
        req = self._slots[slot]
        before = req.seq.prefilled
        t0 = time.monotonic()
        try:
            token = self.engine.prefill_next(slot)
        except Exception as e:
            self._abort(slot, "prefill", e)
            return
        dt = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.prefill(req.seq.prefilled - before, dt)
        req.events.put(Progress(req.seq.prefilled, req.seq.prompt_len))
        if token is not None:
            req.t_first = time.monotonic()
            if self.metrics is not None:
                self.metrics.ttft(req.t_first - req.t_arrival)
            self._emit(slot, token)

    def _decode_steps(self) -> int:
        """Decode steps in this iteration's one device call. Bound: a cancellation, an admission or the
        next prefill chunk waits at most one iteration, i.e. one prefill chunk + n decode steps. n = 1 while
        a prompt is prefilling or a request is waiting (the interleaving described above, unchanged);
        otherwise engine.decode_block steps (16: ~180 ms at 11 ms/step, ~70 ms at 4.5 ms/step) and the
        device checks stop ids and max_new_tokens itself, so a finished slot wastes no steps."""
        with self._cond:
            waiting = bool(self._waiting)
        busy = waiting or any(r is not None and not r.decoding for r in self._slots)
        return 1 if busy else int(getattr(self.engine, "decode_block", 1))

    def _decode(self, slots: list[int]) -> None:
        try:
            tokens = self.engine.decode_steps(slots, self._decode_steps())
        except Exception as e:
            # a failed batched step cannot be pinned on one sequence: fail the ones in this step
            for s in slots:
                self._abort(s, "decode", e)
            return
        for s in slots:
            for token in tokens.get(s, ()):
                if self._slots[s] is None:       # finished (or failed) at an earlier token of this call
                    break
                self._emit(s, token)

    def _emit(self, slot: int, token: int) -> None:
        req = self._slots[slot]
        try:
            text, reason = req.seq.append(int(token))
        except Exception as e:
            self._abort(slot, "detokenize", e)
            return
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.token(None if req.t_last is None else now - req.t_last)
        req.t_last = now
        req.generated += 1
        req.events.put(Delta(text, (int(token),)))
        if reason is not None:
            self._end(slot, reason)

    # ---------------------------------------------------------------- endings
    def _usage(self, req: Request) -> Usage:
        now = time.monotonic()
        admitted = req.t_admitted if req.t_admitted is not None else now
        return Usage(prompt_tokens=len(req.prompt_ids), generated_tokens=req.generated,
                     ttft_s=(req.t_first - req.t_arrival) if req.t_first is not None else 0.0,
                     queue_s=admitted - req.t_arrival, total_s=now - req.t_arrival)

    def _end(self, slot: int, reason: str) -> None:
        """Normal end (stop/length) or cancellation of a running request: event, release, log."""
        req = self._slots[slot]
        self._slots[slot] = None
        self._release(slot)
        req.done = True
        req.events.put(Finished(reason, self._usage(req)))
        self._finished(req, reason, _CANCEL_STATUS[req._cancel_reason])

    def _finish_unstarted(self, req: Request) -> None:
        req.done = True
        req.events.put(Finished("cancelled", self._usage(req)))
        self._finished(req, "cancelled", _CANCEL_STATUS[req._cancel_reason])

    def _abort(self, slot: int, where: str, exc: Exception) -> None:
        req = self._slots[slot]
        if req is None:
            return
        self._slots[slot] = None
        self._release(slot)
        self._fail_internal(req, where, exc)

    def _fail_internal(self, req: Request, where: str, exc: Exception) -> None:
        log.error("request %s failed in %s:\n%s", req.id, where,
                  "".join(traceback.format_exception(exc)))
        self._fail(req, "internal", f"internal error in {where}: {type(exc).__name__}: {exc}")

    def _fail(self, req: Request, code: str, message: str) -> None:
        req.done = True
        req.events.put(Failed(code, message))
        self._finished(req, "error", code.upper())

    def _finished(self, req: Request, reason: str, status: str) -> None:
        if self.metrics is not None:
            self.metrics.finished(reason, status)
        if self.on_finish is not None:
            try:
                self.on_finish(req, reason, status)
            except Exception:
                log.error("on_finish hook failed:\n%s", traceback.format_exc())

    def _release(self, slot: int) -> None:
        try:
            self.engine.release(slot)
        except Exception:
            log.error("engine.release(%d) failed:\n%s", slot, traceback.format_exc())

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        with self._cond:
            waiting = len(self._waiting)
            running = [r for r in self._slots if r is not None]
        used = sum((r.seq.prefilled + r.generated) if r.seq is not None else 0 for r in running)
        self.metrics.gauges(waiting=waiting, running=len(running), reserved_slots=len(running),
                            used_tokens=used, max_batch=self.max_batch, max_model_len=self.max_model_len)
