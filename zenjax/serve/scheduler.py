"""The scheduler: one thread that owns the engine and multiplexes requests onto its batch slots.

Walk of the flow (front-end handlers on the left: gRPC threads or HTTP tasks, both through
zenjax/serve/service.py; the scheduler thread on the right):

    handler: tokenize + validate -> Request --submit()--> waiting queue (bounded; full -> QueueFull)
                                                          |
    scheduler loop, one iteration:                        v
      1. reap     cancelled requests: waiting ones are dropped, running ones released (slot freed)
      2. admit    waiting -> free slots, FIFO: engine.start(slot, ids, params[, reuse_min]); with prefix
                  reuse on, the free slot whose cache holds the longest reusable prefix of the prompt
                  (engine.reusable), else the one released longest ago (its content is the least likely
                  to be asked for again)
      3. prefill  pieces of the prefilling slots, round-robin: ONE full-size piece when no stream decodes
                  (or max_itl_ms = 0), else as many pieces as fit the inter-token budget (below)
                  -> Progress event per piece; after a prompt's last piece its first token -> Delta event
                  Fused (the engine's prefill_and_decode, when it has several slots): while streams
                  decode, the iteration's ONE piece and one decode step of every decoding slot are one
                  device call (one read of the weights for both) -> its Deltas, and step 4 is skipped
      4. decode   ONE device call of n steps for every slot past prefill -> one Delta per token; a
                  finished sequence gets its Finished event and its slot is released (tokens the call made
                  past a stop string are dropped). n: see `_decode_steps`
    handler: reads its Request.events queue and turns each event into its protocol's message.

The inter-token budget (max_itl_ms, default 100 in ServerConfig; 0 = unbounded). A running stream gets
the tokens of one decode call at once, so the gap it sees between tokens is the time from one decode
call to the next: this iteration's prefill work plus the decode call. A prefill piece's cost grows with
its size and with the context it attends to (a 8192-token piece takes 150-500 ms at 128K on an H200 and
seconds at 1M), so pieces are sized, not fixed:
    left = budget - bound(decode call of 1 step)        (no prefill until one decode call was measured)
    while a prompt prefills: take the largest compiled bucket whose piece has bound <= left (the first
        piece of an iteration runs even if none fits: the smallest bucket, so a long prompt never
        starves); left -= its measured time
    decode: n = 1 while a prompt prefills (the largest share of time for prefill: the long prompt's TTFT
        stays close to prefill alone); otherwise the largest n <= engine.decode_block whose bound fits
        what this iteration's prefill left of the budget (decode blocks are streams' gaps too)
`bound` is pacing.CostBound: an upper bound on a step's time from recent measured ones (host wall clock
of the call; the engine waits for each piece), valid for any cost c0 + size * (a + b * context) with
non-negative coefficients, so nothing needs to be fitted or configured. When no stream decodes, a
prompt prefills at full speed (one largest piece per iteration, as with the budget off).
Worked example, budget 100 ms, decode step 8 ms, a 128K prompt prefilling while a chat decodes: at
context 64K a 2048-token piece measured 60 ms, so each iteration runs one 2048 piece (2 x 60 > 92) and,
with the 32 ms left, the largest smaller piece whose bound fits (1024 if <= 32 ms, else 512, ...), then
one decode step: a token every ~100 ms.
At 1M context where even one 256 piece takes longer than the budget, each iteration runs that one piece
and one decode step: the gap is one smallest piece (the best the compiled buckets allow).
Fused, the iteration is one call: the largest bucket whose fused call is bounded within the whole budget
(`fused_cost`, its own CostBound; before one was measured, the piece's bound plus the decode step's). One
piece per iteration, not several: each extra piece pays the weights and the fixed costs once more, while
an extra iteration costs only its decode rows, so fewer, larger pieces give the long prompt the shorter
TTFT (and the streams a gap shorter than the budget). In the example: one 2048 piece per iteration at 64K.
Round-robin over prefilling prompts bounds a newly admitted prompt's wait by one piece per other
prefilling prompt. Piece sizes now depend on timing; a dense prefill's result does not (only rounding
changes), but a sparse one estimates its indices from each piece's last queries, so with sparse prefill
on, the output of a long prompt varies within the sparse approximation with the pieces it was cut into.

KV memory is reserved, not paged: the engine's cache holds max_batch x max_model_len tokens, and a
request admitted to a slot owns max_model_len of them until it finishes. The handler rejects requests
with prompt + max_new_tokens > max_model_len before they are queued, so an admitted request can never
run out of cache mid-generation.

The engine is not thread-safe, so only this thread calls it. The scheduler uses the engine's slot API
(start, prefill_next, decode_steps, append_token, release) and its queries (slot_state -> a frozen
SlotView, next_piece, reusable, prefill_buckets, decode_block); it never reads the engine's sequence
objects. Handlers talk to it through `submit` / `Request.cancel` (a lock + condition variable) and
read results from per-request queues. An exception raised for one request fails that request only.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import traceback
from typing import Callable, Sequence

from zenjax.sampling import SamplingParams
from zenjax.serve.errors import QueueFull, Unavailable
from zenjax.serve.events import Delta, Failed, Finished, Progress, Usage
from zenjax.serve.pacing import CostBound

__all__ = ["Delta", "Failed", "Finished", "Progress", "QueueFull", "Request", "Scheduler", "ShuttingDown",
           "Usage"]

log = logging.getLogger("zenjax.serve")


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
        self.reused = 0                       # prompt tokens taken from the slot's cache (prefix reuse)
        self.slot: int | None = None
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
                 on_finish: Callable[[Request, str, str], None] | None = None, max_itl_ms: float = 0.0,
                 reuse_min: int = 0, clock: Callable[[], float] = time.monotonic, fuse: bool = True):
        """max_itl_ms: inter-token budget of running streams (0 = unbounded: one piece per iteration);
        reuse_min: prefix reuse of at least this many tokens (0 = off); clock: measures step times
        (tests inject a scripted one); fuse: run a piece and the running streams' decode step as one call
        where the engine can (False: separate calls, the benchmarks' baseline). The server's defaults are
        ServerConfig's."""
        if max_itl_ms < 0 or reuse_min < 0:
            raise ValueError(f"max_itl_ms={max_itl_ms} and reuse_min={reuse_min} must be >= 0")
        self.engine = engine
        self.max_itl_s = max_itl_ms / 1000.0
        self.reuse_min = int(reuse_min)
        self.clock = clock
        # (bucket, end position) -> seconds, for dense and for sparse pieces (different costs)
        self.prefill_cost = {False: CostBound(), True: CostBound()}
        self.decode_cost = CostBound()       # (steps, tokens cached in the decoding slots) -> seconds
        # a piece fused with one decode step of the running streams (engine.prefill_and_decode), when the
        # engine can: (bucket, end position) -> seconds, dense and sparse
        self.fuse = bool(fuse and engine.fuses_decode)
        self.fused_cost = {False: CostBound(), True: CostBound()}
        self._released = [0] * int(engine.max_batch)   # release order of each slot (LRU choice)
        self._release_count = 0
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
        self._prefill_spent = 0.0             # seconds of prefill pieces in this iteration so far

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
        """One iteration: reap, admit, prefill work (module docstring), one decode call."""
        self._reap()
        self._admit()
        self._prefill_spent = 0.0
        worked, decoded = self._prefill_work()
        decoding = self._decoding()
        if decoding and not decoded:
            self._decode(decoding)
            worked = True
        self.steps += worked
        self._gauges()

    def _decoding(self) -> list[int]:
        return [s for s, r in enumerate(self._slots) if r is not None and r.decoding]

    def _prefill_work(self) -> tuple[bool, bool]:
        """Step 3 of the loop: (a piece ran, the decoding slots got their step with it)."""
        decoding = self._decoding()
        if decoding and self.fuse:
            slot = self._next_prefill_slot()
            if slot is None:
                return False, False
            if self.max_itl_s <= 0:
                self._prefill(slot, None, decoding)
            else:
                self._prefill(slot, self._fused_size(slot, decoding), decoding)
            return True, True
        if self.max_itl_s <= 0 or not decoding:
            slot = self._next_prefill_slot()
            if slot is None:
                return False, False
            self._prefill(slot, None)
            return True, False
        if not len(self.decode_cost):
            return False, False              # no decode call measured yet: this iteration's call measures one
        left = self.max_itl_s - self.decode_cost.bound(1, self._decode_context(decoding))
        ran = 0
        while True:
            slot = self._next_prefill_slot(peek=True)
            if slot is None:
                break
            size = self._piece_size(slot, left, first=ran == 0)
            if size is None:
                break
            self._rr = slot
            left -= self._prefill(slot, size)
            ran += 1
        return ran > 0, False

    def _piece_size(self, slot: int, left: float, first: bool) -> int | None:
        """The largest prefill bucket whose piece of `slot` is bounded within `left` seconds; the smallest
        one for the iteration's first piece when none is (progress); None: stop prefilling."""
        cost = self.prefill_cost[self.engine.slot_state(slot).sparse]
        size = self._largest_within(slot, left, cost.bound)
        return size if size is not None or not first else min(self.engine.prefill_buckets)

    def _fused_size(self, slot: int, decoding: list[int]) -> int:
        """The largest bucket whose piece of `slot` fused with a decode step of `decoding` is bounded within
        the budget; the smallest one when none is (progress). Before any fused call of that kind was
        measured, a bound is the piece's plus the decode step's (each measured alone), if both exist."""
        sparse = self.engine.slot_state(slot).sparse
        fused, alone = self.fused_cost[sparse], self.prefill_cost[sparse]
        step = self.decode_cost.bound(1, self._decode_context(decoding)) if len(self.decode_cost) else None

        def bound(bucket, end):
            b = fused.bound(bucket, end)
            if b is None and step is not None:
                piece = alone.bound(bucket, end)
                b = None if piece is None else piece + step
            return b
        size = self._largest_within(slot, self.max_itl_s, bound)
        return size if size is not None else min(self.engine.prefill_buckets)

    def _largest_within(self, slot: int, left: float, bound) -> int | None:
        """The largest prefill bucket whose next piece of `slot` has bound(bucket, end) <= left, else None."""
        for b in sorted(self.engine.prefill_buckets, reverse=True):
            _, end, bucket = self.engine.next_piece(slot, b)
            est = bound(bucket, end)
            if est is not None and est <= left:
                return b
        return None

    def _decode_context(self, slots: list[int]) -> int:
        return sum(self.engine.slot_state(s).cached for s in slots)

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
            slot = self._pick_slot(req)           # only this thread changes _slots: no lock needed to read
            with self._cond:
                self._slots[slot] = req
            req.slot, req.t_admitted = slot, time.monotonic()
            try:
                if self.reuse_min > 0:
                    self.engine.start(slot, req.prompt_ids, req.params, reuse_min=self.reuse_min)
                else:
                    self.engine.start(slot, req.prompt_ids, req.params)
            except ValueError as e:               # refused before touching the slot: what it holds stays
                self._slots[slot] = None
                self._release(slot)
                self._fail(req, "invalid_request", str(e))
                continue
            except Exception as e:
                self._slots[slot] = None
                self._release(slot, keep=False)
                self._fail_internal(req, "start", e)
                continue
            req.reused = self.engine.slot_state(slot).reused
            if req.reused and self.metrics is not None:
                self.metrics.reused(req.reused)

    def _pick_slot(self, req: Request) -> int:
        """A free slot for req: the first one, or with prefix reuse on the one
        holding the longest reusable prefix, else the least recently released."""
        free = [s for s, r in enumerate(self._slots) if r is None]
        if self.reuse_min <= 0:
            return free[0]
        return max(free, key=lambda s: (self.engine.reusable(s, req.prompt_ids, self.reuse_min), -self._released[s]))

    def _next_prefill_slot(self, peek: bool = False) -> int | None:
        n = self.max_batch
        for k in range(1, n + 1):
            s = (self._rr + k) % n
            req = self._slots[s]
            if req is not None and not req.decoding:
                if not peek:
                    self._rr = s
                return s
        return None

    def _prefill(self, slot: int, max_tokens: int | None, decode: list[int] | None = None) -> float:
        """One piece of `slot` (<= max_tokens), fused with one decode step of the slots in `decode` if
        given; returns its measured seconds."""
        req = self._slots[slot]
        view = self.engine.slot_state(slot)
        before = view.prefilled
        cost = (self.fused_cost if decode else self.prefill_cost)[view.sparse]
        _, end, bucket = self.engine.next_piece(slot, max_tokens)
        t0 = self.clock()
        tokens: dict = {}
        try:
            if decode:
                token, tokens = self.engine.prefill_and_decode(slot, decode, max_tokens)
            elif max_tokens is None:
                token = self.engine.prefill_next(slot)
            else:
                token = self.engine.prefill_next(slot, max_tokens)
        except Exception as e:
            # a failed fused step cannot be pinned on one sequence: every slot in it fails
            for s in [slot] + list(decode or ()):
                self._abort(s, "prefill", e)
            return self.clock() - t0
        dt = self.clock() - t0
        self._prefill_spent += dt
        cost.add(bucket, end, dt)
        view = self.engine.slot_state(slot)
        if self.metrics is not None:
            self.metrics.prefill(view.prefilled - before, dt, bucket)
        self._emit_all(tokens)
        req.events.put(Progress(view.prefilled, view.prompt_len))
        if token is not None:
            req.t_first = time.monotonic()
            if self.metrics is not None:
                self.metrics.ttft(req.t_first - req.t_arrival)
            self._emit(slot, token)
        return dt

    def _decode_steps(self, slots: list[int]) -> int:
        """Decode steps in this iteration's one device call.

        Budget off (max_itl_ms = 0): n = 1 while a prompt is prefilling or a request is waiting (a
        cancellation, an admission or the next prefill piece waits at most one piece + one step), else
        engine.decode_block (16: ~180 ms at 11 ms/step, ~70 ms at 4.5 ms/step).
        Budget on: n = 1 while a prompt is prefilling; otherwise the largest n <= decode_block whose
        bound fits what this iteration's prefill pieces left of the budget (1 before any decode call was
        measured): the iteration that ran a prompt's last piece must not add a full block to that gap.
        Either way the device checks stop ids and max_new_tokens itself, so a finished slot wastes no steps."""
        block = int(getattr(self.engine, "decode_block", 1))
        prefilling = any(r is not None and not r.decoding for r in self._slots)
        if self.max_itl_s <= 0:
            with self._cond:
                waiting = bool(self._waiting)
            return 1 if (waiting or prefilling) else block
        if prefilling:
            return 1
        context = self._decode_context(slots)
        left = self.max_itl_s - self._prefill_spent
        for n in range(block, 1, -1):
            bound = self.decode_cost.bound(n, context)
            if bound is not None and bound <= left:
                return n
        return 1

    def _decode(self, slots: list[int]) -> None:
        n = self._decode_steps(slots)
        context = self._decode_context(slots)
        t0 = self.clock()
        try:
            tokens = self.engine.decode_steps(slots, n)
        except Exception as e:
            # a failed batched step cannot be pinned on one sequence: fail the ones in this step
            for s in slots:
                self._abort(s, "decode", e)
            return
        self.decode_cost.add(n, context, self.clock() - t0)
        self._emit_all(tokens)

    def _emit_all(self, tokens: dict) -> None:
        """The tokens of a decode call per slot, in order, up to where each slot finished."""
        for s, toks in tokens.items():
            for token in toks:
                if self._slots[s] is None:       # finished (or failed) at an earlier token of this call
                    break
                self._emit(s, token)

    def _emit(self, slot: int, token: int) -> None:
        req = self._slots[slot]
        try:
            text, reason = self.engine.append_token(slot, int(token))
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
                     queue_s=admitted - req.t_arrival, total_s=now - req.t_arrival, reused_tokens=req.reused)

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
        self._release(slot, keep=False)          # the row's content is unknown after a failed step
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

    def _release(self, slot: int, keep: bool = True) -> None:
        self._release_count += 1
        self._released[slot] = self._release_count
        try:
            if keep:
                self.engine.release(slot)
            else:
                self.engine.release(slot, keep=False)
        except Exception:
            log.error("engine.release(%d) failed:\n%s", slot, traceback.format_exc())

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        with self._cond:
            waiting = len(self._waiting)
            running = [s for s, r in enumerate(self._slots) if r is not None]
        used = 0
        for s in running:
            try:
                used += self.engine.slot_state(s).cached
            except KeyError:                  # between the slot's claim and engine.start
                pass
        self.metrics.gauges(waiting=waiting, running=len(running), reserved_slots=len(running),
                            used_tokens=used, max_batch=self.max_batch, max_model_len=self.max_model_len)
