"""experiments.on_policy: its arithmetic (outcome, squeeze test, coefficient recomputation, the analytic
curves, PPO-clip's coefficient) and claims on hand-made numbers, and (marked ``experiment``) one quick
end-to-end run."""
import json

import numpy as np
import pytest

from experiments import on_policy
from experiments.claims import read_claims
from ldjax.losses import residual_coefficients
from ldjax.tracking import spread


def _curves(chosen, star, rejected, a=(20.0, 20.5)):
    n = len(chosen)
    return {"steps": list(range(0, 10 * n, 10)), "logps": {"chosen": chosen, "argmax_chosen": star, "rejected": rejected},
            "a_norm": list(np.linspace(a[0], a[1], n)), "off_argmax": [-1.0] * n}


def test_outcome_and_squeezes():
    o = on_policy.outcome(_curves([-50, -51, -53], [-10, -9, -8], [-80, -90, -95]))
    assert o == pytest.approx({"d_argmax": 2.0, "d_chosen": -3.0, "d_rejected": -15.0, "d_a_norm": 0.5})
    assert on_policy.squeezes(o)
    assert not on_policy.squeezes({**o, "d_chosen": 0.5})
    assert not on_policy.squeezes({**o, "d_argmax": 0.05})


def _records(loss_type, beta, lc, lj, rc, rj, steps=3, **kw):
    """Tracking-like records whose dpo entry is what the library logs for these per-prompt log-probs."""
    rng = np.random.default_rng(0)
    out = []
    for s in range(steps):
        c, j = rc + rng.normal(0, 1, rc.shape) * s, rj - rng.normal(1, 1, rj.shape) * s
        ref = (None, None) if loss_type == "simpo" else (rc, rj)
        cp, cm = residual_coefficients(c, j, *ref, loss_type=loss_type, beta=beta, chosen_lengths=lc,
                                       rejected_lengths=lj, **kw)
        out.append({"step": 10 * s, "per_prompt": {"chosen": c.tolist(), "rejected": j.tolist()},
                    "dpo": {"margin": spread((c - rc) - (j - rj)), "coef_chosen": spread(np.asarray(cp)),
                            "coef_rejected": spread(np.asarray(cm))}})
    return out


@pytest.mark.parametrize("loss_type,beta,kw", [("sigmoid", 0.1, {}), ("hinge", 0.1, {}), ("ipo", 0.1, {}),
                                               ("simpo", 2.0, {"simpo_gamma": 0.5})])
def test_recompute_per_prompt_matches_logged(loss_type, beta, kw):
    lc, lj = np.array([10.0, 12, 7, 9]), np.array([11.0, 8, 9, 14])
    rc, rj = np.array([-30.0, -35, -20, -28]), np.array([-60.0, -50, -45, -70])
    records = _records(loss_type, beta, lc, lj, rc, rj, **kw)
    ref = {"chosen_lengths": lc.tolist(), "rejected_lengths": lj.tolist(), "ref_chosen": rc.tolist(), "ref_rejected": rj.tolist()}
    opts = {"loss_type": loss_type, "beta": beta, "label_smoothing": 0.0, **kw}
    q = on_policy.recompute(records, ref, opts)
    assert on_policy.coefficient_gap(records, q) < 1e-5
    # every pair lies on the analytic curve (c·L against the length-normalised margin for ipo / simpo)
    for p in q:
        cp, cm = on_policy.analytic(loss_type, np.asarray(p["x"]), beta, kw.get("simpo_gamma", 0.5))
        np.testing.assert_allclose(p["scaled_chosen"], cp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p["scaled_rejected"], cm, rtol=1e-5, atol=1e-6)
    # a wrong β is caught
    wrong = on_policy.recompute(records, ref, {**opts, "beta": beta * 1.5})
    assert on_policy.coefficient_gap(records, wrong) > 1e-3


def test_recompute_from_spreads_uses_monotone_min_max():
    lc = lj = np.full(5, 10.0)
    rc, rj = np.linspace(-40, -20, 5), np.linspace(-60, -50, 5)
    records = _records("sigmoid", 0.1, lc, lj, rc, rj)
    q = on_policy.recompute(records, None, {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0})
    assert on_policy.coefficient_gap(records, q) < 1e-6
    with pytest.raises(ValueError):
        on_policy.recompute(records, None, {"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0})


def test_analytic_regimes():
    d = np.array([-5.0, 0.0, 5.0, 9.9, 10.1, 100.0])
    cp, cm = on_policy.analytic("sigmoid", d, 0.1)
    np.testing.assert_allclose(cp, 0.1 / (1 + np.exp(0.1 * d)), rtol=1e-5)
    np.testing.assert_allclose(cm, -cp)
    cp, _ = on_policy.analytic("hinge", d, 0.1)
    np.testing.assert_allclose(cp, [0.1, 0.1, 0.1, 0.1, 0, 0], atol=1e-7)
    cp, cm = on_policy.analytic("ipo", np.array([0.0, 5.0, 6.0]), 0.1)  # sign flips at h = 1/(2β) = 5
    np.testing.assert_allclose(cp, [10.0, 0.0, -2.0], atol=1e-5)
    np.testing.assert_allclose(cm, -cp, atol=1e-5)


def test_ppo_clip_curve():
    lr = np.log(np.array([0.5, 0.9, 1.0, 1.1, 1.5]))
    pos, neg = on_policy.ppo_clip_curve(lr, 0.2)
    np.testing.assert_allclose(pos, [0.5, 0.9, 1.0, 1.1, 0.0], rtol=1e-5)   # push-up stops above 1 + ε
    np.testing.assert_allclose(neg, [0.0, -0.9, -1.0, -1.1, -1.5], rtol=1e-5)  # push-down stops below 1 − ε


def test_claims_compare_on_to_off_per_seed():
    off = [on_policy.outcome(_curves([-50, -52, -55], [-10, -8, -5], [-80, -90, -100]))] * 3
    on = [on_policy.outcome(_curves([-50, -50.5, -51], [-10, -9.5, -9], [-80, -85, -90]))] * 3
    weak = [on_policy.outcome(_curves([-50, -49, -48], [-10, -10, -10], [-80, -81, -82]))] * 3
    peaks = [{"on_policy": {"logp_token": -1.0, "logp_sum": -20.0, "judge": -1.0},
              "off_policy": {"logp_token": -3.0, "logp_sum": -40.0, "judge": -2.0},
              "chosen": {"logp_token": -2.0, "logp_sum": -30.0, "judge": 2.0}}] * 3
    rows = on_policy.claims({"sigmoid": off, "sigmoid_on": on, "ipo": weak}, {"sigmoid": [0.0] * 3, "ipo": [1e-3] * 3},
                            peaks, [0, 1, 2])
    by = {r.claim: r for r in rows}
    assert all(r.passed for c, r in by.items() if "on-policy" in c and r.kind == "paper"), [(r.claim, r.value) for r in rows]
    assert by[next(c for c in by if c.startswith("IPO squeezes"))].passed is False
    checks = [r for r in rows if r.kind == "check"]
    assert [r.passed for r in checks] == [True, False]
    flipped = on_policy.claims({"sigmoid": on, "sigmoid_on": off}, {}, [], [0, 1, 2])
    assert not any(r.passed for r in flipped if "squeeze less" in r.claim)


@pytest.mark.experiment  # end-to-end (a few minutes on 2 cores): make test-experiments
def test_quick_run(tmp_path):
    out = tmp_path / "out"
    res = on_policy.main(on_policy.Config(out=str(out), run_dir=str(tmp_path / "run"), quick=True, seeds=(0,)))
    for f in ("squeeze.png", "coefficients.png", "results.json", "report.md", "claims.json"):
        assert (out / f).exists(), f
    rows = read_claims(out / "claims.json")
    assert {r["experiment"] for r in rows} == {"on_policy"}
    assert all(r["passed"] for r in rows if r["kind"] == "check"), [r for r in rows if r["kind"] == "check"]
    assert set(res["per_seed"]) == set(on_policy.RUNS)
    assert json.loads((out / "results.json").read_text())["negative_peak"]
