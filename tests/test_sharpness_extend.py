"""experiments.sharpness and experiments.extend: their curve arithmetic and claims on hand-made
curves, and (marked ``experiment``) one quick end-to-end run of both sharing one pipeline cache
(their long-SFT / baseline DPO is dpo_dynamics' cached job)."""
import json

import numpy as np
import pytest

from experiments import extend, sharpness
from experiments.claims import read_claims


def _curves(chosen, star, rejected, a0=20.0):
    n = len(chosen)
    return {"steps": list(range(0, 10 * n, 10)), "logps": {"chosen": chosen, "argmax_chosen": star, "rejected": rejected},
            "a_norm": [a0] * n, "off_argmax": [-1.0] * n}


def test_first_drop_and_outcome():
    assert sharpness.first_drop([0.0, -0.5, -1.2, -3]) == pytest.approx(2 / 3)
    assert sharpness.first_drop([0.0, 0.5, -0.2]) == 1.0
    o = sharpness.outcome(_curves([-50, -51, -53], [-10, -9, -8], [-80, -90, -95], a0=21.0))
    assert o == {"d_chosen": -3.0, "d_rejected": -15.0, "d_argmax": 2.0, "chosen_drop_at": 0.5, "a_norm": 21.0,
                 "off_argmax": -1.0, "argmax_minus_chosen": 40.0}


def test_sharpness_claims_compare_long_to_short_per_seed():
    short = [sharpness.outcome(_curves([-50, -50.5, -51], [-10, -9.8, -9.5], [-80, -85, -90], a0=20.0))] * 3
    long_ = [sharpness.outcome(_curves([-40, -42, -45], [-8, -7, -6], [-70, -80, -90], a0=21.0))] * 3
    rows = {r.claim.split(":")[0][:40]: r for r in sharpness.claims({"short": short, "long": long_}, [0, 1, 2])}
    assert all(r.passed for r in rows.values()), [(r.claim, r.value) for r in rows.values()]
    flipped = sharpness.claims({"short": long_, "long": short}, [0, 1, 2])
    assert not any(r.passed for r in flipped)


def test_extend_two_phases_and_claims():
    sft = _curves([-100, -80, -60], [-20, -18, -15], [-140, -130, -120])
    dpo = _curves([-60, -61, -62], [-15, -14, -13], [-120, -130, -140])
    p = extend.two_phases(sft, dpo)
    assert p["steps"] == [0, 10, 20, 30, 40] and p["boundary"] == 20
    assert p["chosen"] == [-100, -80, -60, -61, -62]
    base = dict(d_chosen=-3.0, d_argmax=2.0, rejected_start=-140.0)
    ext = dict(d_chosen=-1.0, d_argmax=0.5, rejected_start=-100.0)
    rows = extend.claims({"baseline": [base] * 3, "extend": [ext] * 3}, [0, 1, 2])
    assert [r.passed for r in rows] == [True, True, True]
    assert rows[0].value["mean"] == pytest.approx(2.0)


@pytest.mark.experiment  # end-to-end (minutes on 2 cores): make test-experiments
def test_quick_runs_share_the_pipeline(tmp_path):
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
    sharpness.main(sharpness.Config(out=str(tmp_path / "sh"), run_dir=run_dir, quick=True, compile_cache=cache))
    stamp = (tmp_path / "run" / "seed0" / "dpo_sft_full" / "stage.json").stat().st_mtime_ns
    extend.main(extend.Config(out=str(tmp_path / "ex"), run_dir=run_dir, quick=True, compile_cache=cache))
    # extend's baseline DPO is the same cached job as sharpness' long start
    assert (tmp_path / "run" / "seed0" / "dpo_sft_full" / "stage.json").stat().st_mtime_ns == stamp
    for name, fig in (("sh", "sharpness.png"), ("ex", "extend.png")):
        rows = read_claims(tmp_path / name / "claims.json")
        assert {r["kind"] for r in rows} == {"check", "paper"} and all(len(r["seeds"]) == 3 for r in rows)
        assert all(r["passed"] for r in rows if r["kind"] == "check")
        assert (tmp_path / name / fig).stat().st_size > 0
    results = json.loads((tmp_path / "ex" / "results.json").read_text())
    assert np.all(np.diff(results["phases"]["extend"][0]["steps"]) > 0)
    wins = results["win_rate"]
    assert wins["judge"] == "world" and wins["judge_check"]["rate"] >= 0.95
    pooled = wins["pooled"]
    assert pooled["wins"] + pooled["ties"] + pooled["losses"] == 3 * wins["prompts"] * wins["samples"]
    assert pooled["low"] <= pooled["rate"] <= pooled["high"]
