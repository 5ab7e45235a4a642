"""A decoder-only causal transformer in Flax NNX covering GPT-NeoX (Pythia) and Qwen2 (Qwen1.5).

The two architectures differ in a handful of switches, all held by :class:`TransformerConfig`:

============================  =============================  ==============================
                              ``arch="gpt_neox"`` (Pythia)   ``arch="qwen2"`` (Qwen1.5)
============================  =============================  ==============================
normalisation                 LayerNorm (scale and bias)     RMSNorm (scale only)
MLP                           ``down(act(up(x)))``, biases   ``down(silu(gate(x)) * up(x))``
residual                      parallel or sequential         sequential
rotary embedding              on ``rotary_pct`` of each head  on the whole head
attention                     multi-head, all biases         grouped-query, q/k/v bias only
embeddings                    untied ``embed_out``           tied or untied
============================  =============================  ==============================

Conventions (shared by the whole library): ``input_ids`` (B, T) int, ``attention_mask`` (B, T)
with 1 for real tokens and right padding; logits (B, T, V) in float32, row t predicting token
t + 1. Rotary positions are ``arange(T)`` for every row, which is what Hugging Face uses when
there is no left padding, so right-padded positions never shift the real ones.

References: Su et al. 2021 (RoPE, arXiv 2104.09864); Black et al. 2022 (GPT-NeoX-20B,
arXiv 2204.06745); Ainslie et al. 2023 (GQA, arXiv 2305.13245); Qwen team 2023
(arXiv 2309.16609).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCHITECTURES = ("gpt_neox", "qwen2")

# Per layer (keys, values), each (B, L, kv_heads, head_dim): what decoding one token at a time reuses.
KVCache = tuple[jax.Array, jax.Array]


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU ``x · Φ(x) = x/2 · (1 + erf(x/√2))`` (Hendrycks & Gimpel 2016), torch's formula.

    ``jax.nn.gelu(approximate=False)`` evaluates the same function through ``erfc``, whose
    branchy XLA CPU kernels took ~22 ms of a 1M-parameter model's ~90 ms training step (4
    layers, 8 x 128 tokens); ``erf`` is one vectorised rational approximation (~4 ms there).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


# Hugging Face ``hidden_act`` names -> the same function in JAX. "gelu" is the exact erf form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


class TransformerConfigError(ValueError):
    """A transformer config that is inconsistent or not representable."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of :class:`CausalLM`; ``arch`` picks the GPT-NeoX or Qwen2 block."""

    arch: str = dataclasses.field(default="qwen2", metadata=_help("'gpt_neox' (Pythia) or 'qwen2' (Qwen1.5)"))
    vocab_size: int = dataclasses.field(default=256, metadata=_help("number of token ids V"))
    hidden_size: int = dataclasses.field(default=64, metadata=_help("model width D"))
    num_layers: int = dataclasses.field(default=2, metadata=_help("number of transformer blocks"))
    num_heads: int = dataclasses.field(default=4, metadata=_help("query heads H"))
    num_kv_heads: int | None = dataclasses.field(
        default=None, metadata=_help("key/value heads (grouped-query attention); None = num_heads"))
    head_dim: int | None = dataclasses.field(default=None, metadata=_help("per-head width; None = D // H"))
    intermediate_size: int = dataclasses.field(default=256, metadata=_help("MLP hidden width"))
    hidden_act: str = dataclasses.field(default="silu", metadata=_help(f"MLP activation, one of {sorted(ACTIVATIONS)}"))
    norm_eps: float = dataclasses.field(default=1e-6, metadata=_help("epsilon of LayerNorm / RMSNorm"))
    rotary_pct: float = dataclasses.field(default=1.0, metadata=_help("fraction of each head that is rotated"))
    rope_theta: float = dataclasses.field(default=10000.0, metadata=_help("RoPE base"))
    parallel_residual: bool = dataclasses.field(
        default=False, metadata=_help("x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residuals"))
    qkv_bias: bool = dataclasses.field(default=True, metadata=_help("bias on the q/k/v projections"))
    out_bias: bool = dataclasses.field(default=False, metadata=_help("bias on the attention output projection"))
    mlp_bias: bool = dataclasses.field(default=False, metadata=_help("biases in the MLP"))
    tie_word_embeddings: bool = dataclasses.field(
        default=False, metadata=_help("the output head reuses the input embedding matrix"))
    max_position_embeddings: int = dataclasses.field(default=2048, metadata=_help("longest sequence (metadata)"))
    initializer_range: float = dataclasses.field(default=0.02, metadata=_help("std of the normal weight init"))
    bos_token_id: int | None = dataclasses.field(default=None, metadata=_help("metadata for save_pretrained"))
    eos_token_id: int | None = dataclasses.field(default=None, metadata=_help("metadata for save_pretrained"))
    pad_token_id: int | None = dataclasses.field(default=None, metadata=_help("metadata for save_pretrained"))
    remat: bool = dataclasses.field(default=False, metadata=_help("rematerialise each block (jax.checkpoint)"))

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise TransformerConfigError(f"TransformerConfig.arch={self.arch!r}: supported are {ARCHITECTURES}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TransformerConfigError(f"TransformerConfig.{name}={value!r} must be a positive int")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise TransformerConfigError(
                    f"TransformerConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise TransformerConfigError(
                f"TransformerConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise TransformerConfigError(f"TransformerConfig.hidden_act={self.hidden_act!r}: supported are {sorted(ACTIVATIONS)}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise TransformerConfigError(f"TransformerConfig.rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.rotary_dim % 2:
            raise TransformerConfigError(
                f"TransformerConfig: rotary dimension int(head_dim * rotary_pct) = {self.rotary_dim} must be even")
        if self.arch == "qwen2" and (self.parallel_residual or self.out_bias or self.mlp_bias):
            raise TransformerConfigError("TransformerConfig(arch='qwen2') has a sequential residual, no o_proj bias and no MLP "
                              "bias: set parallel_residual=out_bias=mlp_bias=False")

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that RoPE rotates (as HF: int(head_dim * pct))."""
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def tiny(cls, arch: str = "qwen2", vocab_size: int = 256, **overrides: Any) -> "TransformerConfig":
        """A CPU-sized preset of either architecture (D=64, 2 layers, 4 heads); fields overridable.

        ``tiny("gpt_neox")`` is a miniature Pythia (LayerNorm, parallel residual, 25 % rotary, exact
        GELU, untied embeddings); ``tiny("qwen2")`` a miniature Qwen1.5 (RMSNorm, SwiGLU, 2 kv heads
        for 4 query heads, tied embeddings).
        """
        if arch == "gpt_neox":
            base = dict(arch=arch, vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=256, hidden_act="gelu", norm_eps=1e-5, rotary_pct=0.25,
                        parallel_residual=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                        tie_word_embeddings=False)
        elif arch == "qwen2":
            base = dict(arch=arch, vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=176, hidden_act="silu", norm_eps=1e-6,
                        rotary_pct=1.0, parallel_residual=False, qkv_bias=True, out_bias=False,
                        mlp_bias=False, tie_word_embeddings=True)
        else:
            raise TransformerConfigError(f"TransformerConfig.tiny(arch={arch!r}): supported are {ARCHITECTURES}")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> "TransformerConfig":
        """Reads a Hugging Face ``config.json`` dict (transformers 4.x or 5.x field names).

        Raises:
          TransformerConfigError: for a ``model_type`` other than gpt_neox / qwen2, a missing field, or a
            feature this model does not implement (RoPE scaling, sliding-window attention).
        """
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise TransformerConfigError(f"config.json: model_type={model_type!r} is not supported; supported are {ARCHITECTURES}")
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope.setdefault("rope_type", legacy_scaling.get("rope_type", legacy_scaling.get("type")))
        if rope.get("rope_type", "default") != "default":
            raise TransformerConfigError(f"config.json: rope_type={rope['rope_type']!r} is not supported (only 'default')")

        def need(key: str) -> Any:
            if key not in hf:
                raise TransformerConfigError(f"config.json (model_type={model_type!r}): missing field {key!r}")
            return hf[key]

        common = dict(
            arch=model_type, vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            num_layers=need("num_hidden_layers"), num_heads=need("num_attention_heads"),
            intermediate_size=need("intermediate_size"), hidden_act=hf.get("hidden_act", "gelu"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=_single_id(hf.get("bos_token_id")), eos_token_id=_single_id(hf.get("eos_token_id")),
            pad_token_id=_single_id(hf.get("pad_token_id")),
        )
        if model_type == "gpt_neox":
            bias = bool(hf.get("attention_bias", True))
            fields = dict(
                common, norm_eps=hf.get("layer_norm_eps", 1e-5),
                rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                rope_theta=rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)),
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                qkv_bias=bias, out_bias=bias, mlp_bias=True,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        else:
            if hf.get("use_sliding_window", False):
                raise TransformerConfigError("config.json: use_sliding_window=true is not supported")
            fields = dict(
                common, hidden_act=hf.get("hidden_act", "silu"),
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"), norm_eps=hf.get("rms_norm_eps", 1e-6),
                rotary_pct=rope.get("partial_rotary_factor", 1.0),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                parallel_residual=False, qkv_bias=True, out_bias=False, mlp_bias=False,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (loadable by transformers 4.x and 5.x).

        Raises:
          TransformerConfigError: if this config has no Hugging Face equivalent (e.g. GPT-NeoX with a
            different bias on q/k/v than on the output projection).
        """
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            use_cache=True, torch_dtype="float32",
        )
        if self.arch == "gpt_neox":
            if self.head_dim * self.num_heads != self.hidden_size or self.num_kv_heads != self.num_heads:
                raise TransformerConfigError("GPT-NeoX in transformers needs head_dim * num_heads == hidden_size and no GQA")
            if not (self.qkv_bias == self.out_bias and self.mlp_bias):
                raise TransformerConfigError("GPT-NeoX in transformers has one attention_bias for q/k/v and dense and "
                                  "always has MLP biases")
            return dict(
                common, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox",
                layer_norm_eps=self.norm_eps, rotary_pct=self.rotary_pct, rotary_emb_base=self.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=self.rope_theta,
                                     partial_rotary_factor=self.rotary_pct),
                use_parallel_residual=self.parallel_residual, attention_bias=self.qkv_bias,
                attention_dropout=0.0, hidden_dropout=0.0,
            )
        if not self.qkv_bias or self.rotary_pct != 1.0 or self.head_dim * self.num_heads != self.hidden_size:
            raise TransformerConfigError("Qwen2 in transformers needs qkv_bias=True, rotary_pct=1 and head_dim * num_heads "
                              "== hidden_size")
        return dict(
            common, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
            num_key_value_heads=self.num_kv_heads, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
            rope_parameters=dict(rope_type="default", rope_theta=self.rope_theta),
            use_sliding_window=False, attention_dropout=0.0,
        )


def _single_id(value: Any) -> int | None:
    """HF allows a list of eos ids; we keep the first as metadata."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


# --------------------------------------------------------------------------------------------
# Rotary position embedding


def rotary_cos_sin(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """RoPE tables as in HF: ``cos, sin`` of shape (T, rotary_dim), the frequencies repeated twice.

    Args:
      positions: (T,) integer positions.
      rotary_dim: number of rotated channels (even).
      theta: the RoPE base.
    """
    # float32 throughout, as transformers computes its inv_freq: keeps parity under jax_enable_x64.
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / jnp.float32(rotary_dim)
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """(x1, x2) -> (-x2, x1) on the last axis (the "half" layout of GPT-NeoX and Llama, not interleaved)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first ``cos.shape[-1]`` channels of each head; the rest pass through.

    Args:
      x: (B, T, heads, head_dim).
      cos, sin: (T, rotary_dim) shared by every row, or (B, T, rotary_dim) per row (decoding,
        where each row sits at its own position).
    """
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([x_rot, x_pass], axis=-1)


def attention_mask_4d(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean (B, 1, T, T) mask: query t may see key s iff s <= t and key s is a real token."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    keys = attention_mask.astype(bool)[:, None, None, :]
    return causal[None, None] & keys


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    """Raises ``ValueError`` naming the first id outside ``[0, vocab_size)`` and where it is.

    Needs concrete values (a NumPy or committed JAX array, not a tracer): ``jnp.take`` inside the
    embedding would otherwise fill out-of-range rows with NaN without a word.
    """
    ids = np.asarray(jax.device_get(input_ids))
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"CausalLM: input_ids{list(where)} = {int(ids[where])} is outside the vocabulary "
                         f"[0, {vocab_size}) ({int(bad.sum())} such ids)")


# --------------------------------------------------------------------------------------------
# Dense layer


@jax.custom_jvp
def dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel``: (..., D_in) x (D_in, D_out) -> (..., D_out), the forward of a dense layer.

    The value is exactly ``jnp.dot(x, kernel)``; only the derivative is arranged differently.
    Reverse mode computes the weight gradient ``xᵀ · g`` (contracting the N = batch × time rows
    of ``x`` (N, D_in) and of the output cotangent ``g`` (N, D_out)). Left to itself XLA folds
    the transpose into the dot, whose left operand is then contracted on its *major* axis; XLA
    CPU hands such a dot to Eigen instead of its faster YNNPACK kernels (about 1.5x slower on
    the training shapes). Here the tangent rule materialises the transpose of the smaller of
    ``x`` and ``g`` instead, so every backward dot contracts the minor axis of its left operand.
    """
    return jnp.dot(x, kernel)


@dense_matmul.defjvp
def _dense_matmul_jvp(primals, tangents):
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = jnp.dot(x, kernel)
    # Forward mode (e.g. eNTK Jacobian-vector products) pays one transpose more; values are equal.
    rows = x.reshape(-1, x.shape[-1])
    barrier = jax.lax.optimization_barrier  # keeps XLA from folding a transpose into its dot
    if kernel.shape[0] <= kernel.shape[1]:
        # Transposed by autodiff into  dkernel = (x^T) g  with x^T materialised (D_in, N).
        kernel_term = jax.lax.dot_general(barrier(rows.T), kernel_dot, (((0,), (0,)), ((), ())))
    else:
        # (dkernel^T x^T)^T: transposed into  dkernel^T = (g^T) x  with g^T materialised (D_out, N).
        # The barrier on dkernel^T stops XLA from swapping the operands to drop that transpose.
        kernel_term = barrier(jax.lax.dot_general(barrier(kernel_dot.T), rows, (((1,), (1,)), ((), ())))).T
    return y, jnp.dot(x_dot, kernel) + kernel_term.reshape(y.shape)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters ``kernel`` (D_in, D_out) and ``bias``, same value) whose
    matmul is :func:`dense_matmul`, for a faster backward pass on XLA CPU."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = dense_matmul(inputs, kernel)
        return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# Modules


def _dense(config: TransformerConfig, n_in: int, n_out: int, use_bias: bool, *, rngs, dtype, param_dtype):
    return Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


def _norm(config: TransformerConfig, *, rngs, dtype, param_dtype) -> nnx.Module:
    if config.arch == "gpt_neox":
        # use_fast_variance=False: E[(x-mean)^2] as torch, not E[x^2]-mean^2.
        return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps, use_fast_variance=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.RMSNorm(config.hidden_size, epsilon=config.norm_eps, use_fast_variance=False,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with RoPE and grouped-query heads (query head h reads kv head h // G)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d, dh = config.hidden_size, config.head_dim
        self.q_proj = _dense(config, d, config.num_heads * dh, config.qkv_bias, **kw)
        self.k_proj = _dense(config, d, config.num_kv_heads * dh, config.qkv_bias, **kw)
        self.v_proj = _dense(config, d, config.num_kv_heads * dh, config.qkv_bias, **kw)
        self.o_proj = _dense(config, config.num_heads * dh, d, config.out_bias, **kw)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> q (B, T, H, head_dim) and k, v (B, T, kv_heads, head_dim), RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q (B, S, H, hd), k/v (B, L, kv_heads, hd), mask (B, 1, S, L) bool -> (B, S, D)."""
        b, s = q.shape[:2]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Query head h reads kv head h // G. Repeating k/v costs (B, L, H, head_dim) memory,
            # small beside the (B, H, S, L) scores, and keeps every attention dot 4-D: XLA CPU
            # ran the grouped 5-D einsums ~1.3x slower, forward and backward.
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (self.head_dim ** -0.5)
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))  # bf16 -> f32, f64 stays
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, D), cos/sin (T, rotary_dim), mask (B, 1, T, T) bool -> (B, T, D)."""
        return self.attend(*self.qkv(x, cos, sin), mask)


class DenseMLP(nnx.Module):
    """GPT-NeoX MLP: ``down(act(up(x)))``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = _dense(config, config.hidden_size, config.intermediate_size, config.mlp_bias, **kw)
        self.down_proj = _dense(config, config.intermediate_size, config.hidden_size, config.mlp_bias, **kw)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.hidden_act](self.up_proj(x)))


class GatedMLP(nnx.Module):
    """Qwen2 / Llama MLP (SwiGLU with silu): ``down(act(gate(x)) * up(x))`` (Shazeer 2020)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = _dense(config, config.hidden_size, config.intermediate_size, config.mlp_bias, **kw)
        self.up_proj = _dense(config, config.hidden_size, config.intermediate_size, config.mlp_bias, **kw)
        self.down_proj = _dense(config, config.intermediate_size, config.hidden_size, config.mlp_bias, **kw)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.hidden_act](self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm transformer block, sequential or parallel (GPT-J / GPT-NeoX) residual."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_norm = _norm(config, **kw)
        self.post_attention_norm = _norm(config, **kw)
        self.attn = Attention(config, **kw)
        self.mlp = DenseMLP(config, **kw) if config.arch == "gpt_neox" else GatedMLP(config, **kw)
        self.parallel_residual = config.parallel_residual

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        return self.forward(h, cos, sin, mask)[0]

    def forward(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache: KVCache | None = None,
                cursor: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """The block on h (B, S, D); also returns this layer's keys and values.

        Without ``cache``: k, v are those of the S positions. With ``cache`` (k, v), each
        (B, L, kv_heads, head_dim), and ``cursor`` (B,): S = 1, the new token's k, v are written
        at ``cache[b, cursor[b]]`` and attention runs over the whole cache (``mask`` (B, 1, 1, L)).
        """
        q, k, v = self.attn.qkv(self.input_norm(h), cos, sin)
        if cache is not None:
            if h.shape[1] != 1 or cursor is None:
                raise ValueError(f"Block.forward with a cache decodes one token per row with a cursor; got h of shape "
                                 f"{tuple(h.shape)}, cursor {'missing' if cursor is None else 'given'}")
            rows = jnp.arange(h.shape[0])
            k = cache[0].at[rows, cursor].set(k[:, 0])
            v = cache[1].at[rows, cursor].set(v[:, 0])
        attn_out = self.attn.attend(q, k, v, mask)
        if self.parallel_residual:
            return h + attn_out + self.mlp(self.post_attention_norm(h)), (k, v)
        h = h + attn_out
        return h + self.mlp(self.post_attention_norm(h)), (k, v)


class CausalLM(nnx.Module):
    """Decoder-only language model: ``model(input_ids, attention_mask=None) -> logits (B, T, V)``.

    Args:
      config: the architecture.
      rngs: initialisation randomness (normal(``initializer_range``) weights, zero biases, unit norms).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); attention softmax and logits are at least float32.
      param_dtype: storage dtype of the parameters.

    With ``config.tie_word_embeddings`` the output head is ``embed.embedding.T`` (one parameter)
    and ``lm_head`` is None.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
        self.layers = nnx.List([Block(config, **kw) for _ in range(config.num_layers)])
        self.final_norm = _norm(config, **kw)
        self.lm_head = (None if config.tie_word_embeddings
                        else _dense(config, config.hidden_size, config.vocab_size, False, **kw))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, T) int, attention_mask (B, T) of {0, 1} or None -> logits (B, T, V).

        Logits are float32 (float64 when the model computes in float64). Padded positions get
        finite logits that are meaningless; real positions never depend on them.

        Raises:
          ValueError: ``input_ids`` not an integer (B, T) array, a mask of another shape,
            ``T > config.max_position_embeddings``, or (only when ``input_ids`` is a concrete
            array, not a tracer) a token id outside ``[0, vocab_size)``. Under ``jit`` the ids
            are abstract and cannot be checked here; an out-of-range id would silently give
            NaN logits, so the data pipeline checks them (``ldjax.data.tokenize`` functions
            take ``vocab_size``).
        """
        return self._head(self.features(input_ids, attention_mask))

    def features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 input_embeddings: jax.Array | None = None) -> jax.Array:
        """The final-norm hidden states ``z`` (B, T, D), so that ``logits = z @ W.T`` with
        ``W = self.output_head()`` (no head bias in either architecture).

        Args:
          input_ids: (B, T) int, as for ``__call__`` (checked the same way).
          attention_mask: (B, T) or None.
          input_embeddings: optional (B, T, D) used instead of looking ``input_ids`` up in the
            embedding table (``ldjax.lm_kernel`` differentiates through the looked-up rows
            only); the ids then only set the shape and are checked.

        Returns:
          (B, T, D) in the compute dtype.
        """
        cos, sin, mask = self._rope_and_mask(input_ids, attention_mask)

        def run_block(block: Block, h: jax.Array) -> jax.Array:
            return block(h, cos, sin, mask)

        if self.config.remat:
            run_block = nnx.remat(run_block)
        h = self.embed(input_ids) if input_embeddings is None else input_embeddings
        for block in self.layers:
            h = run_block(block, h)
        return self.final_norm(h)

    def output_head(self) -> jax.Array:
        """The output head ``W`` (V, D): the embedding matrix when tied, else ``lm_head.kernel.T``."""
        if self.lm_head is None:
            return self.embed.embedding[...]
        return self.lm_head.kernel[...].T

    def prefill(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                logits_at: jax.Array | None = None) -> tuple[jax.Array, list[KVCache]]:
        """Like ``__call__``, and also returns every layer's (keys, values) for :meth:`decode`.

        Args:
          input_ids: (B, L) int: the prompts, right-padded to the buffer length L that decoding
            will fill (L = the longest prompt + the tokens to generate).
          attention_mask: (B, L), 1 on each prompt.
          logits_at: optional (B,) int: return only the logits at position ``logits_at[b]`` of
            row b, (B, V), instead of (B, L, V) (a large vocabulary makes the latter big).

        Returns:
          logits (B, L, V) or (B, V) and a list (one per layer) of (k, v), each
          (B, L, kv_heads, head_dim).
        """
        cos, sin, mask = self._rope_and_mask(input_ids, attention_mask)
        h, cache = self.embed(input_ids), []
        for block in self.layers:
            h, kv = block.forward(h, cos, sin, mask)
            cache.append(kv)
        if logits_at is not None:
            h = h[jnp.arange(h.shape[0]), logits_at]
        return self._logits(h), cache

    def decode(self, token_ids: jax.Array, cursor: jax.Array, cache: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        """One decoding step: token ``token_ids[b]`` at position ``cursor[b]`` of row b.

        Every position before ``cursor[b]`` must hold row b's real tokens in ``cache`` (from
        :meth:`prefill` or earlier steps): the new token attends to positions ``<= cursor[b]``.
        The logits equal those of ``__call__`` on the whole sequence at that position, up to
        float round-off (tested), at O(L) instead of O(L^2) cost per token.

        Args:
          token_ids: (B,) int.
          cursor: (B,) int, each < L (under jit an out-of-range cursor cannot be checked: its
            keys and values would be dropped and the logits wrong).
          cache: from :meth:`prefill` or the previous :meth:`decode`.

        Returns:
          next-token logits (B, V) and the cache with this token's keys and values written in.
        """
        length = cache[0][0].shape[1]
        cursor = cursor.astype(jnp.int32)
        cos, sin = rotary_cos_sin(cursor, self.config.rotary_dim, self.config.rope_theta)  # (B, rotary_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # (B, 1, rotary_dim): each row at its own position
        mask = (jnp.arange(length)[None, :] <= cursor[:, None])[:, None, None, :]  # (B, 1, 1, L)
        h, new_cache = self.embed(token_ids[:, None]), []
        for block, kv in zip(self.layers, cache):
            h, kv = block.forward(h, cos, sin, mask, cache=kv, cursor=cursor)
            new_cache.append(kv)
        return self._logits(h)[:, 0], new_cache

    def _logits(self, h: jax.Array) -> jax.Array:
        return self._head(self.final_norm(h))

    def _head(self, z: jax.Array) -> jax.Array:
        logits = self.embed.attend(z) if self.lm_head is None else self.lm_head(z)
        # float32 for float32/bfloat16 compute; float64 compute (exactness checks) keeps float64.
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def _rope_and_mask(self, input_ids: jax.Array,
                       attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Checks the inputs; RoPE tables (T, rotary_dim) for positions 0..T-1 and the (B, 1, T, T) mask."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CausalLM: input_ids must be an integer array (B, T), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"CausalLM: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CausalLM: sequence length T={input_ids.shape[1]} exceeds the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if not isinstance(input_ids, jax.core.Tracer):
            check_token_ids(input_ids, self.config.vocab_size)
        b, t = input_ids.shape
        cos, sin = rotary_cos_sin(jnp.arange(t), self.config.rotary_dim, self.config.rope_theta)
        return cos, sin, attention_mask_4d(attention_mask, b, t)
