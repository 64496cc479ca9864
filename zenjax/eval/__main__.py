"""Evaluations of zenjax models.

    python -m zenjax.eval passkey --checkpoint DIR --lengths 2k,8k,32k,128k --depths 10 [--no-dca]
                                  [--dca CHUNK,LOCAL[,ORIG]] [--server HOST:PORT] [--samples N] [--out DIR] [--seed S]
    python -m zenjax.eval plot RESULT.json [--out FILE.png] [--title TEXT]

`passkey` prints the accuracy table (rows = depth, columns = length) on stdout, a progress bar on stderr
(terminal only), and writes <out>/passkey_dca.json or passkey_nodca.json (+ .png with matplotlib).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zenjax.eval", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="task", required=True)
    p = sub.add_parser("passkey", help="passkey retrieval accuracy per (length, depth)")
    p.add_argument("--checkpoint", default=None, help="converted checkpoint dir (default: the embedded model)")
    p.add_argument("--server", default=None, help="HOST:PORT of a running zenjax server instead of --checkpoint")
    p.add_argument("--lengths", default="2k,8k,32k", help="comma list of context lengths, e.g. 2k,8k,32k,128k")
    p.add_argument("--depths", type=int, default=10, help="number of depths from 0%% to 100%%")
    p.add_argument("--samples", type=int, default=1, help="prompts (different keys and filler) per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dca", action="store_true", help="turn the checkpoint's DCA off (plain RoPE)")
    p.add_argument("--dca", default=None, metavar="CHUNK,LOCAL[,ORIG]",
                   help="DCA config overriding the checkpoint's (ORIG defaults to its max_position_embeddings)")
    p.add_argument("--attention", default="reference", help="reference | cudnn | pallas | auto")
    p.add_argument("--sparse", default="auto", metavar="auto|on|off|PATH",
                   help="sparse prefill: the checkpoint's sparse_attention_config.json (auto), off, or a file")
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new cells after this")
    p.add_argument("--out", default=".", help="directory for the JSON and PNG")
    p.add_argument("--name", default=None, help="file stem (default passkey_dca / passkey_nodca)")
    q = sub.add_parser("plot", help="redraw the heatmap of a passkey JSON")
    q.add_argument("result")
    q.add_argument("--out", default=None, help="PNG path (default: next to the JSON)")
    q.add_argument("--title", default=None)
    return ap


def parse_dca(text: str, checkpoint):
    """'1024,128' or '1024,128,2048' -> DCAConfig; ORIG defaults to the checkpoint's trained length."""
    from zenjax.checkpoint import read_config
    from zenjax.config import DCAConfig
    from zenjax.engine import DEFAULT_CHECKPOINT
    cfg, _ = read_config(Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT)
    return DCAConfig.parse(text, cfg.max_position_embeddings)


def run_passkey(args) -> dict:
    from zenjax.eval import passkey as pk
    lengths = [pk.parse_length(s) for s in args.lengths.split(",") if s.strip()]
    if not lengths:
        raise ValueError("--lengths: no length given")
    short = [L for L in lengths if L <= pk.ANSWER_RESERVE + 64]
    if short:
        raise ValueError(f"--lengths {short}: too short for a passkey prompt")
    dca = not args.no_dca
    if args.dca is not None:
        if args.no_dca:
            raise ValueError("--dca and --no-dca contradict each other")
        dca = parse_dca(args.dca, args.checkpoint)
    if args.server:
        if args.checkpoint or args.no_dca or args.dca or args.sparse != "auto":
            raise ValueError("--server: --checkpoint, --no-dca/--dca and --sparse are the server's choice, not the client's")
        backend = pk.ServerBackend(args.server)
    else:
        from zenjax.config import parse_sparse_choice
        backend = pk.LocalBackend(args.checkpoint, dca=dca, attention=args.attention,
                                  sparse=parse_sparse_choice(args.sparse),
                                  prefill_chunk=args.prefill_chunk, dtype=args.dtype)
    result = pk.evaluate(backend, lengths, pk.depth_grid(args.depths), samples=args.samples, seed=args.seed,
                         max_seconds=args.max_seconds)
    print(pk.format_table(result))
    name = args.name or ("passkey_dca" if result.get("dca") else "passkey_nodca")
    for path in pk.write_outputs(result, args.out, name):
        print(f"wrote {path}", file=sys.stderr)
    return result


def run_plot(args) -> None:
    import json
    from zenjax.eval import passkey as pk
    result = json.loads(Path(args.result).read_text())
    out = Path(args.out) if args.out else Path(args.result).with_suffix(".png")
    if not pk.save_heatmap(result, out, args.title):
        # `plot` has no other output: without matplotlib it must fail, not exit 0 having written nothing
        raise ValueError("plot needs matplotlib: pip install 'zenjax[plot]'")
    print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.task == "passkey":
            run_passkey(args)
        else:
            run_plot(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
