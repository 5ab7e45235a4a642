"""Benchmark of the factored LM eNTK (``ldjax.lm_kernel``) against the dense exact routes.

    python benchmarks/lm_ntk.py --out benchmarks/results          # writes lm_ntk.json, lm_ntk.md

The model is a causal LM with a small body (``--layers`` pre-norm blocks of multi-head causal
attention + GELU MLP, final LayerNorm, untied head without bias), written in pure JAX so that
the same function runs in the neural-tangents environment (jax 0.5.3). float32, highest matmul
precision, T = 16 tokens per sequence. For each vocabulary V and width d:

- **token pair**: one V×V block between position 15 of one sequence and position 15 of another.
  Factored: ``lm_ntk(...).dense()`` (d VJPs + d JVPs of z, then ``(z·z')I + W M Wᵀ``). Dense:
  ``ldjax.ntk.empirical_ntk`` of the logits at that position, NTK-vector products over batches
  of output directions (``basis_batch_size``; the only dense route whose memory does not grow
  as V × P), and neural-tangents' two implementations in the oracle environment.
- **16×16 grid**: all 16 positions of one sequence against all 16 of another, traced over V (the
  untraced grid, 256 V² floats, is written out by neither route). Factored: ``lm_ntk`` +
  ``dense(trace_axes=(-1,))``. Dense: 16 V output directions.

Wall time is the median of ``--repeats`` runs after a warm-up (compilation excluded); memory is
the growth of the process's peak resident set over its post-set-up size, each size in its own
process, the factored routes (pair, then grid) before the dense one. A dense route whose estimated time exceeds
``--dense-budget-s`` is not run to the end: its time is extrapolated from timed batches of its
own output directions and marked "est.". neural-tangents vectorises over every output
direction (and its Jacobian contraction stores V × P Jacobians): where that needs more than
``--nt-memory-gib`` it is not run, and the table says how much it would need.

Part 2 (``--pythia true``): a random-weight Pythia-160M-shaped ``CausalLM`` (V=50304, d=768,
12 layers) written with ``save_pretrained`` and read back with ``load_pretrained``: the
factored ``matvec`` of one position pair against the implicit ``kernel_vector_product`` of the
logits (float32), the time of that pair's M, and the dense route's estimated time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import process_stats  # noqa: E402
from ldjax import lm_kernel, ntk, xla_cpu_fixes  # noqa: E402

SEQ = 16
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = dataclasses.field(default="benchmarks/results", metadata={"help": "directory for lm_ntk.json/.md"})
    vocabs: tuple[int, ...] = dataclasses.field(default=(4096, 32768, 50304), metadata={"help": "vocabulary sizes V"})
    widths: tuple[int, ...] = dataclasses.field(default=(128, 512, 768), metadata={"help": "model widths d"})
    layers: int = dataclasses.field(default=2, metadata={"help": "transformer blocks of the body"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed runs per measurement (median)"})
    dense_budget_s: float = dataclasses.field(
        default=60.0, metadata={"help": "dense routes estimated to take longer are extrapolated"})
    nt_memory_gib: float = dataclasses.field(
        default=8.0, metadata={"help": "neural-tangents runs only where its estimated memory is below"})
    grid_widths: tuple[int, ...] = dataclasses.field(
        default=(128,), metadata={"help": "widths at which the 16x16 position grid is measured"})
    side_by_side: tuple[int, int] = dataclasses.field(
        default=(1024, 128), metadata={"help": "an extra (V, d) small enough for neural-tangents"})
    pythia: bool = dataclasses.field(default=True, metadata={"help": "part 2: the Pythia-160M-shaped check"})
    oracle_python: str = dataclasses.field(default=".venv-oracle/bin/python",
                                           metadata={"help": "neural-tangents environment ('' skips it)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "PRNG seed"})
    worker: str = dataclasses.field(default="", metadata={"help": "internal: 'size' or 'nt' (one size, JSON out)"})
    nt_only: bool = dataclasses.field(
        default=False, metadata={"help": "rerun only the neural-tangents side into an existing lm_ntk.json"})
    vocab: int = dataclasses.field(default=0, metadata={"help": "internal: the worker's V"})
    width: int = dataclasses.field(default=0, metadata={"help": "internal: the worker's d"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "tiny sizes (a smoke test)"})


# --------------------------------------------------------------------------------------------
# The model: pure JAX, float32.


def _layer_norm(h, scale, shift):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * scale + shift


def body_fn(p, h, input_ids, attention_mask):
    """(N, T, d) input embeddings -> final-norm hidden states (N, T, d)."""
    n, t, d = h.shape
    heads = max(1, d // 64)
    causal = jnp.tril(jnp.ones((t, t), bool))
    h = h + p["pos"][:t]
    for layer in p["layers"]:
        x = _layer_norm(h, layer["ln1"], layer["ln1_b"])
        q, k, v = (jnp.einsum("ntd,de->nte", x, w).reshape(n, t, heads, d // heads)
                   for w in (layer["q"], layer["k"], layer["v"]))
        scores = jnp.einsum("nqhe,nkhe->nhqk", q, k) / jnp.sqrt(d // heads)
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        h = h + jnp.einsum("nhqk,nkhe->nqhe", weights, v).reshape(n, t, d) @ layer["o"]
        x = _layer_norm(h, layer["ln2"], layer["ln2_b"])
        h = h + jax.nn.gelu(x @ layer["up"]) @ layer["down"]
    return _layer_norm(h, p["lnf"], p["lnf_b"])


def make_parts(seed: int, vocab: int, d: int, layers: int) -> lm_kernel.LMParts:
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 8 * layers))
    normal = lambda shape, scale: scale * jax.random.normal(next(key), shape, jnp.float32)  # noqa: E731
    ones, zeros = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)
    body = {"pos": normal((SEQ, d), 0.02), "lnf": ones, "lnf_b": zeros, "layers": [
        {"ln1": ones, "ln1_b": zeros, "ln2": ones, "ln2_b": zeros,
         "q": normal((d, d), d ** -0.5), "k": normal((d, d), d ** -0.5), "v": normal((d, d), d ** -0.5),
         "o": normal((d, d), d ** -0.5), "up": normal((d, 4 * d), d ** -0.5),
         "down": normal((4 * d, d), (4 * d) ** -0.5)} for _ in range(layers)]}
    return lm_kernel.LMParts(body_fn=body_fn, body_params=body, embedding=normal((vocab, d), 0.02),
                             head=normal((vocab, d), d ** -0.5), tied=False)


def inputs(seed: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, vocab, (1, SEQ)), rng.integers(0, vocab, (1, SEQ))


def param_count(tree) -> int:
    return int(sum(a.size for a in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------------------------
# Measurement helpers.


def timed(fn, repeats: int) -> dict:
    """Warm-up call (compilation), then the median of ``repeats`` calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    # Long runs (tens of seconds) vary little relative to their length: one timed run each.
    for _ in range(repeats if first < 20 else 1):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "first_s": first, "estimated": False}


def peak_growth(baseline: int) -> int:
    return process_stats.peak_rss_bytes() - baseline


def per_direction_seconds(f, params, x1, x2, batch: int, repeats: int) -> float:
    """Seconds per output direction of the dense NTK-vector-product route: a batch of
    ``batch`` directions (one VJP on x2 and one JVP on x1 each, vectorised), timed."""
    out_shape = jax.eval_shape(f, params, x2).shape

    def kernel_rows(basis):
        pull = jax.vjp(lambda p: f(p, x2), params)[1]
        return jax.vmap(lambda e: jax.jvp(lambda p: f(p, x1), (params,), (pull(e)[0],))[1])(basis)

    basis = jnp.zeros((batch,) + out_shape, jnp.float32).reshape(batch, -1)
    basis = basis.at[jnp.arange(batch), jnp.arange(batch)].set(1.0).reshape((batch,) + out_shape)
    run = jax.jit(kernel_rows)
    return timed(lambda: run(basis), repeats)["median_s"] / batch


def dense_basis_batch(params_bytes: int, budget: int = 2 * GiB) -> int:
    return int(max(1, min(256, budget // max(1, params_bytes))))


# --------------------------------------------------------------------------------------------
# One size (run in its own process).


def _case(config: Config):
    """The model and inputs of one (V, d): ``(parts, f, params, ids1, ids2, param_bytes)``."""
    parts = make_parts(config.seed, config.vocab, config.width, config.layers)
    f, params = parts.logits_function()
    ids1, ids2 = inputs(config.seed, config.vocab)
    return parts, f, params, ids1, ids2, 4 * param_count(params)


def measure_size(config: Config) -> dict:
    vocab, d = config.vocab, config.width
    parts, f, params, ids1, ids2, p_bytes = _case(config)
    row = {"vocab": vocab, "d": d, "layers": config.layers, "params": param_count(params),
           "body_params": param_count(parts.body_params)}
    baseline = process_stats.rss_bytes()
    with jax.default_matmul_precision("highest"):
        # --- one token pair -------------------------------------------------------------
        pos = np.array([SEQ - 1])
        factored = lambda: lm_kernel.lm_ntk_from_parts(  # noqa: E731
            parts, ids1, ids2, positions1=pos, positions2=pos).dense()
        row["pair_factored"] = timed(factored, config.repeats)
        row["pair_factored"]["peak_bytes"] = peak_growth(baseline)
        # --- 16 x 16 grid, traced over V ----------------------------------------------------
        if d in config.grid_widths:
            grid = lambda: lm_kernel.lm_ntk_from_parts(parts, ids1, ids2).dense(trace_axes=(-1,))  # noqa: E731
            row["grid_factored"] = timed(grid, max(1, config.repeats // 2))
            row["grid_factored"]["peak_bytes"] = peak_growth(baseline)
            row["grid_untraced_bytes"] = SEQ * SEQ * vocab * vocab * 4
        block = np.asarray(factored())
        x1 = {"input_ids": jnp.asarray(ids1), "positions": jnp.asarray(pos[None])}
        x2 = {"input_ids": jnp.asarray(ids2), "positions": jnp.asarray(pos[None])}
        batch = dense_basis_batch(p_bytes)
        per_dir = per_direction_seconds(f, params, x1, x2, batch, config.repeats)
        estimate = per_dir * vocab
        row["pair_dense"] = {"basis_batch_size": batch, "per_direction_s": per_dir}
        if estimate <= config.dense_budget_s:
            dense = lambda: ntk.empirical_ntk(f, params, x1, x2, implementation="ntk_vector_products",  # noqa: E731
                                              basis_batch_size=batch)
            row["pair_dense"].update(timed(dense, max(1, config.repeats // 2)))
            row["pair_dense"]["peak_bytes"] = peak_growth(baseline)
            ref = np.asarray(dense())
            row["pair_max_rel_diff"] = float(np.max(np.abs(block - ref)) / np.max(np.abs(ref)))
        else:
            # One batch of parameter-sized gradients plus the V×V output it fills.
            row["pair_dense"].update({"median_s": estimate, "estimated": True,
                                      "peak_bytes_estimate": batch * p_bytes + vocab * vocab * 4})
        row["pair_block_bytes"] = vocab * vocab * 4
        del block
        if "grid_factored" in row:
            row["grid_dense"] = {"median_s": per_dir * vocab * SEQ, "estimated": True, "directions": vocab * SEQ}
    row["nt_bytes_estimate"] = {"ntk_vector_products": vocab * p_bytes,
                                "jacobian_contraction": 2 * vocab * p_bytes}
    return row


def measure_nt(config: Config) -> dict:
    """neural-tangents on one token pair (oracle env), where it fits."""
    vocab, d = config.vocab, config.width
    parts, f, params, ids1, ids2, p_bytes = _case(config)
    pos = np.array([[SEQ - 1]])
    x1 = {"input_ids": jnp.asarray(ids1), "positions": jnp.asarray(pos)}
    x2 = {"input_ids": jnp.asarray(ids2), "positions": jnp.asarray(pos)}
    nt = ntk._import_neural_tangents()
    out = {"vocab": vocab, "d": d}
    impls = {"jacobian_contraction": (nt.NtkImplementation.JACOBIAN_CONTRACTION, 2 * vocab * p_bytes),
             "ntk_vector_products": (nt.NtkImplementation.NTK_VECTOR_PRODUCTS, vocab * p_bytes)}
    baseline = process_stats.rss_bytes()
    parts_block = None
    for name, (impl, need) in sorted(impls.items(), key=lambda kv: kv[1][1]):
        if need > config.nt_memory_gib * GiB:
            out[name] = {"skipped": f"needs about {need / GiB:.0f} GiB"}
            continue
        fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl))
        with jax.default_matmul_precision("highest"):
            out[name] = timed(lambda: fn(x1, x2, params), max(1, config.repeats // 2))
            out[name]["peak_bytes"] = peak_growth(baseline)
            if parts_block is None:
                parts_block = np.asarray(lm_kernel.lm_ntk_from_parts(
                    parts, ids1, ids2, positions1=pos[0], positions2=pos[0]).dense())
            value = np.asarray(fn(x1, x2, params))
            out[name]["max_rel_diff_vs_factored"] = float(
                np.max(np.abs(value - parts_block)) / np.max(np.abs(parts_block)))
    return out


# --------------------------------------------------------------------------------------------
# Part 2: a Pythia-160M-shaped CausalLM.


def pythia_check(config: Config) -> dict:
    from flax import nnx

    from ldjax.models import CausalLM, TransformerConfig, load_pretrained, save_pretrained

    cfg = TransformerConfig(arch="gpt_neox", vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12,
                            intermediate_size=3072, hidden_act="gelu", norm_eps=1e-5, rotary_pct=0.25,
                            parallel_residual=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                            tie_word_embeddings=False, max_position_embeddings=2048)
    if config.quick:
        cfg = dataclasses.replace(cfg, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                                  intermediate_size=256)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(CausalLM(cfg, rngs=nnx.Rngs(config.seed)), None, tmp)
        model, _ = load_pretrained(tmp)
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(config.seed)
    ids1, ids2 = rng.integers(0, cfg.vocab_size, (1, SEQ)), rng.integers(0, cfg.vocab_size, (1, SEQ))
    pos = np.array([SEQ - 1])
    parts = lm_kernel.causal_lm_parts(model)
    baseline = process_stats.rss_bytes()
    with jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        kernel = jax.block_until_ready(lm_kernel.lm_ntk_from_parts(parts, ids1, ids2, positions1=pos, positions2=pos))
        m_seconds = time.perf_counter() - t0  # includes compilation: one pair is what a user computes
        m_peak = peak_growth(baseline)
        g = jnp.asarray(rng.normal(size=(1, 1, cfg.vocab_size)), jnp.float32)
        f, params = parts.logits_function()
        x1 = {"input_ids": jnp.asarray(ids1), "positions": jnp.asarray(pos[None])}
        x2 = {"input_ids": jnp.asarray(ids2), "positions": jnp.asarray(pos[None])}
        implicit = np.asarray(jax.jit(lambda p: ntk.kernel_vector_product(f, p, x1, x2, g))(params))
        factored = np.asarray(kernel.matvec(g))
        per_dir = per_direction_seconds(f, params, x1, x2, 4, 1)
    return {"vocab": cfg.vocab_size, "d": cfg.hidden_size, "layers": cfg.num_layers,
            "params": param_count(params), "setup_s": setup_s, "pair_M_seconds": m_seconds,
            "pair_M_peak_bytes": m_peak, "matvec_max_rel_diff": float(
                np.max(np.abs(factored - implicit)) / np.max(np.abs(implicit))),
            "dense_per_direction_s": per_dir, "dense_estimated_s": per_dir * cfg.vocab_size,
            "quick": config.quick}


# --------------------------------------------------------------------------------------------
# Driver and report.


def _worker(config: Config, kind: str, vocab: int, width: int, python: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        result = pathlib.Path(tmp) / "row.json"
        cmd = [python, str(pathlib.Path(__file__).resolve()), "--worker", kind, "--vocab", str(vocab),
               "--width", str(width), "--out", str(result), "--layers", str(config.layers),
               "--repeats", str(config.repeats), "--dense-budget-s", str(config.dense_budget_s),
               "--nt-memory-gib", str(config.nt_memory_gib),
               "--grid-widths", *map(str, config.grid_widths),
               "--seed", str(config.seed)]
        # The oracle environment's jaxlib 0.5.3 aborts on the flag ldjax adds for newer ones.
        env = dict(xla_cpu_fixes.environ_without_flag(), PYTHONPATH=str(ROOT),
                   JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        done = subprocess.run(cmd, env=env)
        if done.returncode:
            return {"vocab": vocab, "d": width, "error": f"worker exited with status {done.returncode}"}
        return json.loads(result.read_text())


def machine() -> dict:
    return {"cpu": process_stats.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "load_average": os.getloadavg()}


def _t(r: dict | None) -> str:
    if not r or "median_s" not in r:
        return (r or {}).get("skipped", "–")
    s = r["median_s"]
    text = f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 600 else f"{s / 60:.0f} min"
    return ("≈ " + text + " (est.)") if r.get("estimated") else text


def _m(r: dict | None) -> str:
    if not r:
        return "–"
    if "peak_bytes" in r:
        return f"{max(0, r['peak_bytes']) / 2**20:.0f}"
    if "peak_bytes_estimate" in r:
        return f"≈ {r['peak_bytes_estimate'] / 2**20:.0f} (est.)"
    return "–"


def write_report(results: dict, out: pathlib.Path) -> None:
    m = results["machine"]
    lines = ["# Factored LM eNTK vs dense exact routes", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}, jax {m['jax']} (load average "
             f"{m['load_average'][0]:.1f} at the start: other processes shared the cores). float32, "
             "highest matmul precision, T = 16, body of "
             f"{results['config']['layers']} transformer blocks, untied head. Median of "
             f"{results['config']['repeats']} runs after a warm-up; memory = growth of the peak RSS "
             "(MiB) over the process's post-set-up size, factored route measured first. "
             "“est.”: extrapolated from timed batches of the route's own output directions "
             f"(dense routes over {results['config']['dense_budget_s']:.0f} s). "
             "Regenerate: `python benchmarks/lm_ntk.py --out benchmarks/results`.", "",
             "## One token-pair V×V block", "",
             "| V | d | params | factored | MiB | ldjax dense (NTK-vector products, batched directions) | MiB "
             "| NT Jacobian contraction | NT NTK-vector products | factored / fastest dense | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["sizes"]:
        if "error" in row:
            lines.append(f"| {row['vocab']} | {row['d']} | – | {row['error']} |||||||")
            continue
        nt = results["nt"].get(f"{row['vocab']}x{row['d']}") or {}
        dense_times = [row["pair_dense"]["median_s"]] + [
            nt[k]["median_s"] for k in ("jacobian_contraction", "ntk_vector_products")
            if isinstance(nt.get(k), dict) and "median_s" in nt[k]]
        ratio = row["pair_factored"]["median_s"] / min(dense_times)
        diff = row.get("pair_max_rel_diff")
        lines.append(
            f"| {row['vocab']} | {row['d']} | {row['params'] / 1e6:.1f}M | {_t(row['pair_factored'])} | "
            f"{_m(row['pair_factored'])} | {_t(row['pair_dense'])} | {_m(row['pair_dense'])} | "
            f"{_t(nt.get('jacobian_contraction'))} | {_t(nt.get('ntk_vector_products'))} | "
            f"**{ratio:.3g}** | {'–' if diff is None else f'{diff:.1e}'} |")
    lines += ["", "neural-tangents vectorises over all V output directions at once (and its Jacobian "
              "contraction stores the V × P Jacobians of both sequences); “needs about N GiB” = that "
              f"estimate, above the {results['config']['nt_memory_gib']:.0f} GiB allowed here (24 GiB "
              "machine)."]
    if any("grid_factored" in r for r in results["sizes"]):
        lines += ["", "## 16×16 position grid, traced over V", "",
                  "| V | d | factored (M: 16·d VJPs + JVPs) | MiB | ldjax dense (16·V directions) | "
                  "factored / dense | untraced grid would hold |", "|---|---|---|---|---|---|---|"]
        for row in results["sizes"]:
            if "grid_factored" not in row:
                continue
            ratio = row["grid_factored"]["median_s"] / row["grid_dense"]["median_s"]
            lines.append(f"| {row['vocab']} | {row['d']} | {_t(row['grid_factored'])} | "
                         f"{_m(row['grid_factored'])} | {_t(row['grid_dense'])} | **{ratio:.2g}** | "
                         f"{row['grid_untraced_bytes'] / GiB:.0f} GiB |")
    p = results.get("pythia")
    if p:
        lines += ["", "## Pythia-160M-shaped model (random weights, save_pretrained → load_pretrained)", "",
                  f"V = {p['vocab']}, d = {p['d']}, {p['layers']} layers, {p['params'] / 1e6:.0f}M parameters"
                  + (" (QUICK: shrunken sizes)" if p["quick"] else "") + ". One position pair:", "",
                  f"- factored `matvec` vs implicit `kernel_vector_product` of the logits: max relative "
                  f"difference **{p['matvec_max_rel_diff']:.1e}** (float32)",
                  f"- that pair's M (768 VJPs + 768 JVPs of z, compilation included): "
                  f"**{p['pair_M_seconds']:.0f} s**, peak RSS growth {p['pair_M_peak_bytes'] / GiB:.1f} GiB",
                  f"- dense route (V = {p['vocab']} VJP + JVP pairs of the logits): "
                  f"≈ {p['dense_estimated_s'] / 3600:.1f} h (est., {p['dense_per_direction_s'] * 1e3:.0f} ms "
                  "per direction)"]
    out.joinpath("lm_ntk.md").write_text("\n".join(lines) + "\n")


def main(config: Config) -> dict:
    if config.worker:
        data = measure_size(config) if config.worker == "size" else measure_nt(config)
        pathlib.Path(config.out).write_text(json.dumps(data))
        return data
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.quick:
        sizes = [(512, 32), (2048, 32), (2048, 64)]
    else:
        grid = [(v, w) for w in config.widths for v in config.vocabs]
        # The must-show size (V=32768, d=128) first, then neural-tangents' side-by-side size.
        first = [size for size in ((32768, 128), tuple(config.side_by_side)) if size in grid or size == tuple(config.side_by_side)]
        sizes = first + [size for size in grid if size not in first]
    oracle = ROOT / config.oracle_python if config.oracle_python else None
    if config.nt_only:
        results = json.loads(out.joinpath("lm_ntk.json").read_text())
        for row in results["sizes"]:
            print(f"V={row['vocab']} d={row['d']}: neural-tangents", file=sys.stderr, flush=True)
            results["nt"][f"{row['vocab']}x{row['d']}"] = _worker(config, "nt", row["vocab"], row["d"], str(oracle))
        out.joinpath("lm_ntk.json").write_text(json.dumps(results, indent=2))
        write_report(results, out)
        print(out.joinpath("lm_ntk.md").read_text())
        return results
    results = {"machine": machine(), "config": dataclasses.asdict(config), "sizes": [], "nt": {}}
    for vocab, width in sizes:
        print(f"V={vocab} d={width}: ldjax", file=sys.stderr, flush=True)
        results["sizes"].append(_worker(config, "size", vocab, width, sys.executable))
        if oracle is not None and oracle.exists():
            print(f"V={vocab} d={width}: neural-tangents", file=sys.stderr, flush=True)
            results["nt"][f"{vocab}x{width}"] = _worker(config, "nt", vocab, width, str(oracle))
        out.joinpath("lm_ntk.json").write_text(json.dumps(results, indent=2))
        write_report(results, out)  # partial tables as sizes finish
    if config.pythia:
        print("Pythia-160M-shaped check", file=sys.stderr, flush=True)
        results["pythia"] = pythia_check(config)
    out.joinpath("lm_ntk.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    print(out.joinpath("lm_ntk.md").read_text())
    return results


if __name__ == "__main__":
    from ldjax.config import parse_config

    main(parse_config(Config))
