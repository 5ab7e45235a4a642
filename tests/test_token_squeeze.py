"""experiments.token_squeeze: the quick run writes its claims, figures and numbers, every check
row passes; and, independently of the experiment's code, a head-only SGD step of a tiny untied
float64 LM is exactly the squeezing theorem's closed form (SPEC §2, last paragraph)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import token_squeeze
from experiments.claims import read_claims
from ldjax import squeeze as sq
from ldjax.models.transformer import CausalLM, TransformerConfig



@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("token_squeeze")
    result = token_squeeze.main(token_squeeze.Config(out=str(out), quick=True))
    return out, result


@pytest.mark.experiment  # an end-to-end run (minutes): make test-experiments
def test_quick_run_claims_and_figures(quick_run):
    out, result = quick_run
    rows = read_claims(out / "claims.json")
    checks = [r for r in rows if r["kind"] == "check"]
    papers = [r for r in rows if r["kind"] == "paper"]
    assert {r["experiment"] for r in rows} == {"token_squeeze"}
    wanted_checks = ("head-only SGD step", "head-only control, negative steps", "exact-K first order",
                     "implicit K·G", "factored statistics")
    for text in wanted_checks:
        assert sum(text in r["claim"] for r in checks) == 1, text
    failed = [r["claim"] for r in checks if not r["passed"]]
    assert not failed, failed
    assert result["checks_pass"] is True
    for head in ("untied", "tied"):
        for case in token_squeeze.CASES:
            mine = [r for r in papers if r["claim"].startswith(f"{head} head, {case}:")]
            assert len(mine) == 4, (head, case, [r["claim"] for r in mine])
            for r in mine:
                assert len(r["seeds"]) == 3 and len(r["value"]["per_seed"]) == 3
    for name in ("token_bars.png", "kernel_vs_width.png", "head_body_share.png", "squeeze_rates.png",
                 "first_order_gaps.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "Quick smoke settings" in report and "| PASS | check |" in report


@pytest.mark.experiment  # an end-to-end run (minutes): make test-experiments
def test_quick_run_numbers(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert {r["case"] for r in records} == set(token_squeeze.CASES)
    assert {r["head"] for r in records} == {"untied", "tied"}
    for r in records:
        k = r["kernel"]
        assert 0 < k["identity_share"] <= 1 + 1e-12 and 0 <= k["offdiag_share"] <= 1
        assert k["s"] > 0 and k["trace_per_class"] > k["s"]  # the body part adds a PSD term
        # η was set so that the fitted identity step is α
        assert np.isclose(r["eta"] * k["trace_per_class"], results["config"]["alpha"])
        assert 3.0 <= r["gap_ratios"][-1] <= 5.0
        if r["head"] == "untied":
            assert r["kernel"]["cross_head_diag_ratio"] == 0.0
            assert r["head_only"]["max_abs_err"] < 1e-9
        # the first-order change of the label has the sign of the step (K is PSD)
        signed = sum(r["label_contrib"].values()) * token_squeeze.SIGNS[r["case"]]
        assert signed > 0
    assert set(results["summary"]) == {f"d16_{h}/{c}" for h in ("untied", "tied") for c in token_squeeze.CASES}


@pytest.mark.parametrize("sign", [sq.NEGATIVE, sq.POSITIVE])
def test_head_only_step_is_the_closed_form_exactly(sign):
    """One SGD step on the untied head alone: logits are linear in W, so Δz = −sign·η‖z‖²(π − e_ȳ)."""
    with jax.enable_x64(True):
        cfg = TransformerConfig.tiny("gpt_neox", vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                                     intermediate_size=32)
        model = CausalLM(cfg, rngs=nnx.Rngs(3), dtype=jnp.float64, param_dtype=jnp.float64)
        # larger head weights than the init's, so that π is far from uniform and many classes move
        model.lm_head.kernel[...] = model.lm_head.kernel[...] * 40.0
        ids = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 0, 40)
        pos, label, eta = 7, 5, 0.05
        graphdef, head, rest = nnx.split(model, nnx.PathContains("lm_head"), ...)

        def logits(h):
            return nnx.merge(graphdef, h, rest)(ids)[0, pos]

        def loss(h):
            return -jax.nn.log_softmax(logits(h))[label]

        grad = jax.grad(loss)(head)
        moved = jax.tree_util.tree_map(lambda p, g: p - sign * eta * g, head, grad)
        z, z_new = np.asarray(logits(head)), np.asarray(logits(moved))
        feature = np.asarray(model.features(ids)[0, pos])
        alpha = eta * float(feature @ feature)
        closed = np.asarray(sq.one_step_logits(z, np.int64(label), alpha, sign))
        np.testing.assert_allclose(z_new, closed, rtol=0, atol=1e-12)
        change = np.asarray(sq.log_probabilities(z_new) - sq.log_probabilities(z))
        others = np.arange(40) != label
        assert (change[label] < 0) == (sign == sq.NEGATIVE)
        if sign == sq.NEGATIVE:
            # claim 3 in the real model: the classes with π_i > τ = log Z/α are exactly those that rose
            p = np.asarray(sq.probabilities(z))
            tau = float(sq.threshold(z, np.int64(label), alpha))
            assert np.array_equal(others & (p > tau), others & (change > 0))
            star = int(np.argmax(np.where(others, p, -1)))
            assert change[star] > 0
            assert 1 <= int((others & (change > 0)).sum()) < 39
