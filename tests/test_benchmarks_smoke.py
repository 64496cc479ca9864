"""The GPU benchmark scripts run end to end on the CPU in --smoke mode (tiny model, reference attention),
so they cannot rot between GPU leases. Figures are not checked, only that every part produced rows."""
import json

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
