"""ldjax's probability-weighted negative gradient (``negative_weight_power``), held against autodiff.

The mitigation keeps every loss value and scales the residual of rejected token t by
π(y⁻_t)^α. Checked: the value is the plain log-prob; the logits gradient is the closed form
w_t (e_y − π); α = 0 is the plain loss bit for bit; the engine's gradient, the decomposition's
per-token coefficients c⁻_t = c⁻ π(y⁻_t)^α and its explicit A·K·G agree; the SGD prediction's
gap is second order. float64 (tests/conftest.py enables x64).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from ldjax import losses
from ldjax import sequence_dynamics as sd
from ldjax.train import objectives
from tests.test_sequence_dynamics import NTK, V, T, make_model, rel_err, sequences


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), power=st.floats(0.0, 3.0), average=st.booleans())
def test_value_is_the_log_prob_and_gradient_is_weighted(seed, power, average):
    rng = np.random.default_rng(seed)
    b, t, v = 3, 5, 7
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * 2)
    batch = sequences(rng, b, 1, [rng.integers(1, t) for _ in range(b)], length=t, vocab=v)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    w = losses.probability_weights(logits, ids, mask, power)
    plain = losses.sequence_logps(logits, ids, mask, average=average)
    chex.assert_trees_all_close(losses.reweighted_sequence_logps(logits, ids, mask, w, average=average), plain,
                                atol=1e-13)
    # the one-pass route (the engine's) equals weights-then-reweighting, in value and in gradient
    one_pass = lambda z: losses.probability_weighted_logps(z, ids, mask, power, average=average)  # noqa: E731
    two_step = lambda z: losses.reweighted_sequence_logps(  # noqa: E731
        z, ids, mask, losses.probability_weights(z, ids, mask, power), average=average)
    chex.assert_trees_all_close(one_pass(logits), two_step(logits), atol=1e-13)
    chex.assert_trees_all_close(jax.grad(lambda z: one_pass(z).sum())(logits),
                                jax.grad(lambda z: two_step(z).sum())(logits), atol=1e-13)
    # weights: π(y_t)^α on scored tokens (position 0 never), exactly 0 elsewhere
    p = np.exp(np.asarray(losses.token_logps(logits, ids, mask)))
    scored = np.asarray(mask).astype(bool)
    scored[:, 0] = False
    np.testing.assert_allclose(np.asarray(w)[scored], p[scored] ** power, rtol=1e-12)
    assert np.all(np.asarray(w)[~scored] == 0)
    # ∂/∂z of Σ_b r_b · logp_b: row t−1 gets r_b w_t (e_y − π) / (L_b if average) — closed form
    r = jnp.asarray(rng.normal(size=b))
    grad = jax.grad(lambda z: jnp.sum(r * losses.reweighted_sequence_logps(z, ids, mask, w, average=average)))(logits)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    lengths = np.maximum(scored.sum(1), 1) if average else np.ones(b)
    want = np.zeros((b, t, v))
    for i in range(b):
        for k in range(1, t):
            if scored[i, k]:
                e = np.eye(v)[int(ids[i, k])]
                want[i, k - 1] = float(r[i]) * float(w[i, k]) * (e - probs[i, k - 1]) / lengths[i]
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-12)


def test_weights_shape_is_checked():
    logits = jnp.zeros((2, 4, 5))
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(losses.LossInputError, match="weights must have shape"):
        losses.reweighted_sequence_logps(logits, ids, jnp.ones((2, 4)), jnp.ones((2, 3)))


@pytest.fixture(scope="module")
def setup():
    model, apply_fn, params = make_model("gpt_neox", V, 3)
    rng = np.random.default_rng(1)
    chosen, rejected = sequences(rng, 2, 2, [4, 2]), sequences(rng, 2, 2, [3, 4])
    rejected["input_ids"] = rejected["input_ids"].at[:, :2].set(chosen["input_ids"][:, :2])
    pref = {f"{side}_{k}": v for side, b in (("chosen", chosen), ("rejected", rejected)) for k, v in b.items()}
    pref["ref_chosen_logps"] = jnp.array([-9.0, -7.5])
    pref["ref_rejected_logps"] = jnp.array([-8.0, -9.5])
    observed = sequences(rng, 3, 2, [4, 2, 3])
    return model, apply_fn, params, pref, observed


def engine_grad(model, batch, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)[0])(params)


@pytest.mark.parametrize("concatenate", [False, True])
def test_power_zero_is_the_plain_loss(setup, concatenate, monkeypatch):
    model, _, _, pref, _ = setup
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu" if concatenate else "cpu")
    plain = objectives.preference_objective("sigmoid", beta=0.5)
    zero = objectives.preference_objective("sigmoid", beta=0.5, negative_weight_power=0.0)
    chex.assert_trees_all_equal(engine_grad(model, pref, plain), engine_grad(model, pref, zero))
    weighted = objectives.preference_objective("sigmoid", beta=0.5, negative_weight_power=1.0)
    assert float(weighted(model, pref)[0]) == pytest.approx(float(plain(model, pref)[0]), rel=1e-12)
    assert rel_err(jax.tree_util.tree_leaves(engine_grad(model, pref, weighted))[0],
                   jax.tree_util.tree_leaves(engine_grad(model, pref, plain))[0]) > 1e-3, "α = 1 must change the step"


@pytest.mark.parametrize("loss_type,power", [("sigmoid", 1.0), ("sigmoid", 0.5), ("ipo", 2.0)])
def test_engine_gradient_equals_decomposition_with_token_coefficients(setup, loss_type, power):
    model, apply_fn, params, pref, _ = setup
    obj = sd.PreferenceObjective(loss_type, beta=0.5, negative_weight_power=power)
    engine = engine_grad(model, pref, objectives.preference_objective(loss_type, beta=0.5,
                                                                      negative_weight_power=power))
    d_plus, d_minus = sd.training_gradients(apply_fn, params, pref, obj)
    ours = jax.tree_util.tree_map(jnp.add, d_plus, d_minus)
    chex.assert_trees_all_close(ours, engine, atol=1e-5, rtol=1e-5)  # the engine casts logits to float32
    # c⁻_t = c⁻ π(y⁻_t)^α with c⁻ of the plain loss (closed form, losses.residual_coefficients)
    c_plus, c_minus = sd.update_coefficients(apply_fn, params, pref, obj)
    plain_plus, plain_minus = sd.update_coefficients(apply_fn, params, pref, sd.PreferenceObjective(loss_type, beta=0.5))
    logits_r = sd._forward(apply_fn, params, sd._inputs(pref, "rejected_"))
    p = jnp.exp(losses.token_logps(logits_r, pref["rejected_input_ids"], pref["rejected_loss_mask"]))
    scored = np.asarray(pref["rejected_loss_mask"]).astype(bool)
    scored[:, 0] = False
    chex.assert_trees_all_close(c_plus, plain_plus, atol=1e-15)
    chex.assert_shape(c_minus, pref["rejected_input_ids"].shape)
    np.testing.assert_allclose(np.asarray(c_minus)[scored], (plain_minus[:, None] * p ** power)[scored], rtol=1e-12)
    assert np.all(np.asarray(c_minus)[~scored] == 0)


def test_explicit_and_first_order(setup):
    _, apply_fn, params, pref, observed = setup
    obj = sd.PreferenceObjective("sigmoid", beta=0.5, negative_weight_power=1.0)
    exp = sd.explicit_decomposition(apply_fn, params, pref, observed, obj, lr=0.2, **NTK)
    # G⁻ against jax.grad of the weighted loss w.r.t. the rejected logits
    logits = tuple(sd._forward(apply_fn, params, sd._inputs(pref, f"{s}_")) for s in sd.SIDES)

    def loss(z):
        w = losses.probability_weights(z[1], pref["rejected_input_ids"], pref["rejected_loss_mask"], 1.0)
        per = losses.preference_loss(
            losses.sequence_logps(z[0], pref["chosen_input_ids"], pref["chosen_loss_mask"]),
            losses.reweighted_sequence_logps(z[1], pref["rejected_input_ids"], pref["rejected_loss_mask"], w),
            pref["ref_chosen_logps"], pref["ref_rejected_logps"], beta=0.5)[0]
        return per.mean()

    g_plus, g_minus = jax.grad(loss)(logits)
    chex.assert_trees_all_close(exp.G_plus, g_plus, atol=1e-14)
    chex.assert_trees_all_close(exp.G_minus, g_minus, atol=1e-14)
    imp = sd.predict_sgd(apply_fn, params, pref, observed, obj, lr=0.2)
    assert rel_err(imp.total.tokens, exp.prediction.total.tokens) < 1e-10
    gaps = []
    for eta in (4e-3, 2e-3, 1e-3):
        step = sd.optimizer_step(apply_fn, params, optax.sgd(eta), optax.sgd(eta).init(params), pref, observed, obj)
        gaps.append(float(jnp.max(jnp.abs(step.gap.tokens))))
    ratios = [gaps[0] / gaps[1], gaps[1] / gaps[2]]
    assert all(3.0 <= r <= 5.0 for r in ratios), f"gap ratios {ratios} when η halves (gaps {gaps})"


def test_negative_power_is_refused():
    with pytest.raises(sd.SequenceDynamicsError, match="negative_weight_power"):
        sd.PreferenceObjective(negative_weight_power=-1.0)
    with pytest.raises(ValueError, match="negative_weight_power"):
        objectives.preference_objective(negative_weight_power=-0.5)


# --- PPO-clip on preference pairs (objectives.ppo_clip_objective) -------------------------------------

def test_ppo_clip_pairs_start_at_zero_with_the_token_mean_gradient(setup):
    """At the start (policy = reference, ρ = 1, nothing clipped) the loss is 0 and its gradient is that of
    −(mean_t log π(y⁺_t) − mean_t log π(y⁻_t)), averaged over pairs (autodiff of the plain formula)."""
    model, _, _, pref, _ = setup
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref = objectives.reference_logps(graphdef, params, rest, {k: np.asarray(v) for k, v in pref.items()
                                                              if k.startswith(("chosen_", "rejected_"))},
                                     batch_size=2, per_token=True)
    batch = {**pref, **{k: jnp.asarray(v) for k, v in ref.items()}}
    plain = {k: jnp.asarray(v) for k, v in objectives.reference_logps(
        graphdef, params, rest, {k: np.asarray(v) for k, v in pref.items() if k.startswith(("chosen_", "rejected_"))},
        batch_size=2).items()}
    np.testing.assert_allclose(ref["ref_chosen_logps"], plain["ref_chosen_logps"], rtol=1e-5)  # row sums
    loss_fn = objectives.ppo_clip_objective(epsilon=0.2)
    loss, metrics = loss_fn(model, batch)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["clip_fraction/chosen"]) == 0.0 and float(metrics["clip_fraction/rejected"]) == 0.0

    def by_hand(p):
        m = nnx.merge(graphdef, p, rest)
        total = 0.0
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            logits = m(pref[f"{side}_input_ids"], pref[f"{side}_attention_mask"])
            tok = losses.token_logps(logits, pref[f"{side}_input_ids"], pref[f"{side}_loss_mask"])
            total = total - sign * (tok.sum(-1) / losses.response_lengths(pref[f"{side}_loss_mask"])).mean()
        return total

    chex.assert_trees_all_close(engine_grad(model, batch, loss_fn), jax.grad(by_hand)(params), atol=1e-6, rtol=1e-5)


def test_ppo_clip_pairs_stop_pushing_clipped_tokens(setup):
    """Old log-probs moved so that some y⁻ tokens have ρ < 1 − ε: exactly those get no gradient (the logits
    rows that predict them have zero gradient), the others keep theirs."""
    model, apply_fn, params, pref, _ = setup
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    arrays = {k: np.asarray(v) for k, v in pref.items() if k.startswith(("chosen_", "rejected_"))}
    ref = objectives.reference_logps(graphdef, params, rest, arrays, batch_size=2, per_token=True)
    scored = np.asarray(pref["rejected_loss_mask"]).astype(bool)
    scored[:, 0] = False
    bump = np.zeros_like(ref["ref_rejected_token_logps"])
    positions = np.argwhere(scored)[::2]  # every other scored rejected token: ρ = e^{-1} < 0.8 → clipped
    bump[tuple(positions.T)] = 1.0
    batch = {**pref, **{k: jnp.asarray(v) for k, v in ref.items()},
             "ref_rejected_token_logps": jnp.asarray(ref["ref_rejected_token_logps"] + bump)}
    _, metrics = objectives.ppo_clip_objective(epsilon=0.2)(model, batch)
    assert float(metrics["clip_fraction/rejected"]) == pytest.approx(len(positions) / scored.sum())
    logits = model(pref["rejected_input_ids"], pref["rejected_attention_mask"])

    def loss_of_logits(z):
        tok = losses.token_logps(z, pref["rejected_input_ids"], pref["rejected_loss_mask"])
        return losses.clipped_surrogate(tok, batch["ref_rejected_token_logps"], -jnp.ones(2), scored.astype(np.float64),
                                        epsilon=0.2).mean()

    g = np.abs(np.asarray(jax.grad(loss_of_logits)(logits))).sum(-1)  # (B, T): row t−1 predicts token t
    for b, t in np.argwhere(scored):
        clipped = any((positions == (b, t)).all(1))
        assert (g[b, t - 1] == 0) == clipped, (b, t, clipped)
