"""experiments.mitigation: its decomposition summary and claims on hand-made numbers, and (marked
``experiment``) one quick end-to-end run that reuses dpo_dynamics' and extend's cached DPO jobs."""
import json

import pytest

from experiments import mitigation
from experiments.claims import read_claims


def _record(rej_head, rej_body):
    return {"terms": {"chosen": {"chosen/head": [0.1, 0.0], "chosen/body": [0.2, 0.1],
                                 "rejected/head": rej_head, "rejected/body": rej_body}}}


def test_rejected_push_sums_head_and_body_over_steps():
    push = mitigation.rejected_push([_record([0.01, 0.02], [-0.3, 0.1]), _record([0.03, 0.0], [-0.1, 0.3])])
    assert push["on_chosen"] == pytest.approx(0.02 - 0.2)
    assert push["on_argmax"] == pytest.approx(0.01 + 0.2)
    assert push["body_on_chosen"] == pytest.approx(-0.2) and push["head_on_chosen"] == pytest.approx(0.02)


def _outcome(d_chosen, d_argmax, d_rejected, push):
    return dict(d_chosen=d_chosen, d_argmax=d_argmax, d_rejected=d_rejected, push_on_chosen=push,
                push_body_on_chosen=push * 0.9)


def test_claims_compare_weighted_with_baseline_per_seed():
    base = [_outcome(-3.0, 2.0, -20.0, -0.25)] * 3
    ext = [_outcome(-2.0, 1.0, -15.0, -0.2)] * 3
    good = [_outcome(-0.5, 0.3, -8.0, -0.05)] * 3
    rows = mitigation.claims({"baseline": base, "extend": ext, "weighted": good}, [0, 1, 2], 1.0)
    assert [r.passed for r in rows] == [True, True, True, True]
    assert rows[0].value["mean"] == pytest.approx(2.5)
    assert rows[0].value["weighted_minus_extend"]["mean"] == pytest.approx(1.5)
    assert rows[2].value["mean"] == pytest.approx(7.5)  # Δchosen − Δrejected of the weighted run
    # a weighting that squeezes harder and learns nothing fails every row
    bad = [_outcome(-4.0, 3.0, -4.0, -0.3)] * 3
    rows = mitigation.claims({"baseline": base, "extend": ext, "weighted": bad}, [0, 1, 2], 1.0)
    assert not any(r.passed for r in rows)
    # one seed against the trend fails the claim (min/max over seeds, not the mean)
    mixed = good[:2] + [_outcome(-3.05, 2.0, -9.0, -0.26)]
    rows = mitigation.claims({"baseline": base, "extend": ext, "weighted": mixed}, [0, 1, 2], 1.0)
    assert not rows[0].passed and not rows[3].passed


def test_config_refuses_a_non_positive_power():
    with pytest.raises(ValueError, match="powers"):
        mitigation.Config(powers=(0.5, 0.0))
    with pytest.raises(ValueError, match="powers"):
        mitigation.Config(powers=())
    config = mitigation.Config(powers=(0.5, 1.0))
    assert [mitigation.weighted_run(config, p) for p in config.powers] == ["weighted", "weighted α=1"]


@pytest.mark.experiment  # end-to-end (minutes on 2 cores): make test-experiments
def test_quick_run(tmp_path):
    run_dir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
    mitigation.main(mitigation.Config(out=str(tmp_path / "m"), run_dir=run_dir, quick=True, seeds=(0,),
                                      compile_cache=cache, samples=1, powers=(1.0,)))
    rows = read_claims(tmp_path / "m" / "claims.json")
    assert {r["kind"] for r in rows} == {"check", "paper"}
    assert all(r["passed"] for r in rows if r["kind"] == "check")
    assert (tmp_path / "m" / "mitigation.png").stat().st_size > 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert set(results["per_seed"]) == set(mitigation.RUNS)
    # the weighted job is its own cached stage beside the plain one
    assert (tmp_path / "run" / "seed0" / "dpo_sft_full_nw1" / "stage.json").exists()
    assert (tmp_path / "run" / "seed0" / "dpo_sft_full" / "stage.json").exists()
    wins = results["win_rates"]
    assert wins["judge"] == "world" and {"vs_baseline", "vs_extend"} <= set(wins)
