"""Reading a local Hugging Face Qwen2 / Qwen2-MoE directory: config, tensor headers, and tensors one at a time.

`HFSource.open(src)` reads config.json (-> ModelConfig through config.model_config_from_hf) and only the
*headers* of the safetensors files (names, dtypes, shapes; no tensor data), then `check()` compares them
with the weight layout of zenjax/params.py before anything is written: every expected tensor present
exactly once with the shape its ParamSpec declares, nothing unexpected. `read(spec)` then returns one
parameter in our layout: one tensor, or for a stacked parameter (MoE experts) its E tensors read one
after the other into the rows of one array, so peak memory is that parameter plus one expert tensor.

Why `read` uses plain file reads at the header's byte offsets instead of `safe_open(...).get_tensor`:
get_tensor copies out of a memory map, and every page of the map it touches stays in the process's
resident set until the file is closed - reading a 0.6 GB embedding that way costs 1.2 GB of RSS. safe_open
still validates each file's header first (in `_read_header`), so a corrupt file is refused before any
data is read.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from zenjax.config import ConfigError, ModelConfig, model_config_from_hf
from zenjax.params import ParamSpec, assemble, from_hf, param_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_NP_DTYPES = {"F32": lambda: np.dtype("<f4"), "F16": lambda: np.dtype("<f2"),
              "BF16": lambda: np.dtype(__import__("ml_dtypes").bfloat16)}
FLOAT_DTYPES = set(_NP_DTYPES)
# Tensors some exporters keep that carry nothing we need (recomputed RoPE frequencies).
HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


class ConvertError(Exception):
    """Conversion refused; the message names the file, tensor or field at fault. CLI exit code 2."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str          # shard file name, relative to the HF directory
    dtype: str         # safetensors dtype string: F32 | F16 | BF16 | ...
    shape: tuple[int, ...]
    offset: int        # absolute byte offset of the data in the file
    nbytes: int


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: not found ({what})")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object ({what})")
    return obj


def _shard_files(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names, weight_map from the index or None for a single file)."""
    if (root / INDEX_FILE).exists():
        index = _read_json(root / INDEX_FILE, "shard index")
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ConvertError(f"{root / INDEX_FILE}: field 'weight_map' missing or empty")
        return sorted(set(wmap.values())), wmap
    if (root / SINGLE_FILE).exists():
        return [SINGLE_FILE], None
    raise ConvertError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _read_header(root: Path, file: str) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and byte ranges of a safetensors file: 8-byte little-endian header length,
    the JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data."""
    from safetensors import safe_open
    path = root / file
    if not path.is_file():
        raise ConvertError(f"{path}: shard file not found (listed in {INDEX_FILE})")
    try:
        with safe_open(path, framework="numpy") as f:   # full validation (offsets, sizes, dtypes)
            names = set(f.keys())
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except Exception as e:  # SafetensorError, OSError, ValueError: a corrupt or truncated file
        raise ConvertError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from e
    header.pop("__metadata__", None)
    if set(header) != names:
        raise ConvertError(f"{path}: unreadable safetensors file (header names disagree)")
    return {name: TensorInfo(file, h["dtype"], tuple(int(d) for d in h["shape"]), 8 + n + h["data_offsets"][0],
                             h["data_offsets"][1] - h["data_offsets"][0])
            for name, h in header.items()}


def _all_finite(x: np.ndarray, step: int = 1 << 24) -> bool:
    """np.isfinite in slices: a whole-tensor check would allocate a bool copy as large as the tensor."""
    flat = x.reshape(-1)
    return all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step))


@dataclasses.dataclass
class HFSource:
    root: Path
    hf_config: dict
    cfg: ModelConfig
    tensors: dict[str, TensorInfo]   # every tensor in every shard

    @classmethod
    def open(cls, src: str | Path) -> "HFSource":
        root = Path(src)
        if not root.is_dir():
            raise ConvertError(f"{root}: not a directory")
        hf_config = _read_json(root / "config.json", "model config")
        try:
            cfg = model_config_from_hf(hf_config)
        except ConfigError as e:
            raise ConvertError(f"{root / 'config.json'}: {e}") from e
        files, wmap = _shard_files(root)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(root, file).items():
                if name in tensors:
                    raise ConvertError(f"tensor '{name}' appears in both {tensors[name].file} and {file}")
                tensors[name] = info
        if wmap is not None:
            for name, file in wmap.items():
                if name not in tensors or tensors[name].file != file:
                    raise ConvertError(f"tensor '{name}': {INDEX_FILE} says it is in {file}, "
                                       f"but {file} does not contain it")
        return cls(root, hf_config, cfg, tensors)

    def check(self) -> None:
        """Every expected tensor present with the right shape and a float dtype; nothing unexpected."""
        specs = {name: shape for s in param_specs(self.cfg).values() for name, shape in s.hf_shapes().items()}
        problems = self._expert_count_problems()
        for name, shape in specs.items():
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor '{name}' (not in any of {self.files})")
            elif info.shape != shape:
                problems.append(f"tensor '{name}' in {info.file} has shape {list(info.shape)}, but config.json "
                                f"implies {list(shape)}")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"tensor '{name}' in {info.file} has dtype {info.dtype} "
                                f"(supported: {', '.join(sorted(FLOAT_DTYPES))}; quantized checkpoints are not)")
        for name, info in self.tensors.items():
            if name in specs or HARMLESS.search(name):
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue   # some exporters keep the tied copy; the embedding is used either way
            problems.append(f"unexpected tensor '{name}' in {info.file} (not part of a "
                            f"{self.cfg.architecture} with num_hidden_layers={self.cfg.num_layers})")
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise ConvertError(f"{self.root}: checkpoint does not match config.json:\n  "
                               + "\n  ".join(problems[:10]) + more)

    def _expert_count_problems(self) -> list[str]:
        """One line per layer whose experts in the files are not 0..num_experts-1 (listed first, so a wrong
        num_experts is named before the per-tensor lines it causes)."""
        found: dict[int, set[int]] = {}
        for name in self.tensors:
            m = EXPERT_KEY.match(name)
            if m:
                found.setdefault(int(m[1]), set()).add(int(m[2]))
        out = []
        for l in sorted(set(found) | {l for l in range(self.cfg.num_layers) if self.cfg.is_moe_layer(l)}):
            want = set(range(self.cfg.moe.num_experts)) if self.cfg.is_moe_layer(l) else set()
            got = found.get(l, set())
            if got != want:
                missing, extra = sorted(want - got), sorted(got - want)
                out.append(f"layer {l}: the checkpoint has {len(got)} experts, config.json implies "
                           f"{len(want)} (num_experts, mlp_only_layers, decoder_sparse_step)"
                           + (f"; missing experts {missing}" if missing else "")
                           + (f"; unexpected experts {extra}" if extra else ""))
        return out

    @property
    def files(self) -> list[str]:
        return sorted({i.file for i in self.tensors.values()})

    def tensor_bytes(self, spec: ParamSpec) -> int:
        return sum(self.tensors[name].nbytes for name in spec.hf_names)

    def read(self, spec: ParamSpec, dtype: np.dtype) -> np.ndarray:
        """One parameter, transformed to our layout and cast to `dtype`, C-contiguous (fused and stacked
        ones put together by `params.assemble`, one HF tensor read at a time)."""
        return assemble(spec, lambda name, s: self._read_one(name, s, dtype))

    def _read_one(self, name: str, spec: ParamSpec, dtype: np.dtype) -> np.ndarray:
        info = self.tensors[name]
        path = self.root / info.file
        dt = _NP_DTYPES[info.dtype]()
        try:
            x = np.fromfile(path, dtype=dt, count=info.nbytes // dt.itemsize, offset=info.offset)
            if x.nbytes != info.nbytes:
                raise ValueError(f"file ends {info.nbytes - x.nbytes} bytes early")
        except (OSError, ValueError) as e:
            raise ConvertError(f"{path}: cannot read tensor '{name}' ({type(e).__name__}: {e})") from e
        x = x.reshape(info.shape)
        if not _all_finite(x):
            raise ConvertError(f"{path}: tensor '{name}' contains NaN or Inf")
        with np.errstate(over="ignore"):                                  # checked just below
            y = from_hf(spec, x).astype(dtype, copy=False)
        if y.dtype.itemsize < x.dtype.itemsize and not _all_finite(y):    # e.g. f32 1e5 -> f16 inf
            raise ConvertError(f"{path}: tensor '{name}' overflows {dtype} (use a wider --dtype)")
        return y
