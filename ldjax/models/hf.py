"""Hugging Face checkpoints <-> :class:`~ldjax.models.transformer.CausalLM` (safetensors only).

``load_pretrained(path)`` reads a local directory as written by ``transformers``'
``save_pretrained`` or downloaded from the Hub (``config.json``, ``model.safetensors`` or a
sharded ``model.safetensors.index.json`` with its shards, optional ``tokenizer.json``) for
``model_type`` "gpt_neox" (Pythia) and "qwen2" (Qwen1.5). Pickled ``*.bin`` weights are never
read. ``save_pretrained`` writes the same layout back, loadable by ldjax and by transformers.

Layout notes: a torch ``nn.Linear`` weight is (out, in), an NNX kernel (in, out); GPT-NeoX fuses
q, k and v in one ``query_key_value`` projection whose output rows are laid out per head as
``[heads, (q, k, v), head_dim]``, which we split into the separate projections of our Attention.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldjax.models.transformer import CausalLM, TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Buffers that old checkpoints store next to the weights; they are recomputed, not parameters.
IGNORED_TENSORS = re.compile(r"(\.attention\.(bias|masked_bias)|rotary_emb\.inv_freq)$")

ParamPath = tuple[Any, ...]


class PretrainedFormatError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the tensors."""


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One Hugging Face tensor and the NNX parameter(s) it holds.

    Attributes:
      hf_name: the safetensors key.
      hf_shape: its shape.
      paths: paths of the parameters in ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
      to_nnx: HF array -> tuple of arrays, one per path.
      to_hf: arrays (one per path) -> HF array; the exact inverse of ``to_nnx``.
      optional: may be absent (a tied output head); if present it must equal ``to_hf`` of the paths.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[ParamPath, ...]
    to_nnx: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    optional: bool = False


def _identity(hf_name: str, shape: tuple[int, ...], path: ParamPath, optional: bool = False) -> TensorMapping:
    return TensorMapping(hf_name, shape, (path,), lambda a: (a,), lambda a: a, optional)


def _transposed(hf_name: str, n_in: int, n_out: int, path: ParamPath, optional: bool = False) -> TensorMapping:
    """torch Linear weight (out, in) <-> NNX kernel (in, out)."""
    return TensorMapping(hf_name, (n_out, n_in), (path,), lambda a: (a.T,), lambda k: k.T, optional)


def _linear(hf_prefix: str, path: ParamPath, n_in: int, n_out: int, bias: bool) -> list[TensorMapping]:
    out = [_transposed(f"{hf_prefix}.weight", n_in, n_out, path + ("kernel",))]
    if bias:
        out.append(_identity(f"{hf_prefix}.bias", (n_out,), path + ("bias",)))
    return out


def _norm(hf_prefix: str, path: ParamPath, size: int, bias: bool) -> list[TensorMapping]:
    out = [_identity(f"{hf_prefix}.weight", (size,), path + ("scale",))]
    if bias:
        out.append(_identity(f"{hf_prefix}.bias", (size,), path + ("bias",)))
    return out


def _fused_qkv(hf_prefix: str, path: ParamPath, config: TransformerConfig) -> list[TensorMapping]:
    """GPT-NeoX ``query_key_value``: rows ordered [heads, 3, head_dim] <-> q_proj, k_proj, v_proj."""
    h, dh, d = config.num_heads, config.head_dim, config.hidden_size
    paths = tuple(path + (name, "kernel") for name in ("q_proj", "k_proj", "v_proj"))

    def weight_to_nnx(w):
        w = w.reshape(h, 3, dh, d)
        return tuple(w[:, i].reshape(h * dh, d).T for i in range(3))

    def weight_to_hf(*kernels):
        return np.stack([k.T.reshape(h, dh, d) for k in kernels], axis=1).reshape(3 * h * dh, d)

    out = [TensorMapping(f"{hf_prefix}.weight", (3 * h * dh, d), paths, weight_to_nnx, weight_to_hf)]
    if config.qkv_bias:
        bias_paths = tuple(p[:-1] + ("bias",) for p in paths)

        def bias_to_nnx(b):
            b = b.reshape(h, 3, dh)
            return tuple(b[:, i].reshape(h * dh) for i in range(3))

        def bias_to_hf(*biases):
            return np.stack([b.reshape(h, dh) for b in biases], axis=1).reshape(3 * h * dh)

        out.append(TensorMapping(f"{hf_prefix}.bias", (3 * h * dh,), bias_paths, bias_to_nnx, bias_to_hf))
    return out


def tensor_mappings(config: TransformerConfig) -> list[TensorMapping]:
    """Every Hugging Face tensor of ``config``'s architecture, in checkpoint order."""
    d, v, f, dh = config.hidden_size, config.vocab_size, config.intermediate_size, config.head_dim
    embed = ("embed", "embedding")
    maps: list[TensorMapping] = []
    if config.arch == "gpt_neox":
        maps.append(_identity("gpt_neox.embed_in.weight", (v, d), embed))
        for i in range(config.num_layers):
            hf, p = f"gpt_neox.layers.{i}", ("layers", i)
            maps += _norm(f"{hf}.input_layernorm", p + ("input_norm",), d, bias=True)
            maps += _norm(f"{hf}.post_attention_layernorm", p + ("post_attention_norm",), d, bias=True)
            maps += _fused_qkv(f"{hf}.attention.query_key_value", p + ("attn",), config)
            maps += _linear(f"{hf}.attention.dense", p + ("attn", "o_proj"), config.num_heads * dh, d, config.out_bias)
            maps += _linear(f"{hf}.mlp.dense_h_to_4h", p + ("mlp", "up_proj"), d, f, config.mlp_bias)
            maps += _linear(f"{hf}.mlp.dense_4h_to_h", p + ("mlp", "down_proj"), f, d, config.mlp_bias)
        maps += _norm("gpt_neox.final_layer_norm", ("final_norm",), d, bias=True)
        head_name = "embed_out.weight"
    else:
        maps.append(_identity("model.embed_tokens.weight", (v, d), embed))
        hkv = config.num_kv_heads * dh
        for i in range(config.num_layers):
            hf, p = f"model.layers.{i}", ("layers", i)
            maps += _norm(f"{hf}.input_layernorm", p + ("input_norm",), d, bias=False)
            maps += _norm(f"{hf}.post_attention_layernorm", p + ("post_attention_norm",), d, bias=False)
            maps += _linear(f"{hf}.self_attn.q_proj", p + ("attn", "q_proj"), d, config.num_heads * dh, True)
            maps += _linear(f"{hf}.self_attn.k_proj", p + ("attn", "k_proj"), d, hkv, True)
            maps += _linear(f"{hf}.self_attn.v_proj", p + ("attn", "v_proj"), d, hkv, True)
            maps += _linear(f"{hf}.self_attn.o_proj", p + ("attn", "o_proj"), config.num_heads * dh, d, False)
            maps += _linear(f"{hf}.mlp.gate_proj", p + ("mlp", "gate_proj"), d, f, False)
            maps += _linear(f"{hf}.mlp.up_proj", p + ("mlp", "up_proj"), d, f, False)
            maps += _linear(f"{hf}.mlp.down_proj", p + ("mlp", "down_proj"), f, d, False)
        maps += _norm("model.norm", ("final_norm",), d, bias=False)
        head_name = "lm_head.weight"
    if config.tie_word_embeddings:
        maps.append(_identity(head_name, (v, d), embed, optional=True))
    else:
        maps.append(_transposed(head_name, d, v, ("lm_head", "kernel")))
    return maps


# --------------------------------------------------------------------------------------------
# Reading


def read_config(path: str | os.PathLike, **overrides: Any) -> TransformerConfig:
    """``TransformerConfig`` of the checkpoint directory ``path`` (reads ``config.json``)."""
    config_path = pathlib.Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise PretrainedFormatError(f"{config_path}: no such file (a Hugging Face checkpoint directory needs one)")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PretrainedFormatError(f"{config_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(hf, dict):
        raise PretrainedFormatError(f"{config_path}: expected a JSON object, got {type(hf).__name__}")
    try:
        return TransformerConfig.from_hf_dict(hf, **overrides)
    except (ValueError, TypeError) as e:  # TransformerConfigError, or a field of the wrong type
        raise PretrainedFormatError(f"{config_path}: {e}") from e


def _weight_files(directory: pathlib.Path) -> dict[pathlib.Path, list[str] | None]:
    """Shard file -> the tensor names the index assigns to it (None: take all, unsharded)."""
    index_path, single = directory / INDEX_FILE, directory / WEIGHTS_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PretrainedFormatError(f"{index_path}: not a safetensors index with a 'weight_map' ({e!r})") from e
        shards: dict[pathlib.Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(directory / shard, []).append(name)
        missing = sorted(str(p.name) for p in shards if not p.is_file())
        if missing:
            raise PretrainedFormatError(f"{index_path}: shard files listed in the index are missing: {missing}")
        return dict(shards)
    if single.is_file():
        return {single: None}
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise PretrainedFormatError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found (files: {present}); "
                          "only safetensors checkpoints are read, never pickled *.bin files")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (one file or sharded index) as numpy arrays.

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (exactly representable in float32).
    """
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for shard, expected in _weight_files(pathlib.Path(path)).items():
        try:
            with safe_open(str(shard), framework="numpy") as f:
                keys = list(f.keys())
                if expected is not None:
                    absent = sorted(set(expected) - set(keys))
                    if absent:
                        raise PretrainedFormatError(f"{shard}: tensors the index places here are absent: {absent}")
                    keys = expected
                for key in keys:
                    if key in tensors:
                        raise PretrainedFormatError(f"{shard}: tensor {key!r} appears in more than one shard")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise PretrainedFormatError(f"{shard}: cannot read safetensors file: {e}") from e
    return tensors


def _get(tree: dict, path: ParamPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: ParamPath, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def params_from_hf(config: TransformerConfig, tensors: dict[str, np.ndarray], pure: dict,
                   *, source: str = "checkpoint") -> dict:
    """Fills the nested pure dict ``pure`` (NNX layout) from HF ``tensors``; checks names and shapes.

    Raises:
      PretrainedFormatError: naming every missing, unexpected and mis-shaped tensor.
    """
    maps = tensor_mappings(config)
    tensors = dict(tensors)
    if config.arch == "gpt_neox" and "lm_head.weight" in tensors and "embed_out.weight" not in tensors:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")  # transformers>=5 in-memory name
    known = {m.hf_name for m in maps}
    missing = [m.hf_name for m in maps if m.hf_name not in tensors and not m.optional]
    unexpected = sorted(k for k in tensors if k not in known and not IGNORED_TENSORS.search(k))
    bad_shapes = [f"{m.hf_name}: expected {m.hf_shape}, found {tuple(tensors[m.hf_name].shape)}"
                  for m in maps if m.hf_name in tensors and tuple(tensors[m.hf_name].shape) != m.hf_shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if bad_shapes:
        problems.append(f"mis-shaped tensors [{'; '.join(bad_shapes)}]")
    if problems:
        raise PretrainedFormatError(f"{source} does not match {config.arch} config "
                              f"(layers={config.num_layers}, hidden={config.hidden_size}, "
                              f"vocab={config.vocab_size}): " + "; ".join(problems))
    for m in maps:
        if m.optional:
            continue
        for path, value in zip(m.paths, m.to_nnx(np.asarray(tensors[m.hf_name]))):
            target = _get(pure, path)
            _set(pure, path, jnp.asarray(value, dtype=target.dtype))
    for m in maps:
        if m.optional and m.hf_name in tensors:
            tied = m.to_hf(*(np.asarray(_get(pure, p), np.float32) for p in m.paths))
            if not np.array_equal(np.asarray(tensors[m.hf_name], np.float32), tied):
                raise PretrainedFormatError(f"{source}: {m.hf_name} differs from the embedding although "
                                      "tie_word_embeddings is true")
    return pure


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None,
                    **config_overrides: Any) -> tuple[CausalLM, Any]:
    """Loads a local Hugging Face GPT-NeoX or Qwen2 checkpoint directory.

    Args:
      path: directory with ``config.json``, ``model.safetensors`` (or ``model.safetensors.index.json``
        and its shards) and optionally ``tokenizer.json``.
      dtype: compute dtype of the model (float32 or bfloat16 weights are converted exactly).
      param_dtype: storage dtype of the parameters (default: ``dtype``).
      **config_overrides: non-architectural ``TransformerConfig`` fields, e.g. ``remat=True``.

    Returns:
      ``(model, tokenizer)``: a :class:`CausalLM` and a ``tokenizers.Tokenizer`` (None, with a
      warning, when ``tokenizer.json`` is absent).

    Raises:
      PretrainedFormatError (a ``ValueError``): unsupported ``model_type``, unreadable files, missing,
        unexpected or mis-shaped tensors.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise PretrainedFormatError(f"{directory}: not a directory")
    config = read_config(directory, **config_overrides)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    pure = params_from_hf(config, read_safetensors(directory), nnx.to_pure_dict(state), source=str(directory))
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    return model, load_tokenizer(directory)


def load_tokenizer(path: str | os.PathLike):
    """``tokenizers.Tokenizer`` from ``path/tokenizer.json``; None with a warning when absent."""
    from tokenizers import Tokenizer

    tokenizer_path = pathlib.Path(path) / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        warnings.warn(f"{tokenizer_path} not found: returning tokenizer=None", stacklevel=2)
        return None
    try:
        return Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        raise PretrainedFormatError(f"{tokenizer_path}: cannot parse tokenizer: {e}") from e


# --------------------------------------------------------------------------------------------
# Writing


def params_to_hf(model: CausalLM) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of ``model`` (tied heads are not written, as transformers does)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for m in tensor_mappings(model.config):
        if m.optional:
            continue
        arrays = [np.asarray(jax.device_get(_get(pure, p))) for p in m.paths]
        tensors[m.hf_name] = np.ascontiguousarray(m.to_hf(*arrays))
    return tensors


def _atomic_write(target: pathlib.Path, write: Callable[[str], None]) -> None:
    """Writes through a temporary file in the same directory, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def save_pretrained(model: CausalLM, tokenizer: Any, path: str | os.PathLike, *,
                    max_shard_bytes: int | None = None) -> pathlib.Path:
    """Writes ``config.json``, ``model.safetensors`` (or shards + index) and ``tokenizer.json``.

    Tensors keep the parameters' dtype (float32 or bfloat16) and use the Hub names
    (``embed_out.weight`` for GPT-NeoX), so both :func:`load_pretrained` and transformers'
    ``from_pretrained`` read the directory back.

    Args:
      model: a :class:`CausalLM`.
      tokenizer: a ``tokenizers.Tokenizer`` or None (then no ``tokenizer.json`` is written).
      path: target directory (created).
      max_shard_bytes: if set, split the weights into shards of at most this size plus an index.

    Returns:
      the directory.
    """
    from safetensors.numpy import save_file

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(model)
    dtypes = {str(a.dtype) for a in tensors.values()}
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        (directory / INDEX_FILE).unlink(missing_ok=True)  # a stale index would take precedence on load
        _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    else:
        shards = _shards(tensors, max_shard_bytes)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(directory / name, lambda tmp, s=shard: save_file(s, tmp, metadata=metadata))
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
        _atomic_write(directory / INDEX_FILE, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic_write(directory / CONFIG_FILE,
                  lambda tmp: pathlib.Path(tmp).write_text(json.dumps(hf_config, indent=2, sort_keys=True)))
    if tokenizer is not None:
        _atomic_write(directory / TOKENIZER_FILE, lambda tmp: tokenizer.save(tmp))
    return directory


__all__: Sequence[str] = ("PretrainedFormatError", "TensorMapping", "tensor_mappings", "read_config", "read_safetensors",
                          "params_from_hf", "params_to_hf", "load_pretrained", "load_tokenizer", "save_pretrained")
