"""Quick run of experiments.first_order_lm: claims.json with both kinds, every check row passes
(the first-order gap quarters when η halves, SFT and DPO, SGD and Adam, float64), figures exist."""
import json

from experiments import first_order_lm
from experiments.claims import read_claims
import pytest

# End-to-end experiment runs (minutes on 2 cores): `make test-experiments`, not `make test`.
pytestmark = pytest.mark.experiment


def test_quick(tmp_path):
    out = tmp_path / "out"
    results = first_order_lm.main(first_order_lm.Config(out=str(out), run_dir=str(tmp_path / "run"), seeds=(0, 1, 2),
                                                        quick=True, compile_cache=str(tmp_path / "jax_cache")))
    rows = read_claims(out / "claims.json")
    assert {r["kind"] for r in rows} == {"check", "paper"}
    checks = [r for r in rows if r["kind"] == "check"]
    assert len(checks) == 4  # {SFT, DPO} x {SGD, Adam}
    for r in checks:
        assert r["passed"], (r["claim"], r["value"])
        assert len(r["seeds"]) == 3 and len(r["value"]["per_seed"]) == 3
    for name in ("gap_vs_lr.png", "predicted_vs_actual.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "report.md").read_text().startswith("#")
    saved = json.loads((out / "results.json").read_text())
    seed0 = saved["per_seed"]["0"]
    # the observed set: every probe family of the update prompts plus the argmax path
    assert "argmax_chosen" in seed0["families"] and {"chosen", "rejected"} <= set(seed0["families"])
    for key in ("sft/sgd", "sft/adam", "dpo/sgd", "dpo/adam"):
        assert 1.8 < seed0[key]["loglog_slope_small_eta"] < 2.2
        assert len(seed0[key]["scatter"]["predicted"]) == len(seed0["families"])
    assert results["adaptive_optimizer"] == "adam"
