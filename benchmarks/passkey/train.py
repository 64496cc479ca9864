"""Train zenjax's demo model: a small Qwen2-architecture model that retrieves passkeys from 2K-token prompts.

    # CPU smoke (seconds): a toy model, a few steps, exports a loadable HF checkpoint
    PYTHONPATH=. python3 benchmarks/passkey/train.py --toy --steps 3 --out /tmp/pk
    # the demo model (GPU, a few minutes): train for a wall-clock budget, export, evaluate
    PYTHONPATH=. python3 benchmarks/passkey/train.py --seconds 150 --out $OUT \\
        --eval-lengths 2k,8k,32k --eval-seconds 80

Walk:
1. data (benchmarks/passkey/data.py): prompts from zenjax.eval.passkey.make_prompt, total lengths
   uniform in [T/2, T] for buckets T in {512, 1024, 2048} at a constant tokens-per-batch; short
   buckets dominate the first 15% of training (a curriculum: the retrieval heads form on short prompts);
2. forward: zenjax's own Qwen2 (zenjax/model.py) built from the params dict inside the loss, one prefill
   step over a fresh KV cache (write_pos = arange(T), q_start = 0, kv_len = T), impl="reference",
   logits for every row;
3. loss: mean NLL of the answer tokens + 0.1 x mean NLL of the other tokens;
4. DCA augmentation (--dca-aug 256,512,1024): on a share of the steps the same <= 2K prompt is attended
   through DCA with a smaller chunk c (local c / 8), so one training prompt spans several DCA chunks;
   no sequence and no relative distance exceeds 2K. DCA temperature augmentation: at inference DCA
   multiplies q and k by m(L) = 1 + 0.1 ln(L / 2048)
   (m = 1.28 at 32K, 1.42 at 128K). Since RoPE is linear, scaling the q and k projections (weights and
   biases) by m is the same thing;
   half of the steps draw m ~ U(1, 1.45) so the model sees the sharper attention it will meet at 16-64x;
5. AdamW (b2 0.95, wd 0.1, clip 1.0), linear warmup + cosine decay to 10%, scheduled on the fraction of
   the --steps or --seconds budget (compilation is done ahead of time and not counted);
6. export a Hugging Face directory (config.json with dual_chunk_attention_config, model.safetensors,
   generation_config.json, tokenizer files) that `python -m zenjax.convert` ingests; with --eval-lengths,
   convert it and run the passkey evaluation (DCA on and off) through zenjax.load, writing JSON.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))                       # run from a checkout without installing zenjax
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import TOKENIZER_DIR, Prefetcher, check_concatenation, load_tokenizer  # noqa: E402

from zenjax.config import DCAConfig, ModelConfig  # noqa: E402
from zenjax.model import KVCache, Qwen2, StepInputs, init_params  # noqa: E402
from zenjax.params import param_specs, to_hf_tensors  # noqa: E402

TRAIN_LEN = 2048
# The config written into the export (and shipped): chunk c = 1024 = half the training length, local
# w = c / 8. Measured (benchmarks/passkey/README.md): with --dca-aug the model reads 32K-128K at c = 1024
# but gets the 4th key digit wrong at c = 2048 (0-5% at 8K-32K): it learned DCA's inter-chunk pattern
# at distances up to the largest augmentation chunk (1024), not up to 2048.
DCA = DCAConfig(chunk_size=1024, local_size=128, original_max_position_embeddings=2048)
# D, F, layers, N, K, H: 0.89 M parameters, 3.5 MB in float32 (the shipped asset must stay < 4 MB)
DEMO = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)
TOY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def model_config(vocab_size: int, sizes: dict) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       max_position_embeddings=TRAIN_LEN, dca=None, **sizes)


def scale_qk(params: dict, m):
    """Multiply every layer's q and k projections (weights and biases) by m: the DCA temperature. In the
    fused w_qkv [D, K, G+2, H] and b_qkv [K, G+2, H] (zenjax/params.py) q and k are entries 0..G of the
    part axis; v (entry G+1) keeps its scale."""
    def qk(x, axis):
        f = jnp.ones((x.shape[axis],), x.dtype).at[:-1].set(m)
        return x * f.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
    layers = {l: dict(p, w_qkv=qk(p["w_qkv"], 2), b_qkv=qk(p["b_qkv"], 1)) for l, p in params["layers"].items()}
    return dict(params, layers=layers)


def forward(cfg: ModelConfig, params: dict, tokens):
    """All-row logits [B, T, V] of one prefill step from position 0 (the engine's model code)."""
    B, T = tokens.shape
    inp = StepInputs(tokens=tokens, q_start=jnp.zeros((B,), jnp.int32), kv_len=jnp.full((B,), T, jnp.int32),
                     write_pos=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                     temp=jnp.ones((B,), jnp.float32))
    logits, _ = Qwen2(cfg, params)(inp, KVCache.zeros(cfg, B, T, jnp.float32), impl="reference")
    return logits


def loss_fn(params, cfg, batch, m):
    logits = forward(cfg, scale_qk(params, m), batch["tokens"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]      # [B, T]
    ans, oth = batch["answer"], batch["other"]
    ans_loss = (nll * ans).sum() / jnp.maximum(ans.sum(), 1.0)
    oth_loss = (nll * oth).sum() / jnp.maximum(oth.sum(), 1.0)
    # key exact match under teacher forcing: all 5 digit predictions right
    pred = jnp.argmax(logits, axis=-1)
    rows = jnp.arange(pred.shape[0])[:, None]
    hit = (pred[rows, batch["digits"]] == batch["targets"][rows, batch["digits"]]).all(-1)
    return ans_loss + 0.1 * oth_loss, {"answer_nll": ans_loss, "other_nll": oth_loss, "key_acc": hit.mean()}


def make_optimizer(peak_lr: float):
    # the schedule is applied on the host (fraction of the budget) through inject_hyperparams
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=peak_lr, b1=0.9, b2=0.95,
                                                             weight_decay=0.1))


def lr_at(frac: float, peak: float, warmup: float = 0.03) -> float:
    if frac < warmup:
        return peak * frac / warmup
    t = min(1.0, (frac - warmup) / (1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def set_lr(opt_state, lr: float):
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state


def bucket_weights(frac: float, buckets: list[int]) -> np.ndarray:
    """Curriculum: the shortest buckets first, then mostly full-length prompts."""
    n = len(buckets)
    w = np.array([2.0 ** -i for i in range(n)]) if frac < 0.15 else np.linspace(1.0, 2.5, n)
    return w / w.sum()


# ------------------------------------------------------------------------------------------ export

def hf_config(cfg: ModelConfig, bos: int, eos: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "max_position_embeddings": TRAIN_LEN, "max_window_layers": cfg.num_layers, "use_sliding_window": False,
        "sliding_window": None, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True, "bos_token_id": bos,
        "eos_token_id": eos, "torch_dtype": "float32", "dual_chunk_attention_config": DCA.to_hf(),
    }


def load_hf_params(cfg: ModelConfig, src: Path) -> dict:
    """Params dict from an HF directory written by export_hf (to continue training a checkpoint)."""
    from safetensors.numpy import load_file
    from zenjax.params import from_hf_tensors, nested_set
    tensors = load_file(str(Path(src) / "model.safetensors"))
    params: dict = {}
    for path, spec in param_specs(cfg).items():
        nested_set(params, path, jnp.asarray(from_hf_tensors(spec, tensors)))
    return params


def export_hf(cfg: ModelConfig, params: dict, tok, dst: Path) -> None:
    """Write a Hugging Face Qwen2 directory (as save_pretrained lays it out)."""
    from safetensors.numpy import save_file
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER_DIR / name, dst / name)
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    (dst / "config.json").write_text(json.dumps(hf_config(cfg, endoftext, im_end), indent=2) + "\n")
    generation = {"bos_token_id": endoftext, "pad_token_id": endoftext, "eos_token_id": [im_end, endoftext],
                  "do_sample": False, "temperature": 0.0}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {}
    for path, spec in param_specs(cfg).items():
        x = params
        for k in path:
            x = x[k]
        for name, t in to_hf_tensors(spec, np.asarray(x, np.float32)).items():
            tensors[name] = np.ascontiguousarray(t)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ training

def train(args) -> tuple[ModelConfig, dict, list]:
    tok = load_tokenizer()
    check_concatenation(tok)
    vocab = -(-tok.vocab_size // 64) * 64
    cfg = model_config(vocab, TOY if args.toy else DEMO)
    n_params = sum(int(np.prod(s.shape)) for s in param_specs(cfg).values())
    print(f"model: {n_params / 1e6:.2f} M parameters, {cfg}", file=sys.stderr)
    params = init_params(cfg, jax.random.key(args.seed), jnp.float32)
    if args.init:
        params = load_hf_params(cfg, args.init)
        print(f"initialised from {args.init}", file=sys.stderr)
    opt = make_optimizer(args.lr)
    opt_state = opt.init(params)
    buckets = [int(b) for b in args.buckets.split(",") if int(b) <= args.max_len] or [args.max_len]

    def make_step(step_cfg):
        def step(params, opt_state, batch, m):
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, step_cfg, batch, m)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss)
        return jax.jit(step, donate_argnums=(0, 1))

    # DCA augmentation (--dca-aug): the same <= 2K-token prompts attended through DCA with a SMALLER chunk
    # size c (local w = c / 8, the shipped ratio), so that a 2K prompt already spans several DCA chunks.
    # Neither the sequence length nor any relative distance exceeds 2K; what the model learns is the DCA
    # pattern it meets at 16-64x: many keys sharing a rotated position, the capped inter-chunk query.
    dca_chunks = [int(c) for c in args.dca_aug.split(",") if c] if args.dca_aug else []
    variants = [None] + dca_chunks
    cfgs = {c: cfg if c is None else dataclasses.replace(cfg, dca=DCAConfig(c, c // 8, TRAIN_LEN)) for c in variants}
    steps = {c: make_step(cfgs[c]) for c in variants}
    data = Prefetcher(tok, args.seed, args.tokens_per_batch, buckets)
    t0 = time.time()

    def spec(T):
        B = data.batch_size(T)
        return {"tokens": jax.ShapeDtypeStruct((B, T), jnp.int32), "targets": jax.ShapeDtypeStruct((B, T), jnp.int32),
                "answer": jax.ShapeDtypeStruct((B, T), jnp.float32), "other": jax.ShapeDtypeStruct((B, T), jnp.float32),
                "digits": jax.ShapeDtypeStruct((B, 5), jnp.int32)}
    shaped = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    # a DCA variant is only compiled for buckets longer than its chunk (else it is plain attention)
    keys = [(T, c) for T in buckets for c in variants if c is None or cfgs[c].dca.chunk_len < T]
    with concurrent.futures.ThreadPoolExecutor(min(8, len(keys))) as pool:   # XLA compiles in parallel
        futures = {(T, c): pool.submit(lambda T=T, c=c: steps[c].lower(
                       shaped(params), shaped(opt_state), spec(T), jax.ShapeDtypeStruct((), jnp.float32)).compile())
                   for T, c in keys}
        compiled = {key: f.result() for key, f in futures.items()}
    print(f"compiled {keys} in {time.time() - t0:.1f}s", file=sys.stderr)

    rng = np.random.default_rng(args.seed + 1)
    log, step_i, tokens_seen = [], 0, 0
    t_start = time.time()
    while True:
        elapsed = time.time() - t_start
        frac = step_i / args.steps if args.steps else elapsed / args.seconds
        if frac >= 1.0:
            break
        T = int(rng.choice(buckets, p=bucket_weights(frac, buckets)))
        b = data.get(T)
        batch = {"tokens": b.tokens, "targets": b.targets, "answer": b.answer, "other": b.other, "digits": b.digits}
        m = 1.0 if rng.random() < 0.5 or args.no_temp_aug else float(rng.uniform(1.0, 1.45))
        usable = [c for c in dca_chunks if (T, c) in compiled]
        c = None if not usable or rng.random() >= args.dca_aug_p else int(rng.choice(usable))
        opt_state = set_lr(opt_state, lr_at(frac, args.lr))
        params, opt_state, metrics = compiled[(T, c)](params, opt_state, batch, jnp.float32(m))
        step_i += 1
        tokens_seen += b.tokens.size
        if step_i % args.log_every == 0 or step_i == 1:
            row = {k: round(float(v), 4) for k, v in metrics.items()}
            row.update(step=step_i, T=T, dca_chunk=c, m=round(m, 3), lr=round(lr_at(frac, args.lr), 6),
                       seconds=round(time.time() - t_start, 1), tokens=tokens_seen)
            log.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    data.close()
    print(f"trained {step_i} steps, {tokens_seen / 1e6:.1f} M tokens in {time.time() - t_start:.0f}s",
          file=sys.stderr)
    return cfg, jax.tree.map(np.asarray, params), log


def evaluate_export(hf_dir: Path, out: Path, lengths: str, seconds: float, samples: int, chunk: int) -> None:
    """Convert the export and run the passkey eval with DCA on and off (engine path, reference attention)."""
    from zenjax.convert import convert_checkpoint
    from zenjax.eval import passkey as pk
    ckpt = Path(tempfile.mkdtemp()) / "zenjax"
    convert_checkpoint(hf_dir, ckpt, dtype="float32", progress=False)
    lens = [pk.parse_length(s) for s in lengths.split(",")]
    long = [L for L in lens if L > 32768]
    short = [L for L in lens if L <= 32768]
    t0 = time.time()
    budget = lambda share: max(1.0, share - (time.time() - t0))
    # the DCA figures first (they are the claim), then DCA off (the expected collapse) with what is left
    runs = [("dca", True, short, 0.45 * seconds), ("dca", True, long, 0.75 * seconds),
            ("nodca", False, short, seconds)]
    results: dict = {}
    for name, dca, ls, share in runs:
        if not ls:
            continue
        backend = pk.LocalBackend(ckpt, dca=dca, prefill_chunk=chunk, dtype="float32")
        r = pk.evaluate(backend, ls, pk.depth_grid(10), samples=samples, max_seconds=budget(share), progress=False)
        if name in results:          # append the long lengths to the DCA table
            prev = results[name]
            for k in ("lengths", "accuracy", "cells", "skipped"):
                prev[k] = prev[k] + r[k]
            prev["per_length"].update(r["per_length"])
            prev["seconds"] += r["seconds"]
        else:
            results[name] = r
        print(f"--- {name}\n{pk.format_table(results[name])}", file=sys.stderr, flush=True)
        (out / f"eval_{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/hf (the HF checkpoint), OUT/train_log.json")
    ap.add_argument("--toy", action="store_true", help="tiny model and 256-token prompts (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps (else --seconds)")
    ap.add_argument("--seconds", type=float, default=150.0, help="wall-clock training budget")
    ap.add_argument("--max-len", type=int, default=TRAIN_LEN)
    ap.add_argument("--tokens-per-batch", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="continue from this HF export (model.safetensors)")
    ap.add_argument("--buckets", default="512,1024,2048", help="training sequence lengths (curriculum buckets)")
    ap.add_argument("--no-temp-aug", action="store_true")
    ap.add_argument("--dca-aug", default="", help="DCA augmentation: chunk sizes c, e.g. 256,512,1024 (local c/8)")
    ap.add_argument("--dca-aug-p", type=float, default=0.5, help="share of steps trained with DCA augmentation")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-lengths", default="", help="after export: evaluate these lengths, e.g. 2k,8k,32k")
    ap.add_argument("--eval-seconds", type=float, default=60.0)
    ap.add_argument("--eval-samples", type=int, default=1)
    ap.add_argument("--eval-prefill-chunk", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.toy:
        args.max_len = min(args.max_len, 256)
        args.tokens_per_batch = min(args.tokens_per_batch, 1024)
    t0 = time.time()
    cfg, params, log = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    export_hf(cfg, params, load_tokenizer(), args.out / "hf")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(jax.devices()[0]),
            "config": cfg.to_dict(), "log": log, "seconds": round(time.time() - t0, 1)}
    (args.out / "train_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"exported {args.out / 'hf'}", file=sys.stderr, flush=True)
    if args.eval_lengths:
        evaluate_export(args.out / "hf", args.out, args.eval_lengths, args.eval_seconds, args.eval_samples,
                        args.eval_prefill_chunk)


if __name__ == "__main__":
    main()
