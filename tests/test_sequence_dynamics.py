"""Tests for ldjax.sequence_dynamics: implicit A·K·G vs explicit K blocks, splits, O(η²) gap, errors.

float64 on CPU (tests/conftest.py enables x64 for the whole session) on tiny CausalLMs with small
vocabularies, so that every K block (V×V) can be formed and the implicit routes checked against it.
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
from ldjax.models.transformer import CausalLM, TransformerConfig

V = 13
T = 6
NTK = dict(implementation="jacobian_contraction")


def rel_err(got, want):
    """max |got − want| / max |want| (the relative error quoted in assertion messages)."""
    got, want = np.asarray(got), np.asarray(want)
    scale = np.max(np.abs(want))
    assert scale > 0, "reference is identically zero: the comparison would be vacuous"
    return float(np.max(np.abs(got - want)) / scale)


def sequences(rng, batch, prompt, lengths, *, length=T, vocab=V):
    """A right-padded batch: `prompt` unscored tokens, then lengths[i] scored ones, then padding."""
    ids = rng.integers(0, vocab, (batch, length))
    att = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, n in enumerate(lengths):
        att[i, :prompt + n] = 1
        mask[i, prompt:prompt + n] = 1
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(att), "loss_mask": jnp.asarray(mask)}


def make_model(arch, vocab, seed):
    overrides = dict(hidden_size=16, num_heads=2, intermediate_size=32, num_layers=1, initializer_range=0.3)
    if arch == "qwen2":
        overrides["num_kv_heads"] = 1
    cfg = TransformerConfig.tiny(arch, vocab_size=vocab, **overrides)
    model = CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float64, param_dtype=jnp.float64)
    return model, *sd.lm_apply_fn(model)


@pytest.fixture(scope="module")
def lm():
    model, apply_fn, params = make_model("gpt_neox", V, 0)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(params))
    return model, apply_fn, params


@pytest.fixture(scope="module")
def batches(lm):
    _, apply_fn, params = lm
    rng = np.random.default_rng(0)
    sft = sequences(rng, 2, 2, [4, 3])
    observed = sequences(rng, 3, 2, [4, 2, 3])
    chosen, rejected = sequences(rng, 2, 2, [4, 2]), sequences(rng, 2, 2, [3, 4])
    # Same prompts on both sides, as in a preference pair.
    rejected["input_ids"] = rejected["input_ids"].at[:, :2].set(chosen["input_ids"][:, :2])
    pref = {f"{side}_{k}": v for side, b in (("chosen", chosen), ("rejected", rejected)) for k, v in b.items()}
    logp = {side: losses.sequence_logps(sd._forward(apply_fn, params, sd._inputs(b)), b["input_ids"], b["loss_mask"])
            for side, b in (("chosen", chosen), ("rejected", rejected))}
    # Reference log-probs off the policy's: the margin differs per pair, pair 1 beyond the hinge.
    pref["ref_chosen_logps"] = logp["chosen"] - jnp.array([0.3, 6.0])
    pref["ref_rejected_logps"] = logp["rejected"] + jnp.array([0.2, 6.0])
    return {"sft": sft, "observed": observed, "pref": pref}


def central_difference(f, params, direction, eps):
    """(f(θ + εv) − f(θ − εv)) / 2ε: the directional derivative with an O(ε²) error."""
    plus = f(jax.tree_util.tree_map(lambda p, v: p + eps * v, params, direction))
    minus = f(jax.tree_util.tree_map(lambda p, v: p - eps * v, params, direction))
    return (plus - minus) / (2 * eps)


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


PREFERENCE = {
    "sigmoid": sd.PreferenceObjective("sigmoid", beta=0.5),
    "ipo": sd.PreferenceObjective("ipo", beta=0.5),
    "hinge": sd.PreferenceObjective("hinge", beta=0.1),
}


def autodiff_residuals(apply_fn, params, batch, objective):
    """∂L/∂logits per side by jax.grad of the loss written with ldjax.losses (as objectives.py)."""
    if isinstance(objective, sd.SFTObjective):
        def loss(z):
            per = losses.sft_loss(z[0], batch["input_ids"], batch["loss_mask"], reduction=objective.reduction)
            return per.mean() if objective.batch_reduction == "mean" else per.sum()
        return jax.grad(loss)((sd._forward(apply_fn, params, sd._inputs(batch)),))

    def loss(z):
        lp = [losses.sequence_logps(z[i], batch[f"{s}_input_ids"], batch[f"{s}_loss_mask"]) for i, s in enumerate(sd.SIDES)]
        per = losses.preference_loss(
            lp[0], lp[1], batch["ref_chosen_logps"], batch["ref_rejected_logps"], loss_type=objective.loss_type,
            beta=objective.beta, label_smoothing=objective.label_smoothing,
            chosen_lengths=losses.response_lengths(batch["chosen_loss_mask"]),
            rejected_lengths=losses.response_lengths(batch["rejected_loss_mask"]))[0]
        return per.mean() if objective.batch_reduction == "mean" else per.sum()
    return jax.grad(loss)(tuple(sd._forward(apply_fn, params, sd._inputs(batch, f"{s}_")) for s in sd.SIDES))


def assert_zero_where_unscored(change: sd.ObservedChange, observed):
    scored = np.asarray(observed["loss_mask"]).astype(bool)
    scored[:, 0] = False
    tokens = np.asarray(change.tokens)
    assert np.all(tokens[..., ~scored] == 0.0), "unscored observed tokens must be exactly zero"
    assert np.any(tokens[..., scored] != 0.0)


# --- implicit == explicit A·K·G -------------------------------------------------------------------
def test_sft_implicit_equals_explicit(lm, batches):
    _, apply_fn, params = lm
    upd, obs, obj = batches["sft"], batches["observed"], sd.SFTObjective()
    exp = sd.explicit_decomposition(apply_fn, params, upd, obs, obj, lr=0.1, **NTK)
    chex.assert_shape([exp.A, exp.K_plus, exp.G_plus, exp.K_plus_norms],
                      [(3, T, V, V), (3, 2, T, T, V, V), (2, T, V), (3, 2, T, T)])
    assert exp.K_minus is None and exp.G_minus is None and exp.prediction.negative is None
    # the terms against autodiff: A = ∂ log softmax/∂z, G = ∂L/∂logits, norms of the blocks
    logits_obs = sd._forward(apply_fn, params, sd._inputs(obs))
    chex.assert_trees_all_close(exp.A, jax.vmap(jax.vmap(jax.jacobian(jax.nn.log_softmax)))(logits_obs), atol=1e-14)
    chex.assert_trees_all_close(exp.G_plus, autodiff_residuals(apply_fn, params, upd, obj)[0], atol=1e-14)
    chex.assert_trees_all_close(exp.K_plus_norms, jnp.linalg.norm(exp.K_plus, axis=(-2, -1)), atol=1e-12)

    imp = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.1)
    err = rel_err(imp.total.tokens, exp.prediction.total.tokens)
    assert err < 1e-10, f"SFT implicit vs explicit A·K·G: relative error {err:.2e}"
    assert rel_err(imp.total.responses, exp.prediction.total.responses) < 1e-10
    assert_zero_where_unscored(imp.total, obs)


@pytest.mark.parametrize("loss_type", list(PREFERENCE))
def test_preference_implicit_equals_explicit(lm, batches, loss_type):
    _, apply_fn, params = lm
    upd, obs, obj = batches["pref"], batches["observed"], PREFERENCE[loss_type]
    exp = sd.explicit_decomposition(apply_fn, params, upd, obs, obj, lr=0.2, **NTK)
    g_plus, g_minus = autodiff_residuals(apply_fn, params, upd, obj)
    chex.assert_trees_all_close(exp.G_plus, g_plus, atol=1e-14)
    chex.assert_trees_all_close(exp.G_minus, g_minus, atol=1e-14)
    chex.assert_shape(exp.K_minus, (3, 2, T, T, V, V))

    imp = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.2)
    errs = {name: rel_err(getattr(imp, name).tokens, getattr(exp.prediction, name).tokens)
            for name in ("total", "positive", "negative")}
    assert max(errs.values()) < 1e-10, f"{loss_type}: implicit vs explicit relative errors {errs}"
    # the two terms are the JVPs along the two separate gradients and add up to the whole
    both = imp.positive.tokens + imp.negative.tokens
    assert rel_err(both, exp.prediction.total.tokens) < 1e-10
    unsplit = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.2, split=False)
    assert unsplit.positive is None and unsplit.negative is None
    assert rel_err(unsplit.total.tokens, both) < 1e-12

    pos = sd.position_contributions(apply_fn, params, upd, obs, obj, lr=0.2)
    chex.assert_shape([pos.negative.tokens, pos.negative.responses], [(2, T, 3, T), (2, T, 3)])
    pos_errs = {name: rel_err(getattr(pos, name).tokens, getattr(exp.positions, name).tokens)
                for name in ("positive", "negative")}
    assert max(pos_errs.values()) < 1e-10, f"{loss_type}: per-position relative errors {pos_errs}"
    groups = {"chosen": rel_err(pos.positive_sum.tokens, imp.positive.tokens),
              "rejected": rel_err(pos.negative_sum.tokens, imp.negative.tokens),
              "total": rel_err(pos.total.tokens, imp.total.tokens)}
    assert max(groups.values()) < 1e-10, f"{loss_type}: grouped sums vs the split prediction {groups}"
    np.testing.assert_allclose(pos.positive.responses, pos.positive.tokens.sum(-1), rtol=1e-13, atol=1e-16)
    # unscored update positions (prompt, padding, position 0) contribute exactly zero, scored ones not
    for side, change in (("chosen", pos.positive), ("rejected", pos.negative)):
        unscored = ~np.asarray(upd[f"{side}_loss_mask"]).astype(bool)
        unscored[:, 0] = True
        per_position = np.abs(np.asarray(change.tokens)).max(axis=(-2, -1))  # (B_u, T_u)
        assert np.all(per_position[unscored] == 0.0), side
        if loss_type != "hinge":
            assert np.all(per_position[~unscored] > 0), side
    if loss_type == "hinge":
        # pair 1 is beyond the margin: c± = 0, so its positions contribute exactly nothing
        c_plus, c_minus = sd.update_coefficients(apply_fn, params, upd, obj)
        assert float(c_plus[1]) == 0.0 and float(c_minus[1]) == 0.0 and float(c_plus[0]) != 0.0
        assert np.all(np.asarray(pos.positive.tokens[1]) == 0.0)
        assert np.all(np.asarray(pos.negative.tokens[1]) == 0.0)


def test_dpo_terms_have_opposite_coefficients(lm, batches):
    """DPO: c⁺ = −c⁻ = β(1 − a)/B (SPEC §1.3, mean over pairs)."""
    _, apply_fn, params = lm
    upd, obj = batches["pref"], PREFERENCE["sigmoid"]
    c_plus, c_minus = sd.update_coefficients(apply_fn, params, upd, obj)
    logp_c = losses.sequence_logps(sd._forward(apply_fn, params, sd._inputs(upd, "chosen_")),
                                   upd["chosen_input_ids"], upd["chosen_loss_mask"])
    logp_r = losses.sequence_logps(sd._forward(apply_fn, params, sd._inputs(upd, "rejected_")),
                                   upd["rejected_input_ids"], upd["rejected_loss_mask"])
    d = (logp_c - upd["ref_chosen_logps"]) - (logp_r - upd["ref_rejected_logps"])
    expected = 0.5 * (1 - jax.nn.sigmoid(0.5 * d)) / 2
    chex.assert_trees_all_close(c_plus, expected, atol=1e-14)
    chex.assert_trees_all_close(c_minus, -expected, atol=1e-14)


# --- the loss is the training engine's --------------------------------------------------------------
def test_update_loss_and_gradient_match_training_objectives(lm, batches):
    from ldjax.train import objectives

    model, apply_fn, params = lm
    cases = [(batches["sft"], sd.SFTObjective(), objectives.sft_objective()),
             (batches["pref"], PREFERENCE["ipo"], objectives.preference_objective("ipo", beta=0.5))]
    for batch, obj, engine in cases:
        ours = sd.update_loss(apply_fn, params, batch, obj)
        theirs = nnx.jit(engine)(model, batch)[0]  # the engine casts logits to float32
        np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
    # Σ_s J_sᵀ G_s with the closed-form coefficients is ∇_θ of the loss: compared along random unit
    # directions with central differences of the loss (truncation O(ε²), round-off O(1e-16 L/ε))
    for batch, obj in [(batches["sft"], sd.SFTObjective()), (batches["pref"], PREFERENCE["sigmoid"]),
                       (batches["pref"], PREFERENCE["ipo"])]:
        grad = jax.tree_util.tree_map(jnp.add, *sd.training_gradients(apply_fn, params, batch, obj)) \
            if len(sd._sides(batch, obj)) > 1 else sd.training_gradients(apply_fn, params, batch, obj)[0]
        for seed in range(2):
            leaves, tree = jax.tree_util.tree_flatten(params)
            keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
            v = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
            v = jax.tree_util.tree_map(lambda x: x / jnp.sqrt(tree_dot(v, v)), v)
            fd = central_difference(lambda p: sd.update_loss(apply_fn, p, batch, obj), params, v, 1e-5)
            err = abs(float(tree_dot(grad, v)) - float(fd)) / abs(float(fd))
            assert err < 1e-6, f"{obj}: <J_uᵀG, v> vs central difference of the loss: relative error {err:.2e}"


@pytest.mark.parametrize("reduction,batch_reduction", [("sum", "mean"), ("mean_token", "mean"), ("sum", "sum")])
def test_sft_reductions(lm, batches, reduction, batch_reduction):
    _, apply_fn, params = lm
    upd = batches["sft"]
    obj = sd.SFTObjective(reduction=reduction, batch_reduction=batch_reduction)
    (c,) = sd.update_coefficients(apply_fn, params, upd, obj)
    lengths = np.asarray(losses.response_lengths(upd["loss_mask"]), np.float64)  # [4, 3]
    expected = (1 / lengths if reduction == "mean_token" else np.ones(2)) / (2 if batch_reduction == "mean" else 1)
    np.testing.assert_allclose(c, expected, rtol=1e-15)
    (g,) = sd.update_residuals(apply_fn, params, upd, obj)
    chex.assert_trees_all_close(g, autodiff_residuals(apply_fn, params, upd, obj)[0], atol=1e-14)


def test_response_change_is_the_directional_derivative(lm, batches):
    """SPEC §1.2: Δ log π(y'|x_o) ≈ −η ⟨∇_θ log π(y'|x_o), ∇_θ L⟩, the derivative of the summed response
    log-prob along the step: checked against central differences of sequence_logps (forward passes only)."""
    _, apply_fn, params = lm
    upd, obs, obj = batches["sft"], batches["observed"], sd.SFTObjective()
    (grad,) = sd.training_gradients(apply_fn, params, upd, obj)
    step = jax.tree_util.tree_map(lambda g: -0.3 * g, grad)

    def logps(p, fn=losses.token_logps):
        return fn(sd._forward(apply_fn, p, sd._inputs(obs)), obs["input_ids"], obs["loss_mask"])

    pred = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.3)
    fd_responses = central_difference(lambda p: logps(p, losses.sequence_logps), params, step, 1e-5)
    err = rel_err(pred.total.responses, fd_responses)
    assert err < 1e-7, f"per-response change vs central difference of log π(y'|x): relative error {err:.2e}"
    fd_tokens = central_difference(logps, params, step, 1e-5)
    err = rel_err(pred.total.tokens, fd_tokens)
    assert err < 1e-7, f"per-token change vs central difference of token log-probs: relative error {err:.2e}"
    np.testing.assert_allclose(pred.total.responses, pred.total.tokens.sum(-1), rtol=1e-14)


# --- the actual optimizer update ------------------------------------------------------------------
def test_optax_sgd_route_equals_sgd_route(lm, batches):
    _, apply_fn, params = lm
    upd, obs, obj = batches["pref"], batches["observed"], PREFERENCE["sigmoid"]
    eta = 0.05
    step = sd.optimizer_step(apply_fn, params, optax.sgd(eta), optax.sgd(eta).init(params), upd, obs, obj,
                             chunk_size=2)
    split = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=eta)
    err = rel_err(step.predicted.tokens, split.total.tokens)
    assert err < 1e-12, f"optax.sgd route vs SGD route: relative error {err:.2e}"
    # positive + negative = the JVP along the whole step (one tangent instead of two)
    err = rel_err(split.positive.tokens + split.negative.tokens, step.predicted.tokens)
    assert err < 1e-12, f"positive + negative vs JVP along the optax step: {err:.2e}"
    np.testing.assert_allclose(step.gap.tokens, step.predicted.tokens - step.actual.tokens, atol=0)
    assert_zero_where_unscored(step.actual, obs)
    assert_zero_where_unscored(step.gap, obs)


def gap_ratios(apply_fn, params, upd, obs, obj, optimizer_fn, opt_state, etas):
    gaps = []
    for eta in etas:
        step = sd.optimizer_step(apply_fn, params, optimizer_fn(eta), opt_state, upd, obs, obj, chunk_size=2)
        gaps.append(float(jnp.max(jnp.abs(step.gap.tokens))))
        # first order: the prediction is much closer to the change than the change is to zero
        assert gaps[-1] < 0.1 * float(jnp.max(jnp.abs(step.actual.tokens))), (eta, gaps)
    return gaps, [gaps[i] / gaps[i + 1] for i in range(len(gaps) - 1)]


def test_sgd_gap_is_second_order(lm, batches):
    _, apply_fn, params = lm
    obj = sd.SFTObjective()
    gaps, ratios = gap_ratios(apply_fn, params, batches["sft"], batches["observed"], obj, optax.sgd,
                              optax.sgd(1.0).init(params), [4e-3, 2e-3, 1e-3])
    assert all(3.0 <= r <= 5.0 for r in ratios), f"SGD: gap ratios {ratios} when η halves (gaps {gaps})"


def test_adam_gap_is_second_order(lm, batches):
    """Real Adam steps at η, η/2, η/4 from the same warmed-up moments (the update is linear in η)."""
    _, apply_fn, params = lm
    upd, obs, obj = batches["pref"], batches["observed"], PREFERENCE["sigmoid"]
    warm = optax.adam(1e-3)
    state = warm.init(params)
    for _ in range(2):
        step = sd.optimizer_step(apply_fn, params, warm, state, upd, obs, obj, chunk_size=2)
        params, state = step.new_params, step.new_opt_state
    gaps, ratios = gap_ratios(apply_fn, params, upd, obs, obj, optax.adam, state, [2e-3, 1e-3, 5e-4])
    assert all(3.0 <= r <= 5.0 for r in ratios), f"Adam: gap ratios {ratios} when η halves (gaps {gaps})"
    # the optimizer-aware prediction is not SGD's
    adam = sd.optimizer_step(apply_fn, params, optax.adam(1e-3), state, upd, obs, obj, chunk_size=2)
    sgd = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=1e-3)
    assert rel_err(sgd.total.tokens, adam.predicted.tokens) > 0.1


# --- chunks, padding, linearity ---------------------------------------------------------------------
def test_chunked_equals_unchunked(lm, batches):
    _, apply_fn, params = lm
    obs = batches["observed"]  # 3 sequences: chunks of 2 pad the last chunk
    direction = jax.tree_util.tree_map(lambda p: 0.01 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    whole = sd.predict_for_update(apply_fn, params, obs, direction)
    chunked = sd.predict_for_update(apply_fn, params, obs, direction, chunk_size=2)
    np.testing.assert_allclose(chunked.tokens, whole.tokens, rtol=1e-12, atol=1e-15)
    new = jax.tree_util.tree_map(jnp.add, params, direction)
    a = sd.actual_change(apply_fn, params, new, obs)
    b = sd.actual_change(apply_fn, params, new, obs, chunk_size=2)
    np.testing.assert_allclose(b.tokens, a.tokens, rtol=1e-12, atol=1e-15)
    assert_zero_where_unscored(whole, obs)


def test_padding_tokens_do_not_matter(lm, batches):
    """Changing the ids of padded (attention 0, unscored) update and observed tokens changes nothing."""
    _, apply_fn, params = lm
    upd, obs, obj = batches["sft"], batches["observed"], sd.SFTObjective()
    base = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.1)

    def repad(batch, token):
        ids = jnp.where(batch["attention_mask"] == 0, token, batch["input_ids"])
        return {**batch, "input_ids": ids}

    upd2, obs2 = repad(upd, 7), repad(obs, 11)
    assert not np.array_equal(upd2["input_ids"], upd["input_ids"]) and not np.array_equal(obs2["input_ids"], obs["input_ids"])
    other = sd.predict_sgd(apply_fn, params, upd2, obs2, obj, lr=0.1)
    np.testing.assert_allclose(other.total.tokens, base.total.tokens, rtol=1e-12, atol=1e-15)


@settings(max_examples=8, deadline=None)
@given(c1=st.lists(st.floats(-2, 2), min_size=4, max_size=4), c2=st.lists(st.floats(-2, 2), min_size=4, max_size=4),
       alpha=st.floats(-3, 3), lr=st.floats(1e-3, 1.0))
def test_prediction_is_linear_in_coefficients_and_lr(lm, batches, c1, c2, alpha, lr):
    _, apply_fn, params = lm
    upd, obs, obj = batches["pref"], batches["observed"], PREFERENCE["sigmoid"]
    c1 = (jnp.array(c1[:2]), jnp.array(c1[2:]))
    c2 = (jnp.array(c2[:2]), jnp.array(c2[2:]))
    mix = tuple(alpha * a + b for a, b in zip(c1, c2))

    def pred(c, eta):
        p = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=eta, coefficients=c)
        return np.stack([p.positive.tokens, p.negative.tokens])

    p1, p2, pm = pred(c1, lr), pred(c2, lr), pred(mix, lr)
    scale = max(np.max(np.abs(p1)), np.max(np.abs(p2)), 1e-300) * (abs(alpha) + 1)
    assert np.max(np.abs(pm - (alpha * p1 + p2))) <= 1e-11 * scale
    half = pred(c1, lr / 2)
    assert np.max(np.abs(2 * half - p1)) <= 1e-12 * max(np.max(np.abs(p1)), 1e-300)


# --- a tied-embedding Qwen2 -------------------------------------------------------------------------
def test_qwen2_tied_sft_implicit_equals_explicit():
    model, apply_fn, params = make_model("qwen2", 17, 1)
    assert model.config.tie_word_embeddings and model.lm_head is None
    rng = np.random.default_rng(1)
    upd = sequences(rng, 2, 1, [3, 4], length=5, vocab=17)
    obs = sequences(rng, 2, 2, [4, 5], length=7, vocab=17)  # longer than the update: padded for K
    obj = sd.SFTObjective()
    exp = sd.explicit_decomposition(apply_fn, params, upd, obs, obj, lr=0.1, **NTK)
    chex.assert_shape([exp.K_plus, exp.positions.positive.tokens], [(2, 2, 7, 5, 17, 17), (2, 5, 2, 7)])
    imp = sd.predict_sgd(apply_fn, params, upd, obs, obj, lr=0.1)
    err = rel_err(imp.total.tokens, exp.prediction.total.tokens)
    assert err < 1e-10, f"qwen2 tied: implicit vs explicit relative error {err:.2e}"
    # the explicit per-position terms add up to the explicit total
    assert rel_err(exp.positions.total.tokens, exp.prediction.total.tokens) < 1e-12


# --- bad input -----------------------------------------------------------------------------------------
def test_errors_name_the_problem(lm, batches):
    _, apply_fn, params = lm
    upd, obs, pref = batches["sft"], batches["observed"], batches["pref"]
    sft = sd.SFTObjective()
    err = sd.SequenceDynamicsError
    assert issubclass(err, ValueError)

    def call(u=upd, o=obs, objective=sft, **kw):
        return sd.predict_sgd(apply_fn, params, u, o, objective, lr=0.1, **kw)

    with pytest.raises(err, match=r"missing \['loss_mask'\]"):
        call(u={k: v for k, v in upd.items() if k != "loss_mask"})
    with pytest.raises(err, match="attention_mask has shape"):
        call(o={**obs, "attention_mask": obs["attention_mask"][:, :-1]})
    with pytest.raises(err, match=r"empty response in rows \[1\]"):
        call(u={**upd, "loss_mask": upd["loss_mask"].at[1].set(0)})
    with pytest.raises(err, match="scores padding tokens"):
        call(o={**obs, "loss_mask": obs["loss_mask"].at[1, -1].set(1)})
    with pytest.raises(err, match="integer token ids"):
        call(u={**upd, "input_ids": upd["input_ids"].astype(jnp.float32)})
    with pytest.raises(err, match="T >= 2"):
        call(o={k: v[:, :1] for k, v in obs.items()})
    with pytest.raises(err, match="needs 'ref_chosen_logps'"):
        call(u={k: v for k, v in pref.items() if k != "ref_chosen_logps"}, objective=PREFERENCE["sigmoid"])
    with pytest.raises(err, match=r"missing \['chosen_input_ids'"):
        call(objective=PREFERENCE["sigmoid"])
    with pytest.raises(err, match="coefficient has shape"):
        call(coefficients=(jnp.ones(3),))
    with pytest.raises(err, match="one per update side"):
        call(u=pref, objective=PREFERENCE["sigmoid"], coefficients=(jnp.ones(2),))
    with pytest.raises(err, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(err, match="SFTObjective or a PreferenceObjective"):
        call(objective="sft")
    with pytest.raises(err, match="reduction"):
        sd.SFTObjective(reduction="mean")
    with pytest.raises(err, match="loss_type"):
        sd.PreferenceObjective("dpo")
    with pytest.raises(err, match=r"logits \(B, T, V\)"):
        sd.predict_sgd(lambda p, x: apply_fn(p, x)[:, :, 0], params, upd, obs, sft, lr=0.1)
    with pytest.raises(err, match="tree structure"):
        sd.predict_for_update(apply_fn, params, obs, {"w": jnp.ones(3)})
    with pytest.raises(err, match="side must be"):
        sd.preference_side(pref, "winner")
    chex.assert_trees_all_equal(sd.preference_side(pref, "chosen")["input_ids"], pref["chosen_input_ids"])
