"""Quick run of experiments.kernel_balance: claims.json with both kinds, every exactness check passes
(factored K·g = autodiff J·Jᵀ·g, parts sum to the total, untied head part = V z·z and the head-only
route), the figure and the DPO squeeze outcome exist."""
import json

from experiments import kernel_balance
from experiments.claims import read_claims
import pytest



def test_variant_names():
    v = kernel_balance.Variant.parse("tied_d64_L2_long")
    assert (v.tied, v.width, v.layers, v.pretrain) == (True, 64, 2, "long") and v.name == "tied_d64_L2_long"
    assert len(kernel_balance.full_grid()) == 36


@pytest.mark.experiment  # an end-to-end run (minutes): make test-experiments
def test_quick(tmp_path):
    out = tmp_path / "out"
    kernel_balance.main(kernel_balance.Config(out=str(out), run_dir=str(tmp_path / "run"), quick=True,
                                              compile_cache=str(tmp_path / "jax_cache")))
    rows = read_claims(out / "claims.json")
    assert {r["kind"] for r in rows} == {"check", "paper"}
    checks = [r for r in rows if r["kind"] == "check"]
    assert len(checks) == 3  # K·g vs autodiff, parts sum, untied head part
    for r in checks:
        assert r["passed"], (r["claim"], r["value"])
    assert (out / "kernel_balance.png").stat().st_size > 0
    assert (out / "report.md").read_text().startswith("#")
    saved = json.loads((out / "results.json").read_text())
    tied, untied = saved["variants"]["tied_d32_L1_short"]["0"], saved["variants"]["untied_d32_L1_short"]["0"]
    assert untied["tr_cross"] == 0.0 and tied["tr_cross"] != 0.0
    for r in (tied, untied):
        assert 0.0 < r["identity_share"] <= 1.0 and 0.0 < r["head_share"] < 1.0
    assert isinstance(saved["dpo"]["untied_d32_L1_short/full"]["0"]["squeezes"], bool)
