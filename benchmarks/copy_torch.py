"""The device copy bandwidth through torch, the check on benchmarks/common.py's JAX ceilings (run it in
the same lease, in its own process: JAX preallocates most of the GPU's memory).

    python3 benchmarks/copy_torch.py          # prints one JSON line

A 4 GiB bf16 device-to-device `copy_` (70x the H200's 60 MB L2), timed with CUDA events, 20 copies after
3 warm-ups, median; bytes counted read + written, as in common.copy_bandwidth.
"""
import json

import torch


def main() -> dict:
    n = 2 << 30                                          # elements: 4 GiB of bf16
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    assert torch.equal(a[:: 1 << 20], b[:: 1 << 20])
    t = sorted(times)[len(times) // 2]
    row = dict(peer="torch", torch=torch.__version__, device=torch.cuda.get_device_name(),
               copy_gib=4, median_ms=round(t * 1e3, 3), copy_tbs=round(2 * 2 * n / t / 1e12, 3))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
