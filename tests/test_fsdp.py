"""FSDP on 8 fake CPU devices (tests/conftest.py): the ("data", "fsdp") mesh, the per-parameter rule,
SFT/DPO trajectories equal to one device's, checkpoints moved between meshes, the analysis on the mesh."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from ldjax.models.transformer import CausalLM, TransformerConfig
from ldjax.train import objectives, sharding, steps
from ldjax.train.checkpoint import RunCheckpointer
from ldjax.train.config import ConfigError, LoopConfig, SFTConfig
from tests import test_sharding

# ----------------------------------------------------------------- the rule (properties)


@given(st.lists(st.integers(1, 64), min_size=0, max_size=4), st.integers(1, 16))
def test_fsdp_partition_spec_splits_the_largest_divisible_axis(shape, n):
    spec = tuple(sharding.fsdp_partition_spec(shape, n))
    divisible = [a for a, size in enumerate(shape) if size % n == 0 and size >= n]
    if n <= 1 or not divisible:
        assert spec == ()  # replicated iff nothing divides (or no fsdp axis)
        return
    assert len(spec) == len(shape) and spec.count(sharding.FSDP_AXIS) == 1
    axis = spec.index(sharding.FSDP_AXIS)
    assert shape[axis] % n == 0  # the chosen axis divides
    assert shape[axis] == max(shape[a] for a in divisible)  # and is the largest that does
    assert axis == min(a for a in divisible if shape[a] == shape[axis])  # the first of equal sizes
    assert all(s is None for a, s in enumerate(spec) if a != axis)


def test_make_mesh_shapes_and_refusals():
    mesh = sharding.make_mesh(fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh(num_devices=1).shape) == {"data": 1, "fsdp": 1}
    assert sharding.data_size(mesh) == 2 and sharding.data_size(sharding.data_mesh()) == 8
    with pytest.raises(sharding.ShardingError, match="fsdp=3 does not divide the 8 devices"):
        sharding.make_mesh(fsdp=3)
    assert sharding.batch_devices(mesh) == 8 and sharding.batch_devices(sharding.data_mesh()) == 8
    with pytest.raises(sharding.ShardingError, match="multiple of the 8 devices of the mesh"):
        sharding.shard_batch({"x": np.zeros((4, 2), np.float32)}, mesh)
    batch = sharding.shard_batch({"x": np.arange(16.0, dtype=np.float32).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == PartitionSpec(("data", "fsdp"))
    # every device its own row: the fsdp devices are data-parallel too (ZeRO-3), no repeated work
    rows = sorted(int(s.data[0, 0]) for s in batch["x"].addressable_shards)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(1, 2)} and rows == list(range(0, 16, 2))


def test_config_and_cli_refuse_an_fsdp_that_does_not_fit():
    with pytest.raises(ConfigError, match="fsdp: must be >= 1"):
        LoopConfig(fsdp=0)
    with pytest.raises(ConfigError, match="fsdp: 3 does not divide num_devices=8"):
        LoopConfig(num_devices=8, fsdp=3)
    from ldjax import cli
    with pytest.raises(ConfigError, match="--fsdp 3 does not divide the 8 devices"):
        cli.check_usage("sft", SFTConfig(fsdp=3, batch_size=8))
    with pytest.raises(ConfigError, match=r"--batch-size 12 is not a multiple of the 8 devices of the mesh"):
        cli.check_usage("sft", SFTConfig(fsdp=2, batch_size=12))
    with pytest.raises(ConfigError, match=r"--batch-size 4 is not a multiple of the 8 devices of the mesh"):
        cli.check_usage("sft", SFTConfig(fsdp=8, batch_size=4, num_devices=8))  # fsdp devices split the batch too
    cli.check_usage("sft", SFTConfig(fsdp=8, batch_size=16, num_devices=8))
    from ldjax.train.config import RESUMABLE_FIELDS
    assert {"fsdp", "num_devices", "distributed"} <= RESUMABLE_FIELDS


# ----------------------------------------------------------------- trajectories

V, T, B, STEPS = 32, 12, 8, 20
MESHES = {"one": dict(num_devices=1), "fsdp8": dict(fsdp=8), "data2_fsdp4": dict(fsdp=4)}


def tiny_lm():
    cfg = TransformerConfig.tiny("qwen2", vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, initializer_range=0.2)
    return CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)


def lm_batches(n_steps, seed):
    assert (V, T) == (test_sharding.V, test_sharding.T)
    return test_sharding.lm_batches(n_steps, seed, size=B)


OPTIMIZER = optax.sgd(0.02, momentum=0.9)  # a momentum trace: optimizer state with the params' shapes


@functools.lru_cache(maxsize=None)
def data(objective):
    if objective == "sft":
        return [{k[len("chosen_"):]: v for k, v in b.items() if k.startswith("chosen_")} for b in lm_batches(STEPS, 0)]
    batches = lm_batches(STEPS, 1)
    graphdef, params, rest = steps.split_model(tiny_lm())
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    ref = objectives.reference_logps(graphdef, params, rest, rows, batch_size=B)
    return [{**b, "ref_chosen_logps": ref["ref_chosen_logps"][i * B:(i + 1) * B],
             "ref_rejected_logps": ref["ref_rejected_logps"][i * B:(i + 1) * B]} for i, b in enumerate(batches)]


@functools.lru_cache(maxsize=None)
def mesh_of(name):
    return sharding.make_mesh(**MESHES[name])


@functools.lru_cache(maxsize=None)
def step_fn(objective, mesh_name):
    """One compiled step per (objective, mesh), shared by the tests."""
    graphdef, _, rest = steps.split_model(tiny_lm())
    loss_fn = objectives.sft_objective() if objective == "sft" else objectives.preference_objective("sigmoid", beta=0.5)
    return steps.make_train_step(graphdef, loss_fn, OPTIMIZER, rest=rest, mesh=mesh_of(mesh_name))


def fresh_state(mesh_name):
    _, params, _ = steps.split_model(tiny_lm())
    return sharding.shard_train_state(steps.init_train_state(params, OPTIMIZER, 0), mesh_of(mesh_name))


def advance(objective, mesh_name, state, start, stop):
    step = step_fn(objective, mesh_name)
    losses = []
    for batch in data(objective)[start:stop]:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@functools.lru_cache(maxsize=None)
def trajectory(objective, mesh_name):
    state, losses = advance(objective, mesh_name, fresh_state(mesh_name), 0, STEPS)
    return jax.device_get(state), losses


def strip(spec):
    spec = tuple(spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def assert_fsdp_placed(tree, mesh):
    n = sharding.axis_size(mesh, sharding.FSDP_AXIS)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert leaves
    for path, x in leaves:
        assert x.sharding.mesh.shape == mesh.shape, jax.tree_util.keystr(path)
        assert strip(x.sharding.spec) == strip(sharding.fsdp_partition_spec(x.shape, n)), (jax.tree_util.keystr(path),
                                                                                          x.shape, x.sharding.spec)
    return sum(strip(x.sharding.spec) != () for _, x in leaves)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_fsdp_trajectories_follow_one_device(objective):
    one, losses1 = trajectory(objective, "one")
    _, init, _ = steps.split_model(tiny_lm())
    change = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(jax.device_get(init)), jax.tree.leaves(one.params)))
    assert change > 5e-2  # training moved the params: the comparison is not of the init
    for name in ("fsdp8", "data2_fsdp4"):
        mesh = mesh_of(name)
        # Every parameter and optimizer-state array of the live state sits where the rule says.
        state, _ = advance(objective, name, fresh_state(name), 0, 1)
        split = assert_fsdp_placed(state.params, mesh)
        assert split >= len(jax.tree.leaves(state.params)) - 1  # (32, 32, 64, 16 all divide: all split)
        assert assert_fsdp_placed(state.opt_state, mesh) >= split
        assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated
        shard = state.params["embed"]["embedding"][...].addressable_shards[0].data
        assert shard.size == V * 32 // sharding.axis_size(mesh, sharding.FSDP_AXIS)  # really 1/fsdp per device
        other, losses = trajectory(objective, name)
        # float32; only the order of the gradient sums differs (and XLA's tiling). Measured max
        # |diff| after 20 steps (2-core CPU): 4.8e-7 to 8.0e-7 on params that moved by 0.25 (DPO)
        # and 0.65 (SFT); at lr 0.05 it reached 8.9e-6, too close to the bound, hence lr 0.02.
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(other.params)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
        np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- checkpoints across meshes

def test_checkpoint_saved_on_one_mesh_resumes_on_another(tmp_path):
    objective, half = "sft", STEPS // 2
    state, _ = advance(objective, "fsdp8", fresh_state("fsdp8"), 0, half)
    saved = jax.device_get(state)
    with RunCheckpointer(tmp_path / "ckpt", model_config={"tiny": 1}) as ckpt:
        ckpt.save(state, epoch=0, batch_index=half)
        # The files hold shards: one piece per fsdp device of every split parameter.
        restored = {}
        for name in ("fsdp8", "data2_fsdp4", "one"):
            template = fresh_state(name)
            got, meta = ckpt.restore(template)
            assert meta["batch_index"] == half and int(got.step) == half
            assert_fsdp_placed(got.params, mesh_of(name))
            assert_fsdp_placed(got.opt_state, mesh_of(name))
            # Restoring moves bytes only: bitwise the saved values on every mesh.
            for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(got))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            restored[name] = got
    # Same mesh: the resumed run is the uninterrupted one, bit for bit.
    resumed, _ = advance(objective, "fsdp8", restored["fsdp8"], half, STEPS)
    whole, _ = trajectory(objective, "fsdp8")
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another mesh: the same trajectory up to float32 rounding.
    for name in ("data2_fsdp4", "one"):
        moved, _ = advance(objective, name, restored[name], half, STEPS)
        assert_fsdp_placed(moved.params, mesh_of(name))
        for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(jax.device_get(moved.params))):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


# ----------------------------------------------------------------- the analysis on the mesh

def test_tracker_and_step_decomposition_on_fsdp_params_equal_one_device(tmp_path):
    from ldjax import probes, sequence_dynamics as sd, tracking
    from ldjax.data.preference import SFTExample
    from ldjax.data.tokenize import tokenize_sft
    from ldjax.data.world import WorldConfig, build_world

    world = build_world(WorldConfig(seed=5, num_entities=8, num_train=12, num_test=4, num_probe=4,
                                    num_pretrain_answers=8, num_pretrain_narrative=4, shakespeare_fraction=0.0))
    tokens = dict(max_length=40, max_prompt_length=16, bos_id=3)
    probe_set = probes.tokenize_probes(probes.probe_texts_from_world(world), world.tokenizer, **tokens)
    arrays = tokenize_sft([SFTExample(e.prompt, e.chosen) for e in world.train[:8]], world.tokenizer,
                          pad_to_max_length=True, **tokens)
    cfg = TransformerConfig.tiny("qwen2", vocab_size=world.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                                 num_kv_heads=2, intermediate_size=32)
    model = CausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    apply_fn, params = sd.lm_apply_fn(model)
    params = jax.device_get(params)
    grads = jax.grad(lambda p: objectives.sft_objective()(nnx.merge(nnx.graphdef(model), p), arrays)[0])(params)
    after = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

    def decompose(before, new, batch):
        pred = sd.predict_sgd(apply_fn, before, batch, batch, sd.SFTObjective(), lr=0.5)
        return {"predicted": pred.total.responses, "actual": sd.actual_change(apply_fn, before, new, batch).responses}

    def records(mesh):
        if mesh is None:
            place = lambda tree: jax.device_put(tree, jax.devices()[0])  # noqa: E731
            batch = place(arrays)
        else:
            place = functools.partial(sharding.shard_params, mesh=mesh)
            batch = sharding.shard_batch(arrays, mesh)  # the observed / update batch along "data"
        p0, p1 = place(params), place(after)
        if mesh is not None:
            assert assert_fsdp_placed(p0, mesh) > 0
        tracker = tracking.Tracker(probe_set, model, every=1, path=tmp_path / str(mesh is None) / "t.jsonl",
                                   decompose_fn=decompose, batch_size=2, per_prompt=True, progress=False, fused=True)
        tracker.begin(None)
        out = [tracker.track(0, p0), tracker.track(1, p1, params_before=p0, batch=batch)]
        return [{k: v for k, v in r.items() if k != "time"} for r in out]

    one = records(None)
    assert one[1]["decompose"]["actual"] and one[0]["per_prompt"]
    # data=2 x fsdp=4: params split over fsdp, the observed batch over data (fsdp=8 alone costs
    # another ~20 s of compiles on 2 cores and exercises nothing more).
    got = records(mesh_of("data2_fsdp4"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5), one, got)
