"""Measures the converter's peak resident memory on a synthetic multi-GB sharded Qwen2 checkpoint.

    .venv/bin/python scripts/measure_convert_memory.py [--layers 16] [--shard-gb 2] [--keep]
        [--moe] [--quantization fp8]

Builds a random bf16 Qwen2 checkpoint shaped like Qwen2.5-3B's proportions (hidden 2048, mlp 11008,
16 q / 2 kv heads of 128, vocab 151936, untied: ~3.7 GB with 16 layers) split into shards of at most
--shard-gb GB with model.safetensors.index.json, runs `python -m zenjax.convert` on it in a subprocess,
and reports that subprocess's peak RSS (its own ru_maxrss from os.wait4, cross-checked with the VmHWM it
reports itself; the builder runs in a separate process so neither counts its memory) against the budget
of issue 2: largest input shard + 2 GB. --moe builds Qwen1.5-MoE-A2.7B's proportions instead (hidden 2048,
16/16 heads, 60 experts of width 1408 + a shared expert of 5632 per layer: ~1.1 GB of expert tensors per
layer, stacked by the converter into three [60, ...] parameters). Temp files are deleted
unless --keep. Exit code 1 when the budget is exceeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

GB = 1e9


def qwen2_config(layers: int, moe: bool = False) -> dict:
    if moe:
        return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
                "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": layers,
                "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
                "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    N, K = c["num_attention_heads"], c["num_key_value_heads"]
    H = D // N
    out = [("model.embed_tokens.weight", (V, D))]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "self_attn.q_proj.weight", (N * H, D)), (p + "self_attn.q_proj.bias", (N * H,)),
                (p + "self_attn.k_proj.weight", (K * H, D)), (p + "self_attn.k_proj.bias", (K * H,)),
                (p + "self_attn.v_proj.weight", (K * H, D)), (p + "self_attn.v_proj.bias", (K * H,)),
                (p + "self_attn.o_proj.weight", (D, N * H))]
        if "num_experts" not in c:
            out += [(p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                    (p + "mlp.down_proj.weight", (D, F))]
            continue
        E, Fe, Fs = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
        out.append((p + "mlp.gate.weight", (E, D)))
        for e in range(E):
            x = f"{p}mlp.experts.{e}."
            out += [(x + "gate_proj.weight", (Fe, D)), (x + "up_proj.weight", (Fe, D)),
                    (x + "down_proj.weight", (D, Fe))]
        x = p + "mlp.shared_expert."
        out += [(x + "gate_proj.weight", (Fs, D)), (x + "up_proj.weight", (Fs, D)),
                (x + "down_proj.weight", (D, Fs)), (p + "mlp.shared_expert_gate.weight", (1, D))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def build(src: Path, layers: int, shard_bytes: float, seed: int = 0, moe: bool = False) -> list[int]:
    """Writes config.json, shards and the index; returns the shard sizes in bytes."""
    from safetensors.numpy import save_file
    src.mkdir(parents=True)
    cfg = qwen2_config(layers, moe)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(cfg):      # HF-style greedy split by --shard-gb
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    wmap, sizes = {}, []
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (rng.random(s, dtype=np.float32) - 0.5).astype(ml_dtypes.bfloat16) for n, s in group}
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        del tensors
        wmap.update({n: fname for n, _ in group})
        sizes.append((src / fname).stat().st_size)
        print(f"  wrote {fname}: {sizes[-1] / GB:.2f} GB", flush=True)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": wmap}))
    return sizes


# The converter under a wrapper that also reports its own high-water mark (VmHWM) when done.
WRAPPER = """import sys
from zenjax.convert.__main__ import main
rc = main(sys.argv[2:])
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
open(sys.argv[1], 'w').write(hwm)
sys.exit(rc)"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--workdir", default=None, help="where to put the temp files (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    ap.add_argument("--moe", action="store_true", help="Qwen1.5-MoE-A2.7B proportions")
    ap.add_argument("--quantization", default=None, choices=("fp8",), help="passed to the converter")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.build_only:
        build(Path(args.build_only), args.layers, args.shard_gb * GB, moe=args.moe)
        return 0

    work = Path(tempfile.mkdtemp(prefix="zenjax-convmem-", dir=args.workdir))
    repo = Path(__file__).resolve().parent.parent
    try:
        # Build in a child process. Why: a child started from a big parent inherits the parent's RSS
        # high-water mark into its own ru_maxrss (vfork + exec), which would inflate the figure.
        print(f"building synthetic checkpoint in {work}", flush=True)
        subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--shard-gb",
                        str(args.shard_gb), "--build-only", str(work / "hf")] + ["--moe"] * args.moe, check=True)
        sizes = [f.stat().st_size for f in (work / "hf").glob("*.safetensors")]
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(work / "hwm"), "--hf", str(work / "hf"),
                                 "--out", str(work / "zj"), "--dtype", args.dtype]
                                + (["--quantization", args.quantization] if args.quantization else []), cwd=repo)
        _, status, usage = os.wait4(proc.pid, 0)        # this child's own rusage
        proc.returncode, secs = os.waitstatus_to_exitcode(status), time.time() - t0
        if proc.returncode != 0:
            print(f"converter failed with exit code {proc.returncode}")
            return proc.returncode
        peak = usage.ru_maxrss * 1024                    # Linux: KiB
        hwm = int((work / "hwm").read_text()) * 1024
        out_bytes = sum(f.stat().st_size for f in (work / "zj").rglob("*") if f.is_file())
        budget = max(sizes) + 2 * GB
        print(f"input:  {sum(sizes) / GB:.2f} GB in {len(sizes)} shards, largest {max(sizes) / GB:.2f} GB")
        print(f"output: {out_bytes / GB:.2f} GB ({args.dtype}) in {secs:.0f} s")
        print(f"peak RSS of the converter: {peak / GB:.2f} GB (ru_maxrss; VmHWM {hwm / GB:.2f} GB); budget "
              f"largest shard + 2 GB = {budget / GB:.2f} GB -> {'OK' if peak <= budget else 'OVER BUDGET'}")
        return 0 if peak <= budget else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
