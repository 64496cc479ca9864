"""python -m zenjax.convert --hf SRC --out DST [--dtype bfloat16|float16|float32] [--quantization fp8] [--force]

Exit codes: 0 converted; 2 refused (the message names the file, tensor or field); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from zenjax.checkpoint import DTYPES
from zenjax.params import QUANTIZATIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zenjax.convert",
                                 description="Convert a Hugging Face Qwen2 checkpoint directory to zenjax.")
    ap.add_argument("--hf", required=True, metavar="SRC", help="local Hugging Face model directory")
    ap.add_argument("--out", required=True, metavar="DST", help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weight dtype (default bfloat16)")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                    help="fp8: linear layers as e4m3 with one float32 scale per output channel")
    ap.add_argument("--force", action="store_true", help="replace a non-empty DST")
    args = ap.parse_args(argv)
    from zenjax.convert import ConvertError, convert_checkpoint
    try:
        convert_checkpoint(args.hf, args.out, dtype=args.dtype, force=args.force, quantization=args.quantization)
    except ConvertError as e:
        print(f"zenjax.convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zenjax.convert: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"zenjax.convert: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
