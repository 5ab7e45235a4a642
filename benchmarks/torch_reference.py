"""Plain PyTorch reference of ldjax's ``CausalLM`` and of its SFT / DPO train steps.

This file is the *other side* of ``benchmarks/train.py``: it runs in a separate virtual
environment (``benchmarks/requirements-torch.txt``) so that ldjax's own environment stays free
of torch, and it never imports ldjax. It reads the model from the Hugging Face directory that
``ldjax.models.save_pretrained`` wrote (``config.json`` + ``model.safetensors``), so both sides
start from bit-identical weights, and the batch from an ``.npz`` file in the team's token
convention (``input_ids``/``attention_mask``/``loss_mask``, or the ``chosen_``/``rejected_``
keys plus ``ref_chosen_logps``/``ref_rejected_logps``).

The model is written from the architecture description, not copied: pre-norm blocks,
LayerNorm + exact GELU + parallel residual + partial rotary + fused q/k/v for GPT-NeoX
(Black et al. 2022), RMSNorm + SwiGLU + grouped-query attention + q/k/v bias for Qwen2;
rotary embeddings in the "rotate half" layout (Su et al. 2021). Module names follow the
Hugging Face checkpoint names, so ``load_state_dict(strict=True)`` checks every tensor.

Protocol: ``python torch_reference.py JOB.json`` prints one JSON line with the result
(per-step seconds and losses, peak RSS); see :func:`run_job` for the job fields.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import resource
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import process_stats  # noqa: E402  (stdlib-only helpers shared with the ldjax side)

# ---------------------------------------------------------------------------------------------
# Model


def _activation(name: str):
    if name == "gelu":
        return lambda x: F.gelu(x)  # the exact erf form, as ldjax's "gelu"
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"config.json: hidden_act={name!r} is not supported by the torch reference")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight`` (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(length: int, rotary_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, rotary_dim): frequencies repeated twice ("rotate half" layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim): rotates the first ``cos.shape[-1]`` channels of each head."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([x_rot, x_pass], dim=-1)


def attend(q, k, v, mask: torch.Tensor, sdpa: bool) -> torch.Tensor:
    """q (B,H,T,dh), k/v (B,Hkv,T,dh), mask (B,1,T,T) bool -> (B,T,H*dh)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
        out = scores.softmax(-1).to(v.dtype) @ v
    b, h, t, dh = out.shape
    return out.transpose(1, 2).reshape(b, t, h * dh)


class NeoXAttention(nn.Module):
    def __init__(self, cfg: dict, sdpa: bool):
        super().__init__()
        d, h = cfg["hidden_size"], cfg["num_attention_heads"]
        self.heads, self.head_dim, self.sdpa = h, d // h, sdpa
        bias = cfg.get("attention_bias", True)
        # Output rows laid out [heads, (q, k, v), head_dim], as in the checkpoint.
        self.query_key_value = nn.Linear(d, 3 * d, bias=bias)
        self.dense = nn.Linear(d, d, bias=bias)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.dense(attend(q, k, v, mask, self.sdpa))


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: dict, sdpa: bool):
        super().__init__()
        d, h = cfg["hidden_size"], cfg["num_attention_heads"]
        hkv = cfg.get("num_key_value_heads") or h
        dh = cfg.get("head_dim") or d // h
        self.heads, self.kv_heads, self.head_dim, self.sdpa = h, hkv, dh, sdpa
        self.q_proj = nn.Linear(d, h * dh, bias=True)
        self.k_proj = nn.Linear(d, hkv * dh, bias=True)
        self.v_proj = nn.Linear(d, hkv * dh, bias=True)
        self.o_proj = nn.Linear(h * dh, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend(q, k, v, mask, self.sdpa))


class NeoXMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.dense_4h_to_h = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.act = _activation(cfg["hidden_act"])

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, f = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act = _activation(cfg.get("hidden_act", "silu"))

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm block; GPT-NeoX may use the parallel residual ``x + attn(ln1 x) + mlp(ln2 x)``."""

    def __init__(self, cfg: dict, sdpa: bool):
        super().__init__()
        d = cfg["hidden_size"]
        if cfg["model_type"] == "gpt_neox":
            eps = cfg.get("layer_norm_eps", 1e-5)
            self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d, eps), nn.LayerNorm(d, eps)
            self.attention, self.mlp = NeoXAttention(cfg, sdpa), NeoXMLP(cfg)
            self.parallel = cfg.get("use_parallel_residual", True)
        else:
            eps = cfg.get("rms_norm_eps", 1e-6)
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
            self.self_attn, self.mlp = Qwen2Attention(cfg, sdpa), Qwen2MLP(cfg)
            self.parallel = False

    def forward(self, h, cos, sin, mask):
        attn = self.attention if hasattr(self, "attention") else self.self_attn
        a = attn(self.input_layernorm(h), cos, sin, mask)
        if self.parallel:
            return h + a + self.mlp(self.post_attention_layernorm(h))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    """Embedding, blocks, final norm; attribute names are the checkpoint's per architecture."""

    def __init__(self, cfg: dict, sdpa: bool):
        super().__init__()
        v, d = cfg["vocab_size"], cfg["hidden_size"]
        layers = nn.ModuleList([Layer(cfg, sdpa) for _ in range(cfg["num_hidden_layers"])])
        if cfg["model_type"] == "gpt_neox":
            self.embed_in, self.layers = nn.Embedding(v, d), layers
            self.final_layer_norm = nn.LayerNorm(d, cfg.get("layer_norm_eps", 1e-5))
        else:
            self.embed_tokens, self.layers = nn.Embedding(v, d), layers
            self.norm = RMSNorm(d, cfg.get("rms_norm_eps", 1e-6))

    @property
    def embedding(self) -> nn.Embedding:
        return self.embed_in if hasattr(self, "embed_in") else self.embed_tokens

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        cos, sin = rotary_tables(t, self.rotary_dim, self.theta, input_ids.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        h = self.embedding(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.final_layer_norm(h) if hasattr(self, "final_layer_norm") else self.norm(h)


class TorchCausalLM(nn.Module):
    """``model(input_ids (B,T) long, attention_mask (B,T)) -> logits (B,T,V)`` float32.

    Args:
      cfg: a Hugging Face ``config.json`` dict of ``model_type`` "gpt_neox" or "qwen2".
      sdpa: fused ``scaled_dot_product_attention`` (default) or the explicit softmax(QKᵀ)V.
    """

    def __init__(self, cfg: dict, sdpa: bool = True):
        super().__init__()
        kind = cfg.get("model_type")
        if kind not in ("gpt_neox", "qwen2"):
            raise ValueError(f"config.json: model_type={kind!r}; the torch reference covers gpt_neox and qwen2")
        h = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // h
        rope = cfg.get("rope_parameters") or {}
        if kind == "gpt_neox":
            pct = rope.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25))
            theta = rope.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))
            body = self.gpt_neox = Body(cfg, sdpa)
        else:
            pct = rope.get("partial_rotary_factor", 1.0)
            theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
            body = self.model = Body(cfg, sdpa)
        body.rotary_dim, body.theta = int(head_dim * pct), float(theta)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if not self.tied:
            head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
            if kind == "gpt_neox":
                self.embed_out = head
            else:
                self.lm_head = head

    @property
    def body(self) -> Body:
        return self.gpt_neox if hasattr(self, "gpt_neox") else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(input_ids, attention_mask)
        if self.tied:
            return F.linear(h, self.body.embedding.weight).float()
        head = self.embed_out if hasattr(self, "embed_out") else self.lm_head
        return head(h).float()


def load_model(model_dir: str | os.PathLike, *, sdpa: bool = True) -> TorchCausalLM:
    """The torch reference with the weights of a ldjax/HF checkpoint directory (strict names/shapes)."""
    from safetensors.torch import load_file

    directory = pathlib.Path(model_dir)
    cfg = json.loads((directory / "config.json").read_text())
    model = TorchCausalLM(cfg, sdpa=sdpa)
    tensors = load_file(str(directory / "model.safetensors"))
    if cfg["model_type"] == "gpt_neox" and "lm_head.weight" in tensors:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    if model.tied:  # transformers may write the tied head too; it is the embedding
        tensors.pop("lm_head.weight", None)
        tensors.pop("embed_out.weight", None)
    model.load_state_dict(tensors, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Losses: the same conventions as ldjax.losses (logits row t-1 predicts token t, position 0
# never scored, summed response log-probs, log-softmax in float32).


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """(B,T,V), (B,T), (B,T) -> (B,) summed log π of the scored tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token * loss_mask[:, 1:].float()).sum(-1)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over examples of −log π(y|x) (ldjax's ``sft_objective(reduction="sum")``)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return -sequence_logps(logits, batch["input_ids"], batch["loss_mask"]).mean()


def dpo_loss(model, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023) with precomputed reference log-probs; one forward on both sides."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logps = sequence_logps(model(ids, att), ids, mask)
    b = batch["chosen_input_ids"].shape[0]
    chosen, rejected = logps[:b], logps[b:]
    margin = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
    return -F.logsigmoid(beta * margin).mean()


# ---------------------------------------------------------------------------------------------
# The measured job


class HFWrapper(nn.Module):
    """transformers' own model behind the same call signature (a second reference)."""

    def __init__(self, model_dir: str):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.inner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Builds the model and the step described by ``job``, times it, returns the numbers.

    Job fields: ``model_dir``, ``batch_file`` (.npz), ``objective`` ("sft" | "dpo"),
    ``impl`` ("torch" | "hf"), ``threads`` (0 = torch's default), ``sdpa`` (bool),
    ``warmup``, ``steps``, ``learning_rate``, ``beta``, ``device`` ("cpu" | "cuda").
    """
    if job.get("threads", 0):
        torch.set_num_threads(int(job["threads"]))
    device = torch.device("cuda" if job.get("device") == "cuda" and torch.cuda.is_available() else "cpu")
    rss_start = process_stats.rss_bytes()
    if job.get("impl", "torch") == "hf":
        model = HFWrapper(job["model_dir"])
    else:
        model = load_model(job["model_dir"], sdpa=job.get("sdpa", True))
    model.to(device).train()
    arrays = dict(np.load(job["batch_file"]))
    batch = {k: torch.from_numpy(v).to(device).long() if v.dtype.kind in "iu" else torch.from_numpy(v).to(device)
             for k, v in arrays.items()}
    if job["objective"] == "sft":
        loss_of = lambda: sft_loss(model, batch)  # noqa: E731
    elif job["objective"] == "dpo":
        beta = float(job.get("beta", 0.1))
        loss_of = lambda: dpo_loss(model, batch, beta)  # noqa: E731
    else:
        raise ValueError(f"job objective={job['objective']!r}: expected 'sft' or 'dpo'")
    optimizer = torch.optim.Adam(model.parameters(), lr=float(job.get("learning_rate", 1e-4)), eps=1e-8)

    times, losses, cpu_start, faults_start = [], [], None, None
    for _ in range(int(job["warmup"]) + int(job["steps"])):
        if len(times) == int(job["warmup"]):
            cpu_start, faults_start = process_stats.cpu_seconds(), process_stats.minor_faults()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # .item() synchronises, as ldjax's float(loss) does
        times.append(time.perf_counter() - start)
    cpu_seconds = process_stats.cpu_seconds() - cpu_start  # all threads, over the timed steps only
    minor_faults = process_stats.minor_faults() - faults_start
    result = {
        "impl": job.get("impl", "torch"),
        "threads": torch.get_num_threads(),
        "step_seconds": times[int(job["warmup"]):],
        "warmup_seconds": times[:int(job["warmup"])],
        "losses": losses,
        "cpu_seconds": cpu_seconds,
        "minor_faults": minor_faults,
        "num_params": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_start_bytes": rss_start,
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
        "device": str(device),
    }
    if device.type == "cuda":
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        result["device_name"] = torch.cuda.get_device_name()
    return result


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python torch_reference.py JOB.json  (prints one JSON result line)")
    job = json.loads(pathlib.Path(argv[0]).read_text())
    print(json.dumps(run_job(job)))


if __name__ == "__main__":
    main(sys.argv[1:])
