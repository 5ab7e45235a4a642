"""experiments.lm_pipeline's analysis pieces without training: the update split by gradient term and
head/body (parts sum to the update; exact terms for SGD) and the tracker's decomposition hook
(predicted = an independent JVP along the update, over the first ``prompts`` probe prompts)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import lm_pipeline
from ldjax import probes, sequence_dynamics as sd
from ldjax.data.world import WorldConfig, build_world
from ldjax.models.transformer import CausalLM, TransformerConfig

jax.config.update("jax_enable_x64", True)

WORLD = WorldConfig(seed=3, num_entities=8, num_train=12, num_test=4, num_probe=4, num_pretrain_answers=8,
                    num_pretrain_narrative=4, shakespeare_fraction=0.0)


@pytest.fixture(scope="module")
def setup():
    world = build_world(WORLD)
    probe_set = probes.tokenize_probes(probes.probe_texts_from_world(world), world.tokenizer, max_length=40,
                                       max_prompt_length=16, bos_id=3)
    cfg = TransformerConfig.tiny("gpt_neox", vocab_size=world.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                 intermediate_size=32)
    model = CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float64, param_dtype=jnp.float64)
    return world, probe_set, model


def test_split_update_parts_sum_and_are_exact_for_sgd(setup):
    _, probe_set, model = setup
    apply_fn, params = sd.lm_apply_fn(model)
    pair = {f"{side}_{k}": jnp.asarray(probe_set.arrays[side][k]) for side in ("chosen", "rejected")
            for k in sd.SEQUENCE_KEYS}
    n = probe_set.num_prompts
    pair.update(ref_chosen_logps=jnp.full((n,), -50.0), ref_rejected_logps=jnp.full((n,), -60.0))
    objective = sd.PreferenceObjective(loss_type="sigmoid", beta=0.1)
    grads = sd.training_gradients(apply_fn, params, pair, objective)
    eta = 0.05
    update = jax.tree.map(lambda a, b: -eta * (a + b), *grads)  # SGD on d⁺ + d⁻
    parts = lm_pipeline.split_update(update, grads)
    assert set(parts) == {f"{t}/{h}" for t in ("chosen", "rejected", "rest") for h in ("head", "body")}
    total = jax.tree.map(lambda *x: sum(x), *parts.values())
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(update)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for side, g in zip(("chosen", "rejected"), grads):  # SGD: the term is exactly −η d±
        got = jax.tree.map(lambda h, b: h + b, parts[f"{side}/head"], parts[f"{side}/body"])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.tree.map(lambda x: -eta * x, g))):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-15)
    heads = jax.tree_util.tree_leaves_with_path(parts["chosen/head"])
    assert any("lm_head" in jax.tree_util.keystr(p) and np.any(np.asarray(x)) for p, x in heads)
    assert all(not np.any(np.asarray(x)) for p, x in heads if "lm_head" not in jax.tree_util.keystr(p))


def test_decomposition_hook_predicts_along_the_update_on_the_first_prompts(setup, tmp_path):
    from ldjax.tracking import Tracker
    world, probe_set, model = setup
    apply_fn, params = sd.lm_apply_fn(model)
    tracker = Tracker(probe_set, model, every=1, path=tmp_path / "t.jsonl", progress=False)
    lm_pipeline.decomposition_hook(sd.SFTObjective(), families=("chosen", "other_train"), split_families=("chosen",),
                                   prompts=2)(tracker, model)
    batch = {k: probe_set.arrays["chosen"][k] for k in sd.SEQUENCE_KEYS}
    grad = sd.training_gradients(apply_fn, params, {k: jnp.asarray(v) for k, v in batch.items()}, sd.SFTObjective())[0]
    after = jax.tree.map(lambda p, g: p - 1e-5 * g, params, grad)
    record = tracker.decompose_fn(params, after, batch)
    update = jax.tree.map(lambda a, b: a - b, after, params)
    for family in ("chosen", "other_train"):
        first_two = {k: jnp.asarray(probe_set.arrays[family][k][:2]) for k in sd.SEQUENCE_KEYS}
        want = np.asarray(sd.predict_for_update(apply_fn, params, first_two, update).responses).mean()
        assert record["predicted"][family] == pytest.approx(float(want), rel=1e-10)
        act = np.asarray(sd.actual_change(apply_fn, params, after, first_two).responses).mean()
        assert record["actual"][family] == pytest.approx(float(act), rel=1e-10)
    assert record["relative_gap"] < 0.05 and record["correlation"] > 0.99  # a small step: first order
    terms = record["terms"]["chosen"]
    assert terms["chosen/head"][0] + terms["chosen/body"][0] == pytest.approx(record["predicted"]["chosen"], rel=1e-8)


@pytest.mark.slow  # one tiny SFT job (~15 s: a compile)
def test_run_hooks_train_only_the_head_and_reach_the_tracker(tmp_path):
    """``cli.run``'s hooks: ``optimizer_wrapper=head_only`` leaves every body parameter bitwise
    unchanged and moves ``lm_head``; ``tracker_hook`` is called once with the job's tracker."""
    from ldjax import cli
    from ldjax.models.hf import load_pretrained
    from ldjax.train.config import SFTConfig
    small = dict(d_model=16, num_layers=1, num_heads=2, max_length=48, max_prompt_length=20, world_entities=8,
                 world_train=8, world_test=4, world_pretrain=16, batch_size=4, progress=False, num_devices=1,
                 arch="gpt_neox")
    cli.run("sft", SFTConfig(**small, num_steps=1, learning_rate=1e-9, out=str(tmp_path / "start")))
    seen = []
    cli.run("sft", SFTConfig(**small, model=str(tmp_path / "start" / "model"), num_steps=3, learning_rate=1e-2,
                             track_every=1, track_prompts=2, out=str(tmp_path / "head")),
            tracker_hook=lambda tracker, model: seen.append(type(tracker).__name__),
            optimizer_wrapper=lm_pipeline.head_only)
    assert seen == ["Tracker"]
    before, _ = load_pretrained(tmp_path / "start" / "model", dtype=jnp.float32)
    after, _ = load_pretrained(tmp_path / "head" / "model", dtype=jnp.float32)
    moved = {}
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(before, nnx.Param)),
                                 jax.tree_util.tree_leaves_with_path(nnx.state(after, nnx.Param))):
        moved[jax.tree_util.keystr(path)] = bool(np.any(np.asarray(a) != np.asarray(b)))
    assert any(v for k, v in moved.items() if "lm_head" in k)
    assert not any(v for k, v in moved.items() if "lm_head" not in k), moved
