"""Logical axes -> mesh axes, and the layout of a tensor- / expert-parallel mesh.

Weights and the KV cache name their dimensions with logical axes (zenjax/params.py); RULES map them onto
a `jax.sharding.Mesh`, so parallelism is configuration. The mesh has three axes, always in this order:

    "ep"   expert parallel: the stacked MoE experts [E, ...] are split ep ways; everything else
           (attention, the dense and shared MLPs, activations) is replicated over it
    "tp"   tensor parallel over kv heads: the KV cache and wk / wv are split here
    "kvr"  kv-head replicas: when tp > K (more devices than kv heads), each kv head lives on tp / K
           devices and the q heads of its group are split over those (vLLM does the same)

q heads and MLP widths are split over ("tp", "kvr") together, i.e. tensor_parallel ways. Example: Qwen2.5-
14B (40 q / 8 kv heads) at tensor_parallel=8 -> mesh (ep 1, tp 8, kvr 1): one kv head and 5 q heads per
device. Qwen2.5-3B (16 q / 2 kv) at 4 -> (1, 2, 2): devices (0, 1) hold kv head 0 and q heads 0-3, 4-7;
devices (2, 3) kv head 1 and q heads 8-11, 12-15; a q head's kv head is on its device, so the attention
kernels run per device on local heads (zenjax/attention/__init__.py wraps them in `jax.shard_map`).

What does not split is refused by `parallelism` with the numbers: tensor_parallel must divide the q heads
(every device computes whole heads) and either divide the kv heads or be a multiple of them. Qwen2.5-7B
(28 q / 4 kv) runs at tensor_parallel 1, 2 or 4 (7 q heads and one kv head per device); 8 is refused:
28 q heads do not split 8 ways (vLLM refuses it too; padding every group of 7 q heads to 8 with zero
heads would make it possible at 8/7 of the attention FLOPs, not done).

`parallelism(cfg, tp, ep)` is the one function that builds a `Parallelism`; `make_mesh` lays it out.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("ep", "tp", "kvr")
HEAD_AXES = ("tp", "kvr")          # what q heads and MLP widths split over (tensor_parallel ways)

RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": None, "embed": None, "norm": None, "head_dim": None,
    "q_heads": HEAD_AXES, "kv_heads": "tp", "mlp": HEAD_AXES,
    "batch": None, "cache_seq": None,
    # the part axes of fused weights (zenjax/params.py): w_qkv's q|k|v within a kv head, w_gate_up's gate|up
    "qkv": None, "gate_up": None,
    # Qwen2-MoE: the stacked expert weights [E, ...] name their expert axis "experts" (split over "ep"),
    # each expert's width "expert_mlp" (tensor parallel like "mlp"); the router [D, E] is small and stays
    # replicated, so every device routes every token the same way.
    "experts": "ep", "expert_mlp": HEAD_AXES, "router": None,
}


class ParallelismError(ValueError):
    """A tensor / expert parallel layout that the model's shapes or the devices cannot take; names both."""


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How one model is split over devices: tp = tensor_parallel (heads, MLP widths), ep =
    expert_parallel (MoE experts), kv_split = the part of tp that splits kv heads (min(tp, K)); the
    rest, tp // kv_split, replicates each kv head. Devices used: ep * tp."""

    tp: int = 1
    ep: int = 1
    kv_split: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.ep

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.ep, self.kv_split, self.tp // self.kv_split


def _tp_fits(cfg, tp: int) -> str | None:
    """Why tensor_parallel=tp does not fit cfg, or None."""
    N, K = cfg.num_heads, cfg.num_kv_heads
    if N % tp:
        return f"{N} query heads do not split {tp} ways (every device computes whole heads)"
    if K % tp and tp % K:
        return (f"{K} kv heads neither split {tp} ways nor replicate evenly over {tp} devices "
                f"({tp} is not a multiple of {K})")
    widths = [("intermediate_size", cfg.intermediate_size)]
    if getattr(cfg, "moe", None) is not None:
        widths += [("moe_intermediate_size", cfg.moe.moe_intermediate_size),
                   ("shared_expert_intermediate_size", cfg.moe.shared_expert_intermediate_size)]
    for name, f in widths:
        if f % tp:
            return f"{name}={f} does not split {tp} ways"
    return None


def parallelism(cfg, tp: int = 1, ep: int = 1) -> Parallelism:
    """The one builder of a Parallelism for model config `cfg`; ParallelismError naming the numbers (and
    the values that would work) when tp or ep does not fit."""
    for name, v in (("tensor_parallel", tp), ("expert_parallel", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParallelismError(f"{name}={v!r}: expected an integer >= 1")
    why = _tp_fits(cfg, tp)
    if why is not None:
        ok = [d for d in range(1, cfg.num_heads + 1) if _tp_fits(cfg, d) is None]
        raise ParallelismError(f"tensor_parallel={tp}: {why}; this model takes tensor_parallel in {ok}")
    if ep > 1:
        E = cfg.moe.num_experts if getattr(cfg, "moe", None) is not None else None
        if E is None:
            raise ParallelismError(f"expert_parallel={ep}: the model has no experts (not a Qwen2-MoE)")
        if E % ep:
            raise ParallelismError(f"expert_parallel={ep}: {E} experts do not split {ep} ways")
    return Parallelism(tp=tp, ep=ep, kv_split=min(tp, cfg.num_kv_heads))


def make_mesh(tp: "int | Parallelism" = 1, devices=None, *, cfg=None, ep: int = 1) -> Mesh:
    """The ("ep", "tp", "kvr") mesh over the first ep * tp devices (default: one device). With `cfg`, tp
    and ep are checked against the model (`parallelism`) and kv heads are replicated when tp > K;
    without it the mesh is (ep, tp, 1)."""
    par = tp if isinstance(tp, Parallelism) else (parallelism(cfg, tp, ep) if cfg is not None
                                                  else Parallelism(tp=tp, ep=ep, kv_split=tp))
    devices = devices if devices is not None else jax.devices()
    if par.devices > len(devices):
        raise ParallelismError(f"tensor_parallel={par.tp} x expert_parallel={par.ep} = {par.devices} devices "
                               f"exceeds the {len(devices)} available")
    return Mesh(np.asarray(devices[:par.devices]).reshape(par.shape), MESH_AXES)


def check_mesh(cfg, mesh: Mesh | None) -> None:
    """ParallelismError when `mesh` (any mesh with zenjax's axes) cannot hold cfg's heads and experts."""
    if mesh is None:
        return
    tp = mesh_size(mesh, HEAD_AXES)
    parallelism(cfg, tp, mesh_size(mesh, ("ep",)))
    if mesh_size(mesh, ("tp",)) != min(tp, cfg.num_kv_heads):
        raise ParallelismError(f"mesh {dict(mesh.shape)}: its 'tp' axis must be min(tensor_parallel, "
                               f"kv heads) = {min(tp, cfg.num_kv_heads)} (use make_mesh(..., cfg=cfg))")


def mesh_size(mesh: Mesh | None, axes) -> int:
    """Product of the sizes of the named mesh axes that exist (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in axes if a in mesh.axis_names], dtype=np.int64))


def _mesh_axes(logical: str | None, mesh: Mesh):
    """The mesh axes a logical axis maps to on this mesh (size-1 axes dropped): None, a name or a tuple."""
    m = RULES.get(logical) if logical is not None else None
    names = (m,) if isinstance(m, str) else tuple(m or ())
    names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return None if not names else names[0] if len(names) == 1 else names


def spec_for(axes: tuple[str | None, ...], mesh: Mesh) -> P:
    return P(*(_mesh_axes(a, mesh) for a in axes))


def sharding_for(axes: tuple[str | None, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, mesh))


def spec_axes(spec: P) -> tuple[str, ...]:
    """Every mesh axis a PartitionSpec splits over (e.g. for a psum of partial sums)."""
    out: list[str] = []
    for entry in spec:
        out += [entry] if isinstance(entry, str) else list(entry or ())
    return tuple(out)


def is_sharded(mesh: Mesh | None) -> bool:
    """Whether `mesh` spans more than one device (else every path runs as on one device)."""
    return mesh is not None and mesh.size > 1


def constrain(x, mesh: Mesh | None, axes: tuple[str | None, ...]):
    """with_sharding_constraint of x to its logical axes (no-op on one device). The model pins its
    activations with it at layer boundaries so XLA's propagation cannot pick another layout."""
    if not is_sharded(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(axes, mesh))


CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")   # KV cache [B, S, K, H]
ACT_AXES = ("batch", None, "embed")                          # activations [B, T, D]: replicated


def shard_params(cfg, params: dict, mesh: Mesh) -> dict:
    """A params tree (zenjax/params.py layout, fp8 scales included) placed on `mesh` by each parameter's
    logical axes; what zenjax.load does tensor by tensor, for params already in memory (benchmarks)."""
    from zenjax.params import iter_paths, nested_set, param_specs
    has_fp8 = any(p[-1].endswith("_scale") for p, _ in iter_paths(params))
    specs = param_specs(cfg, "fp8" if has_fp8 else None)
    out: dict = {}
    for path, value in iter_paths(params):
        nested_set(out, path, jax.device_put(value, sharding_for(specs[path].axes, mesh)))
    return out
