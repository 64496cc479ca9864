"""Sparsity refinement (spec 3.6, the Qwen2.5-1M report's Alg. 1): per-head vertical-slash budgets that
keep a recall threshold at long lengths, written as Qwen's `sparse_attention_config.json`.

    python -m zenjax.refine CHECKPOINT --calibration FILE|passkey --lengths 32768,131072 \\
        --out sparse_attention_config.json [--threshold 0.95 --step-vertical 2048 --step-slash 2048 \\
        --max-rounds 4 --start qwen-default|PATH --aggregate mean|q0.05]

Walk of `refine(rc)`:
  1. Calibration sequences: per length, `samples` passkey prompts (zenjax/eval/passkey.py, depths spread
     over the haystack) or the first `length` tokens of FILE (text through the checkpoint's tokenizer, or
     a JSON list of token ids). Start budgets: `qwen-default` = every head (1000, 6096), MInference's
     block-sparse -> VS conversion and the most frequent entry of both Qwen 1M files; or a config file.
  2. One engine (zenjax.load, dense prefill, max_model_len = the longest length). A round measures every
     sequence: each prefill piece of the chunked engine runs the runner's `prefill_probe` step, in which
     every layer attends DENSE (so later layers see the dense model's activations) and also runs the
     dispatcher's sparse path with the round's budgets on the same q / k / v (estimation included, as at
     inference); the step returns log recall = lse_sparse - lse_dense per layer, query row and head. Only
     LSEs leave the step: no N x N matrix (the reference sparse path builds a [T, S] mask per piece).
  3. Aggregation per (layer, head) over the scored queries: every valid query row of every piece of every
     calibration sequence. `mean` (default): the mean of exp(log recall); `qF`: the F-quantile of a
     1000-bin histogram of the recall (a low quantile is stricter: it protects the few queries that
     need distant keys, e.g. the passkey question), reported as its bin's lower edge (<= 1/1000 low).
  4. Heads whose aggregate is below the threshold get + (step_vertical, step_slash) on the budgets in
     effect (a vertical 30 counts as the 130 vLLM uses, so raising never shrinks it); heads already at
     both budgets >= the longest length cannot gain more and stay. The next round re-measures. It ends
     when no head can be raised or after max_rounds measurements, so every written score is the measured
     recall of the written budgets.
  5. Output: a list per layer of {global head id: ["vertical_and_slash", v, s, score]} (spec 3.4),
     written atomically, plus `<out stem>.report.json` (the rounds: budgets and recall per head).

Resume: after every (round, sequence) unit the accumulated sums, the budgets and the history are saved
atomically (tmp + os.replace) to the state file (default `<out>.partial.json`); a rerun with the same
arguments continues after the last saved unit and gives the same file as an uninterrupted run (the
state stores exact float reprs); a rerun with other arguments is refused. The state is removed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zenjax.config import ConfigError, SparseConfig, sparse_config_from_json

QWEN_DEFAULT = (1000, 6096)
BINS = 1000                 # histogram of recall for the quantile aggregate: bins [b/1000, (b+1)/1000)
PATTERN = "vertical_and_slash"


class RefineArgumentError(ValueError):
    """A bad argument of the refinement tool (the CLI exits 2 with this message)."""


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    checkpoint: Path | None                 # None: the embedded demo model
    calibration: str                        # "passkey" or a file path
    lengths: tuple[int, ...]
    out: Path
    threshold: float = 0.95
    step_vertical: int = 2048
    step_slash: int = 2048
    max_rounds: int = 4
    start: str = "qwen-default"             # or a sparse_attention_config.json
    aggregate: str = "mean"                 # or "q<F>", e.g. q0.05
    samples: int = 1                        # passkey prompts per length
    seed: int = 0
    attention: str = "auto"
    prefill_chunk: int = 8192
    dtype: str | None = None
    state: Path | None = None               # None: <out>.partial.json

    @property
    def state_path(self) -> Path:
        return self.state if self.state is not None else self.out.with_name(self.out.name + ".partial.json")

    @property
    def report_path(self) -> Path:
        return self.out.with_suffix(".report.json")

    def fingerprint(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        d = dataclasses.asdict(self)
        for k in ("out", "state"):
            d.pop(k)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint is not None else "default"
        d["lengths"] = list(self.lengths)
        return d


def _quantile_level(aggregate: str) -> float | None:
    if aggregate == "mean":
        return None
    try:
        f = float(aggregate[1:]) if aggregate.startswith("q") else None
    except ValueError:
        f = None
    if f is None or not 0.0 < f < 1.0:
        raise RefineArgumentError(f"--aggregate {aggregate!r}: expected 'mean' or 'q<F>' with 0 < F < 1, "
                                  "e.g. q0.05")
    return f


def refine_config(checkpoint, calibration: str, lengths, out, **kw) -> RefineConfig:
    """The one place a RefineConfig is built: checks every argument, raising RefineArgumentError naming it."""
    from zenjax.eval.passkey import parse_length
    if checkpoint in (None, "default"):
        ck = None
    else:
        ck = Path(checkpoint)
        if not (ck / "zenjax_config.json").is_file():
            raise RefineArgumentError(f"CHECKPOINT {str(checkpoint)!r}: not a converted zenjax checkpoint "
                                      "(no zenjax_config.json); 'default' is the embedded demo model")
    if calibration != "passkey" and not Path(calibration).is_file():
        raise RefineArgumentError(f"--calibration {calibration!r}: expected 'passkey' or an existing file")
    if isinstance(lengths, str):
        try:
            lengths = [parse_length(x) for x in lengths.split(",") if x.strip()]
        except ValueError as e:
            raise RefineArgumentError(f"--lengths: {e}") from None
    lengths = tuple(sorted(set(int(x) for x in lengths)))
    if not lengths or lengths[0] < 2:
        raise RefineArgumentError(f"--lengths {list(lengths)}: need at least one length >= 2 tokens")
    out = Path(out)
    if not out.parent.is_dir():
        raise RefineArgumentError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    rc = RefineConfig(checkpoint=ck, calibration=str(calibration), lengths=lengths, out=out, **kw)
    if not 0.0 < rc.threshold <= 1.0:
        raise RefineArgumentError(f"--threshold {rc.threshold}: must be in (0, 1]")
    for name in ("step_vertical", "step_slash"):
        if getattr(rc, name) < 0:
            raise RefineArgumentError(f"--{name.replace('_', '-')} {getattr(rc, name)}: must be >= 0")
    if rc.step_vertical == rc.step_slash == 0:
        raise RefineArgumentError("--step-vertical and --step-slash are both 0: budgets could never rise")
    if rc.max_rounds < 1:
        raise RefineArgumentError(f"--max-rounds {rc.max_rounds}: must be >= 1")
    if rc.samples < 1:
        raise RefineArgumentError(f"--samples {rc.samples}: must be >= 1")
    if rc.prefill_chunk < 1:
        raise RefineArgumentError(f"--prefill-chunk {rc.prefill_chunk}: must be >= 1")
    if rc.start != "qwen-default" and not Path(rc.start).is_file():
        raise RefineArgumentError(f"--start {rc.start!r}: expected 'qwen-default' or an existing "
                                  "sparse_attention_config.json")
    _quantile_level(rc.aggregate)
    return rc


# ------------------------------------------------------------------------------------------ pure parts

def start_config(rc: RefineConfig, cfg) -> SparseConfig:
    """The round-0 budgets: every head QWEN_DEFAULT, or the --start file (checked by the loader)."""
    if rc.start == "qwen-default":
        return SparseConfig(budgets=((QWEN_DEFAULT,) * cfg.num_heads,) * cfg.num_layers, source="qwen-default")
    try:
        entries = json.loads(Path(rc.start).read_text())
        return sparse_config_from_json(entries, cfg, source=rc.start)
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as e:
        raise RefineArgumentError(f"--start {rc.start!r}: {e}") from None


def calibration_sequences(rc: RefineConfig, tokenizer) -> list[tuple[str, list[int]]]:
    """(name, token ids) per calibration sequence, shortest length first (step 1 of the walk)."""
    from zenjax.eval.passkey import as_encoder, cell_seed, format_length, make_prompt
    seqs = []
    if rc.calibration == "passkey":
        cache: dict = {}
        for L in rc.lengths:
            for i in range(rc.samples):
                depth = (i + 0.5) / rc.samples
                try:
                    p = make_prompt(tokenizer, L, depth, cell_seed(rc.seed, L, i, 0), _cache=cache)
                except ValueError as e:
                    raise RefineArgumentError(f"--lengths {format_length(L)}: {e}") from None
                seqs.append((f"passkey {format_length(L)} depth {depth:.2f}", list(p.ids)))
        return seqs
    f = Path(rc.calibration)
    text = f.read_text()
    try:
        ids = json.loads(text) if f.suffix == ".json" else as_encoder(tokenizer)(text)
    except json.JSONDecodeError as e:
        raise RefineArgumentError(f"--calibration {str(f)!r}: not a JSON list of token ids ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RefineArgumentError(f"--calibration {str(f)!r}: expected a JSON list of token ids")
    for L in rc.lengths:
        if len(ids) < L:
            raise RefineArgumentError(f"--calibration {str(f)!r} has {len(ids)} tokens, fewer than the "
                                      f"length {L} of --lengths")
        seqs.append((f"{f.name} {format_length(L)}", list(ids[:L])))
    return seqs


@dataclasses.dataclass
class RecallStats:
    """Per (layer, head): sum of recall, number of scored queries, histogram of recall ([L, N, BINS + 1];
    the last bin is recall >= 1 - 1e-6, i.e. 1 up to rounding)."""

    sums: np.ndarray
    counts: np.ndarray
    hist: np.ndarray

    @staticmethod
    def zeros(L: int, N: int) -> "RecallStats":
        return RecallStats(np.zeros((L, N)), np.zeros((L, N), np.int64), np.zeros((L, N, BINS + 1), np.int64))

    def add(self, log_recall: np.ndarray) -> None:
        """log_recall [L, T, N] of the valid query rows of one piece."""
        r = np.exp(log_recall.astype(np.float64))                                       # [L, T, N]
        self.sums += r.sum(axis=1)
        self.counts += r.shape[1]
        b = np.where(r >= 1 - 1e-6, BINS, np.clip(np.floor(r * BINS), 0, BINS - 1)).astype(np.int64)
        L, _, N = r.shape
        flat = ((np.arange(L)[:, None, None] * N + np.arange(N)[None, None, :]) * (BINS + 1) + b).ravel()
        self.hist += np.bincount(flat, minlength=L * N * (BINS + 1)).reshape(L, N, BINS + 1)

    def to_json(self) -> dict:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist(),
                "hist": {f"{l},{n}": {str(b): int(c) for b, c in enumerate(self.hist[l, n]) if c}
                         for l in range(self.hist.shape[0]) for n in range(self.hist.shape[1])}}

    @staticmethod
    def from_json(d: dict) -> "RecallStats":
        sums = np.asarray(d["sums"], np.float64)
        s = RecallStats(sums, np.asarray(d["counts"], np.int64), np.zeros(sums.shape + (BINS + 1,), np.int64))
        for key, bins in d["hist"].items():
            l, n = map(int, key.split(","))
            for b, c in bins.items():
                s.hist[l, n, int(b)] = c
        return s


def aggregate(stats: RecallStats, how: str) -> np.ndarray:
    """[L, N] recall per head: the mean over scored queries, or a histogram quantile (lower bin edge)."""
    f = _quantile_level(how)
    if f is None:
        return stats.sums / np.maximum(stats.counts, 1)
    cum = np.cumsum(stats.hist, axis=-1)
    b = np.argmax(cum >= f * stats.counts[..., None], axis=-1)                        # first bin reaching F
    return np.where(b == BINS, 1.0, b / BINS)


def raise_budgets(budgets, scores, threshold: float, step_vertical: int, step_slash: int, cap: int,
                  patterns=()):
    """Step 4: (new budgets, raised [L, N] bool). A head below the threshold gains the steps unless both its
    budgets already reach `cap` (the longest length: more keys than exist change nothing). An A-shape
    head (patterns[l][h] == "a_shape", spec 3.1) raises its (n_init, n_local) the same way."""
    new, raised = [], np.zeros(np.shape(scores), bool)
    for l, row in enumerate(budgets):
        out = []
        for h, (v, s) in enumerate(row):
            if scores[l][h] < threshold and not (v >= cap and s >= cap):
                # from the budget in effect: vLLM reads a vertical-slash budget of 30 as 130 (spec 3.4)
                vs = not patterns or patterns[l][h] == PATTERN
                v, s = (130 if v == 30 and vs else v) + step_vertical, s + step_slash
                raised[l, h] = True
            out.append((int(v), int(s)))
        new.append(tuple(out))
    return tuple(new), raised


def qwen_entries(budgets, scores, head_offset: int = 0, patterns=()) -> list[dict]:
    """Spec 3.4's format: per layer {global head id: [pattern, vertical, slash, score]} (patterns: as in
    SparseConfig, () = every head vertical_and_slash)."""
    return [{str(head_offset + h): [patterns[l][h] if patterns else PATTERN, int(v), int(s),
                                    round(float(scores[l][h]), 4)]
             for h, (v, s) in enumerate(row)} for l, row in enumerate(budgets)]


def _write_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the run

def measure(engine, ids: Sequence[int], probe: SparseConfig, stats: RecallStats, slot: int = 0) -> None:
    """Step 2 for one sequence: every chunked-prefill piece through the runner's recall probe."""
    for start, end in engine.prefill_plan(len(ids)):
        log_recall = engine.runner.prefill_probe(slot, list(ids), start, end, probe)
        stats.add(np.asarray(log_recall)[:, : end - start])


def load_engine(rc: RefineConfig):
    import zenjax
    return zenjax.load(rc.checkpoint, max_model_len=max(rc.lengths), prefill_chunk=rc.prefill_chunk,
                       attention=rc.attention, dtype=rc.dtype, sparse=False, verbose=False)


def refine(rc: RefineConfig, *, progress: bool = True, engine=None,
           on_unit: Callable[[int, int], None] | None = None) -> dict:
    """Run the walk of the module docstring; returns the report (also written beside --out).

    engine: an already loaded engine for rc's checkpoint (benchmarks reuse one); on_unit(round, unit) is
    called after each (round, sequence) unit has been saved (tests inject an interruption there)."""
    from tqdm import tqdm
    if engine is None:
        engine = load_engine(rc)
    cfg = engine.config
    seqs = calibration_sequences(rc, engine.tokenizer)
    start = start_config(rc, cfg)
    L, N = cfg.num_layers, cfg.num_heads
    state = {"fingerprint": rc.fingerprint(), "round": 0, "next_unit": 0,
             "budgets": [list(map(list, row)) for row in start.budgets], "stats": None, "history": []}
    sp = rc.state_path
    if sp.is_file():
        saved = json.loads(sp.read_text())
        if saved.get("fingerprint") != state["fingerprint"]:
            raise RefineArgumentError(f"state file {str(sp)!r} was written by a run with other arguments "
                                      f"({saved.get('fingerprint')}); delete it to start over")
        state = saved
    bar = tqdm(total=rc.max_rounds * len(seqs), initial=state["round"] * len(seqs) + state["next_unit"],
               unit="seq", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            r = state["round"]
            budgets = tuple(tuple((int(v), int(s)) for v, s in row) for row in state["budgets"])
            probe = dataclasses.replace(start, budgets=budgets, source=f"refine round {r}")
            stats = RecallStats.from_json(state["stats"]) if state["stats"] else RecallStats.zeros(L, N)
            for i in range(state["next_unit"], len(seqs)):
                bar.set_description(f"round {r} {seqs[i][0]}")
                measure(engine, seqs[i][1], probe, stats)
                state.update(next_unit=i + 1, stats=stats.to_json())
                _write_atomic(sp, state)
                bar.update(1)
                if on_unit is not None:
                    on_unit(r, i)
            scores = aggregate(stats, rc.aggregate)
            new, raised = raise_budgets(budgets, scores, rc.threshold, rc.step_vertical, rc.step_slash,
                                        max(rc.lengths), start.patterns)
            state["history"].append({"round": r, "budgets": [list(map(list, row)) for row in budgets],
                                     "recall": scores.tolist(), "raised": int(raised.sum())})
            if not raised.any() or r + 1 >= rc.max_rounds:
                break
            state.update(round=r + 1, next_unit=0, stats=None, budgets=[list(map(list, row)) for row in new])
            _write_atomic(sp, state)
    finally:
        bar.close()
    below = [[l, h] for l in range(L) for h in range(N) if scores[l, h] < rc.threshold]
    _write_atomic(rc.out, qwen_entries(budgets, scores, start.head_offset, start.patterns))
    report = {"tool": "zenjax.refine", "args": rc.fingerprint(), "out": str(rc.out),
              "aggregate": ("mean recall over every valid query row of every piece of every calibration "
                            "sequence" if rc.aggregate == "mean" else
                            f"{rc.aggregate[1:]}-quantile of recall over those rows (1000-bin histogram)"),
              "sequences": [name for name, _ in seqs], "rounds": state["history"], "below_threshold": below}
    _write_atomic(rc.report_path, report)
    sp.unlink(missing_ok=True)
    return report


# ------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zenjax.refine", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="converted checkpoint directory ('default': the embedded demo model)")
    p.add_argument("--calibration", required=True, help="'passkey' or a text file / JSON list of token ids")
    p.add_argument("--lengths", required=True, help="comma-separated lengths, e.g. 32768,131072 or 32k,128k")
    p.add_argument("--out", default="sparse_attention_config.json")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--step-vertical", type=int, default=2048)
    p.add_argument("--step-slash", type=int, default=2048)
    p.add_argument("--max-rounds", type=int, default=4, help="measurement passes at most")
    p.add_argument("--start", default="qwen-default", help="'qwen-default' (every head 1000/6096) or a file")
    p.add_argument("--aggregate", default="mean", help="'mean' or a low quantile 'q<F>', e.g. q0.05")
    p.add_argument("--samples", type=int, default=1, help="passkey prompts per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto")
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--dtype", default=None)
    p.add_argument("--state", default=None, help="partial results for resuming (default <out>.partial.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = refine_config(args.checkpoint, args.calibration, args.lengths, args.out, threshold=args.threshold,
                           step_vertical=args.step_vertical, step_slash=args.step_slash,
                           max_rounds=args.max_rounds, start=args.start, aggregate=args.aggregate,
                           samples=args.samples, seed=args.seed, attention=args.attention,
                           prefill_chunk=args.prefill_chunk, dtype=args.dtype,
                           state=Path(args.state) if args.state else None)
        report = refine(rc, progress=not args.no_progress)
    except RefineArgumentError as e:
        print(f"python -m zenjax.refine: error: {e}", file=sys.stderr)
        return 2
    last = report["rounds"][-1]
    print(json.dumps({"out": report["out"], "rounds": len(report["rounds"]), "raised_last_round": last["raised"],
                      "below_threshold": len(report["below_threshold"]),
                      "min_recall": round(float(np.min(last["recall"])), 4)}))
    return 0
