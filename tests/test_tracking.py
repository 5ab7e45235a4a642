"""The probe tracker: its JSONL records and cost, the decomposition hook, the loop and resume."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ldjax import probes, tracking
from ldjax.data.preference import SFTExample
from ldjax.data.tokenize import batches, tokenize_sft
from ldjax.data.world import WorldConfig, build_world
from ldjax.models.transformer import CausalLM, TransformerConfig
from ldjax.train import loop as loop_lib
from ldjax.train import objectives, steps
from ldjax.train.checkpoint import RunCheckpointer
from ldjax.train.config import LoopConfig

WORLD = WorldConfig(seed=5, num_entities=8, num_train=12, num_test=4, num_probe=4, num_pretrain_answers=8,
                    num_pretrain_narrative=4, shakespeare_fraction=0.0)
TOKENS = dict(max_length=40, max_prompt_length=16, bos_id=3)
STATS = {"mean", "std", "min", "q25", "median", "q75", "max"}


@pytest.fixture(scope="module")
def world():
    return build_world(WORLD)


@pytest.fixture(scope="module")
def probe_set(world):
    return probes.tokenize_probes(probes.probe_texts_from_world(world), world.tokenizer, **TOKENS)


@pytest.fixture(scope="module")
def train_arrays(world):
    return tokenize_sft([SFTExample(e.prompt, e.chosen) for e in world.train], world.tokenizer,
                        pad_to_max_length=True, **TOKENS)


def tiny_model(vocab, seed=0):
    cfg = TransformerConfig.tiny("qwen2", vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                 intermediate_size=32)
    return CausalLM(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def model(world):
    return tiny_model(world.vocab_size)


OPTIMIZER = optax.adam(1e-2)


@pytest.fixture(scope="module")
def sft_step(model):
    """One compiled SFT step for every run of the module (it is a pure function of its inputs)."""
    graphdef, _, rest = steps.split_model(model)
    return steps.make_train_step(graphdef, objectives.sft_objective(), OPTIMIZER, rest=rest)


@pytest.fixture(scope="module")
def scorer(model):
    return probes.ProbeScorer(model)


def initial_state(model, seed=0):
    """Step 0 of ``model``'s parameters (copied: the step donates its input)."""
    return steps.init_train_state(jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)), OPTIMIZER, seed)


def epochs(arrays):
    return lambda epoch: batches(arrays, 4, seed=0, epoch=epoch)


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


# ------------------------------------------------------------------------------ records


def test_tracker_writes_the_spread_of_every_family_and_its_cost(tmp_path, model, probe_set):
    path = tmp_path / "run" / "tracking.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 99}\n')  # an old run's log: a fresh tracker starts over
    calls = []

    def decompose(before, after, batch):
        calls.append(batch["input_ids"].shape)
        return {"rows": batch["input_ids"].shape[0], "delta": jnp.float32(0.5), "per": np.arange(2)}

    tracker = tracking.Tracker(probe_set, model, every=2, path=path, decompose_fn=decompose, batch_size=3,
                               per_prompt=True, progress=False)
    params = nnx.state(model, nnx.Param)
    tracker.begin(None)
    assert not path.exists()
    first = tracker.track(0, params)
    batch = {"input_ids": np.zeros((4, 5), np.int32)}
    second = tracker.track(2, params, params_before=params, batch=batch, train_seconds=1.5)
    records = tracking.read_tracking(path)
    assert records == json.loads(json.dumps([first, second]))
    assert [r["step"] for r in records] == [0, 2]

    scores = probes.score_probes(model, probe_set)  # an independent scorer (all prompts in one pass)
    families = list(probe_set.families)
    assert list(first["logps"]) == families + ["argmax_chosen", "argmax_rejected"]
    for family in families:
        values = scores[family].logps
        stats = first["logps"][family]
        assert set(stats) == STATS
        np.testing.assert_allclose([stats["mean"], stats["std"], stats["median"]],
                                   [values.mean(), values.std(), np.median(values)], rtol=1e-5)
        np.testing.assert_allclose([stats["q25"], stats["q75"]], np.percentile(values, [25, 75]), rtol=1e-5)
        np.testing.assert_allclose(first["per_prompt"][family], values, rtol=1e-5)
        for key in ("a_norm", "off_argmax", "residual_norm"):
            np.testing.assert_allclose(first[key][family]["mean"], getattr(scores[family], key).mean(), rtol=1e-5)
    np.testing.assert_allclose(first["logps"]["argmax_rejected"]["mean"], scores["rejected"].argmax_logps.mean(),
                               rtol=1e-5)
    assert "dpo" not in first and "decompose" not in first  # no preference; no before/batch at step 0
    assert second["decompose"] == {"rows": 4, "delta": 0.5, "per": [0, 1]} and calls == [(4, 5)]

    # Cost: every call timed; the totals add up; the overhead fraction against the training time.
    t0, t1 = first["time"], second["time"]
    assert t0["track_s"] > 0 and t1["track_s"] > 0 and t1["decompose_s"] >= 0
    assert t1["track_total_s"] == pytest.approx(t0["track_s"] + t1["track_s"])
    assert t1["train_total_s"] == 1.5 and "train_total_s" not in t0
    assert t1["track_fraction"] == pytest.approx(t1["track_total_s"] / (t1["track_total_s"] + 1.5))
    assert tracker.track_seconds == pytest.approx(t1["track_total_s"])
    saved = json.loads((path.parent / "probes.json").read_text())
    assert saved["digest"] == probe_set.texts.digest() and saved["families"] == families
    assert (tracker.due(0), tracker.due(3), tracker.due(3, num_steps=3), tracker.due(4)) == (True, False, True, True)


def test_preference_tracking_at_the_reference_is_the_zero_margin_point(tmp_path, model, probe_set):
    beta = 0.25
    tracker = tracking.Tracker(probe_set, model, every=1, path=tmp_path / "t.jsonl", progress=False,
                               preference=tracking.PreferenceTracking("sigmoid", beta))
    params = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match="reference log-probs"):
        tracker.track(0, params)
    tracker.set_reference(params)
    record = tracker.track(0, params)
    dpo = record["dpo"]
    assert set(dpo) == {"margin", "loss", "coef_chosen", "coef_rejected", "G_chosen", "G_rejected"}
    assert dpo["margin"]["max"] == 0 and dpo["margin"]["min"] == 0  # policy = reference
    assert dpo["coef_chosen"]["mean"] == pytest.approx(beta / 2) and dpo["coef_rejected"]["mean"] == pytest.approx(-beta / 2)
    assert dpo["loss"]["mean"] == pytest.approx(np.log(2), rel=1e-6)
    assert dpo["G_chosen"]["mean"] == pytest.approx(beta / 2 * record["residual_norm"]["chosen"]["mean"], rel=1e-6)


# ------------------------------------------------------------------------------ the loop


def test_tracking_leaves_the_trajectory_unchanged_and_hands_decompose_each_step(tmp_path, model, probe_set,
                                                                              train_arrays, sft_step, scorer):
    cfg = LoopConfig(num_steps=4, batch_size=4, progress=False, out=str(tmp_path / "plain"))
    plain = loop_lib.train(sft_step, initial_state(model), epochs(train_arrays), cfg)

    seen = []

    def decompose(before, after, batch):
        seen.append((jax.device_get(before), jax.device_get(after), batch))
        return {"step_norm": float(optax.tree.norm(jax.tree.map(jnp.subtract, after, before)))}

    tracker = tracking.Tracker(probe_set, model, every=1, path=tmp_path / "tracked" / "tracking.jsonl",
                               decompose_fn=decompose, progress=False, scorer=scorer)
    tracked = loop_lib.train(sft_step, initial_state(model), epochs(train_arrays), dataclasses.replace(cfg, out=str(tmp_path / "tracked")),
                             tracker=tracker)
    for a, b in zip(jax.tree.leaves(jax.device_get(plain.state)), jax.tree.leaves(jax.device_get(tracked.state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same trajectory, bitwise
    metrics = lambda d: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"}  # noqa: E731
                         for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert metrics(tmp_path / "plain") == metrics(tmp_path / "tracked")

    records = tracking.read_tracking(tmp_path / "tracked" / "tracking.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert "decompose" not in records[0] and all(r["decompose"]["step_norm"] > 0 for r in records[1:])
    # decompose_fn saw (params before step s, params after step s, batch of step s).
    expected_batches = [b for e in range(2) for b in epochs(train_arrays)(e)][:4]
    assert len(seen) == 4
    for s, (before, after, batch) in enumerate(seen):
        np.testing.assert_array_equal(batch["input_ids"], expected_batches[s]["input_ids"])
        if s:
            for a, b in zip(jax.tree.leaves(seen[s - 1][1]), jax.tree.leaves(before)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(seen[-1][1]), jax.tree.leaves(jax.device_get(tracked.state.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tracked.train_seconds > 0 and records[-1]["time"]["train_total_s"] == pytest.approx(tracked.train_seconds)


def test_resume_with_tracking_writes_the_records_of_an_uninterrupted_run(tmp_path, world, model, probe_set,
                                                                         train_arrays, sft_step, scorer):
    def run(out, *, kill_at=None, seed=0):
        cfg = LoopConfig(num_steps=8, batch_size=4, progress=False, out=str(out), checkpoint_every=4)
        state = initial_state(tiny_model(model.config.vocab_size, seed=seed) if seed else model)
        requested = []

        def epoch_batches(epoch):
            for b in epochs(train_arrays)(epoch):
                requested.append(b)
                if kill_at is not None and len(requested) > kill_at:
                    raise KeyboardInterrupt("simulated kill")
                yield b

        tracker = tracking.Tracker(probe_set, model, every=2, path=out / "tracking.jsonl", progress=False,
                                   scorer=scorer)
        with RunCheckpointer(out / "checkpoints", model_config={"m": 1}) as ckpt:
            return loop_lib.train(sft_step, state, epoch_batches, cfg, checkpointer=ckpt, tracker=tracker)

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=7)  # steps 1..7 done, checkpoint at 4, records 0, 2, 4, 6
    assert [r["step"] for r in tracking.read_tracking(tmp_path / "killed" / "tracking.jsonl")] == [0, 2, 4, 6]
    resumed = run(tmp_path / "killed", seed=9)  # another init: only the checkpoint can make it agree
    assert resumed.resumed_from == 4
    full_records = tracking.read_tracking(tmp_path / "full" / "tracking.jsonl")
    resumed_records = tracking.read_tracking(tmp_path / "killed" / "tracking.jsonl")
    assert [r["step"] for r in resumed_records] == [0, 2, 4, 6, 8]  # step 6 redone once, step 0 not redone
    assert strip_time(resumed_records) == strip_time(full_records)

    # Appending another probe set's records to this log is refused before any step.
    fewer = probes.tokenize_probes(probes.probe_texts_from_world(world, 2), world.tokenizer, **TOKENS)
    other = tracking.Tracker(fewer, model, every=2, path=tmp_path / "killed" / "tracking.jsonl", progress=False,
                             scorer=scorer)
    cfg = LoopConfig(num_steps=10, batch_size=4, progress=False, out=str(tmp_path / "killed"))
    with RunCheckpointer(tmp_path / "killed" / "checkpoints", model_config={"m": 1}) as ckpt:
        with pytest.raises(tracking.TrackingMismatch, match="holds 5 records of the probe set"):
            loop_lib.train(sft_step, initial_state(model), epochs(train_arrays), cfg, checkpointer=ckpt, tracker=other)
    assert strip_time(tracking.read_tracking(tmp_path / "killed" / "tracking.jsonl")) == strip_time(full_records)


# ------------------------------------------------------------------------------ subsets of prompts


def test_subset_tracker_rotates_windows_and_estimates_the_all_prompt_mean(tmp_path, model, probe_set, train_arrays,
                                                                         sft_step, scorer):
    """``subset=m``: all prompts at the first and last step, rotating windows of m prompts in between;
    ``estimate`` = mean of the step-0 values + mean change over the window, checked against an
    independent full scoring of the same parameters."""
    cfg = LoopConfig(num_steps=5, batch_size=4, progress=False, out=str(tmp_path / "sub"), checkpoint_every=0)
    kept = {}

    def keep(before, after, batch):
        kept[len(kept) + 1] = jax.device_get(after)
        return {}

    tracker = tracking.Tracker(probe_set, model, every=1, path=tmp_path / "sub" / "tracking.jsonl", progress=False,
                               subset=3, fused=True, decompose_fn=keep)
    loop_lib.train(sft_step, initial_state(model), epochs(train_arrays), cfg, tracker=tracker)
    records = tracking.read_tracking(tmp_path / "sub" / "tracking.jsonl")
    p = probe_set.num_prompts
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0]["prompts"] == records[-1]["prompts"] == list(range(p))
    windows = [r["prompts"] for r in records[1:-1]]
    assert windows == [[(3 * j + i) % p for i in range(3)] for j in range(4)]
    assert "baseline" in records[0] and all("baseline" not in r for r in records[1:])
    assert all(r["num_prompts"] == 3 for r in records[1:-1]) and records[-1]["num_prompts"] == p

    base = probes.ProbeScorer(model)(None if False else initial_state(model).params, probe_set)
    for r in records[1:]:
        full = probes.ProbeScorer(model)(kept[r["step"]], probe_set)
        rows = np.asarray(r["prompts"])
        for family in ("chosen", "rejected", "other_train"):
            x0, xt = base[family].logps, full[family].logps
            want = x0.mean() + (xt[rows] - x0[rows]).mean()
            assert r["estimate"]["logps"][family] == pytest.approx(want, rel=1e-5, abs=1e-4)
            assert r["logps"][family]["mean"] == pytest.approx(xt[rows].mean(), rel=1e-5, abs=1e-4)
        star = x0 = base["chosen"].argmax_logps
        want = star.mean() + (full["chosen"].argmax_logps[rows] - star[rows]).mean()
        assert r["estimate"]["logps"]["argmax_chosen"] == pytest.approx(want, rel=1e-5, abs=1e-4)
    # At the last step the estimate is the exact all-prompt mean.
    assert records[-1]["estimate"]["logps"]["chosen"] == pytest.approx(records[-1]["logps"]["chosen"]["mean"])

    # A resumed subset run reloads the step-0 baseline and writes the same records.
    def run(out, kill_at=None):
        requested = []

        def epoch_batches(epoch):
            for b in epochs(train_arrays)(epoch):
                requested.append(b)
                if kill_at is not None and len(requested) > kill_at:
                    raise KeyboardInterrupt("simulated kill")
                yield b

        t = tracking.Tracker(probe_set, model, every=1, path=out / "tracking.jsonl", progress=False, subset=3,
                             scorer=scorer)
        c = LoopConfig(num_steps=5, batch_size=4, progress=False, out=str(out), checkpoint_every=2)
        with RunCheckpointer(out / "checkpoints", model_config={"m": 1}) as ckpt:
            return loop_lib.train(sft_step, initial_state(model), epoch_batches, c, checkpointer=ckpt, tracker=t)

    run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=3)
    run(tmp_path / "killed")
    full_records = strip_time(tracking.read_tracking(tmp_path / "full" / "tracking.jsonl"))
    resumed = strip_time(tracking.read_tracking(tmp_path / "killed" / "tracking.jsonl"))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    assert json.dumps(resumed, sort_keys=True) == json.dumps(full_records, sort_keys=True)
