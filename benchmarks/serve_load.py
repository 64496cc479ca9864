"""Load test of the gRPC server: many concurrent clients, mixed prompts, some cancelling midway.

    .venv/bin/python benchmarks/serve_load.py                  # starts a server on the embedded model
    .venv/bin/python benchmarks/serve_load.py --clients 64 --server-args "--max-batch 4"
    .venv/bin/python benchmarks/serve_load.py --server 127.0.0.1:50051 --server-pid PID   # a running one

What it does (`run_load`), all on loopback:
    1. reference: each distinct request (prompt x sampling) alone, one after another; its token ids are
       what that request must produce under load (greedy, or sampling with a fixed seed; ignore_eos and
       max_new_tokens make the token count known);
    2. round 1 and round 2: `clients` threads start together (a barrier); client i sends distinct request
       i % n_distinct (neighbours differ, so a mixed-up stream cannot match), about 1 in 4 prompts is
       long, and every `cancel_every`-th client cancels its stream after a few tokens;
    3. checks: every non-cancelled stream ends with finish reason "length", exactly max_new_tokens tokens,
       and the token ids of its reference; no RPC fails; after the rounds the server is idle (metrics:
       no running or queued sequence) and still answers; the server's RSS after round 2 is within
       `rss_margin` of its RSS after round 1 (memory is flat: no per-request leak);
    4. reports requests/s and client-side p50/p99 time to first token per round.

`ServerProcess` (start a server subprocess on a free loopback port, read its JSON log) is shared with the
tests in tests/test_serve*.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from zenjax.client import FINISH_REASONS, Client  # noqa: E402


# ---------------------------------------------------------------- a server in a subprocess
class ServerProcess:
    """`python -m zenjax.serve --host 127.0.0.1 --port 0 ARGS` with its JSON log parsed as it arrives."""

    def __init__(self, args=(), env=None, timeout: float = 600.0):
        cmd = [sys.executable, "-m", "zenjax.serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.client = None
        try:
            listening = self.wait_event("listening", timeout)
            self.target = listening["address"]
            self.port = int(self.target.rsplit(":", 1)[1])
            self.http_port = self.http_url = None
            if "--http-port" in args:      # the OpenAI-compatible front end too (zenjax/serve/http_api.py)
                http = self.wait_event("http_listening", timeout)
                self.http_port, self.http_url = int(http["address"].rsplit(":", 1)[1]), http["url"]
            self.client = Client(self.target)
            self.client.wait_ready(timeout)
        except (RuntimeError, TimeoutError) as e:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not become SERVING: {e}\nserver stderr:\n{self.stderr_tail()}") from e

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stderr_tail(self, n: int = 40) -> str:
        with self._cond:
            return "".join(self.lines[-n:])

    def find(self, event: str, **match) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float, **match) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event
                         and all(e.get(k) == v for k, v in match.items())]
                if found:
                    return found[0]
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server never logged {event!r} {match} (exit code {self.proc.poll()})"
                                       f"\nserver stderr:\n{''.join(self.lines[-40:])}")
                self._cond.wait(0.2)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain) and wait; kill if it does not exit in time. Returns the exit code."""
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"server did not exit {timeout}s after SIGTERM\n{self.stderr_tail()}")
        return self.proc.returncode


def free_port() -> int:
    """A free loopback port (for --metrics-port; the gRPC port itself is chosen by the server: --port 0)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(compile_cache_dir: str | None = None, platform: str | None = "cpu") -> dict:
    """Environment for a server subprocess: JAX platform and a persistent compilation cache shared by
    every server started with the same directory (the second start of the same shapes skips compiling)."""
    env = dict(os.environ)
    if platform:
        env["JAX_PLATFORMS"] = platform
    if compile_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def rss_of_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def scrape_metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of 127.0.0.1:port/metrics as {name: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---------------------------------------------------------------- the load
def make_requests(n_distinct: int, vocab: int, short_len: int, long_len: int, max_new_tokens: int, seed: int):
    """Distinct (prompt ids, sampling) pairs; every 4th prompt is long, odd ones sample with a seed."""
    rng = random.Random(seed)
    lo, hi = 3, max(4, min(vocab, 32000) - 3)
    reqs = []
    for i in range(n_distinct):
        n = long_len if i % 4 == 0 else short_len + rng.randrange(0, max(1, short_len // 2))
        ids = [rng.randrange(lo, hi) for _ in range(n)]
        sampling = dict(max_new_tokens=max_new_tokens, ignore_eos=True)
        if i % 2:
            sampling.update(temperature=0.8, top_p=0.95, seed=1000 + i)
        reqs.append((ids, sampling))
    return reqs


def _one(client: Client, ids, sampling, cancel_after: int | None, barrier, timeout: float) -> dict:
    if barrier is not None:
        barrier.wait()
    t0 = time.monotonic()
    out = {"token_ids": [], "ttft_s": None, "reason": None, "error": None, "cancelled": False}
    call = client.generate_stream(ids, timeout=timeout, **sampling)
    try:
        for r in call:
            kind = r.WhichOneof("event")
            if kind == "delta":
                if out["ttft_s"] is None:
                    out["ttft_s"] = time.monotonic() - t0
                out["token_ids"].extend(r.delta.token_ids)
                if cancel_after is not None and len(out["token_ids"]) >= cancel_after:
                    call.cancel()
            elif kind == "finished":
                out["reason"] = FINISH_REASONS[r.finished.reason]
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            out["cancelled"] = True
        else:
            out["error"] = f"{e.code().name}: {e.details()}"
    out["total_s"] = time.monotonic() - t0
    return out


def _round(client: Client, reqs, clients: int, cancel_every: int, timeout: float, max_model_len: int) -> dict:
    barrier = threading.Barrier(clients)
    results: list[dict | None] = [None] * clients

    def worker(i):
        ids, sampling = reqs[i % len(reqs)]
        cancel_after = 2 if cancel_every and i % cancel_every == cancel_every - 1 else None
        if cancel_after is not None:
            # a cancelling client asks for all the room its slot has, so its stream cannot finish before
            # the cancel lands, whatever the machine's speed (with max_new_tokens 6 a fast server had
            # sent all 6 tokens and the final status before the client read its 2nd token)
            sampling = dict(sampling, max_new_tokens=max_model_len - len(ids))
        try:
            results[i] = _one(client, ids, sampling, cancel_after, barrier, timeout)
        except Exception as e:  # a bug in the harness must show, not hang
            results[i] = {"error": f"{type(e).__name__}: {e}", "token_ids": [], "cancelled": False}

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 60)
    wall = time.monotonic() - t0
    return {"results": results, "wall_s": wall}


def run_load(target: str, *, clients: int = 64, rounds: int = 2, n_distinct: int = 16, short_len: int = 24,
             long_len: int = 400, max_new_tokens: int = 16, cancel_every: int = 8, seed: int = 0,
             timeout: float = 600.0, server_pid: int | None = None, metrics_port: int | None = None,
             rss_margin: float = 0.10, rss_slack_bytes: int = 32 * 2**20) -> dict:
    """Run the load; returns a report dict. Raises AssertionError on any broken guarantee."""
    client = Client(target)
    try:
        client.wait_ready(timeout)
        info = client.model_info()
        assert long_len + max_new_tokens <= info.max_model_len, \
            f"long_len + max_new_tokens = {long_len + max_new_tokens} > server max_model_len {info.max_model_len}"
        reqs = make_requests(min(n_distinct, clients), info.architecture.vocab_size, short_len, long_len,
                             max_new_tokens, seed)
        # 1. references, one request at a time
        refs = []
        for ids, sampling in reqs:
            r = _one(client, ids, sampling, None, None, timeout)
            assert r["error"] is None and r["reason"] == "length", f"reference request failed: {r}"
            refs.append(r["token_ids"])
        report = {"clients": clients, "distinct_requests": len(reqs), "max_new_tokens": max_new_tokens,
                  "short_len": short_len, "long_len": long_len, "cancel_every": cancel_every, "rounds": []}
        rss = []
        for k in range(rounds):
            res = _round(client, reqs, clients, cancel_every, timeout, info.max_model_len)
            completed = cancelled = 0
            ttfts = []
            for i, r in enumerate(res["results"]):
                assert r is not None, f"client {i}: never finished (stream lost)"
                assert r["error"] is None, f"client {i}: {r['error']}"
                if r["cancelled"]:
                    cancelled += 1
                    continue
                assert not (cancel_every and i % cancel_every == cancel_every - 1), \
                    f"client {i}: asked to cancel after 2 tokens, but its stream ended {r['reason']!r}"
                want = refs[i % len(reqs)]
                assert r["reason"] == "length", f"client {i}: finish reason {r['reason']!r}, expected 'length'"
                assert len(r["token_ids"]) == max_new_tokens, \
                    f"client {i}: {len(r['token_ids'])} tokens, expected {max_new_tokens}"
                assert r["token_ids"] == want, \
                    f"client {i}: tokens differ from the same request alone (mixed streams?)\n" \
                    f"  got  {r['token_ids']}\n  want {want}"
                completed += 1
                ttfts.append(r["ttft_s"])
            _wait_idle(metrics_port, timeout=60)
            if server_pid is not None:
                rss.append(rss_of_pid(server_pid))
            report["rounds"].append({
                "completed": completed, "cancelled": cancelled, "wall_s": round(res["wall_s"], 3),
                "requests_per_s": round(completed / res["wall_s"], 3),
                "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 4),
                "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 4)})
        # the server still answers after the load
        after = _one(client, *reqs[0], None, None, timeout)
        assert after["token_ids"] == refs[0], "server output changed after the load"
        if len(rss) >= 2:
            report["rss_bytes"] = rss
            limit = rss[0] * (1 + rss_margin) + rss_slack_bytes
            report["rss_limit_bytes"] = int(limit)
            assert rss[-1] <= limit, (f"server RSS grew from {rss[0] / 2**20:.1f} MiB after round 1 to "
                                      f"{rss[-1] / 2**20:.1f} MiB after round {len(rss)} (limit "
                                      f"{limit / 2**20:.1f} MiB)")
        return report
    finally:
        client.close()


def _wait_idle(metrics_port: int | None, timeout: float) -> None:
    """Cancelled streams free their slots within an engine step; wait until the server shows none."""
    if metrics_port is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        m = scrape_metrics(metrics_port)
        if m.get("zenjax_running_sequences") == 0 and m.get("zenjax_queue_depth") == 0:
            return
        assert time.monotonic() < deadline, f"server not idle after the round: {m}"
        time.sleep(0.1)


def add_load_args(ap: argparse.ArgumentParser) -> None:
    """The load shape and report flags this script and serve_load_http.py share."""
    ap.add_argument("--server-args", default="--max-batch 4 --max-model-len 1024 --prefill-chunk 128",
                    help="arguments for the started server (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--distinct", type=int, default=16)
    ap.add_argument("--short-len", type=int, default=24)
    ap.add_argument("--long-len", type=int, default=400)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--cancel-every", type=int, default=8)
    ap.add_argument("--json", help="also write the report here")


def load_kwargs(a) -> dict:
    """run_load / run_load_http keyword arguments from add_load_args' flags."""
    return dict(clients=a.clients, rounds=a.rounds, n_distinct=a.distinct, short_len=a.short_len,
                long_len=a.long_len, max_new_tokens=a.max_new_tokens, cancel_every=a.cancel_every)


def write_report(report: dict, path: str | None) -> None:
    print(json.dumps(report, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", help="HOST:PORT of a running server (default: start one)")
    ap.add_argument("--server-pid", type=int, help="its pid, for the RSS check")
    ap.add_argument("--metrics-port", type=int, help="its metrics port, for the idle check")
    add_load_args(ap)
    a = ap.parse_args(argv)
    server = None
    target, pid, mport = a.server, a.server_pid, a.metrics_port
    if target is None:
        mport = free_port()
        server = ServerProcess([*shlex.split(a.server_args), "--metrics-port", str(mport),
                                "--max-queue", str(max(64, a.clients))], env=server_env(platform=None))
        target, pid = server.target, server.proc.pid
    try:
        report = run_load(target, **load_kwargs(a), server_pid=pid, metrics_port=mport)
    finally:
        if server is not None:
            rc = server.stop()
            print(f"server exit code after SIGTERM: {rc}", file=sys.stderr)
    write_report(report, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
