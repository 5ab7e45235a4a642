"""Tests for ldjax.squeeze: the closed form against autodiff, the theorems (claims 1, 2, 3, 7) on
every generated case, the generalised rule for the DPO-like step, and the tendency measurements."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from ldjax import squeeze as sq


@st.composite
def cases(draw, min_classes=3, max_classes=60, label_at=None):
    """(logits (V,), label, α): raw logits in [-10, 10] times a peakedness scale, sometimes a spike."""
    v = draw(st.integers(min_classes, max_classes))
    raw = draw(hnp.arrays(np.float64, (v,), elements=st.floats(-10, 10, allow_nan=False, width=64)))
    scale = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0]) | st.floats(0, 3))
    z = raw * scale
    if draw(st.booleans()):  # a peaked distribution: one class far above the rest
        z[draw(st.integers(0, v - 1))] += draw(st.floats(0, 25))
    if label_at == "peak":
        label = int(np.argmax(z))
    else:
        label = draw(st.integers(0, v - 1))
    alpha = draw(st.floats(1e-3, 20))
    return z, label, alpha


# --- the closed form --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(cases(max_classes=12), st.sampled_from([sq.NEGATIVE, sq.POSITIVE]))
def test_one_step_is_a_gradient_step_on_the_logits(case, sign):
    z, label, alpha = case
    grad = jax.grad(lambda zz: optax.softmax_cross_entropy_with_integer_labels(zz, label))(jnp.asarray(z))
    expected = z - sign * alpha * np.asarray(grad)
    np.testing.assert_allclose(sq.one_step_logits(z, np.int64(label), alpha, sign), expected, atol=1e-10, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_negative_step_matches_spec_formula(case):
    """π'_i = π_i e^{απ_i}/Z (i ≠ ȳ), π'_ȳ = π_ȳ e^{−α(1−π_ȳ)}/Z, τ = log(Z)/α."""
    z, label, alpha = case
    p = scipy.special.softmax(z)
    unnorm = p * np.exp(alpha * p)
    unnorm[label] = p[label] * np.exp(-alpha * (1 - p[label]))
    np.testing.assert_allclose(sq.one_step_probabilities(z, np.int64(label), alpha), unnorm / unnorm.sum(),
                               rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(sq.threshold(z, np.int64(label), alpha), np.log(unnorm.sum()) / alpha,
                               rtol=1e-10, atol=1e-12)


def test_jax_and_numpy_paths_agree_under_jit():
    z = np.random.default_rng(0).normal(size=(3, 7)) * 2
    labels = np.array([0, 3, 6])
    jitted = jax.jit(sq.one_step_probabilities, static_argnums=3)(jnp.asarray(z), jnp.asarray(labels), 4.0, -1)
    np.testing.assert_allclose(jitted, sq.one_step_probabilities(z, labels, 4.0, -1), rtol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sign", [sq.NEGATIVE, sq.POSITIVE])
def test_linear_softmax_step_is_the_real_gradient_step_and_the_closed_form(bias, sign):
    kw, kb, kx = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(kw, (4, 50), jnp.float64)}
    if bias:
        params["b"] = jax.random.normal(kb, (50,), jnp.float64)
    x = jax.random.normal(kx, (4,), jnp.float64)
    label, lr = jnp.int32(7), 0.3

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(sq.linear_softmax_logits(p, x), label)

    grads = jax.grad(loss)(params)
    expected = jax.tree_util.tree_map(lambda p, g: p - sign * lr * g, params, grads)
    new = sq.linear_softmax_step(params, x, label, lr, sign)
    chex.assert_trees_all_close(new, expected, atol=1e-12)
    alpha = sq.linear_softmax_alpha(x, lr, bias=bias)
    z = sq.linear_softmax_logits(params, x)
    chex.assert_trees_all_close(sq.linear_softmax_logits(new, x), sq.one_step_logits(z, label, alpha, sign),
                                atol=1e-12)


# --- the theorems, on every generated case ----------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(cases())
# π_ȳ = 1 − 8e-8 moving by ~1e-16: below float64 resolution, decided by the exact step
@example(case=(np.array([17.0, 0.0, 0.0]), 0, 0.03125))
@example(case=(np.zeros(5), 2, 20.0))
def test_claims_1_2_3_7_hold_on_every_case(case):
    z, label, alpha = case
    one = sq.claim_label_falls(z, label, alpha)
    two = sq.claim_argmax_rises(z, label, alpha)
    three = sq.claim_threshold_rule(z, label, alpha)
    seven = sq.claim_positive_step_no_squeeze(z, label, alpha)
    assert one.holds and one.prob_after <= one.prob_before, one
    assert two.holds and two.gain >= 0 and two.argmax != label, two
    assert three.holds and three.ratio_monotone, three
    assert seven.holds and seven.target_rises, seven


@settings(max_examples=200, deadline=None)
@given(cases())
def test_threshold_rule_against_an_independent_softmax(case):
    """Risers from scipy's softmax of the updated logits are exactly {i ≠ ȳ : π_i > τ}."""
    z, label, alpha = case
    p = scipy.special.softmax(z)
    residual = p.copy()
    residual[label] -= 1.0
    log_ratio = scipy.special.log_softmax(z + alpha * residual) - scipy.special.log_softmax(z)
    tau = sq.claim_threshold_rule(z, label, alpha).tau
    others = np.array([i for i in range(len(z)) if i != label])
    clear = np.abs(alpha * (p[others] - tau)) > 1e-9  # exact float64 ties at τ are undecidable
    assert np.array_equal(log_ratio[others][clear] > 0, p[others][clear] > tau)


@settings(max_examples=150, deadline=None)
@given(cases(label_at="peak"))
def test_pushing_down_the_peak_z_below_one_means_every_other_class_rises(case):
    """The exact part of claim 6: Z < 1 ⇒ τ < 0 ⇒ all others rise (a theorem, unlike the rest of 6)."""
    z, label, alpha = case
    stats = sq.squeeze_stats(z[None], np.array([label]), alpha)
    if stats.partition_below_one[0]:
        assert stats.all_others_rise[0]


@settings(max_examples=150, deadline=None)
@given(cases(), st.data())
def test_generalised_rule_for_the_dpo_like_step(case, data):
    z, neg, alpha_neg = case
    pos = data.draw(st.integers(0, len(z) - 1).filter(lambda i: i != neg))
    alpha_pos = data.draw(st.sampled_from([alpha_neg, alpha_neg / 2]) | st.floats(1e-3, 20))
    result = sq.claim_combined_rule(z, pos, neg, alpha_pos, alpha_neg)
    assert result.holds, result
    if alpha_pos == alpha_neg:  # equal coefficients: every other class is rescaled by the same 1/Z
        delta = sq.combined_logit_change(z, np.int64(pos), np.int64(neg), alpha_pos, alpha_neg)
        log_ratio = scipy.special.log_softmax(z + delta) - scipy.special.log_softmax(z)
        rest = np.delete(log_ratio, [pos, neg])
        assert np.ptp(rest) < 1e-9 if rest.size else True


@settings(max_examples=100, deadline=None)
@given(cases(max_classes=20), st.data())
def test_general_rule_for_several_steps(case, data):
    z, label, alpha = case
    steps = [(label, alpha)] + [(data.draw(st.integers(0, len(z) - 1)), data.draw(st.floats(-20, 20)))
                                for _ in range(data.draw(st.integers(0, 2)))]
    delta = sq.steps_logit_change(z, steps)
    expected = sum(c * (scipy.special.softmax(z) - np.eye(len(z))[l]) for l, c in steps)
    np.testing.assert_allclose(delta, expected, atol=1e-10)
    assert sq.claim_general_rule(z, steps).holds


def test_claims_report_failures():
    """The checks can say no: an SFT step's ratio does not increase with π, an equal-coefficient
    DPO step puts no threshold on π, and pushing down a tall peak with a large α can lower entropy."""
    z = np.array([3.0, 1.0, 0.0, -1.0])
    probs, log_ratio = sq._exact_step(z, [(0, -2.0)])  # an SFT step on class 0
    assert not sq._monotone(log_ratio[1:], probs[1:], increasing=True)
    assert sq._monotone(log_ratio[1:], probs[1:], increasing=False)
    stats = sq.squeeze_stats(np.array([[4.0, 3.5, 0.0, 0.0, 0.0]]), np.array([0]), 20.0)
    assert stats.peak_overtaken[0] and not stats.all_others_rise[0]


# --- measurements -----------------------------------------------------------------------------------
def test_squeeze_stats_agree_with_the_claims():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20, 15)) * rng.uniform(0.1, 4, size=(20, 1))
    labels = rng.integers(0, 15, 20)
    stats = sq.squeeze_stats(z, labels, 6.0)
    chex.assert_shape([stats.frac_risers, stats.argmax_gain, stats.entropy_change], [(20,)] * 3)
    for i in range(20):
        rule = sq.claim_threshold_rule(z[i], int(labels[i]), 6.0)
        assert stats.frac_risers[i] == pytest.approx(len(rule.actual_risers) / 14)
        assert stats.argmax_gain[i] == pytest.approx(sq.claim_argmax_rises(z[i], int(labels[i]), 6.0).gain)
        h = lambda q: -np.sum(q * np.log(q))  # noqa: E731
        p_new = sq.one_step_probabilities(z[i], np.int64(labels[i]), 6.0)
        assert stats.entropy_change[i] == pytest.approx(h(p_new) - h(scipy.special.softmax(z[i])), abs=1e-10)
    assert np.all((stats.argmax_share >= 0) & (stats.argmax_share <= 1 + 1e-12))


def test_tendency_sweeps_return_their_measurements():
    for tendency in (sq.tendency_peakedness(num_samples=100, num_classes=20),
                     sq.tendency_label_rank(num_samples=100, num_classes=20),
                     sq.tendency_peak_pushdown(num_samples=100, num_classes=20)):
        n = len(tendency.x)
        chex.assert_shape([tendency.frac_risers, tendency.argmax_share, tendency.entropy_rise_rate], [(n,)] * 3)
        assert set(tendency.spearman) >= {"frac_risers", "argmax_share", "entropy_rise_rate"}
        assert all(-1 <= r <= 1 for r in tendency.spearman.values())
        d = tendency.to_dict()
        assert isinstance(d["x"], list) and len(d["x"]) == n


def test_peak_pushdown_grid_recounts_and_claim3_equivalence():
    """Claim 6 over (α, peak height): counts add up; every rate is the bin's recount from
    squeeze_stats; 'all others rise' holds exactly when log Z < α · min_{i≠ȳ} π_i (claim 3's
    threshold below every other class), of which Z < 1 is the sufficient special case."""
    alphas, edges = (0.5, 5.0, 50.0), (0.0, 0.3, 0.7, 1.0)
    grid = sq.peak_pushdown_grid(seed=3, num_classes=12, alphas=alphas, peak_edges=edges, num_samples=600)
    chex.assert_shape([grid.entropy_rise_rate, grid.all_others_rise_rate, grid.peak_overtaken_rate], [(3, 3)] * 3)
    assert grid.count.sum() == 600 and np.all(grid.count > 0)
    # The same cases, regenerated independently of the grid code.
    rng = np.random.default_rng(3)
    scales = np.exp(rng.uniform(np.log(0.25), np.log(6.0), 600))
    z = scales[:, None] * rng.standard_normal((600, 12))
    label = np.argmax(z, axis=-1)
    p = scipy.special.softmax(z, axis=-1)
    peak = p.max(-1)
    others_min = np.where(np.arange(12)[None] == label[:, None], np.inf, p).min(-1)
    for a_i, alpha in enumerate(alphas):
        stats = sq.squeeze_stats(z, label, alpha)
        p_new = np.stack([sq.one_step_probabilities(z[i], np.int64(label[i]), alpha) for i in range(600)])
        log_z = np.log(np.sum(p * np.exp(-alpha * (np.eye(12)[label] - p)), axis=-1))  # Z = Σ π_j e^{Δz_j}
        all_rise_direct = np.all((p_new > p) | (np.arange(12)[None] == label[:, None]), axis=-1)
        np.testing.assert_array_equal(stats.all_others_rise, all_rise_direct)
        np.testing.assert_array_equal(all_rise_direct, log_z < alpha * others_min)
        assert np.all(all_rise_direct[log_z < 0])  # Z < 1 is sufficient
        for b in range(3):
            in_bin = (peak >= edges[b]) & ((peak < edges[b + 1]) if b < 2 else (peak <= edges[b + 1]))
            assert in_bin.sum() == grid.count[b]
            assert grid.all_others_rise_rate[a_i, b] == pytest.approx(all_rise_direct[in_bin].mean())
            assert grid.partition_below_one_rate[a_i, b] == pytest.approx((log_z[in_bin] < 0).mean())
            h = lambda q: -np.sum(q * np.log(q), axis=-1)  # noqa: E731
            assert grid.entropy_rise_rate[a_i, b] == pytest.approx((h(p_new[in_bin]) > h(p[in_bin])).mean())
    d = grid.to_dict()
    assert len(d["entropy_rise_rate"]) == 3 and d["count"] == grid.count.tolist()


# --- bad input ---------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    z = np.zeros(5)
    with pytest.raises(sq.SqueezeInputError, match="outside"):
        sq.one_step_logits(z, np.int64(5), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        sq.one_step_logits(z, np.int64(1), -1.0)
    with pytest.raises(ValueError, match="sign"):
        sq.one_step_logits(z, np.int64(1), 1.0, sign=0)
    with pytest.raises(ValueError, match="integer"):
        sq.one_step_logits(z, 1.0, 1.0)
    with pytest.raises(ValueError, match="does not match"):
        sq.one_step_logits(np.zeros((2, 5)), np.zeros(3, int), 1.0)
    with pytest.raises(ValueError, match="class axis"):
        sq.threshold(np.zeros(1), np.int64(0), 1.0)
    with pytest.raises(ValueError, match="differ"):
        sq.claim_combined_rule(z, 1, 1, 1.0, 1.0)
