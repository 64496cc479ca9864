"""Install a trained passkey model (the HF export of train.py) as zenjax's embedded default.

    .venv/bin/python benchmarks/passkey/install_default.py HF_DIR [--out zenjax/assets/default]

Converts with `zenjax.convert.convert_checkpoint(dtype="float32")` (the asset must stay < 4 MB: 0.92 M
parameters x 4 bytes), and replaces the absolute source path the converter records - a path on the
training machine means nothing inside a shipped package - with a note on where the weights come from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "zenjax" / "assets" / "default"


def install(hf_dir: Path, out: Path = OUT) -> int:
    from zenjax.convert import convert_checkpoint
    convert_checkpoint(hf_dir, out, dtype="float32", progress=False, force=True)
    cfg_path = out / "zenjax_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("source"), dict):
        cfg["source"]["hf_path"] = ("trained by benchmarks/passkey/train.py (passkey retrieval, prompts <= 2048 "
                                    "tokens); see benchmarks/passkey/README.md")
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    size = install(args.hf_dir, args.out)
    print(f"wrote {args.out}: {size / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
