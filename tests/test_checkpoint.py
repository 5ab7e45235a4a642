"""Orbax checkpoints: resume after a kill equals the uninterrupted run, bitwise; config checks."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ldjax.train import loop as loop_lib
from ldjax.train import optim, sharding, steps
from ldjax.train.checkpoint import CheckpointConfigMismatch, CheckpointError, RunCheckpointer, file_digest
from ldjax.train.config import (RESUMABLE_FIELDS, DPOConfig, LoopConfig, OptimizerConfig, PretrainConfig, SFTConfig,
                                resume_signature)


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 8):
        self.l1 = nnx.Linear(4, hidden, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.l2 = nnx.Linear(hidden, 3, rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


DATA = {"x": np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32),
        "y": np.random.default_rng(1).integers(0, 3, 24).astype(np.int32)}


def epoch_batches(epoch, kill_at=None, counter=None):
    order = np.random.default_rng(100 + epoch).permutation(24)
    for i in range(3):  # 3 batches of 8 per epoch
        if counter is not None:
            counter.append((epoch, i))
            if kill_at is not None and len(counter) > kill_at:
                raise KeyboardInterrupt("simulated kill")
        idx = order[i * 8:(i + 1) * 8]
        yield {k: v[idx] for k, v in DATA.items()}


def loss_with_noise(model, batch):
    # Uses the state's RNG (through prepare_fn) so a wrongly restored key would change the result.
    logits = model(batch["x"]) + batch["noise"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


def add_noise(params, batch, key, constants):
    return {**batch, "noise": 0.1 * jax.random.normal(key, (batch["x"].shape[0], 3), jnp.float32)}


def fresh(seed, hidden=8):
    """A whole new process's worth of objects: model, optimizer, state, compiled step."""
    graphdef, params, rest = steps.split_model(TinyNet(nnx.Rngs(seed), hidden))
    opt_cfg = OptimizerConfig(optimizer="adamw", learning_rate=0.02, warmup_steps=3, clip_norm=1.0)
    opt = optim.build_optimizer(opt_cfg)
    mesh = sharding.data_mesh()
    state = sharding.replicate(steps.init_train_state(params, opt, seed), mesh)
    step = steps.make_train_step(graphdef, loss_with_noise, opt, rest=rest, prepare_fn=add_noise, mesh=mesh,
                                 learning_rate=optim.learning_rate_schedule(opt_cfg))
    return state, step


def test_resume_after_kill_equals_uninterrupted_bitwise(tmp_path):
    n = 10
    # Uninterrupted.
    state, step = fresh(seed=0)
    cfg = LoopConfig(num_steps=n, out=str(tmp_path / "full"), progress=False)
    full = loop_lib.train(step, state, epoch_batches, cfg)

    # Killed after step 7 (checkpoints at 3 and 6), then everything dropped.
    run_dir = tmp_path / "killed"
    cfg = LoopConfig(num_steps=n, out=str(run_dir), checkpoint_every=3, keep_checkpoints=2, progress=False)
    state, step = fresh(seed=0)
    ckpt = RunCheckpointer(run_dir / "checkpoints", model_config={"hidden": 8}, keep=cfg.keep_checkpoints)
    counter: list = []
    with pytest.raises(KeyboardInterrupt):
        loop_lib.train(step, state, lambda e: epoch_batches(e, kill_at=7, counter=counter), cfg, checkpointer=ckpt)
    ckpt.close()
    assert counter[-1] == (2, 1)  # the 8th batch request was the kill
    del state, step, ckpt

    # A new "process": another init seed, so only the checkpoint can make it agree.
    state, step = fresh(seed=123)
    ckpt = RunCheckpointer(run_dir / "checkpoints", model_config={"hidden": 8}, keep=cfg.keep_checkpoints)
    assert ckpt.all_steps() == [3, 6]
    resumed = loop_lib.train(step, state, epoch_batches, cfg, checkpointer=ckpt)
    assert resumed.resumed_from == 6
    assert ckpt.all_steps() == [9, 10]  # keep last 2
    ckpt.close()

    assert int(resumed.state.step) == n
    for a, b in zip(jax.tree.leaves(jax.device_get(full.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (resumed.epoch, resumed.batch_index) == (full.epoch, full.batch_index) == (3, 1)
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    resumed_log = (run_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in __import__("json").loads(l).items() if k != "tokens_per_s"} for l in lines]
    assert strip(full_log) == strip(resumed_log)  # one line per step, no duplicates from the redone step 7


def test_restore_into_other_model_config_is_refused(tmp_path):
    state, _ = fresh(seed=0)
    with RunCheckpointer(tmp_path, model_config={"hidden": 8, "layers": 2}) as ckpt:
        ckpt.save(state, epoch=0, batch_index=0)
    other, _ = fresh(seed=0, hidden=16)
    with RunCheckpointer(tmp_path, model_config={"hidden": 16, "layers": 2}) as ckpt:
        with pytest.raises(CheckpointConfigMismatch, match="hidden: checkpoint 8 vs now 16"):
            ckpt.restore(other)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    state, _ = fresh(seed=0)
    with RunCheckpointer(tmp_path, model_config={}) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(state)
        ckpt.save(state, epoch=1, batch_index=2)
        with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
            ckpt.restore(state, step=5)
        restored, meta = ckpt.restore(state)
        assert (meta["epoch"], meta["batch_index"], meta["step"]) == (1, 2, 0)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_other_run_settings_are_refused_listing_every_difference(tmp_path):
    state, _ = fresh(seed=0)
    saved = resume_signature(SFTConfig(seed=0, batch_size=8, learning_rate=1e-4), command="sft",
                             sources={"data_sha256": "aa"})
    with RunCheckpointer(tmp_path, model_config={"hidden": 8}, resume_signature=saved) as ckpt:
        ckpt.save(state, epoch=1, batch_index=2)
    now = resume_signature(SFTConfig(seed=1, batch_size=16, learning_rate=1e-4), command="sft",
                           sources={"data_sha256": "bb"})
    with RunCheckpointer(tmp_path, model_config={"hidden": 16}, resume_signature=now) as ckpt:
        with pytest.raises(CheckpointConfigMismatch) as err:
            ckpt.restore(state)
    message = str(err.value)
    for diff in ("model_config.hidden: checkpoint 8 vs now 16", "seed: checkpoint 0 vs now 1",
                 "batch_size: checkpoint 8 vs now 16", "data_sha256: checkpoint 'aa' vs now 'bb'"):
        assert diff in message
    assert "learning_rate" not in message  # only what differs is listed
    # Fields that may change on resume do not stop it; the data position comes back.
    allowed = resume_signature(SFTConfig(seed=0, batch_size=8, learning_rate=1e-4, num_steps=500, log_every=7,
                                         eval_every=3, checkpoint_every=9, keep_checkpoints=1, progress=False,
                                         num_devices=2, out="elsewhere"), command="sft", sources={"data_sha256": "aa"})
    with RunCheckpointer(tmp_path, model_config={"hidden": 8}, resume_signature=allowed) as ckpt:
        _, meta = ckpt.restore(state)
    assert (meta["epoch"], meta["batch_index"]) == (1, 2)


def test_checkpoint_without_a_signature_is_refused_by_a_run_with_one(tmp_path):
    state, _ = fresh(seed=0)
    with RunCheckpointer(tmp_path, model_config={}) as ckpt:  # what older checkpoints look like
        ckpt.save(state, epoch=0, batch_index=0)
        meta = ckpt.read_meta()
    meta.pop("resume_signature")
    import json, pathlib
    meta_file = next(pathlib.Path(tmp_path).glob("0/meta/*"))
    meta_file.write_text(json.dumps(meta))
    with RunCheckpointer(tmp_path, model_config={}, resume_signature={"seed": 0}) as ckpt:
        with pytest.raises(CheckpointConfigMismatch, match="no resume signature"):
            ckpt.check_resumable()


def _changed(config, name):
    """``config`` with field ``name`` set to another valid value."""
    value = getattr(config, name)
    alternatives = {"optimizer": "sgd", "schedule": "cosine", "arch": "gpt_neox", "model": "runs/other/model",
                    "data": "pairs.jsonl", "data_format": "hh", "loss_type": "ipo", "on_policy": "rejected",
                    "out": "runs/elsewhere", "world_rejected_style": "foreign", "distributed": "env",
                    "compute_dtype": "bfloat16", "on_policy_judge": "world"}
    if name in alternatives:
        new = alternatives[name]
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + 1
    else:
        new = value * 0.5 + 0.01
    return dataclasses.replace(config, **{name: new})


@pytest.mark.parametrize("cls, command", [(PretrainConfig, "pretrain"), (SFTConfig, "sft"), (DPOConfig, "dpo")])
def test_resume_signature_covers_every_field_that_sets_the_trajectory(cls, command):
    base = cls()
    reference = resume_signature(base, command=command)
    for f in dataclasses.fields(cls):
        moved = resume_signature(_changed(base, f.name), command=command) != reference
        assert moved == (f.name not in RESUMABLE_FIELDS), f.name
    assert resume_signature(base, command="other") != reference
    # A decaying schedule ends at num_steps: then the length of the run is part of the trajectory.
    decaying = dataclasses.replace(base, schedule="linear")
    assert (resume_signature(decaying, command=command)
            != resume_signature(dataclasses.replace(decaying, num_steps=base.num_steps + 1), command=command))
    # Sources (resolved paths, content hashes) are added and override fields of the same name.
    sig = resume_signature(base, command=command, sources={"data": "/abs/pairs.jsonl", "data_sha256": "ff"})
    assert (sig["data"], sig["data_sha256"]) == ("/abs/pairs.jsonl", "ff")


def test_file_digest_sees_contents_and_names(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("one\n")
    b.write_text("one\n")
    assert file_digest([a]) == file_digest([a]) != file_digest([b])  # the name counts
    first = file_digest([a])
    a.write_text("two\n")
    assert file_digest([a]) != first
    assert file_digest([a, b]) != file_digest([b, a])
    with pytest.raises(CheckpointError, match="not a file"):
        file_digest([tmp_path / "missing"])
