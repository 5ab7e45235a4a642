"""Hugging Face import/export: logits parity with transformers, checkpoint formats, error paths.

Two legs:
- golden (always): ``tests/golden/<name>/`` holds tiny random-weight checkpoints written by
  transformers and its logits (``tests/golden/make_golden.py``); ldjax must reproduce them to 1e-5.
- live (only when ``$LDJAX_TORCH_PYTHON`` names a python with torch + transformers; skipped with
  that reason otherwise): fresh checkpoints with another seed, and the save_pretrained ->
  transformers round trip.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ldjax.models import CausalLM, TransformerConfig, load_pretrained, save_pretrained
from ldjax.models.hf import PretrainedFormatError, read_safetensors

GOLDEN = pathlib.Path(__file__).parent / "golden"
MAKE_GOLDEN = GOLDEN / "make_golden.py"
FIXTURES = ["gpt_neox_parallel", "gpt_neox_sequential", "qwen2_tied", "qwen2_untied"]
ATOL = 1e-5  # the parity claim, float32


def golden_inputs(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN / name / "expected_logits.npz"))


@nnx.jit
def _forward(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return model(input_ids, attention_mask)


def logits_of(model: CausalLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Jitted forward (one compile per config beats op-by-op dispatch); None mask = all ones,
    which test_transformer checks is the same as passing None."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    return np.asarray(_forward(model, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def pure_params(model: CausalLM) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_same_params(a: CausalLM, b: CausalLM) -> None:
    flat_a = jax.tree_util.tree_leaves_with_path(pure_params(a))
    flat_b = jax.tree_util.tree_leaves_with_path(pure_params(b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def copy_checkpoint(name: str, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(GOLDEN / name, target)
    return target


# --------------------------------------------------------------------------------------------
# Golden parity (no torch needed)


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_logits_match_transformers(name):
    model, tokenizer = load_pretrained(GOLDEN / name)
    data = golden_inputs(name)
    masked = logits_of(model, data["input_ids"], data["attention_mask"])
    unmasked = logits_of(model, data["input_ids"])
    assert masked.dtype == np.float32 and masked.shape == data["logits"].shape
    # Every position, padded ones included: eager HF attention masks padded keys the same way.
    np.testing.assert_allclose(masked, data["logits"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(unmasked, data["logits_nomask"], rtol=0, atol=ATOL)
    # The fixture is not trivial: logits are O(1) and the pad mask changes the padded rows.
    assert np.abs(data["logits"]).max() > 1.0
    assert np.abs(data["logits"][1] - data["logits_nomask"][1]).max() > 1e-2
    assert tokenizer is not None and tokenizer.get_vocab_size() == model.config.vocab_size


def test_golden_parity_is_sensitive_to_the_architecture():
    """Negative control: a model differing only in rotary fraction or residual style misses by far."""
    data = golden_inputs("gpt_neox_parallel")
    for override in (dict(rotary_pct=0.5), dict(parallel_residual=False)):
        model, _ = load_pretrained(GOLDEN / "gpt_neox_parallel", **override)
        assert np.abs(logits_of(model, data["input_ids"]) - data["logits_nomask"]).max() > 1e-2, override


def test_golden_configs_read_as_expected():
    neox, _ = load_pretrained(GOLDEN / "gpt_neox_parallel")
    qwen, _ = load_pretrained(GOLDEN / "qwen2_tied")
    assert (neox.config.arch, neox.config.rotary_pct, neox.config.parallel_residual) == ("gpt_neox", 0.25, True)
    assert (qwen.config.arch, qwen.config.num_kv_heads, qwen.config.tie_word_embeddings) == ("qwen2", 2, True)
    assert qwen.lm_head is None and neox.lm_head is not None


# --------------------------------------------------------------------------------------------
# Formats: sharded index, bfloat16, save/load round trips


def test_sharded_index_loads_identically(tmp_path):
    tensors = load_file(str(GOLDEN / "qwen2_untied" / "model.safetensors"))
    target = tmp_path / "sharded"
    target.mkdir()
    shutil.copy(GOLDEN / "qwen2_untied" / "config.json", target)
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names), 3)):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(target / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in chunk})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.warns(UserWarning, match="tokenizer.json"):
        sharded, tokenizer = load_pretrained(target)
    assert tokenizer is None
    single, _ = load_pretrained(GOLDEN / "qwen2_untied")
    assert_same_params(sharded, single)


def test_bfloat16_checkpoint_converts_exactly(tmp_path):
    tensors = load_file(str(GOLDEN / "gpt_neox_parallel" / "model.safetensors"))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    target = tmp_path / "bf16"
    target.mkdir()
    shutil.copy(GOLDEN / "gpt_neox_parallel" / "config.json", target)
    shutil.copy(GOLDEN / "gpt_neox_parallel" / "tokenizer.json", target)
    save_file(bf16, str(target / "model.safetensors"), metadata={"format": "pt"})
    assert read_safetensors(target)["embed_out.weight"].dtype == ml_dtypes.bfloat16
    model, _ = load_pretrained(target)  # float32 parameters
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]),
                                  bf16["gpt_neox.embed_in.weight"].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]),
                                  bf16["embed_out.weight"].astype(np.float32).T)
    # bf16 storage + compute: float32 logits close to the float32 model on the same rounded weights.
    model16, _ = load_pretrained(target, dtype=jnp.bfloat16)
    assert model16.embed.embedding[...].dtype == jnp.bfloat16
    data = golden_inputs("gpt_neox_parallel")
    ref = logits_of(model, data["input_ids"])
    out16 = logits_of(model16, data["input_ids"])
    assert out16.dtype == np.float32
    assert np.abs(out16 - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["gpt_neox_sequential", "qwen2_tied"])
@pytest.mark.parametrize("shard_bytes", [None, 60_000])
def test_save_pretrained_round_trip_is_bitwise(tmp_path, name, shard_bytes):
    model, tokenizer = load_pretrained(GOLDEN / name)
    save_pretrained(model, tokenizer, tmp_path / "out", max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if shard_bytes:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    again, tokenizer2 = load_pretrained(tmp_path / "out")
    assert again.config == model.config
    assert_same_params(again, model)
    assert tokenizer2.encode("w5 w7 w9").ids == tokenizer.encode("w5 w7 w9").ids
    # Same tensor names and values as the transformers-written original (tied head omitted as HF does).
    original = load_file(str(GOLDEN / name / "model.safetensors"))
    written = read_safetensors(tmp_path / "out")
    assert sorted(written) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_save_pretrained_bfloat16_model_keeps_dtype(tmp_path, arch):
    config = TransformerConfig.tiny(arch, vocab_size=97)
    model = CausalLM(config, rngs=nnx.Rngs(3), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    save_pretrained(model, None, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in read_safetensors(tmp_path).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, _ = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert_same_params(again, model)


# --------------------------------------------------------------------------------------------
# Error paths: every message names the culprit


def rewrite_tensors(directory: pathlib.Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_model_type_is_named(tmp_path):
    target = copy_checkpoint("qwen2_tied", tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "llama"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='llama'.*gpt_neox.*qwen2"):
        load_pretrained(target)


def test_missing_tensor_is_named(tmp_path):
    target = copy_checkpoint("gpt_neox_parallel", tmp_path / "ckpt")
    rewrite_tensors(target, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(PretrainedFormatError, match=r"missing tensors \['gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias'\]"):
        load_pretrained(target)


def test_misshaped_and_unexpected_tensors_are_named(tmp_path):
    target = copy_checkpoint("qwen2_untied", tmp_path / "ckpt")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((3,), np.float32)

    rewrite_tensors(target, edit)
    with pytest.raises(PretrainedFormatError) as err:
        load_pretrained(target)
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (64, 64)" in message
    assert "unexpected tensors ['model.layers.7.mlp.up_proj.weight']" in message
    assert str(target) in message


def test_known_buffers_are_ignored_and_legacy_head_name_accepted(tmp_path):
    target = copy_checkpoint("gpt_neox_parallel", tmp_path / "ckpt")

    def edit(t):
        t["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
        t["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
        t["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.ones((2,), np.float32)
        t["lm_head.weight"] = t.pop("embed_out.weight")  # the in-memory name of transformers 5

    rewrite_tensors(target, edit)
    model, _ = load_pretrained(target)
    reference, _ = load_pretrained(GOLDEN / "gpt_neox_parallel")
    assert_same_params(model, reference)


def test_tied_head_that_differs_from_embedding_is_refused(tmp_path):
    target = copy_checkpoint("qwen2_tied", tmp_path / "ckpt")
    rewrite_tensors(target, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert_same_params(load_pretrained(target)[0], load_pretrained(GOLDEN / "qwen2_tied")[0])  # equal copy: fine
    rewrite_tensors(target, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
    with pytest.raises(PretrainedFormatError, match="lm_head.weight differs from the embedding"):
        load_pretrained(target)


def test_missing_weights_and_broken_files_are_clear(tmp_path):
    target = copy_checkpoint("qwen2_tied", tmp_path / "ckpt")
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(PretrainedFormatError, match=r"neither model\.safetensors nor .*never pickled"):
        load_pretrained(target)
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(PretrainedFormatError, match=r"missing: \['gone\.safetensors'\]"):
        load_pretrained(target)
    (target / "model.safetensors.index.json").unlink()
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PretrainedFormatError, match="cannot read safetensors"):
        load_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "2"}))
    with pytest.raises(PretrainedFormatError, match=r"config\.json: TransformerConfig\.num_layers='2' must be a positive int"):
        load_pretrained(target)
    (target / "config.json").write_text('{"model_type": "qwen2",')
    with pytest.raises(PretrainedFormatError, match=r"config\.json: invalid JSON at line 1"):
        load_pretrained(target)
    with pytest.raises(PretrainedFormatError, match="not a directory"):
        load_pretrained(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Live comparison with transformers


def torch_python() -> str | None:
    """The interpreter named by ``$LDJAX_TORCH_PYTHON`` (the Makefile points it at the torch venv it builds).

    Nothing else is probed: a test environment must say which torch it compares against.
    """
    candidate = os.environ.get("LDJAX_TORCH_PYTHON")
    return candidate or None


def run_torch(*args: str) -> None:
    python = torch_python()
    assert pathlib.Path(python).is_file(), f"LDJAX_TORCH_PYTHON={python} is not a file"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([python, str(MAKE_GOLDEN), *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# Set but wrong is a broken test environment, not a reason to skip: run_torch then fails loudly.
requires_torch = pytest.mark.skipif(torch_python() is None, reason="LDJAX_TORCH_PYTHON is not set (point it at a "
                                    "python with torch + transformers, as the Makefile does)")


def ldjax_written_models() -> dict[str, CausalLM]:
    """Random-init ldjax models of every supported shape, to be saved and read by transformers."""
    def tiny(arch, seed, **kw):
        return CausalLM(TransformerConfig.tiny(arch, vocab_size=160, initializer_range=0.2, **kw), rngs=nnx.Rngs(seed))

    return {
        "neox_tiny": tiny("gpt_neox", 0),
        "neox_sequential_tiny": tiny("gpt_neox", 1, parallel_residual=False, rotary_pct=1.0),
        "qwen2_tiny_tied": tiny("qwen2", 2),
        "qwen2_tiny_untied_mqa": tiny("qwen2", 3, tie_word_embeddings=False, num_kv_heads=1),
    }


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """One torch process: fresh golden-style checkpoints (another seed) + logits of ldjax-saved ones."""
    out = tmp_path_factory.mktemp("live")
    data = golden_inputs("qwen2_tied")
    np.savez(out / "inputs.npz", input_ids=data["input_ids"], attention_mask=data["attention_mask"])
    models = ldjax_written_models()
    for name, model in models.items():
        save_pretrained(model, None, out / "saved" / name, max_shard_bytes=100_000 if "untied" in name else None)
    run_torch("live", str(out / "fresh"), "--seed", "1234", str(out / "inputs.npz"),
              *(str(out / "saved" / name) for name in models))
    return out, models, data


@requires_torch
@pytest.mark.parametrize("name", FIXTURES)
def test_live_fresh_checkpoints_match_transformers(live_run, name):
    out, _, _ = live_run
    model, _ = load_pretrained(out / "fresh" / name)
    data = dict(np.load(out / "fresh" / name / "expected_logits.npz"))
    assert not np.array_equal(data["logits"], golden_inputs(name)["logits"])  # really a new checkpoint
    np.testing.assert_allclose(logits_of(model, data["input_ids"], data["attention_mask"]), data["logits"],
                               rtol=0, atol=ATOL)


@requires_torch
def test_live_transformers_loads_what_ldjax_saves(live_run):
    out, models, data = live_run
    for name, model in models.items():
        hf = np.load(out / "saved" / name / "transformers_logits.npz")
        ours = logits_of(model, data["input_ids"], data["attention_mask"])
        assert np.abs(ours).max() > 0.5, name  # non-trivial weights
        np.testing.assert_allclose(ours, hf["logits"], rtol=0, atol=ATOL, err_msg=name)
