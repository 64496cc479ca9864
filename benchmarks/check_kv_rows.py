"""GPU check of the Mosaic prefill kernel's kv_rows (compiled, not interpret mode; Hopper only).

    PYTHONPATH=. python3 benchmarks/check_kv_rows.py

7B head layout (28/4, d 128, DCA), a 4-row cache of 132096 keys (the 128K server's), a 512-row piece at
context 100K reading cache row 2: (1) in place (kv_rows) equals the kernel on a dynamic-slice copy of the row
(max |diff| of out and LSE printed; both compute on the same values, so 0 is expected); (2) ms per call of
each way, each in one jit, i.e. what the model's prefill did per layer before 6060b4a (slice) and does now.
"""
import time, jax, jax.numpy as jnp, numpy as np
from pallas_kernels.dca_prefill_mgpu import dca_prefill_mgpu
S, T, R = 132096, 512, 4
ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (3, 1, T, 28, 128), jnp.bfloat16)
k = jax.random.normal(ks[1], (R, S, 4, 128), jnp.bfloat16)
v = jax.random.normal(ks[2], (R, S, 4, 128), jnp.bfloat16)
qs, kl = jnp.asarray([100000], jnp.int32), jnp.asarray([100000 + T], jnp.int32)
kw = dict(chunk_len=253952, block_k=128, num_splits=4, interpret=False)
inplace = jax.jit(lambda q, k, v, r: dca_prefill_mgpu(q, k, v, qs, kl, kv_rows=r[None], **kw))
copied = jax.jit(lambda q, k, v, r: dca_prefill_mgpu(q, jax.lax.dynamic_slice_in_dim(k, r, 1, 0),
                                                     jax.lax.dynamic_slice_in_dim(v, r, 1, 0), qs, kl, **kw))
r = jnp.int32(2)
a, b = inplace(q, k, v, r), copied(q, k, v, r)
print("max|out diff|", float(jnp.max(jnp.abs(a[0].astype(jnp.float32) - b[0].astype(jnp.float32)))),
      "max|lse diff|", float(jnp.max(jnp.abs(a[1] - b[1]))))
for name, f in (("in_place", inplace), ("slice_copy", copied)):
    for _ in range(3): jax.block_until_ready(f(q, k, v, r))
    t = time.perf_counter()
    for _ in range(20): out = f(q, k, v, r)
    jax.block_until_ready(out)
    print(name, "ms per layer call", round((time.perf_counter() - t) / 20 * 1e3, 3))
