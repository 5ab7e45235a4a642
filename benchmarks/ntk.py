"""Benchmark of the exact eNTK: ldjax's implementations against neural-tangents', and the
implicit A·K·G product against forming K.

    python benchmarks/ntk.py --out benchmarks/results

Three parts, all in float32, all jit-compiled, timed as the median of ``repeats`` runs after
compilation (``block_until_ready``), memory from XLA's compiled memory analysis
(temp + output bytes of the compiled computation):

1. ldjax's Jacobian contraction and NTK-vector products on the main environment's jax, over a
   sweep of model width (parameter count), output size V and batch N (full kernel, no traces).
2. The same sweep in the neural-tangents environment (``.venv-oracle``, jax 0.5.3) run as a
   subprocess (``--worker neural_tangents``): neural-tangents' JACOBIAN_CONTRACTION and
   NTK_VECTOR_PRODUCTS and ldjax's two implementations on the same jax, same functions, same
   inputs. The ratio ldjax-fastest / neural-tangents-fastest is reported per case.
3. The A·K·G change of log-probabilities on a causal-LM-like function with T×V outputs:
   ``kernel_vector_product`` (one VJP + one JVP) against building K with ``empirical_ntk`` and
   contracting it.

Writes ``ntk.json`` and ``ntk.md`` into ``--out``.
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
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ldjax import ntk, xla_cpu_fixes  # noqa: E402
from ldjax.config import parse_config  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import process_stats  # noqa: E402  (stdlib-only helpers shared with the other environments)


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = dataclasses.field(default="benchmarks/results",
                                 metadata={"help": "directory for ntk.json and ntk.md"})
    repeats: int = dataclasses.field(default=7, metadata={"help": "timed runs per measurement"})
    seed: int = dataclasses.field(default=0, metadata={"help": "PRNG seed for params and inputs"})
    oracle_python: str = dataclasses.field(
        default=".venv-oracle/bin/python",
        metadata={"help": "python of the neural-tangents environment ('' skips part 2)"})
    worker: str = dataclasses.field(
        default="", metadata={"help": "internal: 'neural_tangents' runs part 2 and prints JSON"})
    quick: bool = dataclasses.field(default=False,
                                    metadata={"help": "tiny sizes (a smoke test)"})


# --------------------------------------------------------------------------------------------
# The benchmarked functions (pure JAX, explicit params: they must run on jax 0.5.3 too).


def mlp_case(key, width: int, vocab: int, n: int, d_in: int = 32):
    """A 2-hidden-layer tanh MLP ``(N, d_in) -> (N, V)`` and inputs ``x1 (N,)``, ``x2 (N,)``."""
    k = jax.random.split(key, 5)
    params = {"l1": jax.random.normal(k[0], (d_in, width)) / d_in ** 0.5,
              "l2": jax.random.normal(k[1], (width, width)) / width ** 0.5,
              "out": jax.random.normal(k[2], (width, vocab)) / width ** 0.5}

    def f(p, x):
        h = jnp.tanh(x @ p["l1"])
        h = jnp.tanh(h @ p["l2"])
        return h @ p["out"]

    return f, params, jax.random.normal(k[3], (n, d_in)), jax.random.normal(k[4], (n, d_in))


def sweep_cases(quick: bool) -> list[dict]:
    if quick:
        return [{"width": 16, "vocab": 4, "n": 2}]
    base = {"width": 128, "vocab": 10, "n": 8}
    cases = [base,
             dict(base, width=32), dict(base, width=512),   # model size
             dict(base, vocab=2), dict(base, vocab=50),     # output size
             dict(base, n=2), dict(base, n=32)]             # batch
    return cases


def causal_lm(key, vocab: int, seq: int, d: int):
    """Embedding -> one causal self-attention block -> tanh MLP -> logits ``(N, T, V)``."""
    k = jax.random.split(key, 6)
    params = {"embed": jax.random.normal(k[0], (vocab, d)) * 0.5,
              "pos": jax.random.normal(k[1], (seq, d)) * 0.1,
              "qkv": jax.random.normal(k[2], (d, 3, d)) / d ** 0.5,
              "mlp": jax.random.normal(k[3], (d, d)) / d ** 0.5,
              "head": jax.random.normal(k[4], (d, vocab)) / d ** 0.5}

    def f(p, tokens):
        h = p["embed"][tokens] + p["pos"]
        q, kk, v = jnp.einsum("ntd,dce->cnte", h, p["qkv"])
        scores = jnp.einsum("nte,nse->nts", q, kk) / d ** 0.5
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        h = h + jnp.einsum("nts,nse->nte", jax.nn.softmax(jnp.where(causal, scores, -1e9)), v)
        h = h + jnp.tanh(h @ p["mlp"])
        return h @ p["head"]

    return f, params


# --------------------------------------------------------------------------------------------
# Measurement.


def measure(fn, *args, repeats: int) -> dict:
    """Median wall time of ``jax.jit(fn)(*args)`` after compilation, and XLA's memory estimate."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    memory = compiled.memory_analysis()
    peak = None if memory is None else int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
    return {"median_s": statistics.median(times), "compile_s": compile_s, "xla_bytes": peak}


def measure_interleaved(fns: dict, *args, repeats: int) -> dict:
    """Like :func:`measure` for several functions, with their timed runs interleaved so that a
    change of load on a shared machine hits all of them alike."""
    compiled, out = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        memory = compiled[name].memory_analysis()
        out[name] = {"compile_s": time.perf_counter() - t0, "times": [],
                     "xla_bytes": None if memory is None else
                     int(memory.temp_size_in_bytes + memory.output_size_in_bytes)}
        jax.block_until_ready(compiled[name](*args))
    for _ in range(repeats):
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            out[name]["times"].append(time.perf_counter() - t0)
    for r in out.values():
        r["median_s"] = statistics.median(r.pop("times"))
    return out


def _kernel_fns(f, include_nt: bool) -> dict:
    fns = {f"ldjax_{impl}": (lambda impl: lambda p, a, b: ntk.empirical_ntk(
        f, p, a, b, implementation=impl))(impl)
        for impl in ("jacobian_contraction", "ntk_vector_products")}
    if include_nt:
        nt = ntk._import_neural_tangents()
        for name, impl in (("nt_jacobian_contraction", nt.NtkImplementation.JACOBIAN_CONTRACTION),
                           ("nt_ntk_vector_products", nt.NtkImplementation.NTK_VECTOR_PRODUCTS)):
            kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)
            fns[name] = (lambda kernel_fn: lambda p, a, b: kernel_fn(a, b, p))(kernel_fn)
    return fns


def kernel_sweep(config: Config, include_nt: bool) -> list[dict]:
    rows = []
    for i, case in enumerate(sweep_cases(config.quick)):
        f, params, x1, x2 = mlp_case(jax.random.PRNGKey(config.seed + i), **case)
        n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
        row = dict(case, params=int(n_params), output=case["n"] * case["vocab"],
                   auto=ntk.estimate_costs(f, params, x1, x2)["choice"], results={})
        fns = _kernel_fns(f, include_nt)
        row["results"] = measure_interleaved(fns, params, x1, x2, repeats=config.repeats)
        reference = None
        for name, fn in fns.items():
            value = jax.jit(fn)(params, x1, x2)
            if reference is None:
                reference = value
            row["results"][name]["max_rel_diff"] = float(
                jnp.max(jnp.abs(value - reference)) / jnp.max(jnp.abs(reference)))
        rows.append(row)
        print(f"  kernel case {case}: " + ", ".join(
            f"{k} {v['median_s'] * 1e3:.2f} ms" for k, v in row["results"].items()),
            file=sys.stderr, flush=True)
    return rows


def akg_benchmark(config: Config) -> list[dict]:
    """Δ log π on the observed sequence for one update sequence: implicit vs forming K."""
    sizes = [{"vocab": 32, "seq": 8, "d": 16}] if config.quick else \
        [{"vocab": 128, "seq": 16, "d": 32}, {"vocab": 256, "seq": 16, "d": 32}]
    rows = []
    for i, s in enumerate(sizes):
        key = jax.random.split(jax.random.PRNGKey(config.seed + 100 + i), 3)
        f, params = causal_lm(key[0], **s)
        x_obs = jax.random.randint(key[1], (1, s["seq"]), 0, s["vocab"], jnp.int32)
        x_upd = jax.random.randint(key[2], (1, s["seq"]), 0, s["vocab"], jnp.int32)
        labels = jnp.roll(x_upd, -1, axis=1)
        lr = 1e-2

        def residual(p):
            probs = jax.nn.softmax(f(p, x_upd))
            return probs - jax.nn.one_hot(labels, s["vocab"], dtype=probs.dtype)  # G (1, T, V)

        def apply_a(p, dz):
            probs = jax.nn.softmax(f(p, x_obs))
            return dz - jnp.sum(probs * dz, axis=-1, keepdims=True)  # A·Δz per position

        def implicit(p):
            dz = -lr * ntk.kernel_vector_product(f, p, x_obs, x_upd, residual(p))
            return apply_a(p, dz)

        def explicit(p):
            kernel = ntk.empirical_ntk(f, p, x_obs, x_upd)  # (1, 1, T, T, V, V)
            dz = -lr * jnp.einsum("ijabcd,jbd->iac", kernel, residual(p))
            return apply_a(p, dz)

        n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(params)))
        row = dict(s, params=n_params, outputs=s["seq"] * s["vocab"],
                   kernel_entries=(s["seq"] * s["vocab"]) ** 2,
                   implicit=measure(implicit, params, repeats=config.repeats),
                   explicit=measure(explicit, params, repeats=max(3, config.repeats // 2)))
        a, b = jax.jit(implicit)(params), jax.jit(explicit)(params)
        row["max_rel_diff"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        row["speedup"] = row["explicit"]["median_s"] / row["implicit"]["median_s"]
        rows.append(row)
        print(f"  A·K·G {s}: implicit {row['implicit']['median_s'] * 1e3:.2f} ms, "
              f"forming K {row['explicit']['median_s'] * 1e3:.1f} ms, "
              f"speed-up {row['speedup']:.0f}x", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Report.


def machine() -> dict:
    return {"cpu": process_stats.cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend()}


def run_oracle_worker(config: Config) -> dict | None:
    python = ROOT / config.oracle_python if config.oracle_python else None
    if python is None or not python.exists():
        print(f"neural-tangents environment {python} missing: part 2 skipped", file=sys.stderr)
        return None
    result_path = pathlib.Path(config.out) / "ntk_oracle_worker.json"
    cmd = [str(python), str(pathlib.Path(__file__).resolve()), "--worker", "neural_tangents",
           "--out", str(result_path), "--repeats", str(config.repeats), "--seed", str(config.seed)]
    if config.quick:
        cmd += ["--quick", "true"]
    env = dict(xla_cpu_fixes.environ_without_flag(), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    subprocess.run(cmd, check=True, env=env)
    data = json.loads(result_path.read_text())
    result_path.unlink()
    return data


def _ms(r: dict) -> str:
    return f"{r['median_s'] * 1e3:.2f}"


def _mb(r: dict) -> str:
    return "–" if r["xla_bytes"] is None else f"{r['xla_bytes'] / 2**20:.1f}"


def write_report(results: dict, out: pathlib.Path) -> None:
    m = results["machine"]
    lines = ["# eNTK benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['backend']}; main env jax {m['jax']}"
             + (f", oracle env jax {results['oracle']['machine']['jax']}" if results["oracle"]
                else "") + ". float32, jit-compiled, median of "
             f"{results['config']['repeats']} interleaved runs after compilation; memory = XLA compiled "
             "temp + output bytes. Full kernels (no trace), MLP 32 → width → width → V.", ""]
    lines += ["## ldjax implementations (main env)", "",
              "| width | params | V | N | auto picks | Jacobian contraction ms (MiB) | "
              "NTK-vector products ms (MiB) |", "|---|---|---|---|---|---|---|"]
    for row in results["ldjax"]:
        jc, vp = row["results"]["ldjax_jacobian_contraction"], row["results"]["ldjax_ntk_vector_products"]
        lines.append(f"| {row['width']} | {row['params']} | {row['vocab']} | {row['n']} | "
                     f"{row['auto']} | {_ms(jc)} ({_mb(jc)}) | {_ms(vp)} ({_mb(vp)}) |")
    if results["oracle"]:
        lines += ["", f"## Side by side with neural-tangents (oracle env, jax "
                  f"{results['oracle']['machine']['jax']}, same functions and inputs)", "",
                  "| width | params | V | N | ldjax JC ms | ldjax VP ms | NT JC ms | NT VP ms | "
                  "ldjax MiB (JC/VP) | NT MiB (JC/VP) | ldjax fastest / NT fastest |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["oracle"]["rows"]:
            r = row["results"]
            lines.append(
                f"| {row['width']} | {row['params']} | {row['vocab']} | {row['n']} | "
                f"{_ms(r['ldjax_jacobian_contraction'])} | {_ms(r['ldjax_ntk_vector_products'])} | "
                f"{_ms(r['nt_jacobian_contraction'])} | {_ms(r['nt_ntk_vector_products'])} | "
                f"{_mb(r['ldjax_jacobian_contraction'])}/{_mb(r['ldjax_ntk_vector_products'])} | "
                f"{_mb(r['nt_jacobian_contraction'])}/{_mb(r['nt_ntk_vector_products'])} | "
                f"**{row['ratio_ldjax_over_nt']:.2f}** |")
        lines += ["", f"Largest ratio over the sweep: {results['summary']['max_ratio']:.2f} "
                  "(≤ 1 means ldjax's fastest is at least as fast). All kernels agree to "
                  f"{results['summary']['max_rel_diff']:.1e} relative (float32)."]
    lines += ["", "## Implicit A·K·G vs forming K (causal-LM-like function, one observed and one "
              "update sequence)", "",
              "| V | T | params | outputs T·V | K entries | implicit ms (MiB) | "
              "forming K ms (MiB) | speed-up | max rel diff |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["akg"]:
        lines.append(f"| {row['vocab']} | {row['seq']} | {row['params']} | {row['outputs']} | "
                     f"{row['kernel_entries']:.2e} | {_ms(row['implicit'])} "
                     f"({_mb(row['implicit'])}) | {_ms(row['explicit'])} ({_mb(row['explicit'])})"
                     f" | **{row['speedup']:.0f}×** | {row['max_rel_diff']:.1e} |")
    lines += ["", "## Language models: the factored eNTK", "",
              "The exact LM eNTK in factored form (`ldjax.ntk.lm_ntk`: `(z·z')I + W M Wᵀ`, tied cross "
              "terms) against these dense routes, per token pair and 16×16 position grid at "
              "V ∈ {4096, 32768, 50304}, d ∈ {128, 512, 768}, and the Pythia-160M-shaped check: "
              "[lm_ntk.md](lm_ntk.md) (`python benchmarks/lm_ntk.py`)."]
    out.joinpath("ntk.md").write_text("\n".join(lines) + "\n")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    if config.worker:
        # Worker (neural-tangents env): --out names the JSON file the parent reads back.
        if config.worker != "neural_tangents":
            raise ValueError(f"--worker must be 'neural_tangents', got {config.worker!r}")
        data = {"machine": machine(), "rows": kernel_sweep(config, include_nt=True)}
        out.write_text(json.dumps(data))
        return data
    out.mkdir(parents=True, exist_ok=True)

    print("part 1: ldjax implementations (main env)", file=sys.stderr)
    ldjax_rows = kernel_sweep(config, include_nt=False)
    print("part 2: side by side with neural-tangents (oracle env)", file=sys.stderr)
    oracle = run_oracle_worker(config)
    print("part 3: implicit A·K·G vs forming K", file=sys.stderr)
    akg = akg_benchmark(config)
    results = {"machine": machine(), "config": dataclasses.asdict(config),
               "ldjax": ldjax_rows, "oracle": oracle, "akg": akg, "summary": {}}
    if oracle:
        for row in oracle["rows"]:
            r = row["results"]
            ours = min(r[k]["median_s"] for k in r if k.startswith("ldjax_"))
            theirs = min(r[k]["median_s"] for k in r if k.startswith("nt_"))
            row["ratio_ldjax_over_nt"] = ours / theirs
        results["summary"]["max_ratio"] = max(r["ratio_ldjax_over_nt"] for r in oracle["rows"])
        results["summary"]["max_rel_diff"] = max(
            v["max_rel_diff"] for row in oracle["rows"] for v in row["results"].values())
    results["summary"]["min_akg_speedup"] = min(r["speedup"] for r in akg)
    out.joinpath("ntk.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    print(out.joinpath("ntk.md").read_text())
    return results


if __name__ == "__main__":
    main(parse_config(Config))
