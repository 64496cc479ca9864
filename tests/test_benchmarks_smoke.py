"""The GPU benchmark scripts run end to end on the CPU in --smoke mode (tiny model, reference attention),
so they cannot rot between GPU leases. Figures are not checked, only that every part produced rows."""
import json

import pytest

from benchmarks import suite


def test_suite_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    suite.main(["--smoke", "--prefill", "40,70", "--decode", "40", "--dca-prefill", "300", "--chunk", "32"])
    out = json.loads((tmp_path / "suite.json").read_text())
    assert "dense_error" not in out and "dca_error" not in out
    assert [r["tokens"] for r in out["prefill"]] == [40, 70]
    assert out["decode"][0]["context"] == 40 and out["decode"][0]["ms_per_step"] > 0
    assert out["dca_prefill"][0]["dca"] is True


def test_moe_fp8_smoke(tmp_path, monkeypatch):
    from benchmarks import moe_fp8
    monkeypatch.setenv("OUT", str(tmp_path))
    moe_fp8.main(["--smoke", "--model", "moe", "--weights", "fp8", "--batches", "1,2"])
    out = json.loads((tmp_path / "moe_fp8_moe_fp8.json").read_text())
    assert out["prefill"][0]["tokens"] == 64 and out["prefill"][0]["ttft_s"] > 0
    assert [r["batch"] for b in ("1", "2") for r in out["decode"][b]] == [1, 2]


@pytest.mark.slow
def test_serve_latency_smoke(tmp_path, monkeypatch):
    """~22 s on 2 CPU cores: every part runs on one engine; prefix reuse really reuses the document and
    gives the cold run's greedy tokens."""
    from benchmarks import serve_latency
    monkeypatch.setenv("OUT", str(tmp_path))
    serve_latency.ROWS.clear()
    assert serve_latency.main(["--tiny", "--long", "300", "--stream-tokens", "8", "--reuse-min", "64"]) == 0
    rows = json.loads((tmp_path / "serve_latency.json").read_text())
    cases = [(r["part"], r.get("case")) for r in rows]
    assert cases.count(("itl", "long_with_chat")) == 4 and ("server", "4_streams") in cases
    # the chat's decode step fused with the long prompt's pieces and, for comparison, not
    assert sorted(r["fused"] for r in rows if r.get("case") == "long_with_chat") == [False, False, True, True]
    # the server's prefill steps by bucket: the long prompt alone is 300 tokens in steps of at most the
    # --tiny chunk (256), so at least two, none larger than 256
    alone = next(r for r in rows if r.get("case") == "long_alone")
    assert sum(alone["pieces"].values()) >= 2 and max(int(k) for k in alone["pieces"]) <= 256, alone
    reuse = next(r for r in rows if r["part"] == "reuse")
    assert reuse["reused_tokens"] == reuse["document_tokens"] == 236 and reuse["greedy_equal_to_cold"] is True
    four = next(r for r in rows if r.get("case") == "4_streams")
    assert four["tokens"] == 4 * 8


def test_pacing_sim_smoke(tmp_path, capsys):
    """The CPU pacing simulation's entry point: every model x buckets x bound x chat start row."""
    from benchmarks import pacing_sim
    assert pacing_sim.main(["--long", "16384", "--out", str(tmp_path / "sim.json")]) == 0
    rows = json.loads((tmp_path / "sim.json").read_text())
    assert len(rows) == (2 * 2 * 2 + 2 * 2) * 2 and "ratio" in capsys.readouterr().out
