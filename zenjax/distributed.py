"""Several processes (hosts), one model: process 0 serves, the others follow its device steps.

JAX is multi-controller: every process runs the same program and every jitted step over a mesh that spans
processes must be called by all of them, in the same order, with the same arguments. zenjax keeps that
true by putting ONE process in charge:

    all processes   distributed_config(...) -> initialize(dc)    jax.distributed.initialize(coordinator,
                                                                 num_processes, process_id); jax.devices()
                                                                 is now every process's devices
                    zenjax.load(..., tensor_parallel=...)         the same weights, cache and jitted steps,
                                                                 sharded over the global mesh
    process 0       engine.runner = LeaderRunner(engine.runner)   serves gRPC / HTTP as usual; before each
                                                                 device call (set_row, prefill,
                                                                 prefill_all_logits, sample_first, decode)
                                                                 it broadcasts the call ("action")
    processes 1..   follow(engine.runner)                         a loop: receive the next action, make the
                                                                 same call on its own runner; "stop" ends it

An action is (op, args) pickled into a uint8 array and sent with
`jax.experimental.multihost_utils.broadcast_one_to_all`: first a [1] int64 length, then the bytes padded
to a power of two >= 256 (so the broadcast compiles for a bounded set of sizes). A prefill action carries
only its piece's tokens (<= prefill_chunk), not the whole prompt. Pickle is safe here: the bytes only flow
from process 0 to processes that already run whatever computations it dispatches.

The host work (tokenizing, scheduling, sampling bookkeeping, detokenizing) happens on process 0 only;
the followers never read a result. Outputs of the steps are replicated, so process 0 reads them as on
one host. On the CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`); on GPUs,
NCCL. Launch (README "Several hosts"):

    python -m zenjax.serve --tensor-parallel 8 --coordinator HOST0:1234 --num-processes 2 --process-id 0
    python -m zenjax.serve --tensor-parallel 8 --coordinator HOST0:1234 --num-processes 2 --process-id 1
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Callable, Mapping

import numpy as np

ENV_VARS = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}
MIN_PAYLOAD = 256          # smallest padded action size (bytes)


class DistributedError(ValueError):
    """A bad multi-process setting; the message names the flag or environment variable."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = None     # "host:port" of process 0's coordinator service
    num_processes: int = 1
    process_id: int = 0

    @property
    def enabled(self) -> bool:
        return self.num_processes > 1

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def add_arguments(ap) -> None:
    """The three flags on an argparse parser (the server's)."""
    ap.add_argument(FLAGS["coordinator"], default=None,
                    help=f"HOST:PORT of process 0's coordinator (several processes; env {ENV_VARS['coordinator']})")
    ap.add_argument(FLAGS["num_processes"], type=int, default=None,
                    help=f"processes in the job (default 1; env {ENV_VARS['num_processes']})")
    ap.add_argument(FLAGS["process_id"], type=int, default=None,
                    help=f"this process's id, 0 serves (env {ENV_VARS['process_id']})")


def distributed_config(coordinator: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None, env: Mapping[str, str] | None = None) -> DistributedConfig:
    """The one builder of a DistributedConfig: flags first, else the JAX_* environment variables, else a
    single process. DistributedError naming the flag (or variable) when a value is malformed."""
    env = os.environ if env is None else env
    given = dict(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
    where = {}
    for key, value in given.items():
        where[key] = FLAGS[key]
        if value is None and env.get(ENV_VARS[key]):
            where[key], value = ENV_VARS[key], env[ENV_VARS[key]]
            if key != "coordinator":
                try:
                    value = int(value)
                except ValueError:
                    raise DistributedError(f"{ENV_VARS[key]}={env[ENV_VARS[key]]!r}: expected an integer") from None
        given[key] = value
    n = 1 if given["num_processes"] is None else given["num_processes"]
    pid = 0 if given["process_id"] is None else given["process_id"]
    coord = given["coordinator"]
    if n < 1:
        raise DistributedError(f"{where['num_processes']}={n}: must be >= 1")
    if not 0 <= pid < n:
        raise DistributedError(f"{where['process_id']}={pid}: must be in [0, {n}) ({where['num_processes']}={n})")
    if n > 1:
        if not coord:
            raise DistributedError(f"{FLAGS['coordinator']} (or {ENV_VARS['coordinator']}) is required with "
                                   f"{where['num_processes']}={n}")
        host, _, port = coord.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"{where['coordinator']}={coord!r}: expected HOST:PORT")
    return DistributedConfig(coordinator=coord, num_processes=n, process_id=pid)


def initialize(dc: DistributedConfig) -> None:
    """jax.distributed.initialize for a multi-process config (nothing for one process). Call before any
    other JAX work: the backends (and so jax.devices()) start here."""
    if not dc.enabled:
        return
    import jax
    # The CPU backend runs cross-process collectives only with a collectives library: gloo (ships with
    # jaxlib). GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dc.coordinator, num_processes=dc.num_processes,
                               process_id=dc.process_id)


# ---------------------------------------------------------------- actions
class BroadcastChannel:
    """Process 0 -> every process, through broadcast_one_to_all (a collective: all processes call it)."""

    def __init__(self):
        import jax
        self.leader = jax.process_index() == 0

    def _bcast(self, payload: bytes | None) -> bytes:
        from jax.experimental.multihost_utils import broadcast_one_to_all
        n = np.zeros((1,), np.int64)
        if self.leader:
            n[0] = len(payload)
        size = int(np.asarray(broadcast_one_to_all(n))[0])
        padded = max(MIN_PAYLOAD, 1 << (size - 1).bit_length())
        buf = np.zeros((padded,), np.uint8)
        if self.leader:
            buf[:size] = np.frombuffer(payload, np.uint8)
        return np.asarray(broadcast_one_to_all(buf))[:size].tobytes()

    def send(self, action) -> None:
        self._bcast(pickle.dumps(action))

    def receive(self):
        return pickle.loads(self._bcast(None))


HOST_ONLY = frozenset({"temperature", "compiled_shapes"})    # Runner methods that touch no device


class LeaderRunner:
    """A Runner (zenjax/runner.py) on process 0 whose device calls are first sent to the followers;
    everything else (buckets, cache_len, trace_counts, ...) reads through to the runner."""

    def __init__(self, runner, channel=None):
        self._runner = runner
        self._channel = channel if channel is not None else BroadcastChannel()
        self._last_logits = None
        self.sent = 0

    def __getattr__(self, name):
        value = getattr(self._runner, name)
        if callable(value) and name not in HOST_ONLY:
            # a Runner method added later that nobody taught the followers: running it on process 0
            # alone would desynchronise the processes' collectives (a hang), so refuse it loudly
            raise AttributeError(f"LeaderRunner does not mirror Runner.{name} to the follower processes; "
                                 f"add it to zenjax/distributed.py (LeaderRunner and follow)")
        return value

    def _send(self, *action) -> None:
        self._channel.send(action)
        self.sent += 1

    def set_row(self, slot, sampler_values, **kw):
        self._send("set_row", slot, sampler_values, kw)
        return self._runner.set_row(slot, sampler_values, **kw)

    def prefill(self, slot, ids, start, end, sparse=False):
        self._send("prefill", slot, _piece(ids, start, end), start, end, len(ids), sparse)
        self._last_logits = self._runner.prefill(slot, ids, start, end, sparse=sparse)
        return self._last_logits

    def prefill_all_logits(self, slot, ids, start, end):
        self._send("prefill_all_logits", slot, _piece(ids, start, end), start, end, len(ids))
        return self._runner.prefill_all_logits(slot, ids, start, end)

    def sample_first(self, slot, logits):
        if logits is not self._last_logits:     # the followers hold their own last prefill's logits only
            raise RuntimeError("LeaderRunner.sample_first: logits must be the last prefill's result")
        self._send("sample_first", slot)
        return self._runner.sample_first(slot, logits)

    def decode(self, slots, n):
        self._send("decode", list(slots), n)
        return self._runner.decode(slots, n)

    def close(self) -> None:
        """Release the followers (their loop returns). Idempotent."""
        if self._channel is not None:
            self._send("stop")
            self._channel = None


def _piece(ids, start: int, end: int) -> np.ndarray:
    return np.asarray(ids[start:end], np.int32)


def _ids(piece, start: int, end: int, total: int) -> np.ndarray:
    """A length-`total` id array with the piece at [start, end): what the runner reads of a prompt."""
    ids = np.zeros((total,), np.int32)
    ids[start:end] = piece
    return ids


def follow(runner, channel=None, on_action: Callable | None = None) -> int:
    """Process 1..n: apply process 0's actions to `runner` until "stop"; returns how many were applied."""
    channel = channel if channel is not None else BroadcastChannel()
    last_logits, count = None, 0
    while True:
        op, *args = channel.receive()
        if op == "stop":
            return count
        if op == "set_row":
            slot, values, kw = args
            runner.set_row(slot, values, **kw)
        elif op == "prefill":
            slot, piece, start, end, total, sparse = args
            last_logits = runner.prefill(slot, _ids(piece, start, end, total), start, end, sparse=sparse)
        elif op == "prefill_all_logits":
            slot, piece, start, end, total = args
            runner.prefill_all_logits(slot, _ids(piece, start, end, total), start, end)
        elif op == "sample_first":
            runner.sample_first(args[0], last_logits)
        elif op == "decode":
            runner.decode(*args)
        else:
            raise RuntimeError(f"follower: unknown action {op!r} from process 0")
        count += 1
        if on_action is not None:
            on_action(op)


def follow_server(config) -> int:
    """`python -m zenjax.serve --process-id N` for N > 0: load the same engine as process 0 (same
    flags) and follow its steps until it stops; serves nothing. Returns the exit code (0)."""
    import sys

    import zenjax
    from zenjax.serve.service import engine_kwargs, use_compile_cache
    use_compile_cache(config.compile_cache)
    engine = zenjax.load(config.checkpoint, **engine_kwargs(config))
    n = follow(engine.runner)
    print(f"zenjax: process {config.distributed.process_id}: followed {n} steps of process 0", file=sys.stderr)
    return 0
