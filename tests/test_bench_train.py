"""benchmarks/train.py: the ldjax side runs, and the torch reference is the same model and step.

The torch checks run ``benchmarks/torch_reference.py`` in a torch environment (found as in
:func:`_torch_python`) and skip where there is none; ldjax's environment never imports torch.
No test asserts a timing.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import train as bench

REPO = pathlib.Path(__file__).resolve().parents[1]


def _torch_python() -> str | None:
    """The python named by $LDJAX_TORCH_PYTHON (``make test`` points it at the torch venv it builds)."""
    candidate = os.environ.get("LDJAX_TORCH_PYTHON")
    if not candidate:
        return None
    probe = subprocess.run([candidate, "-c", "import torch, safetensors"], capture_output=True)
    assert probe.returncode == 0, f"LDJAX_TORCH_PYTHON={candidate} cannot import torch: {probe.stderr[-500:]!r}"
    return candidate


TORCH_PYTHON = _torch_python()
needs_torch = pytest.mark.skipif(TORCH_PYTHON is None, reason="LDJAX_TORCH_PYTHON is not set (make test sets it)")


def _job(directory: pathlib.Path, objective: str, **overrides) -> dict:
    job = {"model_dir": str(directory / "model"), "batch_file": str(directory / f"{objective}.npz"),
           "objective": objective, "warmup": 1, "steps": 2, "learning_rate": 1e-3, "beta": 0.1}
    job.update(overrides)
    return job


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The tiny size in both architectures, with right padding so the masks matter."""
    out = {}
    for arch in ("gpt_neox", "qwen2"):
        directory = tmp_path_factory.mktemp(f"bench-{arch}")
        bench.write_inputs(bench.SIZES["tiny"], arch, seed=3, directory=directory, pad=True)
        out[arch] = directory
    return out


@pytest.fixture(scope="module")
def ldjax_run(tiny_inputs):
    """Memoised single-device ldjax runs (warm-up 1, then 3 steps), shared by several tests."""
    cache: dict = {}

    def run(arch: str, objective: str) -> dict:
        if (arch, objective) not in cache:
            cache[arch, objective] = bench.measure_ldjax(_job(tiny_inputs[arch], objective, steps=3))
        return cache[arch, objective]

    return run


def _run_torch(job: dict, tmp_path: pathlib.Path) -> dict:
    job_file = tmp_path / f"job-{job['objective']}.json"
    job_file.write_text(json.dumps(dict(job, impl="torch", threads=1, sdpa=job.get("sdpa", True))))
    done = subprocess.run([TORCH_PYTHON, str(bench.TORCH_REFERENCE), str(job_file)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_padded_batches_follow_the_token_convention():
    rng = np.random.default_rng(0)
    batch = bench.make_preference_batch(rng, 50, 6, 20, pad=True)
    for side in ("chosen", "rejected"):
        ids, att, loss = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
        assert ids.dtype == att.dtype == loss.dtype == np.int32
        assert np.all(loss <= att) and np.all(loss[:, :5] == 0)          # prompt (T/4) never scored
        assert np.all(np.diff(att, axis=1) <= 0)                          # right padding
        assert np.all(att.sum(1) >= 10) and ids.max() < 50
    np.testing.assert_array_equal(batch["chosen_input_ids"][:, :5], batch["rejected_input_ids"][:, :5])


@pytest.mark.filterwarnings("ignore:.*tokenizer.json not found")
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_model_flops_count_every_matmul_parameter(arch, tiny_inputs):
    """6·N of the formula equals 6 × the number of kernel entries of the real model (+ tied head)."""
    from ldjax.models.hf import load_pretrained

    model, _ = load_pretrained(tiny_inputs[arch] / "model")
    config = json.loads((tiny_inputs[arch] / "model" / "config.json").read_text())
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(
        nnx.state(model)) if "kernel" in jax.tree_util.keystr(path))
    if config["tie_word_embeddings"]:
        kernels += model.config.vocab_size * model.config.hidden_size
    cfg = dataclasses.asdict(model.config)
    seq_len = 16
    attention = 12 * cfg["num_layers"] * cfg["num_heads"] * cfg["head_dim"] * seq_len
    assert bench.model_flops_per_token(cfg, seq_len) == 6 * kernels + attention


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_ldjax_step_smoke_single_device_and_mesh_agree(objective, tiny_inputs, ldjax_run):
    single = ldjax_run("gpt_neox", objective)
    mesh = bench.measure_ldjax(_job(tiny_inputs["gpt_neox"], objective, steps=3, num_devices=2))
    for result in (single, mesh):
        assert len(result["step_seconds"]) == 3 and len(result["losses"]) == 4
        assert all(math.isfinite(x) and x > 0 for x in result["losses"])
        assert result["peak_rss_bytes"] > result["rss_start_bytes"] > 0
        assert result["xla_memory"]["argument_bytes"] > 0 and result["xla_flops"] > 0
    assert single["losses"][-1] < single["losses"][0]  # lr 1e-3 Adam on one batch: it learns
    np.testing.assert_allclose(mesh["losses"], single["losses"], rtol=2e-5)
    if objective == "dpo":
        # The reference log-probs are the starting policy's, so the first loss is log 2.
        np.testing.assert_allclose(single["losses"][0], math.log(2.0), rtol=1e-5)


@needs_torch
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_torch_reference_is_the_same_model_and_step(arch, objective, tiny_inputs, ldjax_run, tmp_path):
    """Same weights and batch: torch's loss equals ldjax's at step 0 and after three Adam updates."""
    ours = ldjax_run(arch, objective)
    theirs = _run_torch(_job(tiny_inputs[arch], objective, steps=3), tmp_path)
    assert theirs["num_params"] == ours["num_params"]
    assert ours["losses"][1] < ours["losses"][0]  # the updates are not no-ops
    np.testing.assert_allclose(theirs["losses"][0], ours["losses"][0], rtol=1e-5)
    np.testing.assert_allclose(theirs["losses"], ours["losses"], rtol=1e-4)


@needs_torch
def test_torch_reference_attention_variants_agree(tiny_inputs, tmp_path):
    """The explicit softmax attention and fused SDPA give the same loss (the mask is applied)."""
    job = _job(tiny_inputs["qwen2"], "sft", warmup=0, steps=1)
    fused = _run_torch(dict(job, sdpa=True), tmp_path)
    explicit = _run_torch(dict(job, sdpa=False), tmp_path)
    np.testing.assert_allclose(fused["losses"], explicit["losses"], rtol=1e-5)


def test_driver_writes_json_and_markdown(tmp_path):
    runners = ("ldjax", "torch") if TORCH_PYTHON else ("ldjax",)
    config = bench.Config(out=str(tmp_path), sizes=("tiny",), objectives=("sft",), runners=runners,
                          extra_runners=(), xla_flag_trials=(), warmup=1, steps=1, torch_python=TORCH_PYTHON or "")
    report = bench.main(config)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert [c["runner"] for c in saved["cells"]] == list(runners)
    assert saved["cells"][0]["tokens_per_step"] == 4 * 16
    text = (tmp_path / "train.md").read_text()
    assert "| tiny | ldjax |" in text and report["machine"]["cores"] == os.cpu_count()
    if TORCH_PYTHON:
        assert saved["cells"][0]["max_loss_gap_vs_torch"] < 1e-3 * saved["cells"][0]["raw"]["losses"][0]


@pytest.mark.parametrize("field, value", [("sizes", ("huge",)), ("runners", ("jax-magic",)),
                                          ("objectives", ("ppo",))])
def test_bad_settings_are_refused_with_the_field_named(field, value, tmp_path):
    config = bench.Config(out=str(tmp_path), **{field: value})
    with pytest.raises(bench.BenchmarkError, match=f"--{field.replace('_', '-')}"):
        bench.main(config)
    assert not (tmp_path / "train.json").exists()
