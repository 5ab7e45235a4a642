"""``ldjax plan`` (:mod:`ldjax.memory_plan`): parameter counts, the FSDP byte rule, and the
plan's totals against XLA's buffer assignment of the real compiled train step (CPU; the
8 fake host devices of tests/conftest.py for the meshes)."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from ldjax import memory_plan as mp
from ldjax.models.transformer import TransformerConfig
from ldjax.train.config import ConfigError
from ldjax.train.sharding import fsdp_partition_spec

# Public counts (EleutherAI's Pythia table, embeddings included, untied 50,304-token vocabulary).
PYTHIA_PUBLIC = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
                 "pythia-1b": 1_011_781_632, "pythia-1.4b": 1_414_647_808, "pythia-2.8b": 2_775_208_960}


def closed_form_parameters(c: TransformerConfig) -> int:
    """Parameters of a GPT-NeoX / Qwen2 block stack written out by hand (independent of the model code)."""
    d, f, v, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if c.qkv_bias else 0) + (d if c.out_bias else 0)
    if c.arch == "gpt_neox":
        mlp, norms = 2 * d * f + (f + d if c.mlp_bias else 0), 4 * d
        final = 2 * d
    else:
        mlp, norms, final = 3 * d * f, 2 * d, d
    head = 0 if c.tie_word_embeddings else d * v
    return v * d + c.num_layers * (attn + mlp + norms) + final + head


@pytest.mark.parametrize("name", list(mp.PRESETS) + list(mp.TINY_PRESETS))
def test_preset_parameter_counts(name):
    tcfg = mp.transformer_config(name)
    count = mp.parameter_count(tcfg)  # nnx.eval_shape of the real CausalLM: nothing allocated
    assert count == closed_form_parameters(tcfg)
    if name in PYTHIA_PUBLIC:
        assert count == PYTHIA_PUBLIC[name]
    if name in ("pythia-410m", "tiny-qwen2"):
        assert mp.make_plan(mp.PlanConfig(model=name, max_length=64)).parameters == count


def test_qwen_presets_match_the_public_sizes():
    assert abs(mp.parameter_count(mp.transformer_config("qwen1.5-0.5b")) / 1e6 - 464) < 1  # tied head
    assert abs(mp.parameter_count(mp.transformer_config("qwen1.5-1.8b")) / 1e9 - 1.84) < 0.01  # untied


def test_sharded_bytes_follow_the_rule():
    leaves = {"embed": jax.ShapeDtypeStruct((50304, 1024), jnp.float32),   # split on 50304
              "bias": jax.ShapeDtypeStruct((1000,), jnp.float32),          # 1000 % 16 != 0: whole
              "scale": jax.ShapeDtypeStruct((1024,), jnp.bfloat16),        # split
              "count": jax.ShapeDtypeStruct((), jnp.int32)}                 # scalar: whole
    assert fsdp_partition_spec((1000,), 16) == jax.sharding.PartitionSpec()
    expected = 50304 * 1024 * 4 // 16 + 1000 * 4 + 1024 * 2 // 16 + 4
    assert mp.sharded_bytes(leaves, 16) == expected
    assert mp.sharded_bytes(leaves, 1) == 50304 * 1024 * 4 + 1000 * 4 + 1024 * 2 + 4


def test_plan_components_on_a_mesh():
    one = mp.make_plan(mp.PlanConfig(model="pythia-410m", optimizer="adam"))
    eight = mp.make_plan(mp.PlanConfig(model="pythia-410m", optimizer="adam", num_devices=8, fsdp=8, batch_size=8))
    c1, c8 = ({n: b for n, b, _ in p.components} for p in (one, eight))
    assert c1["parameters"] == 405_334_016 * 4
    assert 0 < c1["optimizer state"] - 2 * c1["parameters"] <= 16  # mu, nu and Adam's step count
    _, params, _ = mp.abstract_params(mp.transformer_config("pythia-410m"))
    assert c8["parameters"] == mp.sharded_bytes(params, 8)
    # Every Pythia-410M matrix and vector has an axis that 8 divides: exactly 1/8 on each device.
    assert c8["parameters"] * 8 == c1["parameters"]
    assert c8["gradients"] == c8["parameters"]
    # ZeRO-3: every attention matrix gathered full-size (kept for the backward pass); XLA moves
    # the smaller operand, so the MLP (1024 x 4096) is gathered unless the fsdp group's tokens
    # x 1024 are fewer bytes (< 4096 tokens), the embedding/head unless < 50,304 tokens.
    gathered = mp.gathered_bytes(params, 8, 8 * 512, "float32")
    assert gathered["attn"] == 24 * 4 * 1024 * 1024 * 4 and gathered["vocab"] == 0
    assert gathered["mlp"] == 24 * 2 * 1024 * 4096 * 4
    assert mp.gathered_bytes(params, 8, 4 * 512, "float32")["mlp"] == 0
    assert c8["gathered parameters"] == sum(gathered.values())
    rms = {n: b for n, b, _ in mp.make_plan(mp.PlanConfig(model="pythia-410m")).components}
    assert 0 <= rms["optimizer state"] - c1["parameters"] <= 16  # one moment (+ counters)
    sgd = {n: b for n, b, _ in mp.make_plan(mp.PlanConfig(model="pythia-410m", optimizer="sgd")).components}
    assert sgd["optimizer state"] < 1024
    dpo = {n: b for n, b, _ in mp.make_plan(mp.PlanConfig(model="pythia-410m", command="dpo")).components}
    assert "reference model" not in dpo  # ldjax precomputes the reference log-probs
    held = mp.make_plan(mp.PlanConfig(model="pythia-410m", command="dpo", reference="model"))
    assert {n: b for n, b, _ in held.components}["reference model"] == c1["parameters"]
    assert dpo["activations: blocks"] == 2 * rms["activations: blocks"]  # chosen + rejected
    remat = {n: b for n, b, _ in mp.make_plan(mp.PlanConfig(model="pythia-410m", remat=True)).components}
    assert remat["activations: blocks"] < rms["activations: blocks"] / 5


def test_verdict_and_json(capsys):
    assert mp.main(["--model", "pythia-410m", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "FITS: headroom" in out and "DOES NOT FIT" not in out and "parameters" in out
    assert mp.main(["--model", "pythia-2.8b", "--optimizer", "adam", "--device", "tpu-v5e", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is False and plan["headroom_bytes"] < 0
    assert plan["total_bytes"] == sum(c["bytes"] for c in plan["components"])
    assert plan["capacity_bytes"] == 16 * 2 ** 30


@pytest.mark.parametrize("argv, match", [
    (["--model", "gpt-5"], "not a preset"),
    (["--device", "tpu-v9"], "--device 'tpu-v9' is not known"),
    (["--num-devices", "8", "--fsdp", "3"], "--fsdp 3 does not divide --num-devices 8"),
    (["--num-devices", "8", "--batch-size", "4"], "not a multiple of the 8 devices of the mesh"),
    (["--num-devices", "8", "--fsdp", "8", "--batch-size", "8", "--accumulation-steps", "2"],
     "not a multiple of the 8 devices of the mesh x --accumulation-steps 2"),
    (["--optimizer", "lion"], "--optimizer 'lion'"),
    (["--max-length", "4096"], "max_position_embeddings=2048"),
])
def test_clean_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        mp.main(argv)


def test_ldjax_plan_reports_one_line(capsys):
    from ldjax import cli
    assert cli.main(["plan", "--device", "nope"], report_errors=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ldjax plan: error: --device 'nope' is not known —")


def _tiny_dir(tmp_path, **fields):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TransformerConfig.tiny("gpt_neox", **fields).to_hf_dict()))
    return str(d)


def test_local_directory(tmp_path):
    path = _tiny_dir(tmp_path, vocab_size=512, hidden_size=256, num_layers=4, intermediate_size=1024)
    plan = mp.make_plan(mp.PlanConfig(model=path, max_length=32))
    assert plan.parameters == closed_form_parameters(mp.transformer_config(path))


# Plan vs XLA: arguments + outputs not aliased + temporaries of the compiled real train step,
# per device, measured in one subprocess per mesh (8 fake host devices, jax_enable_x64 off as
# ldjax trains). The CPU compiler ignores remat, so no remat case. "m256": the model of
# _tiny_dir below (d = 256, 4 layers, F = 1024, V = 512; 13.7 MB of float32 parameters).
M256 = dict(vocab_size=512, hidden_size=256, num_layers=4, intermediate_size=1024)
MEASURED = {  # name: (mesh group, config)
    "1dev-neox-sft": ("one", dict(model="tiny-gpt_neox", command="sft", batch_size=8, max_length=128, optimizer="adam")),
    "1dev-qwen-dpo": ("one", dict(model="tiny-qwen2", command="dpo", batch_size=8, max_length=128,
                                  optimizer="rmsprop")),
    "data8-qwen-dpo-acc2": ("data8", dict(model="tiny-qwen2", command="dpo", batch_size=16, max_length=64,
                                          optimizer="rmsprop", num_devices=8, accumulation_steps=2)),
    "fsdp8-neox-sft": ("fsdp8", dict(model="tiny-gpt_neox", command="sft", batch_size=8, max_length=128,
                                     optimizer="adam", num_devices=8, fsdp=8)),
    "fsdp8-m256-sft-acc2": ("fsdp8", dict(model="m256", command="sft", batch_size=16, max_length=32, optimizer="adam",
                                          num_devices=8, fsdp=8, accumulation_steps=2)),
    "fsdp8-m256-dpo": ("fsdp8", dict(model="m256", command="dpo", batch_size=8, max_length=32, optimizer="adam",
                                     num_devices=8, fsdp=8)),
    "data2xfsdp4-m256-dpo": ("data2xfsdp4", dict(model="m256", command="dpo", batch_size=8, max_length=32,
                                                 optimizer="adam", num_devices=8, fsdp=4)),
    "data4xfsdp2-m256-sft": ("data4xfsdp2", dict(model="m256", command="sft", batch_size=8, max_length=32,
                                                 optimizer="adam", num_devices=8, fsdp=2)),
    "data4xfsdp2-m256-dpo": ("data4xfsdp2", dict(model="m256", command="dpo", batch_size=8, max_length=32,
                                                 optimizer="adam", num_devices=8, fsdp=2)),
    # Not within 20 % (-37 %): on this 16 KB-kernel model XLA gathers the fsdp group's
    # *activations* (1024 tokens x 64) and runs every matmul split over features instead of
    # gathering the weights; attention then splits over gcd(4 heads, 8) = 4 devices for all
    # 16 sequences of the group. The plan models the weight-gathering ZeRO-3 step (module
    # docstring) and does not predict that choice of XLA's.
    "fsdp8-qwen-dpo": ("fsdp8", pytest.param(
        dict(model="tiny-qwen2", command="dpo", batch_size=8, max_length=64, optimizer="rmsprop", num_devices=8,
             fsdp=8),
        marks=pytest.mark.xfail(strict=True, reason="XLA gathers activations, not weights, here: -37 %"))),
}

_MEASURE = """
import json, sys
from ldjax import memory_plan as mp
print(json.dumps([mp.measure_xla(mp.PlanConfig(**c)) for c in json.loads(sys.stdin.read())]))
"""


@pytest.fixture(scope="module")
def xla_measured(tmp_path_factory):
    """``{name: (plan, measure_xla)}`` of every measured config, in one subprocess."""
    import os
    import subprocess
    import sys
    d = tmp_path_factory.mktemp("m256")
    (d / "config.json").write_text(json.dumps(TransformerConfig.tiny("gpt_neox", **M256).to_hf_dict()))

    def fields(entry):
        f = entry if isinstance(entry, dict) else entry.values[0]  # a pytest.param
        return dict(f, model=str(d)) if f["model"] == "m256" else f

    # every group in one process (each config builds its own mesh of num_devices): one jax start-up
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    names = list(MEASURED)
    configs = [fields(MEASURED[n][1]) for n in names]
    run = subprocess.run([sys.executable, "-c", _MEASURE], input=json.dumps(configs), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {n: (mp.make_plan(mp.PlanConfig(**c)), x)
            for n, c, x in zip(names, configs, json.loads(run.stdout.strip().splitlines()[-1]))}


@pytest.mark.parametrize("name", [n if isinstance(e, dict) else pytest.param(n, marks=e.marks)
                                  for n, (_, e) in MEASURED.items()])
def test_plan_within_20_percent_of_xla(name, xla_measured):
    plan, xla = xla_measured[name]
    error = plan.total / xla["total"] - 1
    assert abs(error) < 0.2, (f"{100 * error:+.1f} %", plan.components, xla)


def test_argument_bytes_are_the_sharded_state(xla_measured):
    # The argument bytes XLA assigns per device are the plan's sharded parameters + optimizer
    # state + batch: the byte rule is the step's layout.
    for name in ("fsdp8-m256-dpo", "data2xfsdp4-m256-dpo", "data4xfsdp2-m256-sft"):
        plan, xla = xla_measured[name]
        parts = {n: b for n, b, _ in plan.components}
        assert math.isclose(xla["argument"], parts["parameters"] + parts["optimizer state"] + parts["batch"],
                            rel_tol=0.02), (name, xla, parts)
