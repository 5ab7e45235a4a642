"""ldjax.losses against TRL's formulas (tests/trl_reference.py), autodiff and closed forms."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import trl_reference as trl
from ldjax.losses import (
    LOSS_TYPES,
    LossInputError,
    clipped_surrogate,
    clipped_surrogate_coefficients,
    preference_coefficients,
    preference_loss,
    residual_coefficients,
    response_lengths,
    sequence_logps,
    sequence_residual,
    sft_loss,
    token_logps,
)

FAST = settings(max_examples=20, deadline=None)
HEAVY = settings(max_examples=8, deadline=None)

seeds = st.integers(0, 2**31 - 1)
betas = st.floats(0.02, 4.0)
# XLA on CPU flushes subnormal floats to zero, so a subnormal ε would meet log(0) in ldjax
# but not in numpy's reference; subnormal smoothing is not a meaningful setting anyway.
smoothings = st.floats(0.0, 0.45, allow_subnormal=False)
# Few distinct shapes: every new shape recompiles each eager op, which dominates run time.
batch_sizes = st.sampled_from([1, 5])
# Log-prob scales from "policy barely moved" to "tens of nats": puts the hinge and IPO
# margins on both sides of their targets.
scales = st.sampled_from([0.05, 1.0, 10.0, 60.0])


def _logps(seed, batch, scale):
    rng = np.random.default_rng(seed)
    ref = -np.abs(rng.normal(30.0, 10.0, size=(2, batch)))
    policy = ref + scale * rng.normal(size=(2, batch))
    lengths = rng.integers(0, 40, size=(2, batch))
    return policy[0], policy[1], ref[0], ref[1], lengths[0], lengths[1]


def _sequence_batch(seed, batch=3, length=9, vocab=7, dtype=np.float64):
    """Random logits and a prompt/response/padding layout per row."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)) * 3
    ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    for b in range(batch):
        prompt = rng.integers(1, length // 2)
        end = rng.integers(prompt, length + 1)
        mask[b, prompt:end] = 1
    return logits.astype(dtype), ids, mask


# ---------------------------------------------------------------------------- TRL parity

TRL_1X_TYPES = [
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
]


@pytest.mark.parametrize("loss_type", TRL_1X_TYPES)
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, eps=smoothings, scale=scales)
def test_matches_trl_1x(loss_type, seed, batch, beta, eps, scale):
    pc, pr, rc, rr, lc, lr = _logps(seed, batch, scale)
    if loss_type == "sigmoid":
        eps = 0.0  # TRL 1.x ignores label_smoothing for sigmoid; ldjax keeps cDPO (see 0.x test)
    if loss_type == "exo_pair":
        eps = max(eps, 1e-3)  # TRL 1.x takes log(label_smoothing) as is
    lengths = dict(chosen_lengths=lc, rejected_lengths=lr) if loss_type == "ipo" else {}
    expected = trl.dpo_loss_trl_1x(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps,
        chosen_completion_len=lc, rejected_completion_len=lr,
    )
    got = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps, **lengths)
    chex.assert_trees_all_close(tuple(map(np.asarray, got)), expected, rtol=1e-11, atol=1e-12)


TRL_0X_TYPES = [
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_pair", "apo_zero", "apo_down", "discopop",
]


@pytest.mark.parametrize("loss_type", TRL_0X_TYPES)
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, eps=smoothings, scale=scales, mean=st.floats(-2, 2))
def test_matches_trl_0x(loss_type, seed, batch, beta, eps, scale, mean):
    pc, pr, rc, rr, lc, lr = _logps(seed, batch, scale)
    # TRL 0.x divides by the unclamped length; an empty completion would be 0/0 there.
    lc, lr = np.maximum(lc, 1), np.maximum(lr, 1)
    if loss_type == "exo_pair" and seed % 2:
        eps = 0.0  # exercises TRL 0.x's 1e-3 substitute
    extra = dict(bco_delta=mean) if loss_type == "bco_pair" else {}
    expected = trl.dpo_loss_trl_0x(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps, running_mean=mean,
        chosen_completion_len=lc, rejected_completion_len=lr,
    )
    if loss_type == "ipo":
        # The loss TRL 0.x trains with is ldjax's IPO with lengths; its logged rewards are
        # those of the averaged log-probs, which ldjax gives when handed averages directly.
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pc, pr, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=lc, rejected_lengths=lr)
        chex.assert_trees_all_close(
            (np.asarray(losses), np.asarray(chosen_rewards) / lc, np.asarray(rejected_rewards) / lr),
            expected, rtol=1e-11, atol=1e-12)
        got = preference_loss(pc / lc, pr / lr, rc / lc, rr / lr, loss_type="ipo", beta=beta)
    else:
        got = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=eps, **extra)
    chex.assert_trees_all_close(tuple(map(np.asarray, got)), expected, rtol=1e-11, atol=1e-12)


def test_trl_ipo_is_length_normalised_in_both_versions():
    # Same log-ratios, different lengths: TRL's IPO loss must see the lengths (it is not
    # Azar et al.'s formula on summed log-probs), and 0.x and 1.x must agree on the loss.
    pc, pr, rc, rr = (np.array([v, v]) for v in (-10.0, -14.0, -11.0, -12.0))
    lc, lr = np.array([2, 5]), np.array([4, 1])
    old, _, _ = trl.dpo_loss_trl_0x(pc, pr, rc, rr, loss_type="ipo", beta=0.5,
                                     chosen_completion_len=lc, rejected_completion_len=lr)
    new, _, _ = trl.dpo_loss_trl_1x(pc, pr, rc, rr, loss_type="ipo", beta=0.5,
                                     chosen_completion_len=lc, rejected_completion_len=lr)
    np.testing.assert_allclose(old, new, rtol=1e-14)
    np.testing.assert_allclose(old, ((pc - rc) / lc - (pr - rr) / lr - 1.0) ** 2, rtol=1e-14)
    assert old[0] != old[1]


@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, eps=smoothings, gamma=st.floats(0.0, 3.0))
def test_simpo_matches_trl_cpo(seed, batch, beta, eps, gamma):
    pc, pr, _, _, lc, lr = _logps(seed, batch, 1.0)
    avg_c, avg_r = pc / np.maximum(lc, 1), pr / np.maximum(lr, 1)
    expected = trl.cpo_loss_trl(avg_c, avg_r, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    from_averages = preference_loss(avg_c, avg_r, None, None, loss_type="simpo", beta=beta,
                                    label_smoothing=eps, simpo_gamma=gamma)
    from_sums = preference_loss(pc, pr, None, None, loss_type="simpo", beta=beta, label_smoothing=eps,
                                gamma=gamma, chosen_lengths=lc, rejected_lengths=lr)
    for got in (from_averages, from_sums):
        chex.assert_trees_all_close(tuple(map(np.asarray, got)), expected, rtol=1e-11, atol=1e-12)


def test_ipo_without_lengths_is_azar_formula_and_lengths_change_it():
    pc, pr, rc, rr = (np.array([v]) for v in (-10.0, -14.0, -11.0, -12.0))
    h = (pc - rc) - (pr - rr)
    plain, _, _ = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.5)
    np.testing.assert_allclose(plain, (h - 1.0) ** 2)
    normalised, _, _ = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.5,
                                       chosen_lengths=np.array([2]), rejected_lengths=np.array([4]))
    np.testing.assert_allclose(normalised, ((pc - rc) / 2 - (pr - rr) / 4 - 1.0) ** 2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_jit_float32_matches_eager_float64(loss_type):
    pc, pr, rc, rr, lc, lr = _logps(11, 5, 1.0)
    kw = dict(loss_type=loss_type, beta=0.3, label_smoothing=0.1)

    @jax.jit
    def compiled(pc, pr, rc, rr, lc, lr):
        out = preference_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)
        return out, preference_coefficients(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)

    f32 = [np.float32(a) for a in (pc, pr, rc, rr)] + [np.int32(lc), np.int32(lr)]
    got = compiled(*f32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
    eager = (preference_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw),
             preference_coefficients(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw))
    chex.assert_trees_all_close(got, eager, rtol=2e-4, atol=2e-5)


# --------------------------------------------------------------- coefficients vs autodiff


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@FAST
@given(seed=seeds, batch=batch_sizes, beta=betas, eps=smoothings, scale=scales, use_lengths=st.booleans())
def test_coefficients_equal_autodiff(loss_type, seed, batch, beta, eps, scale, use_lengths):
    pc, pr, rc, rr, lc, lr = _logps(seed, batch, scale)
    kw = dict(loss_type=loss_type, beta=beta, label_smoothing=eps, discopop_tau=0.05 + eps)
    if loss_type == "bco_pair":
        kw["bco_delta"] = eps - 0.2
    if use_lengths:
        kw.update(chosen_lengths=lc, rejected_lengths=lr)

    def total(chosen, rejected):
        return jnp.sum(preference_loss(chosen, rejected, rc, rr, **kw)[0])

    grad_c, grad_r = jax.grad(total, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    g_plus, g_minus = preference_coefficients(pc, pr, rc, rr, **kw)
    chex.assert_trees_all_close((g_plus, g_minus), (grad_c, grad_r), rtol=1e-9, atol=1e-12)
    c_plus, c_minus = residual_coefficients(pc, pr, rc, rr, **kw)
    chex.assert_trees_all_close((c_plus, c_minus), (-g_plus, -g_minus))


@FAST
@given(beta=betas, offset=st.floats(1e-3, 5.0), side=st.sampled_from([-1.0, 1.0]))
def test_hinge_and_ipo_coefficients_change_at_their_targets(beta, offset, side):
    ref = np.array([-20.0])
    # hinge: active (βd < 1) gives c⁺ = β, past the margin c⁺ = 0.
    d = (1.0 + side * offset) / beta
    c_plus, c_minus = residual_coefficients(ref + d, ref, ref, ref, loss_type="hinge", beta=beta)
    expected = beta if side < 0 else 0.0
    np.testing.assert_allclose([c_plus[0], -c_minus[0]], [expected, expected])
    # IPO: c⁺ = 1/β − 2h, positive below the target h = 1/(2β), negative above it.
    h = 1 / (2 * beta) + side * offset
    c_plus, c_minus = residual_coefficients(ref + h, ref, ref, ref, loss_type="ipo", beta=beta)
    np.testing.assert_allclose(c_plus, 1 / beta - 2 * h, rtol=1e-9)
    np.testing.assert_allclose(c_minus, -c_plus)
    assert np.sign(c_plus[0]) == -side


@given(beta=betas, start=st.floats(-80.0, -1.0))
@FAST
def test_dpo_at_reference_is_log2_and_a_is_half(beta, start):
    logps = np.array([start, start - 3.0])
    losses, chosen_rewards, rejected_rewards = preference_loss(logps, logps - 1.0, logps, logps - 1.0, beta=beta)
    np.testing.assert_allclose(losses, math.log(2.0), rtol=1e-14)
    np.testing.assert_allclose(chosen_rewards, 0.0)
    np.testing.assert_allclose(rejected_rewards, 0.0)
    c_plus, c_minus = residual_coefficients(logps, logps - 1.0, logps, logps - 1.0, beta=beta)
    np.testing.assert_allclose(c_plus, beta / 2, rtol=1e-14)  # β(1 − a) with a = ½
    np.testing.assert_allclose(c_minus, -beta / 2, rtol=1e-14)


@HEAVY
@given(seed=seeds, beta=betas, loss_type=st.sampled_from(["sigmoid", "ipo", "simpo", "apo_down", "aot"]))
def test_sequence_residual_is_the_logits_gradient_of_a_preference_loss(seed, beta, loss_type):
    logits_c, ids_c, mask_c = _sequence_batch(seed)
    logits_r, ids_r, mask_r = _sequence_batch(seed + 1)
    rng = np.random.default_rng(seed)
    ref_c, ref_r = -np.abs(rng.normal(8, 2, size=(2, 3)))
    kw = dict(loss_type=loss_type, beta=beta, chosen_lengths=response_lengths(mask_c),
              rejected_lengths=response_lengths(mask_r))

    def total(lc, lr):
        chosen = sequence_logps(lc, ids_c, mask_c)
        rejected = sequence_logps(lr, ids_r, mask_r)
        return jnp.sum(preference_loss(chosen, rejected, ref_c, ref_r, **kw)[0])

    grad_c, grad_r = jax.grad(total, argnums=(0, 1))(jnp.asarray(logits_c), jnp.asarray(logits_r))
    c_plus, c_minus = residual_coefficients(
        sequence_logps(logits_c, ids_c, mask_c), sequence_logps(logits_r, ids_r, mask_r), ref_c, ref_r, **kw
    )
    chex.assert_trees_all_close(sequence_residual(logits_c, ids_c, mask_c, c_plus), grad_c, atol=1e-12)
    chex.assert_trees_all_close(sequence_residual(logits_r, ids_r, mask_r, c_minus), grad_r, atol=1e-12)


# ------------------------------------------------------------------- sequence log-probs


@FAST
@given(seed=seeds)
def test_sequence_logps_equals_a_loop_over_tokens_and_trl(seed):
    logits, ids, mask = _sequence_batch(seed)
    expected = np.zeros(len(ids))
    per_token = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                row = logits[b, t - 1]
                per_token[b, t] = row[ids[b, t]] - np.log(np.sum(np.exp(row)))
                expected[b] += per_token[b, t]
    np.testing.assert_allclose(sequence_logps(logits, ids, mask), expected, rtol=1e-12)
    # A log-prob near 0 is the difference of two numbers of the logits' size, so both sides
    # carry an absolute rounding error of a few ulps of max|logit| (hypothesis found 1.8e-15).
    cancellation = 8 * np.finfo(np.float64).eps * np.abs(logits).max()
    np.testing.assert_allclose(token_logps(logits, ids, mask), per_token, rtol=1e-12, atol=cancellation)
    labels = np.where(mask == 1, ids, -100)
    np.testing.assert_allclose(sequence_logps(logits, ids, mask), trl.batch_logps_trl(logits, labels), rtol=1e-12)
    lengths = mask[:, 1:].sum(-1)
    np.testing.assert_array_equal(response_lengths(mask), lengths)
    average = np.where(lengths > 0, expected / np.maximum(lengths, 1), 0.0)
    np.testing.assert_allclose(sequence_logps(logits, ids, mask, average=True), average, rtol=1e-12)


def test_position_zero_is_never_scored():
    logits, ids, mask = _sequence_batch(3)
    with_first = mask.copy()
    with_first[:, 0] = 1
    np.testing.assert_array_equal(sequence_logps(logits, ids, with_first), sequence_logps(logits, ids, mask))
    np.testing.assert_array_equal(response_lengths(with_first), response_lengths(mask))


def test_bf16_logits_use_a_float32_log_softmax():
    logits, ids, mask = _sequence_batch(7, batch=4, length=8, vocab=2000, dtype=np.float32)
    logits = logits * 4
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = sequence_logps(bf16, ids, mask)
    assert got.dtype == jnp.float32
    exact = sequence_logps(np.asarray(bf16.astype(jnp.float64)), ids, mask)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    # A bf16 log-softmax would be off by far more: the f32 path is not a no-op.
    naive = jnp.sum(jnp.where(mask[:, 1:] == 1, jnp.take_along_axis(
        jax.nn.log_softmax(bf16[:, :-1], axis=-1), ids[:, 1:, None], axis=-1)[..., 0], 0), axis=-1)
    assert np.max(np.abs(np.asarray(naive, np.float64) - exact)) > 10 * np.max(np.abs(np.asarray(got) - exact))
    chex.assert_shape(sequence_residual(bf16, ids, mask, np.ones(4, np.float32)), (4, 8, 2000))


def test_float32_logits_stay_float32_and_jit():
    logits, ids, mask = _sequence_batch(1, dtype=np.float32)
    got = jax.jit(sequence_logps)(logits, ids, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, sequence_logps(logits.astype(np.float64), ids, mask), rtol=1e-5)


@FAST
@given(seed=seeds, reduction=st.sampled_from(["sum", "mean_token"]))
def test_sft_loss_and_its_residual(seed, reduction):
    logits, ids, mask = _sequence_batch(seed)
    losses = sft_loss(logits, ids, mask, reduction=reduction)
    lengths = np.maximum(mask[:, 1:].sum(-1), 1)
    scale = 1.0 if reduction == "sum" else 1.0 / lengths
    np.testing.assert_allclose(losses, -sequence_logps(logits, ids, mask) * scale, rtol=1e-12)
    grad = jax.grad(lambda z: jnp.sum(sft_loss(z, ids, mask, reduction=reduction)))(jnp.asarray(logits))
    # SPEC §1.3: SFT has c = 1 (per token 1/L for the token mean).
    coefficient = np.ones(len(ids)) * scale
    chex.assert_trees_all_close(sequence_residual(logits, ids, mask, coefficient), grad, atol=1e-13)


# ------------------------------------------------------------------- PPO / GRPO surrogate


def _policy_batch(seed, batch=4, length=7, per_token=False):
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(2.0, 1.0, size=(batch, length)))
    logps = old + 0.4 * rng.normal(size=(batch, length))
    shape = (batch, length) if per_token else (batch,)
    advantages = rng.normal(size=shape)
    mask = (rng.random((batch, length)) < 0.8).astype(np.float64)
    mask[0] = 0.0  # an empty completion
    return logps, old, advantages, mask


@FAST
@given(seed=seeds, eps=st.floats(0.0, 0.5), eps_high=st.one_of(st.none(), st.floats(0.0, 0.5)),
       per_token=st.booleans())
def test_clipped_surrogate_matches_trl_and_autodiff(seed, eps, eps_high, per_token):
    logps, old, advantages, mask = _policy_batch(seed, per_token=per_token)
    kw = dict(epsilon=eps, epsilon_high=eps_high)
    high = eps if eps_high is None else eps_high
    expected = trl.grpo_loss_trl(logps, old, advantages, mask, epsilon_low=eps, epsilon_high=high)
    np.testing.assert_allclose(clipped_surrogate(logps, old, advantages, mask, **kw), expected, rtol=1e-12)

    grad = jax.grad(lambda lp: jnp.sum(clipped_surrogate(lp, old, advantages, mask, **kw)))(jnp.asarray(logps))
    coefficients = clipped_surrogate_coefficients(logps, old, advantages, mask, **kw)
    n_tokens = np.maximum(mask.sum(-1), 1)[:, None]
    chex.assert_trees_all_close(grad, -coefficients / n_tokens, atol=1e-13)

    # SPEC §1.3: a negative-advantage token with ρ < 1 − ε gets zero gradient, and so does
    # a positive-advantage token with ρ > 1 + ε_high; every other scored token gets Âρ.
    ratio = np.exp(logps - old)
    adv = np.broadcast_to(advantages if per_token else advantages[:, None], logps.shape)
    capped = ((adv < 0) & (ratio < 1 - eps)) | ((adv > 0) & (ratio > 1 + high))
    assert np.all(np.asarray(grad)[capped] == 0.0)
    free = ~capped & (mask == 1)
    np.testing.assert_allclose(np.asarray(coefficients)[free], (ratio * adv)[free], rtol=1e-12)


@HEAVY
@given(seed=seeds)
def test_clipped_surrogate_residual_on_logits(seed):
    logits, ids, mask = _sequence_batch(seed)
    rng = np.random.default_rng(seed)
    old = np.asarray(token_logps(logits, ids, mask)) + 0.3 * rng.normal(size=ids.shape)
    advantages = rng.normal(size=len(ids))

    def total(z):
        return jnp.sum(clipped_surrogate(token_logps(z, ids, mask), old, advantages, mask, epsilon=0.1))

    grad = jax.grad(total)(jnp.asarray(logits))
    coefficients = clipped_surrogate_coefficients(token_logps(logits, ids, mask), old, advantages, mask, epsilon=0.1)
    n_tokens = np.maximum(mask.sum(-1), 1)[:, None]
    chex.assert_trees_all_close(sequence_residual(logits, ids, mask, coefficients / n_tokens), grad, atol=1e-13)


# ------------------------------------------------------------------------- bad input


def test_unknown_loss_type_lists_the_supported_ones():
    x = np.zeros(2)
    with pytest.raises(LossInputError, match="supported: sigmoid, hinge, ipo"):
        preference_loss(x, x, x, x, loss_type="dpo_typo")
    assert issubclass(LossInputError, ValueError)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: preference_loss(x, x[:1], x, x), "policy_rejected_logps has shape"),
        (lambda x: preference_loss(x, x, None, x), "needs ref_chosen_logps"),
        (lambda x: preference_loss(x, x, x, x, beta=0.0), "beta must be > 0"),
        (lambda x: preference_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
        (lambda x: preference_loss(x, x, x, x, tau=1.0), r"unknown keyword argument\(s\) \['tau'\]"),
        (lambda x: preference_loss(x, x, x, x, chosen_lengths=x), "both chosen_lengths"),
        (lambda x: preference_loss(x[:, None], x, x, x), r"shape \(B,\)"),
        (lambda x: preference_coefficients(x, x, x, x, loss_type="nope"), "unknown loss_type 'nope'"),
    ],
)
def test_bad_preference_input(call, message):
    with pytest.raises(LossInputError, match=message):
        call(np.zeros(3))


def test_bad_sequence_input():
    logits, ids, mask = _sequence_batch(0)
    with pytest.raises(LossInputError, match=r"logits must have shape \(B, T, V\)"):
        sequence_logps(logits[0], ids, mask)
    with pytest.raises(LossInputError, match="input_ids must have shape"):
        sequence_logps(logits, ids[:, :-1], mask)
    with pytest.raises(LossInputError, match="loss_mask must have the shape"):
        sequence_logps(logits, ids, mask[:, :-1])
    with pytest.raises(LossInputError, match=r"input_ids must lie in \[0, V=7\)"):
        sequence_logps(logits, ids + 7, mask)
    with pytest.raises(LossInputError, match="integer token ids"):
        sequence_logps(logits, ids.astype(np.float32), mask)
    with pytest.raises(LossInputError, match="reduction must be"):
        sft_loss(logits, ids, mask, reduction="mean")
    with pytest.raises(LossInputError, match="coefficient must have shape"):
        sequence_residual(logits, ids, mask, np.ones(5))
    with pytest.raises(LossInputError, match="advantages must have shape"):
        clipped_surrogate(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3), np.ones((2, 3)))
