"""Hugging Face Qwen2 directory -> zenjax checkpoint (format: zenjax/checkpoint.py).

    python -m zenjax.convert --hf SRC --out DST [--dtype bfloat16|float16|float32] [--quantization fp8] [--force]

The flow of `convert_checkpoint`:
  1. refuse a bad --dtype or an existing non-empty DST (unless force) before reading anything;
  2. HFSource.open + check: config.json -> ModelConfig, safetensors headers compared with the layout
     (missing / unexpected tensor, wrong shape); generation / sparse-attention JSON read - still
     nothing written;
  3. stream into a temporary directory beside DST (same filesystem, so the final rename is atomic):
     one checkpoint item (embed, each layer, final_norm, lm_head) is read tensor by tensor, written,
     and dropped before the next, so peak memory is about one layer plus one tensor's shard pages
     (with --quantization fp8 each linear weight is read in float32 and stored as e4m3 + scales);
  4. copy tokenizer/generation files, write zenjax_config.json, rename the temporary directory to DST.
Any error (KeyboardInterrupt included) removes the temporary directory: DST is never half-written.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import zenjax
from zenjax.checkpoint import DTYPES, TOKENIZER_FILES, CheckpointWriter, items, np_dtype
from zenjax.convert.hf import ConvertError, HFSource
from zenjax.convert.progress import Progress
from zenjax.fp8 import quantize
from zenjax.params import FP8_DTYPE, QUANTIZATIONS, nested_set, scale_name

__all__ = ["ConvertError", "convert_checkpoint"]


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str = "bfloat16",
                       progress: bool | None = None, force: bool = False, quantization: str | None = None) -> None:
    """Converts the HF directory `src` into a zenjax checkpoint at `dst`.

    progress: None -> a bar on stderr when it is a terminal; True/False force it on/off.
    quantization: "fp8" stores the linear layers as e4m3 with per-output-channel float32 scales.
    Raises ConvertError (naming the file / tensor / field) and leaves `dst` untouched on any failure.
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConvertError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConvertError(f"{dst}: exists and is not empty (pass --force to replace it)")
    if dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: output directory is the input directory")
    source = HFSource.open(src)
    source.check()
    meta = dict(generation=_generation(source), sparse_attention_config=_sparse(source),
                source=_source_meta(source))   # read (and validated) before anything is written

    created = _missing_parents(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.zenjax-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(source, tmp, dtype, progress, meta, quantization)
        _install(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:            # parents we made for DST, deepest first
            try:
                d.rmdir()
            except OSError:
                pass
        raise


def _write(source: HFSource, tmp: Path, dtype: str, progress: bool | None, meta: dict,
           quantization: str | None = None) -> None:
    cfg, dt = source.cfg, np_dtype(dtype)
    writer = CheckpointWriter(tmp, cfg, dtype, quantization)
    plan = items(cfg, quantization)
    total = sum(source.tensor_bytes(spec) for entries in plan.values() for _, spec in entries)
    with Progress(total, enabled=progress, label="converting") as bar:
        for name, entries in plan.items():
            tree: dict = {}
            for path, spec in entries:
                if spec.derived:            # an fp8 scale: written with its weight just below
                    continue
                if spec.dtype == FP8_DTYPE:
                    q, scale = quantize(spec, source.read(spec, np_dtype("float32")))
                    nested_set(tree, path, q)
                    nested_set(tree, path[:-1] + (scale_name(path[-1]),), scale)
                else:
                    nested_set(tree, path, source.read(spec, dt))
                bar.update(source.tensor_bytes(spec), name)
            writer.write_item(name, tree)
            del tree
    for f in TOKENIZER_FILES:
        if (source.root / f).is_file():
            shutil.copy2(source.root / f, tmp / f)
    writer.finish(**meta)


def _generation(source: HFSource) -> dict:
    """generation_config.json verbatim, eos_token_id as a list; config.json's ids where it lacks them."""
    path = source.root / "generation_config.json"
    gen = _json(path) if path.is_file() else {}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if gen.get(key) is None and source.hf_config.get(key) is not None:
            gen[key] = source.hf_config[key]
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise ConvertError(f"{path}: eos_token_id={gen['eos_token_id']!r} is not a token id or a list of ids")
    gen["eos_token_id"] = eos
    return gen


def _sparse(source: HFSource) -> Any:
    path = source.root / "sparse_attention_config.json"
    return _json(path, obj_only=False) if path.is_file() else None


def _source_meta(source: HFSource) -> dict:
    hc = source.hf_config
    return {"hf_path": str(source.root.resolve()), "architecture": source.cfg.architecture,
            "hf_dtype": hc.get("torch_dtype") or hc.get("dtype"),
            "transformers_version": hc.get("transformers_version"), "files": source.files,
            "tensor_dtypes": sorted({t.dtype for t in source.tensors.values()}),
            "zenjax_version": zenjax.__version__, "hf_config": hc}


def _json(path: Path, obj_only: bool = True) -> Any:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from e
    if obj_only and not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return obj


def _missing_parents(dst: Path) -> list[Path]:
    out, p = [], dst.absolute().parent
    while not p.exists():
        out.append(p)
        p = p.parent
    return out


def _install(tmp: Path, dst: Path) -> None:
    """Moves the finished checkpoint to DST; an existing DST (empty, or --force) is replaced only now."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.zenjax-old-{os.getpid()}"
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
