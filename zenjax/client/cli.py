"""Command-line client: stream a generation from a zenjax server to the terminal.

    python -m zenjax.client "Write a haiku about JAX"          # raw text prompt
    python -m zenjax.client --chat "Write a haiku about JAX"   # as a user message (chat template)
    python -m zenjax.client --chat --file long_document.txt    # prompt from a file
    cat prompt.txt | python -m zenjax.client --chat -          # prompt from stdin

The answer streams to stdout; while a long prompt is prefilled, a progress bar is drawn on stderr
(only when stderr is a terminal). Errors print `error: CODE: message` and exit 1.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc

from zenjax.client import Client, Delta, Done, Progress


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zenjax.client", description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="?", help="prompt text, or - to read stdin")
    ap.add_argument("--file", help="read the prompt from this file")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    ap.add_argument("--system", help="system message (implies --chat)")
    ap.add_argument("--server", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    ap.add_argument("--api-key", default=None,
                    help="API key of a server started with --api-key-file (default: $ZENJAX_API_KEY)")
    ap.add_argument("--tls-ca", default=None, help="PEM file of the CA (or self-signed cert) to trust: use TLS")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--min-p", type=float)
    ap.add_argument("--repetition-penalty", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="wait up to this many seconds for a loading server to become SERVING (default %(default)s)")
    ap.add_argument("--usage", action="store_true", help="print token counts and timings to stderr")
    return ap


def read_prompt(args, ap, stdin=None) -> str:
    sources = [args.prompt is not None and args.prompt != "-", args.file is not None, args.prompt == "-"]
    if sum(sources) != 1:
        ap.error("give exactly one prompt source: a PROMPT argument, --file F, or - for stdin")
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            return f.read()
    if args.prompt == "-":
        return (stdin or sys.stdin).read()
    return args.prompt


class ProgressBar:
    """`prefill [########------------]  12,288/32,768 tokens` redrawn in place on a terminal."""

    def __init__(self, stream, width: int = 30):
        self.stream, self.width, self.shown = stream, width, False

    def update(self, done: int, total: int) -> None:
        if total <= 0:
            return
        fill = self.width * done // total
        self.stream.write(f"\rprefill [{'#' * fill}{'-' * (self.width - fill)}] {done:,}/{total:,} tokens")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def main(argv=None, stdout=None, stderr=None, stdin=None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    ap = _parser()
    args = ap.parse_args(argv)
    text = read_prompt(args, ap, stdin)
    prompt = text
    if args.chat or args.system:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": text}]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos or None)
    bar = ProgressBar(stderr) if stderr.isatty() else None
    roots = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            roots = f.read()
    with Client(args.server, api_key=args.api_key or os.environ.get("ZENJAX_API_KEY"),
                root_certificates=roots) as client:
        try:
            status = client.health_status()
            if status == "UNAVAILABLE":
                print(f"error: no server answers at {args.server} (start one with: python -m zenjax.serve)",
                      file=stderr)
                return 1
            if status != "SERVING" and args.wait:     # loading the model / warming up
                print(f"waiting up to {args.wait:.0f}s for {args.server} to be ready ({status})...", file=stderr)
                client.wait_ready(args.wait)
            for ev in client.generate(prompt, timeout=args.timeout, **sampling):
                if isinstance(ev, Progress):
                    # a one-chunk prompt needs no bar
                    if bar is not None and not (ev.prefilled == ev.total and not bar.shown):
                        bar.update(ev.prefilled, ev.total)
                elif isinstance(ev, Delta):
                    if bar is not None:
                        bar.clear()
                    stdout.write(ev.text)
                    stdout.flush()
                elif isinstance(ev, Done):
                    stdout.write("\n")
                    stdout.flush()
                    if ev.finish_reason == "cancelled":
                        print("[server cancelled the request: shutting down]", file=stderr)
                    if args.usage:
                        print(f"[{ev.finish_reason}] prompt {ev.prompt_tokens} tokens, generated "
                              f"{ev.generated_tokens}, first token after {ev.ttft_s:.3f}s, "
                              f"total {ev.total_s:.3f}s", file=stderr)
        except grpc.RpcError as e:
            if bar is not None:
                bar.clear()
            print(f"error: {e.code().name}: {e.details()}", file=stderr)
            return 1
        except TimeoutError as e:
            print(f"error: {e}", file=stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0
