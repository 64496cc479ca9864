"""The zenjax checkpoint format: how converted weights lie on disk, and how they are written and read.

    DST/zenjax_config.json   {"format": 2, "model": ModelConfig.to_dict(), "dtype": "bfloat16",
                              "quantization": null | "fp8", "fp8_layout": "out_major" (fp8 only),
                              "generation": {...}, "sparse_attention_config": <json or null>, "source": {...}}
    DST/params/manifest.json {"items": [...], "params": {"layers/0/w_qkv": {"shape": [..], "dtype": ".."}, ...}}
    DST/params/<item>/       one Orbax PyTree checkpoint per item (see `item_of`)
    DST/tokenizer.json, ...  tokenizer and generation files copied verbatim from the HF directory

Why one Orbax item per layer instead of one checkpoint for the whole tree: a single Orbax save needs
the whole tree in memory, i.e. 15 GB for a 7B model in bf16. With one item per layer (plus one per
top-level tensor: embed, final_norm, lm_head), the converter holds one layer (~0.5 GB for 7B) at a time
and the loader restores one item, hands each array to `put` (which moves it to the device), and drops
the host copy before the next item. Each item's tree is the sub-dict of the full params tree with the
same paths, so the full tree is simply the union of the items:

    item "embed"     -> {"embed": [V, D]}
    item "layers/3"  -> {"layers": {"3": {"attn_norm": [D], "w_qkv": [D, K, G+2, H], ...}}}

Write flow: `CheckpointWriter(dir, cfg, dtype)` -> `write_item(name, tree)` per item as it completes ->
`finish(...)` writes the manifest and zenjax_config.json last. The converter writes into a temporary
directory and renames it at the end, so a directory with zenjax_config.json is a complete checkpoint.

With quantization "fp8" the linear layers are stored as float8_e4m3fn plus float32 "<name>_scale"
params (zenjax/params.py, zenjax/fp8.py); "dtype" is then the dtype of everything else. The values are
out-major ([out..., in...]); "fp8_layout" says so, and an fp8 checkpoint without it (written before
2026-12-07 in the [in..., out...] order) is refused with a request to convert again.

Format 2 (2026-12-07) stores q|k|v and gate|up fused (zenjax/params.py); a format 1 checkpoint (separate
wq / wk / wv, w_gate / w_up) is refused with a request to convert it again from its HF directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from zenjax.config import ConfigError, ModelConfig
from zenjax.params import QUANTIZATIONS, ParamSpec, iter_paths, nested_set, param_specs

FORMAT_VERSION = 2
FP8_LAYOUT = "out_major"
CONFIG_FILE = "zenjax_config.json"
PARAMS_DIR = "params"
MANIFEST_FILE = "manifest.json"
DTYPES = ("bfloat16", "float16", "float32")
# Files copied verbatim from a Hugging Face directory (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")

Path_ = tuple[str, ...]
PutFn = Callable[[Path_, ParamSpec, np.ndarray], Any]


class CheckpointError(ValueError):
    """The directory is not a (complete, readable) zenjax checkpoint; the message names the file."""


def np_dtype(name: str) -> np.dtype:
    """'bfloat16' | 'float16' | 'float32' (| 'float8_e4m3fn' for fp8 weights) -> numpy dtype (bfloat16 and
    e4m3 through ml_dtypes)."""
    import ml_dtypes
    if name == "float8_e4m3fn":
        return np.dtype(ml_dtypes.float8_e4m3fn)
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(DTYPES)}")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def stored_dtype(spec: ParamSpec, dtype: str) -> str:
    """The dtype a param is stored in: fixed by the layout (fp8 values, float32 scales) or the checkpoint's."""
    return spec.dtype or dtype


def item_of(path: Path_) -> str:
    """The Orbax item a parameter belongs to: 'layers/<l>' for layer params, else its top-level name."""
    return "/".join(path[:2]) if path[0] == "layers" else path[0]


def items(cfg: ModelConfig, quantization: str | None = None) -> dict[str, list[tuple[Path_, ParamSpec]]]:
    """Items in streaming order (embed, layers/0..L-1, final_norm, lm_head), each with its params."""
    out: dict[str, list[tuple[Path_, ParamSpec]]] = {}
    for path, spec in param_specs(cfg, quantization).items():
        out.setdefault(item_of(path), []).append((path, spec))
    return out


# Stored uncompressed in chunks of at most 64 MB. Why: with Orbax's default (zstd, one chunk per
# array) saving a 0.6 GB embedding held ~1.1 GB of extra buffers (peak RSS 2.6 GB instead of 1.5 GB on
# the synthetic checkpoint of scripts/measure_convert_memory.py) for a 25% smaller file, and every load
# would have to decompress; chunking also bounds what tensorstore buffers on save and restore.
USE_COMPRESSION = False
CHUNK_BYTES = 64 << 20


def _checkpointer():
    import orbax.checkpoint as ocp   # imported lazily: it pulls in jax, slow for `--help`
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=USE_COMPRESSION))


class CheckpointWriter:
    """Writes a checkpoint item by item. The directory must not exist (it is created)."""

    def __init__(self, directory: str | Path, cfg: ModelConfig, dtype: str, quantization: str | None = None):
        self.dir = Path(directory)
        self.cfg, self.dtype, self.quantization = cfg, dtype, quantization
        self._dt = np_dtype(dtype)
        self._items = items(cfg, quantization)
        self._written: dict[str, dict] = {}
        (self.dir / PARAMS_DIR).mkdir(parents=True)
        self._ckpt = _checkpointer()

    def write_item(self, name: str, tree: dict) -> None:
        """Validates `tree` against the layout (every param of the item, right shape and dtype) and saves it."""
        if name not in self._items:
            raise ValueError(f"unknown checkpoint item {name!r}")
        if name in self._written:
            raise ValueError(f"checkpoint item {name!r} written twice")
        got = dict(iter_paths(tree))
        want = {p: s for p, s in self._items[name]}
        if set(got) != set(want):
            raise ValueError(f"item {name!r}: params {sorted(got)} != expected {sorted(want)}")
        for p, s in want.items():
            a = got[p]
            dt = stored_dtype(s, self.dtype)
            if tuple(a.shape) != s.shape or a.dtype != np_dtype(dt):
                raise ValueError(f"param {'/'.join(p)}: {a.dtype}{list(a.shape)} != {dt}{list(s.shape)}")
        import jax
        import orbax.checkpoint as ocp
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
        self._ckpt.save((self.dir / PARAMS_DIR / name).absolute(),
                        args=ocp.args.PyTreeSave(tree, save_args=save_args))
        self._written[name] = {"/".join(p): {"shape": list(a.shape), "dtype": stored_dtype(want[p], self.dtype)}
                               for p, a in got.items()}

    def finish(self, *, generation: Mapping | None = None, sparse_attention_config: Any = None,
               source: Mapping | None = None) -> None:
        """Writes manifest.json and zenjax_config.json (last). Every item must have been written."""
        missing = [n for n in self._items if n not in self._written]
        if missing:
            raise ValueError(f"checkpoint items never written: {missing}")
        manifest = {"items": list(self._items),
                    "params": {k: v for n in self._items for k, v in self._written[n].items()}}
        _write_json(self.dir / PARAMS_DIR / MANIFEST_FILE, manifest)
        _write_json(self.dir / CONFIG_FILE, {
            "format": FORMAT_VERSION, "model": self.cfg.to_dict(), "dtype": self.dtype,
            "quantization": self.quantization, **({"fp8_layout": FP8_LAYOUT} if self.quantization else {}),
            "generation": dict(generation or {}), "sparse_attention_config": sparse_attention_config,
            "source": dict(source or {})})


def save_checkpoint(directory: str | Path, cfg: ModelConfig, params: dict, *, dtype: str = "bfloat16",
                    generation: Mapping | None = None, sparse_attention_config: Any = None,
                    source: Mapping | None = None) -> None:
    """Saves an in-memory params tree (numpy or jax arrays, any float dtype; cast to `dtype`).

    For trees that already fit in memory (the embedded model, tests). The converter streams through
    CheckpointWriter directly.
    """
    dt = np_dtype(dtype)
    w = CheckpointWriter(directory, cfg, dtype)
    flat = dict(iter_paths(params))
    for name, entries in w._items.items():
        tree: dict = {}
        for path, _ in entries:
            if path not in flat:
                raise ValueError(f"params tree lacks {'/'.join(path)}")
            nested_set(tree, path, np.asarray(flat[path]).astype(dt))
        w.write_item(name, tree)
    w.finish(generation=generation, sparse_attention_config=sparse_attention_config, source=source)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, meta) where meta is zenjax_config.json without "model" (dtype, generation, ...)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        hint = " (a Hugging Face directory? convert it with `python -m zenjax.convert`)" \
            if (Path(path) / "config.json").is_file() else ""
        raise CheckpointError(f"{f}: not found; {path} is not a zenjax checkpoint{hint}")
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from e
    if isinstance(meta, dict) and meta.get("format") == 1:
        raise CheckpointError(f"{f}: format 1 (separate q/k/v and gate/up weights) is no longer read: convert "
                              f"the checkpoint again from its Hugging Face directory (python -m zenjax.convert)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "model" not in meta:
        raise CheckpointError(f"{f}: not a zenjax checkpoint config of format {FORMAT_VERSION}")
    try:
        cfg = ModelConfig.from_dict(meta.pop("model"))
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{f}: bad 'model' section ({e})") from e
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(f"{f}: dtype={meta.get('dtype')!r} is not one of {DTYPES}")
    if meta.get("quantization") not in (None, *QUANTIZATIONS):
        raise CheckpointError(f"{f}: quantization={meta.get('quantization')!r} is not one of {QUANTIZATIONS}")
    if meta.get("quantization") and meta.get("fp8_layout") != FP8_LAYOUT:
        raise CheckpointError(f"{f}: fp8_layout={meta.get('fp8_layout')!r}: fp8 weights stored before the "
                              f"{FP8_LAYOUT!r} layout; convert the checkpoint again")
    return cfg, meta


def _default_put(path: Path_, spec: ParamSpec, x: np.ndarray):
    import jax.numpy as jnp
    return jnp.asarray(x)


def load_checkpoint(path: str | Path, *, dtype: str | None = None,
                    put: PutFn | None = None) -> tuple[ModelConfig, dict, dict]:
    """Reads a checkpoint item by item -> (ModelConfig, meta, params nested dict).

    put(path_tuple, spec, np.ndarray) places each array (the engine passes device_put with a sharding;
    default jnp.asarray). Each item's host arrays are dropped before the next item is read, so host
    memory stays at about one layer. `dtype` casts on the host before `put` (default: as stored); fp8
    values and their scales keep their stored dtypes.
    """
    import orbax.checkpoint as ocp
    cfg, meta = read_config(path)
    dt = np_dtype(dtype) if dtype else None
    put = put or _default_put
    pdir = Path(path) / PARAMS_DIR
    ckpt = _checkpointer()
    params: dict = {}
    for name, entries in items(cfg, meta.get("quantization")).items():
        idir = pdir / name
        if not idir.is_dir():
            raise CheckpointError(f"{idir}: missing checkpoint item (incomplete checkpoint?)")
        template: dict = {}
        for p, _ in entries:
            nested_set(template, p, ocp.RestoreArgs(restore_type=np.ndarray))
        try:
            tree = ckpt.restore(idir.absolute(), args=ocp.args.PyTreeRestore(restore_args=template))
            flat = dict(iter_paths(tree))
        except Exception as e:  # orbax/tensorstore raise many types; the message names the item
            raise CheckpointError(f"{idir}: unreadable checkpoint item ({type(e).__name__}: {e})") from e
        for p, spec in entries:
            a = flat.get(p)
            if a is None or tuple(a.shape) != spec.shape:
                got = None if a is None else list(a.shape)
                raise CheckpointError(f"{idir}: param {'/'.join(p)} has shape {got}, expected {list(spec.shape)}")
            if dt is not None and spec.dtype is None and a.dtype != dt:
                a = a.astype(dt)
            nested_set(params, p, put(p, spec, a))
        del tree, flat
    return cfg, meta, params
