"""(Copy of ../shared/bench/peer_hf.py, so it travels to the device machine.) Peer: Hugging Face transformers (torch, sdpa attention) on the Qwen2.5-7B-Instruct-1M shape, random
bf16 weights, batch 1. TTFT (one-shot prefill, logits of the last row only) and decode ms/token.
Same FLOP count as zenjax's benchmarks/prefill.py. Prints one JSON line per row."""
import json, sys, time
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768,131072").split(",")]
dec_ctx = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "8192,131072").split(",")]
MOE = len(sys.argv) > 3 and sys.argv[3] == "moe"      # zenjax addition: the Qwen1.5-MoE-A2.7B shape
if MOE:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM as Qwen2ForCausalLM
    cfg = Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                         moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                         max_position_embeddings=65536, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
else:
    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=1010000,
                      rope_theta=1e7, rms_norm_eps=1e-5, tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("meta"):
    m = Qwen2ForCausalLM(cfg)
m = m.to_empty(device="cuda").to(torch.bfloat16)
with torch.no_grad():
    for n, p in m.named_parameters():
        if "norm" in n: p.fill_(1.0)
        else: p.normal_(0, 0.02)
m.eval()
D, F, N, K, H, Lyr = 3584, 18944, 28, 4, 128, 28
if MOE:     # weights one token multiplies by: router, 4 of 60 experts, the shared expert and its gate
    D, F, N, K, H, Lyr = 2048, 4 * 1408 + 5632, 16, 16, 128, 24
lp = Lyr * (D * (N + 2 * K) * H + N * H * D + 3 * D * F + (61 * D if MOE else 0))
print(json.dumps(dict(peer="transformers", shape="qwen1.5-moe-a2.7b" if MOE else "qwen2.5-7b", torch=torch.__version__, device=torch.cuda.get_device_name(),
                      attn=m.config._attn_implementation)), flush=True)

def prefill(L):
    ids = torch.randint(0, cfg.vocab_size, (1, L), device="cuda")
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.no_grad():
        out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out.past_key_values, tok

prefill(1024)
for L in lengths:
    try:
        torch.cuda.reset_peak_memory_stats()
        dt, pkv, tok = prefill(L)
        fl = 2 * lp * L + Lyr * 2 * L * L * N * H
        print(json.dumps(dict(kind="prefill", tokens=L, ttft_s=round(dt, 3), tflops=round(fl / dt / 1e12, 1),
                              peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))), flush=True)
        del pkv
    except Exception as e:
        print(json.dumps(dict(kind="prefill", tokens=L, error=repr(e)[:300])), flush=True)
    torch.cuda.empty_cache()
for C in dec_ctx:
    try:
        _, pkv, tok = prefill(C)
        steps, ts = 32, []
        with torch.no_grad():
            for i in range(steps + 3):
                torch.cuda.synchronize(); t = time.perf_counter()
                out = m(input_ids=tok[:, None], past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                tok = out.logits[:, -1].argmax(-1)
                torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        dt = sorted(ts[3:])[len(ts[3:]) // 2]
        by = 2 * lp + 2 * cfg.vocab_size * D + 2 * Lyr * C * K * H * 2
        print(json.dumps(dict(kind="decode", context=C, ms_per_token=round(dt * 1e3, 2), gbs=round(by / dt / 1e9, 1))), flush=True)
        del pkv
    except Exception as e:
        print(json.dumps(dict(kind="decode", context=C, error=repr(e)[:300])), flush=True)
    torch.cuda.empty_cache()
