"""Head vs body part of the LM eNTK across model variants, and whether that balance predicts DPO's squeeze.

SPEC §2 (last paragraph): for an output head without bias every V×V block of the eNTK is exactly
``K(c, c') = (z_c·z_c') I_V + W M(c, c') Wᵀ`` (+ the input-role cross terms when the head is tied
to the input embedding). The identity *head* part is the squeezing theorem's logit model: alone,
a negative step on a valley token sends the mass to the argmax. The *body* part competes with it.
SPEC measured, on one tiny model, a body diagonal ≈ 21× the head's and full-parameter DPO that
flattened instead of squeezing. This experiment asks how the balance moves with width, depth,
pretraining length and tying, and whether it predicts the squeeze.

For each model variant (``<head>_d<width>_L<layers>_<short|long>``; a GPT-NeoX-style tiny model
from the shared pipeline of :mod:`experiments.lm_pipeline`, pretrained on the embedded world for
``pretrain_short`` or ``pretrain_long`` steps, then SFT; ``tied`` rebuilds the same architecture
with the head tied to the input embedding) the SFT model — the DPO start — is loaded in float64 and
:func:`ldjax.ntk.lm_ntk` gives the exact factored kernel at ``positions`` contexts of the
*rejected* responses of ``prompts`` probe prompts (the contexts after the rejected response left
the chosen one, where off-policy DPO's negative gradient acts). Per context ``c``:

- ``tr K_head = V z·z``, ``tr K_body = tr(M WᵀW)``, ``tr K_cross`` (tied only);
- the identity share of ``K(c, c)``: ``‖(tr K / V) I‖²_F / ‖K‖²_F = (tr K)² / (V ‖K‖²_F)``, with
  ``‖K‖²_F`` from d-sized factors (no V×V block): for ``K = sI + U B Uᵀ`` (``U = [W, P_S]``,
  ``B = [[M, Cᵀ], [R, 0]]`` tied, ``U = W, B = M`` untied) ``‖K‖²_F = V s² + 2s tr(BQ) + tr(BQBᵀQ)``
  with ``Q = UᵀU``;
- the off-diagonal pair ratio ``|tr K(c, c')| / √(tr K(c, c) tr K(c', c'))`` over pairs of contexts
  of the same response, for the whole kernel and for the head and body parts alone;
- the head share of the predicted ``Δz = η K(c, c)(π − e_ȳ)`` of a one-token negative step on the
  rejected token ȳ: ``‖K_head g‖ / (‖K_head g‖ + ‖K_body g‖ + ‖K_cross g‖)``
  (:meth:`ldjax.lm_kernel.LMKernel.matvec` per part), and each part's first-order push on the
  argmax ``y* = argmax_{i≠ȳ} π_i`` (``[A K_part g]_{y*}``; the head part's is always > 0).

Then for ``dpo_variants`` a short full-parameter off-policy DPO runs from the SFT model (the
pipeline's DPO, tracked probes) and the squeeze is read off ``tracking.jsonl``: it **squeezes**
when the argmax path along chosen ``y*`` rises and the chosen response falls (end − start).
The control ``head_only_control`` trains only the untied head of one variant (the effective
kernel is then exactly the head part: head share 1). The table and scatter relate head share and
squeeze. ``kind="check"`` rows (float64): the factored ``K g`` equals autodiff's ``J Jᵀ g``;
on untied models the head part equals the head-only autodiff route and its trace is ``V z·z``;
the parts sum to the total. ``kind="paper"`` rows are measured tendencies.

Default: a CPU sub-grid (see :data:`DEFAULT_VARIANTS`, a few minutes on 2 cores, one seed);
``--full-grid true`` runs d ∈ {32, 64, 128} × layers ∈ {1, 2, 4} × {untied, tied} × {short, long}
(36 variants; DPO on all with ``--dpo-variants all``); ``--quick true`` is the test's smoke run.

Run: ``python -m experiments.kernel_balance --out results/kernel_balance``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.claims import Claim, claims_table, effect, write_claims  # noqa: E402
from experiments.lm_pipeline import (Pipeline, PipelineConfig, Stage, enable_compile_cache, head_only,  # noqa: E402
                                     read_curves, run_stage)
from ldjax.config import parse_config, to_dict  # noqa: E402

EXPERIMENT = "kernel_balance"
PARTS = ("head", "body", "cross")
DEFAULT_VARIANTS = ("untied_d32_L2_short", "untied_d64_L2_short", "untied_d128_L2_short", "tied_d64_L2_short",
                    "untied_d64_L2_long")
DEFAULT_DPO = ("untied_d32_L2_short", "untied_d128_L2_short", "tied_d64_L2_short", "untied_d64_L2_long")
VARIANT_RE = re.compile(r"^(tied|untied)_d(\d+)_L(\d+)_(short|long)$")
CHECK_TOL = 1e-8


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of the sweep: head tying, width, depth, pretraining length."""

    tied: bool
    width: int
    layers: int
    pretrain: str  # "short" | "long"

    @property
    def name(self) -> str:
        return f"{'tied' if self.tied else 'untied'}_d{self.width}_L{self.layers}_{self.pretrain}"

    @classmethod
    def parse(cls, name: str) -> "Variant":
        m = VARIANT_RE.match(name)
        if not m:
            raise ValueError(f"variant {name!r} is not <tied|untied>_d<width>_L<layers>_<short|long>")
        return cls(m.group(1) == "tied", int(m.group(2)), int(m.group(3)), m.group(4))


def full_grid() -> tuple[str, ...]:
    """Every variant of d ∈ {32, 64, 128} × layers ∈ {1, 2, 4} × {untied, tied} × {short, long}."""
    return tuple(Variant(t == "tied", d, L, p).name for t, d, L, p in
                 itertools.product(("untied", "tied"), (32, 64, 128), (1, 2, 4), ("short", "long")))


@dataclasses.dataclass(frozen=True)
class Config:
    """Head/body balance of K(c, c) and K(c, c') across model variants vs DPO's squeeze."""

    out: str = dataclasses.field(default="results/kernel_balance", metadata={"help": "output directory"})
    run_dir: str = dataclasses.field(default="runs/kernel_balance", metadata={"help": "pipeline cache (one sub-directory per variant)"})
    seeds: tuple[int, ...] = dataclasses.field(default=(0,), metadata={"help": "model seeds (3 for the documented full run)"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "seconds-long smoke run (tests)"})
    variants: tuple[str, ...] = dataclasses.field(default=DEFAULT_VARIANTS, metadata={"help": "variants <tied|untied>_d<width>_L<layers>_<short|long>"})
    full_grid: bool = dataclasses.field(default=False, metadata={"help": "the whole grid d∈{32,64,128} × L∈{1,2,4} × tied/untied × short/long (replaces --variants)"})
    dpo_variants: tuple[str, ...] = dataclasses.field(default=DEFAULT_DPO, metadata={"help": "variants that also get a short DPO ('all' = every variant)"})
    head_only_control: str = dataclasses.field(default="untied_d64_L2_short", metadata={"help": "untied variant that also gets head-only DPO ('' = none)"})
    pretrain_short: int = dataclasses.field(default=150, metadata={"help": "pretraining steps of 'short'"})
    pretrain_long: int = dataclasses.field(default=600, metadata={"help": "pretraining steps of 'long'"})
    sft_steps: int = dataclasses.field(default=60, metadata={"help": "SFT steps (the DPO start)"})
    sft_lr: float = dataclasses.field(default=3e-4, metadata={"help": "SFT Adam learning rate"})
    dpo_steps: int = dataclasses.field(default=40, metadata={"help": "DPO steps"})
    dpo_lr: float = dataclasses.field(default=5e-5, metadata={"help": "DPO Adam learning rate (head-only control: 20x)"})
    track_every: int = dataclasses.field(default=5, metadata={"help": "DPO probe tracking every k steps"})
    track_prompts: int = dataclasses.field(default=16, metadata={"help": "probe prompts of the DPO tracking"})
    prompts: int = dataclasses.field(default=4, metadata={"help": "probe prompts analysed per variant"})
    positions: int = dataclasses.field(default=6, metadata={"help": "rejected-response contexts per prompt"})
    num_heads: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    compile_cache: str = dataclasses.field(default="", metadata={"help": "JAX compilation cache dir (default run_dir/jax_cache; 'off' = none)"})

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("Config.seeds: at least one seed")
        for v in self.variants + tuple(d for d in self.dpo_variants if d != "all"):
            Variant.parse(v)
        if self.head_only_control and Variant.parse(self.head_only_control).tied:
            raise ValueError("Config.head_only_control must be an untied variant (a tied head is also the input table)")
        if self.prompts < 1 or self.positions < 2:
            raise ValueError("Config: prompts >= 1, positions >= 2 (pairs of contexts)")


QUICK = dict(variants=("untied_d32_L1_short", "tied_d32_L1_short"), dpo_variants=("untied_d32_L1_short",),
             head_only_control="", pretrain_short=20, sft_steps=8, dpo_steps=8, track_every=4, track_prompts=4,
             prompts=2, positions=3)


def effective(config: Config) -> Config:
    """The config actually run (quick settings, the full grid)."""
    if config.quick:
        config = dataclasses.replace(config, **QUICK)
    if config.full_grid:
        config = dataclasses.replace(config, variants=full_grid())
    if "all" in config.dpo_variants:
        config = dataclasses.replace(config, dpo_variants=config.variants)
    return config


# ------------------------------------------------------------------------------------ models

def pipeline_for(config: Config, variant: Variant) -> PipelineConfig:
    """The pipeline config of one variant (its own cache directory)."""
    world = dict(world_entities=12, world_train=24, world_test=8, world_pretrain=160, max_length=48,
                 max_prompt_length=16, pretrain_batch_size=8, batch_size=8) if config.quick else {}
    return PipelineConfig(run_dir=str(pathlib.Path(config.run_dir) / variant.name), arch="gpt_neox",
                          d_model=variant.width, num_layers=variant.layers, num_heads=config.num_heads,
                          pretrain_steps=config.pretrain_short if variant.pretrain == "short" else config.pretrain_long,
                          optimizer="adam", sft_steps=config.sft_steps, sft_lr=config.sft_lr, dpo_steps=config.dpo_steps,
                          dpo_lr=config.dpo_lr, track_every=config.track_every, track_prompts=config.track_prompts,
                          **world)


def _init_dir(pcfg: PipelineConfig, variant: Variant, seed: int, path: pathlib.Path) -> str:
    """A fresh tiny model of the pipeline's architecture with the head tied as asked, saved as a
    Hugging Face directory (the pipeline's ``tiny`` model has the architecture's default tying)."""
    from flax import nnx

    from ldjax import cli
    from ldjax.models.hf import save_pretrained
    from ldjax.models.transformer import CausalLM, TransformerConfig
    from ldjax.train.config import PretrainConfig
    if not (path / "config.json").exists():
        data = PretrainConfig(out=str(path), world_seed=pcfg.world_seed, world_entities=pcfg.world_entities,
                              world_train=pcfg.world_train, world_test=pcfg.world_test,
                              world_pretrain=pcfg.world_pretrain, max_length=pcfg.max_length,
                              max_prompt_length=pcfg.max_prompt_length)
        tokenizer = cli.load_examples(data)[3]
        tcfg = TransformerConfig.tiny(pcfg.arch, vocab_size=tokenizer.get_vocab_size(), hidden_size=pcfg.d_model,
                                      num_layers=pcfg.num_layers, num_heads=pcfg.num_heads,
                                      num_kv_heads=pcfg.num_heads, intermediate_size=4 * pcfg.d_model,
                                      tie_word_embeddings=variant.tied)
        save_pretrained(CausalLM(tcfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32), tokenizer, path)
    return str(path)


def base_stage(pipeline: Pipeline, variant: Variant, seed: int) -> Stage:
    """The pretrained base of a variant: the pipeline's own (untied GPT-NeoX) or, tied, the same
    pretraining job started from a tied initial model (cached like every stage)."""
    c = pipeline.config
    if not variant.tied:
        return pipeline.base(seed)
    from ldjax.train.config import PretrainConfig
    root = pipeline.root / f"seed{seed}"
    init = _init_dir(c, variant, seed, root / "init_tied")
    common = pipeline._common(seed, root / "base", init)  # the pipeline's own data/model fields
    job = PretrainConfig(**dict(common, optimizer="adamw", learning_rate=c.pretrain_lr, num_steps=c.pretrain_steps,
                                batch_size=c.pretrain_batch_size, log_every=max(1, c.pretrain_steps // 10)))
    return run_stage("pretrain", job, tag="tied-init")


# ------------------------------------------------------------------------------------ kernel analysis

def _stage_probes(stage: Stage, tokenizer, vocab: int):
    from ldjax import cli, probes
    from ldjax.train.config import SFTConfig
    job = SFTConfig(**json.loads((stage.out / "stage.json").read_text())["config"])
    return probes.tokenize_probes(cli.probe_texts(job), tokenizer, **cli._token_kwargs(job, tokenizer, vocab))


def contexts(probe_set, prompts: int, positions: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per probe prompt: ``(ids (T',), rows (P,), labels (P,))`` — the rejected response cut after its
    last used row, the logits rows ``t − 1`` of its first ``positions`` scored tokens after it left
    the chosen response (earlier ones if too few), and the rejected tokens ``ȳ = ids[t]``."""
    rej, cho = probe_set.arrays["rejected"], probe_set.arrays["chosen"]
    out = []
    for i in range(min(prompts, probe_set.num_prompts)):
        ids, mask, c_ids = rej["input_ids"][i], rej["loss_mask"][i], cho["input_ids"][i]
        scored = np.flatnonzero(mask)
        scored = scored[scored >= 1]
        diverged = scored[np.cumsum(ids[scored] != c_ids[scored]) > 0]
        ts = np.concatenate([diverged, scored[~np.isin(scored, diverged)]])[:positions]
        ts = np.sort(ts)
        if len(ts) < 2:
            continue
        out.append((ids[: ts.max() + 1].astype(np.int32), ts - 1, ids[ts].astype(np.int32)))
    return out


def _fro_terms(kern, p: int) -> dict[str, float]:
    """tr and ‖·‖²_F of the diagonal block K(c_p, c_p) and of its parts, from the factors."""
    w = np.asarray(kern.head, np.float64)
    v = w.shape[0]
    s = float(kern.head_identity[0, 0, p, p])
    m = np.asarray(kern.M[0, 0, p, p], np.float64)
    wtw = w.T @ w
    tr_body = float(np.trace(m @ wtw))
    fro_body = float(np.trace(m @ wtw @ m.T @ wtw))
    if kern.tied:
        tokens = np.asarray(kern.tokens)
        r = np.asarray(kern.row_term[0, 0, p, p], np.float64)
        c = np.asarray(kern.col_term[0, 0, p, p], np.float64)
        b = np.block([[m, c.T], [r, np.zeros((len(tokens), len(tokens)))]])
        w_s = w[tokens]
        q = np.block([[wtw, w_s.T], [w_s, (tokens[:, None] == tokens[None, :]).astype(np.float64)]])
    else:
        b, q = m, wtw
    tr_rest = float(np.trace(b @ q))
    fro_rest = float(np.trace(b @ q @ b.T @ q))
    trace = v * s + tr_rest
    fro = v * s * s + 2 * s * tr_rest + fro_rest
    return dict(s=s, trace=trace, fro=fro, tr_head=v * s, tr_body=tr_body, tr_cross=tr_rest - tr_body,
                identity_share=trace ** 2 / (v * fro),
                body_identity_share=tr_body ** 2 / (v * fro_body) if fro_body > 0 else 0.0)


def analyse_prompt(parts, ids: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every kernel statistic of one rejected response's contexts, and the exactness checks."""
    from ldjax.ntk import lm_ntk
    kern = lm_ntk(parts, ids[None], positions1=rows[None])
    f, params = parts.logits_function()
    x = {"input_ids": jnp.asarray(ids[None])}
    logits = np.asarray(f(params, {**x, "positions": jnp.asarray(rows[None])})[0], np.float64)  # (P, V)
    v = logits.shape[-1]
    n_pos = len(rows)
    traces = {part: np.asarray(kern.trace(part=part)[0, 0], np.float64) for part in ("all",) + PARTS}
    per_ctx, checks = [], dict(kg_rel_err=0.0, parts_sum_rel_err=0.0, head_rel_err=0.0, head_trace_rel_err=0.0)
    for p in range(n_pos):
        logp = logits[p] - np.logaddexp.reduce(logits[p])
        prob = np.exp(logp)
        g = prob - np.eye(v)[labels[p]]
        g_full = np.zeros((1, n_pos, v))
        g_full[0, p] = g
        kg = {part: np.asarray(kern.matvec(jnp.asarray(g_full), part=part)[0, p], np.float64)
              for part in ("all",) + PARTS}
        # independent route: autodiff J Jᵀ g at this context
        xp = {**x, "positions": jnp.asarray(rows[None, p:p + 1])}
        _, pull = jax.vjp(lambda th: f(th, xp)[0, 0], params)
        grad = pull(jnp.asarray(g))[0]
        auto = np.asarray(jax.jvp(lambda th: f(th, xp)[0, 0], (params,), (grad,))[1], np.float64)
        scale = np.abs(kg["all"]).max()
        checks["kg_rel_err"] = max(checks["kg_rel_err"], float(np.abs(auto - kg["all"]).max() / scale))
        checks["parts_sum_rel_err"] = max(checks["parts_sum_rel_err"], float(
            np.abs(kg["head"] + kg["body"] + kg["cross"] - kg["all"]).max() / scale),
            float(abs(traces["head"][p, p] + traces["body"][p, p] + traces["cross"][p, p] - traces["all"][p, p])
                  / abs(traces["all"][p, p])))
        fro = _fro_terms(kern, p)
        if not parts.tied:  # head-only autodiff route: only the head's gradient, pushed back through the head
            head_grad = jax.tree_util.tree_map(jnp.zeros_like, grad)
            head_grad["head"] = grad["head"]
            auto_h = np.asarray(jax.jvp(lambda th: f(th, xp)[0, 0], (params,), (head_grad,))[1], np.float64)
            checks["head_rel_err"] = max(checks["head_rel_err"], float(np.abs(auto_h - kg["head"]).max()
                                                                       / np.abs(kg["head"]).max()))
            z = np.asarray(kern.z1[0, p], np.float64)
            checks["head_trace_rel_err"] = max(checks["head_trace_rel_err"],
                                               abs(traces["head"][p, p] - v * float(z @ z)) / (v * float(z @ z)))
        norms = {part: float(np.linalg.norm(kg[part])) for part in PARTS}
        others = np.arange(v) != labels[p]
        star = int(np.argmax(np.where(others, prob, -1.0)))
        push = {part: float(kg[part][star] - prob @ kg[part]) for part in ("all",) + PARTS}  # [A K g]_{y*}
        per_ctx.append(dict(row=int(rows[p]), label=int(labels[p]), label_prob=float(prob[labels[p]]),
                            peak_prob=float(prob[others].max()), **fro,
                            body_head_trace_ratio=fro["tr_body"] / fro["tr_head"],
                            head_share=norms["head"] / sum(norms.values()), part_norms=norms, star_push=push,
                            star_gains=bool(push["all"] > 0), body_star_gains=bool(push["body"] > 0)))
    pairs = {part: [] for part in ("all", "head", "body")}
    for p in range(n_pos):
        for q in range(p + 1, n_pos):
            for part in pairs:
                t = traces[part]
                pairs[part].append(abs(t[p, q]) / np.sqrt(abs(t[p, p] * t[q, q])))
    return dict(contexts=per_ctx, pair_ratio={k: float(np.mean(v_)) for k, v_ in pairs.items()}, checks=checks)


def analyse_variant(stage: Stage, config: Config) -> dict[str, Any]:
    """Kernel statistics at the DPO start (the SFT model of ``stage``) in float64, summarised."""
    from ldjax.lm_kernel import causal_lm_parts
    from ldjax.models.hf import load_pretrained
    model, tokenizer = load_pretrained(stage.model_dir, dtype=jnp.float64, param_dtype=jnp.float64)
    parts = causal_lm_parts(model)
    probe_set = _stage_probes(stage, tokenizer, model.config.vocab_size)
    prompts = [analyse_prompt(parts, *c) for c in contexts(probe_set, config.prompts, config.positions)]
    ctx = [c for pr in prompts for c in pr["contexts"]]

    def mean(key):
        return float(np.mean([c[key] for c in ctx]))

    checks = {k: max(pr["checks"][k] for pr in prompts) for k in prompts[0]["checks"]}
    return dict(vocab=int(model.config.vocab_size), tied=bool(parts.tied), n_contexts=len(ctx),
                tr_head=mean("tr_head"), tr_body=mean("tr_body"), tr_cross=mean("tr_cross"), z_sq=mean("s"),
                body_head_trace_ratio=mean("body_head_trace_ratio"), identity_share=mean("identity_share"),
                body_identity_share=mean("body_identity_share"), head_share=mean("head_share"),
                star_gains=mean("star_gains"), body_star_gains=mean("body_star_gains"),
                star_push={p: float(np.mean([c["star_push"][p] for c in ctx])) for p in ("all",) + PARTS},
                label_prob=float(np.median([c["label_prob"] for c in ctx])),
                pair_ratio={k: float(np.mean([pr["pair_ratio"][k] for pr in prompts])) for k in ("all", "head", "body")},
                checks=checks, prompts=prompts)


# ------------------------------------------------------------------------------------ DPO

def squeeze_outcome(stage: Stage) -> dict[str, Any]:
    """End − start of the tracked probes of a DPO run; ``squeezes`` = y* (along chosen) rises and chosen falls."""
    c = read_curves(stage)
    d = {f: float(v[-1] - v[0]) for f, v in c["logps"].items()}
    out = dict(d_argmax_chosen=d["argmax_chosen"], d_chosen=d["chosen"], d_rejected=d["rejected"],
               d_argmax_rejected=d.get("argmax_rejected", float("nan")),
               d_a_norm=float(c["a_norm"][-1] - c["a_norm"][0]),
               squeezes=bool(d["argmax_chosen"] > 0 and d["chosen"] < 0), steps=c["steps"],
               curves={k: c["logps"][k] for k in ("chosen", "rejected", "argmax_chosen")})
    return out


# ------------------------------------------------------------------------------------ outputs

def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def claims(results: dict[str, dict], dpo: dict[str, dict], seeds: list[int]) -> list[Claim]:
    """Check rows (exactness) and paper rows (measured tendencies)."""
    rows: list[Claim] = []
    names = list(results)
    stats = {n: [results[n][s] for s in seeds] for n in names}

    def worst(key, only_untied=False):
        vals = [r["checks"][key] for n in names for r in stats[n] if not (only_untied and r["tied"])]
        return vals

    kg = worst("kg_rel_err")
    rows.append(Claim(EXPERIMENT, f"factored K(c,c)·g (lm_ntk matvec) equals autodiff J·Jᵀ·g at every context of every "
                                  f"variant (max relative error ≤ {CHECK_TOL:g}, float64)", "check",
                      bool(max(kg) <= CHECK_TOL), effect(kg, variants=names), tuple(seeds)))
    ps = worst("parts_sum_rel_err")
    rows.append(Claim(EXPERIMENT, "head + body + cross parts sum to the whole K (traces and K·g; max relative error)", "check",
                      bool(max(ps) <= CHECK_TOL), effect(ps), tuple(seeds)))
    hu = worst("head_rel_err", True) + worst("head_trace_rel_err", True)
    if hu:
        rows.append(Claim(EXPERIMENT, "untied head: the head part of K·g equals the head-only autodiff route and tr K_head "
                                      "= V z·z (max relative error)", "check", bool(max(hu) <= CHECK_TOL), effect(hu),
                          tuple(seeds)))
    ratio = [float(np.mean([r["body_head_trace_ratio"] for r in stats[n]])) for n in names]
    rows.append(Claim(EXPERIMENT, "full-parameter K(c,c) is dominated by its body part in every variant (tr K_body / "
                                  "tr K_head > 1; value: per variant)", "paper", bool(min(ratio) > 1),
                      effect(ratio, variants=names), tuple(seeds)))
    ident = [float(np.mean([r["identity_share"] for r in stats[n]])) for n in names]
    rows.append(Claim(EXPERIMENT, "K(c,c) is far from a multiple of the identity in every variant (identity share "
                                  "(tr K)²/(V‖K‖²_F) < 0.5; value: per variant)", "paper", bool(max(ident) < 0.5),
                      effect(ident, variants=names), tuple(seeds)))
    share = [float(np.mean([r["head_share"] for r in stats[n]])) for n in names]
    untied_l2_short = sorted([n for n in names if Variant.parse(n).layers == 2 and not Variant.parse(n).tied
                              and Variant.parse(n).pretrain == "short"], key=lambda n: Variant.parse(n).width)
    if len(untied_l2_short) >= 2:
        by_width = [float(np.mean([r["head_share"] for r in stats[n]])) for n in untied_l2_short]
        rows.append(Claim(EXPERIMENT, "the head share of a one-token negative step's Δz grows with width (untied, 2 layers, "
                                      "short pretraining; value: share per width)", "paper",
                          bool(all(b > a for a, b in zip(by_width, by_width[1:]))),
                          effect(by_width, widths=[Variant.parse(n).width for n in untied_l2_short]), tuple(seeds)))
    full = [k for k in dpo if not k.endswith("/head_only")]
    if full:
        sq_share = [float(np.mean([results[k.split("/")[0]][s]["head_share"] for s in seeds])) for k in full]
        squeezes = [all(dpo[k][s]["squeezes"] for s in seeds) for k in full]
        d_star = [float(np.mean([dpo[k][s]["d_argmax_chosen"] for s in seeds])) for k in full]
        rho = _spearman(sq_share, d_star)
        yes = [a for a, q in zip(sq_share, squeezes) if q]
        no = [a for a, q in zip(sq_share, squeezes) if not q]
        separated = bool(yes and no and min(yes) > max(no))
        rows.append(Claim(EXPERIMENT, "full-parameter DPO squeezes (y* rises, chosen falls) exactly in the variants with "
                                      "the larger head share (value: head share per DPO variant)", "paper", separated,
                          effect(sq_share, variants=full, squeezes=squeezes, d_argmax_chosen=d_star,
                                 spearman_head_share_vs_d_argmax=rho), tuple(seeds)))
    control = [k for k in dpo if k.endswith("/head_only")]
    for k in control:
        sq = [dpo[k][s]["squeezes"] for s in seeds]
        rows.append(Claim(EXPERIMENT, f"head-only DPO (identity-K control, {k.split('/')[0]}) squeezes: y* rises and "
                                      "chosen falls (value: Δ y*, nats)", "paper", bool(all(sq)),
                          effect([dpo[k][s]["d_argmax_chosen"] for s in seeds],
                                 d_chosen=effect([dpo[k][s]["d_chosen"] for s in seeds])), tuple(seeds)))
    return rows


def plot(results: dict, dpo: dict, seeds: list[int], path: pathlib.Path) -> None:
    """Left: head share vs Δ y* of DPO (marker: squeezes or not). Right: per-variant tr K parts and identity share."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    for i, k in enumerate(dpo):
        name = k.split("/")[0]
        share = 1.0 if k.endswith("/head_only") else np.mean([results[name][s]["head_share"] for s in seeds])
        for s in seeds:
            o = dpo[k][s]
            ax.scatter(share, o["d_argmax_chosen"], s=60, color=f"C{i % 10}", marker="o" if o["squeezes"] else "x",
                       label=f"{k} ({'squeezes' if o['squeezes'] else 'no squeeze'})" if s == seeds[0] else None)
            ax.scatter(share, o["d_chosen"], s=25, color=f"C{i % 10}", marker="v")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("head share of a one-token negative step's Δz at the DPO start")
    ax.set_ylabel("DPO end − start (nats): big = Δ y*, ▼ = Δ chosen")
    ax.set_title("does the head/body balance predict the squeeze?", fontsize=9)
    ax.legend(fontsize=6)
    ax = axes[1]
    names = list(results)
    x = np.arange(len(names))
    head = [np.mean([results[n][s]["tr_head"] for s in seeds]) for n in names]
    body = [np.mean([results[n][s]["tr_body"] for s in seeds]) for n in names]
    cross = [np.mean([results[n][s]["tr_cross"] for s in seeds]) for n in names]
    ax.bar(x - 0.25, head, 0.25, label="tr K_head = V z·z")
    ax.bar(x, body, 0.25, label="tr K_body")
    ax.bar(x + 0.25, np.abs(cross), 0.25, label="|tr K_cross| (tied)")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, fontsize=7, ha="right")
    ax2 = ax.twinx()
    ax2.plot(x, [np.mean([results[n][s]["identity_share"] for s in seeds]) for n in names], "k^-", label="identity share")
    ax2.plot(x, [np.mean([results[n][s]["head_share"] for s in seeds]) for n in names], "ks--", label="head share of Δz")
    ax2.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    ax.set_title("K(c,c) at rejected-response contexts (mean over contexts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config: Config, results: dict, dpo: dict, rows: list[Claim], seeds: list[int], wall: float,
           timings: dict) -> str:
    """report.md: setting, per-variant table, DPO outcomes, claims."""
    lines = [f"# Head vs body part of the LM eNTK, and DPO's squeeze ({'quick' if config.quick else 'cpu'})", "",
             f"Embedded world; GPT-NeoX-style tiny models (untied, or the same architecture with the head tied to the "
             f"input embedding), pretrained {config.pretrain_short} (short) / {config.pretrain_long} (long) AdamW steps, "
             f"then SFT (Adam {config.sft_lr}, {config.sft_steps} steps). Kernel: exact factored eNTK (float64) at "
             f"{config.positions} rejected-response contexts of {config.prompts} probe prompts of the SFT model. DPO: "
             f"sigmoid, full-parameter, Adam {config.dpo_lr}, {config.dpo_steps} steps from the SFT model (head-only "
             f"control: lr ×20). Seeds {seeds}. Wall time {wall:.0f} s.", "", "![balance](kernel_balance.png)", "",
             "## Per variant (mean over contexts, seed-averaged)", "",
             "| variant | V | ‖z‖² | tr K_head | tr K_body | tr K_cross | body/head | identity share | body's own "
             "identity share | pair ratio all / head / body | head share of Δz | y* gains (full K) | body pushes y* up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, per in results.items():
        r = {k: np.mean([per[s][k] for s in seeds]) for k in ("vocab", "z_sq", "tr_head", "tr_body", "tr_cross",
                                                               "body_head_trace_ratio", "identity_share",
                                                               "body_identity_share", "head_share", "star_gains",
                                                               "body_star_gains")}
        pr = {k: np.mean([per[s]["pair_ratio"][k] for s in seeds]) for k in ("all", "head", "body")}
        lines.append(f"| {n} | {r['vocab']:.0f} | {r['z_sq']:.3g} | {r['tr_head']:.3g} | {r['tr_body']:.3g} | "
                     f"{r['tr_cross']:.3g} | {r['body_head_trace_ratio']:.2f} | {r['identity_share']:.3f} | "
                     f"{r['body_identity_share']:.3f} | {pr['all']:.2f} / {pr['head']:.2f} / {pr['body']:.2f} | "
                     f"{r['head_share']:.3f} | {r['star_gains']:.2f} | {r['body_star_gains']:.2f} |")
    lines += ["", "Pair ratio: |tr K(c,c')| / √(tr K(c,c) tr K(c',c')) over pairs of contexts of one response. Head "
              "share: ‖K_head g‖ / Σ_parts ‖K_part g‖ with g = π − e_ȳ at the context's rejected token. 'y* gains': share "
              "of contexts where the first-order push [A K g] on y* = argmax_{i≠ȳ} π_i is positive (always, for the "
              "head part alone).", "", "## DPO from the SFT model (end − start of the tracked probe means)", "",
              "| run | head share | Δ y* (chosen) | Δ chosen | Δ rejected | Δ y* (rejected) | Δ‖A‖_F | squeezes |",
              "|---|---|---|---|---|---|---|---|"]
    for k, per in dpo.items():
        name = k.split("/")[0]
        share = 1.0 if k.endswith("/head_only") else np.mean([results[name][s]["head_share"] for s in seeds])
        for s in seeds:
            o = per[s]
            lines.append(f"| {k} (seed {s}) | {share:.3f} | {o['d_argmax_chosen']:+.2f} | {o['d_chosen']:+.2f} | "
                         f"{o['d_rejected']:+.2f} | {o['d_argmax_rejected']:+.2f} | {o['d_a_norm']:+.3f} | "
                         f"{'yes' if o['squeezes'] else 'no'} |")
    lines += ["", "## Claims", "", claims_table([r.to_json() for r in rows]), "",
              "## Timings (s)", "", "| variant | stage | seconds | reused |", "|---|---|---|---|"]
    lines += [f"| {n} | {st} | {sec:.0f} | {reused} |" for (n, st), (sec, reused) in timings.items()]
    failed = [r.claim for r in rows if r.kind == "paper" and not r.passed]
    lines += ["", "## Verdict", ""]
    lines += ([f"Not observed as stated (kept as measured): {'; '.join(failed)}."] if failed
              else ["Every measured tendency held on this grid."])
    return "\n".join(lines) + "\n"


def main(config: Config) -> dict[str, Any]:
    """Trains (or reuses) every variant, measures the kernel balance, runs the DPOs, writes all outputs."""
    start = time.perf_counter()
    config = effective(config)
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.compile_cache != "off":
        enable_compile_cache(config.compile_cache or pathlib.Path(config.run_dir) / "jax_cache")
    seeds = list(config.seeds)
    results: dict[str, dict] = {}
    dpo: dict[str, dict] = {}
    timings: dict = {}
    for name in config.variants:
        variant = Variant.parse(name)
        pcfg = pipeline_for(config, variant)
        # the SFT start needs no probe tracking; the DPO runs track every config.track_every steps
        pipeline = Pipeline(dataclasses.replace(pcfg, track_every=0))
        dpo_pipeline = Pipeline(pcfg)
        results[name] = {}
        for seed in seeds:
            base = base_stage(pipeline, variant, seed)
            sft = pipeline.sft(seed, base)
            timings[(name, f"base s{seed}")] = (base.seconds, base.reused)
            timings[(name, f"sft s{seed}")] = (sft.seconds, sft.reused)
            t0 = time.perf_counter()
            with jax.enable_x64(True):
                results[name][seed] = analyse_variant(sft, config)
            timings[(name, f"kernel s{seed}")] = (time.perf_counter() - t0, False)
            r = results[name][seed]
            print(f"[kernel_balance] {name} s{seed}: tr head {r['tr_head']:.3g} body {r['tr_body']:.3g} cross "
                  f"{r['tr_cross']:.3g}; identity share {r['identity_share']:.3f}; head share {r['head_share']:.3f}; "
                  f"checks {r['checks']}", file=sys.stderr)
            runs = [("full", None)] if name in config.dpo_variants else []
            if name == config.head_only_control:
                runs.append(("head_only", head_only))
            for kind, wrapper in runs:
                lr = config.dpo_lr * (20 if kind == "head_only" else 1)
                stage = dpo_pipeline.dpo(seed, sft, name=f"dpo_{kind}", tag=kind, optimizer_wrapper=wrapper,
                                         optimizer="adam", learning_rate=lr)
                timings[(name, f"dpo_{kind} s{seed}")] = (stage.seconds, stage.reused)
                o = squeeze_outcome(stage)
                dpo.setdefault(f"{name}/{kind}", {})[seed] = o
                print(f"[kernel_balance] {name} DPO {kind} s{seed}: Δy* {o['d_argmax_chosen']:+.2f}, Δchosen "
                      f"{o['d_chosen']:+.2f}, Δrejected {o['d_rejected']:+.2f} -> squeezes {o['squeezes']}",
                      file=sys.stderr)
    rows = claims(results, dpo, seeds)
    write_claims(out, rows)
    plot(results, dpo, seeds, out / "kernel_balance.png")
    wall = time.perf_counter() - start
    slim = {n: {s: {k: v for k, v in r.items() if k != "prompts"} for s, r in per.items()} for n, per in results.items()}
    saved = {"config": to_dict(config), "seeds": seeds, "variants": slim,
             "contexts": {n: {s: r["prompts"] for s, r in per.items()} for n, per in results.items()},
             "dpo": dpo, "claims": [r.to_json() for r in rows], "wall_s": wall,
             "timings": {f"{n}/{st}": sec for (n, st), (sec, _) in timings.items()}}
    (out / "results.json").write_text(json.dumps(saved, indent=1, default=str))
    (out / "report.md").write_text(report(config, results, dpo, rows, seeds, wall, timings))
    return saved


if __name__ == "__main__":
    main(parse_config(Config, prog="python -m experiments.kernel_balance"))
