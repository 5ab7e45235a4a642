"""The squeezing effect in linear softmax regression (SPEC §2; Ren & Sutherland 2025, Fig. 3/§3.3).

One fixed input x, logits ``z = Wᵀx``, one real gradient step on W. With one input the eNTK is
``‖x‖² I``, so the step is the closed form of :mod:`ldjax.squeeze` with ``α = η‖x‖²``. For each
panel we take the real step, check it against the closed form, and check whether the threshold
rule predicted exactly which classes rose; then we sweep the tendencies (claims 4–6).

Run: ``python -m experiments.squeeze_logreg --out out/squeeze_logreg``.
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

from ldjax import squeeze as sq  # noqa: E402
from ldjax.config import parse_config, to_dict  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Squeezing in linear softmax regression: five panels of SPEC §2 and the tendency sweeps."""
    out: str = dataclasses.field(default="out/squeeze_logreg", metadata={"help": "output directory"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})
    num_classes: int = dataclasses.field(default=50, metadata={"help": "V of the small panels"})
    dim: int = dataclasses.field(default=4, metadata={"help": "input dimension d of the small panels"})
    large_num_classes: int = dataclasses.field(default=1000, metadata={"help": "V of the large panel"})
    large_dim: int = dataclasses.field(default=50, metadata={"help": "d of the large panel"})
    alpha: float = dataclasses.field(default=4.0, metadata={"help": "step size α = η‖x‖² of the panels' update"})
    peaky_alpha: float = dataclasses.field(default=12.0, metadata={"help": "α of the GD step that makes the peaky start"})
    peaky_target: tuple[float, ...] = dataclasses.field(
        default=(0.5, 0.3, 0.2), metadata={"help": "multi-hot target weights of the peaky start"})
    neg_heavy_ratio: float = dataclasses.field(
        default=2.0, metadata={"help": "α⁻/α⁺ of the second DPO-like panel (rejected side stronger)"})
    sweep_samples: int = dataclasses.field(default=2000, metadata={"help": "random cases per sweep point"})
    sweep_alpha: float = dataclasses.field(default=5.0, metadata={"help": "α of the peakedness and label-rank sweeps"})


# --- initial weights ---------------------------------------------------------------------------------
def init_weights(kind: str, key: jax.Array, x: jax.Array, num_classes: int, config: Config) -> jax.Array:
    """W (d, V): "uniform" N(0,1), "flat" 1 + 0.05 N(0,1), "peaky" = flat + one GD step toward a multi-hot target."""
    d = x.shape[0]
    k_w, k_t = jax.random.split(key)
    if kind == "uniform":
        return jax.random.normal(k_w, (d, num_classes), jnp.float64)
    flat = 1.0 + 0.05 * jax.random.normal(k_w, (d, num_classes), jnp.float64)
    if kind == "flat":
        return flat
    if kind != "peaky":
        raise ValueError(f"Config: unknown initial distribution {kind!r}; expected uniform, flat or peaky")
    hot = jax.random.choice(k_t, num_classes, (len(config.peaky_target),), replace=False)
    target = jnp.zeros(num_classes, jnp.float64).at[hot].set(jnp.asarray(config.peaky_target))
    lr = config.peaky_alpha / jnp.sum(x * x)
    grad = jax.grad(lambda w: optax.softmax_cross_entropy(x @ w, target))(flat)
    return flat - lr * grad


def gradient_step(w: jax.Array, x: jax.Array, steps: list[tuple[int, float]]) -> jax.Array:
    """A real step on W: for each ``(label, c)``, learning rate ``η = |c|/‖x‖²`` on CE(xW, label),
    ascent when ``c > 0`` (push-down), descent when ``c < 0`` (SFT) — so that ``α = η‖x‖² = |c|``."""
    sq_norm = jnp.sum(x * x)

    def objective(w_):
        z = x @ w_
        return -sum(c / sq_norm * optax.softmax_cross_entropy_with_integer_labels(z, label) for label, c in steps)

    return w - jax.grad(objective)(w)


# --- one panel -------------------------------------------------------------------------------------------
def run_panel(name: str, description: str, init: str, num_classes: int, dim: int, key: jax.Array,
              choose_steps, config: Config) -> dict:
    k_x, k_w = jax.random.split(key)
    x = jax.random.normal(k_x, (dim,), jnp.float64)
    w = init_weights(init, k_w, x, num_classes, config)
    z = np.asarray(x @ w)
    p = sq.probabilities(z)
    steps = choose_steps(p)
    w_new = gradient_step(w, x, steps)
    z_new_real = np.asarray(x @ w_new)
    z_new_closed = z + sq.steps_logit_change(z, steps)
    p_new = sq.probabilities(z_new_real)
    rule = sq.claim_general_rule(z, steps)
    # the real float64 gradient step's risers, against the rule's prediction (ties at τ excluded)
    log_ratio_real = sq.log_probabilities(z_new_real) - sq.log_probabilities(z)
    real_risers = np.flatnonzero(log_ratio_real > 0)
    clear = np.setdiff1d(np.arange(num_classes), _ambiguous(z, steps))
    matches_real = bool(np.array_equal(np.intersect1d(real_risers, clear), rule.predicted_risers))
    others = np.setdiff1d(np.arange(num_classes), [l for l, _ in steps])
    star = int(others[np.argmax(p[others])])
    result = dict(
        name=name, description=description, init=init, num_classes=num_classes, dim=dim,
        steps=[dict(label=int(l), coefficient=float(c), kind="push-down" if c > 0 else "SFT") for l, c in steps],
        closed_form_vs_gradient_step=float(np.max(np.abs(z_new_real - z_new_closed))),
        n_risers=int(len(real_risers)), risers=real_risers.tolist(), predicted_risers=rule.predicted_risers.tolist(),
        n_ambiguous=rule.n_ambiguous, rule_holds_exact=rule.holds, rule_matches_gradient_step=matches_real,
        log_partition=rule.log_partition,
        argmax_other=star, argmax_prob_before=float(p[star]), argmax_prob_after=float(p_new[star]),
        argmax_gain=float(p_new[star] - p[star]),
        peak_prob_before=float(p.max()), peak_prob_after=float(p_new.max()),
        entropy_before=float(sq.entropy(z)), entropy_after=float(sq.entropy(z_new_real)),
        label_probs=[dict(label=int(l), before=float(p[l]), after=float(p_new[l])) for l, _ in steps],
    )
    neg = [(l, c) for l, c in steps if c > 0]
    if len(steps) == 1 and neg:  # the lemma's own form: threshold τ on π
        label, alpha = neg[0]
        lemma = sq.claim_threshold_rule(z, label, alpha)
        result.update(tau=lemma.tau, lemma_holds=lemma.holds,
                      claim1_label_falls=sq.claim_label_falls(z, label, alpha).holds,
                      claim2_argmax_rises=sq.claim_argmax_rises(z, label, alpha).holds)
    if len(steps) == 1 and not neg:
        label, c = steps[0]
        result.update(claim7_no_squeeze=sq.claim_positive_step_no_squeeze(z, label, -c).holds)
    if len(steps) == 2:  # DPO-like: threshold on π off both labels
        (pos, c_pos), (negl, c_neg) = steps
        combined = sq.claim_combined_rule(z, pos, negl, -c_pos, c_neg)
        result.update(tau=combined.tau, combined_rule_holds=combined.holds,
                      rule_text=_combined_rule_text(-c_pos, c_neg))
    result["_plot"] = (p, p_new, real_risers, [l for l, _ in steps])
    return result


def _ambiguous(z: np.ndarray, steps) -> np.ndarray:
    delta = sq.steps_logit_change(z, steps)
    return np.flatnonzero(np.abs(delta - sq.log_partition(z, delta)) <= sq.TIE_MARGIN)


def _combined_rule_text(alpha_pos: float, alpha_neg: float) -> str:
    if alpha_neg > alpha_pos:
        return "others rise iff π_i > τ = log Z / (α⁻ − α⁺) (squeeze threshold)"
    if alpha_neg < alpha_pos:
        return "others rise iff π_i < τ = log Z / (α⁻ − α⁺) (inverted: small classes gain)"
    return "α⁻ = α⁺: others all rise iff log Z < 0, else all fall by the same factor 1/Z (no threshold on π)"


def rank(p: np.ndarray, r: int) -> int:
    """Class at rank r of π (0 = largest; negative counts from the smallest)."""
    return int(np.argsort(-p, kind="stable")[r])


def panels(config: Config) -> list[tuple]:
    a, v, d = config.alpha, config.num_classes, config.dim
    heavy = config.neg_heavy_ratio
    return [
        ("positive", "SFT step on a mid-ranked class, uniform start", "uniform", v, d,
         lambda p: [(rank(p, 5), -a)]),
        ("negative_flat", "push-down on a random class of a flat π", "flat", v, d,
         lambda p: [(rank(p, v // 2), a)]),
        ("negative_peak", "push-down on the peak class (on-policy-like)", "peaky", v, d,
         lambda p: [(rank(p, 0), a)]),
        ("negative_valley", "push-down on the least likely class (off-policy-like)", "peaky", v, d,
         lambda p: [(rank(p, -1), a)]),
        ("dpo_like", "SFT on a mid class + push-down on a valley class, equal coefficients", "peaky", v, d,
         lambda p: [(rank(p, 10), -a), (rank(p, -1), a)]),
        ("dpo_like_neg_heavy", f"as dpo_like with α⁻ = {heavy:g} α⁺", "peaky", v, d,
         lambda p: [(rank(p, 10), -a / heavy), (rank(p, -1), a)]),
        ("large_negative_valley", f"V={config.large_num_classes}, d={config.large_dim}: push-down on a valley class", "peaky",
         config.large_num_classes, config.large_dim, lambda p: [(rank(p, -1), a)]),
    ]


# --- figures and report -------------------------------------------------------------------------------------
def plot_panels(results: list[dict], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(2, (len(results) + 1) // 2, figsize=(4.2 * ((len(results) + 1) // 2), 7.5))
    for ax, r in zip(axes.flat, results):
        p, p_new, risers, labels = r["_plot"]
        order = np.argsort(-p, kind="stable")
        xs = np.arange(len(p))
        ax.bar(xs, p[order], width=1.0, color="0.75", label="before")
        rose = np.isin(order, risers)
        ax.bar(xs, p_new[order], width=0.5, color=np.where(rose, "tab:red", "tab:blue"), label="after")
        for l in labels:
            ax.axvline(int(np.flatnonzero(order == l)[0]), color="k", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{r['name']}\nrisers {r['n_risers']}, rule exact: {r['rule_holds_exact']}", fontsize=9)
        ax.set_xlabel("class (sorted by π before)")
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("one update on W of linear softmax regression: π before (grey), after (red = rose, blue = fell)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tendencies(tendencies: list[sq.Tendency], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, len(tendencies), figsize=(5 * len(tendencies), 4))
    for ax, t in zip(axes, tendencies):
        ax.plot(t.x, t.frac_risers, "o-", label="fraction of others rising")
        ax.plot(t.x, t.argmax_share, "s-", label="y*'s share of gained mass")
        ax.plot(t.x, t.entropy_rise_rate, "^-", label="P(entropy rises)")
        ax.plot(t.x, t.all_others_rise_rate, "v-", label="P(all others rise)")
        ax.plot(t.x, t.peak_overtaken_rate, "x-", label="P(old peak overtaken)")
        ax.set_xscale("log")
        ax.set_xlabel(t.x_name)
        ax.set_title(t.name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_peak_grid(grid: sq.PeakPushdownGrid, path: pathlib.Path) -> None:
    """Claim 6 heatmaps: rows α, columns the pushed-down peak's probability."""
    panels = [("P(entropy rises)", grid.entropy_rise_rate), ("P(all others rise)", grid.all_others_rise_rate),
              ("P(old peak overtaken)", grid.peak_overtaken_rate)]
    labels = [f"{a:.1f}–{b:.1f}" for a, b in zip(grid.peak_edges[:-1], grid.peak_edges[1:])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    for ax, (title, rate) in zip(axes, panels):
        im = ax.imshow(rate, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(rate):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_yticks(range(len(grid.alphas)), [f"{a:g}" for a in grid.alphas])
        ax.set_xlabel("π of the pushed-down peak")
        ax.set_ylabel("α")
        ax.set_title(title)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], tendencies: list[sq.Tendency], all_exact: bool, path: pathlib.Path,
                 grid: sq.PeakPushdownGrid | None = None) -> None:
    lines = ["# Squeezing in linear softmax regression", "",
             "One fixed input, logits z = Wᵀx, one real gradient step on W (α = η‖x‖², float64). "
             "The rule: class i rises iff Δz_i > log Z, Z = Σ_j π_j e^{Δz_j} (for a single push-down "
             "this is the lemma's π_i > τ = log(Z)/α). 'exact' compares the rule's prediction with the "
             "step computed in high-precision decimal arithmetic; 'grad step' with the real float64 step on W.", "",
             "| panel | start | V | risers | predicted | rule exact | matches grad step | y* gain | entropy before→after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['init']} | {r['num_classes']} | {r['n_risers']} | {len(r['predicted_risers'])} "
                     f"| {r['rule_holds_exact']} | {r['rule_matches_gradient_step']} | {r['argmax_gain']:+.4f} "
                     f"| {r['entropy_before']:.3f}→{r['entropy_after']:.3f} |")
    lines += ["", f"**Threshold rule predicted the rising classes exactly in all panels: {all_exact}.**", ""]
    for r in results:
        if "rule_text" in r:
            lines.append(f"- {r['name']}: {r['rule_text']}; τ = {r['tau']:.4g}, log Z = {r['log_partition']:.4g}.")
    lines += ["", "## Tendencies (claims 4–6), means over random cases", ""]
    for t in tendencies:
        lines.append(f"**{t.name}** (x = {t.x_name}); Spearman of each mean with x: "
                     + ", ".join(f"{k} {v:+.2f}" for k, v in t.spearman.items()))
        lines.append("")
        lines.append("| x | frac risers | y* share | y* gain | P(entropy↑) | P(all others↑) | P(peak overtaken) |")
        lines.append("|---|---|---|---|---|---|---|")
        for i in range(len(t.x)):
            lines.append(f"| {t.x[i]:.4g} | {t.frac_risers[i]:.3f} | {t.argmax_share[i]:.3f} | {t.argmax_gain[i]:.4f} "
                         f"| {t.entropy_rise_rate[i]:.3f} | {t.all_others_rise_rate[i]:.3f} | {t.peak_overtaken_rate[i]:.3f} |")
        lines.append("")
    if grid is not None:
        labels = [f"{a:.1f}–{b:.1f}" for a, b in zip(grid.peak_edges[:-1], grid.peak_edges[1:])]
        lines += ["## Claim 6 by α and peak height", "",
                  "ȳ = the argmax, pushed down; logits s·N(0, 1) with s log-uniform in [0.25, 6]; cases per "
                  "peak-height bin: " + ", ".join(f"{l}: {c}" for l, c in zip(labels, grid.count)) + ". "
                  "Each cell: P(entropy rises) / P(all others rise) / P(old peak overtaken). 'All others rise' "
                  "holds exactly when log Z < α·min π_i; Z < 1 is the sufficient case "
                  "(rate of Z < 1 in `results.json`).", "",
                  "| α | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for i, alpha in enumerate(grid.alphas):
            cells = [f"{grid.entropy_rise_rate[i, j]:.2f} / {grid.all_others_rise_rate[i, j]:.2f} / "
                     f"{grid.peak_overtaken_rate[i, j]:.2f}" if grid.count[j] else "–" for j in range(len(labels))]
            lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Figures: `panels.png`, `tendencies.png`, `peak_pushdown_grid.png`; numbers: `results.json`."]
    path.write_text("\n".join(lines) + "\n")


def main(config: Config) -> dict:
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(config.seed), len(panels(config)))
        results = [run_panel(*spec[:5], key, spec[5], config)
                   for spec, key in tqdm(list(zip(panels(config), keys)), desc="panels")]
    tendencies = [
        sq.tendency_peakedness(seed=config.seed, num_classes=config.num_classes, alpha=config.sweep_alpha,
                               num_samples=config.sweep_samples),
        sq.tendency_label_rank(seed=config.seed, num_classes=config.num_classes, alpha=config.sweep_alpha,
                               num_samples=config.sweep_samples),
        sq.tendency_peak_pushdown(seed=config.seed, num_classes=config.num_classes, num_samples=config.sweep_samples),
    ]
    grid = sq.peak_pushdown_grid(seed=config.seed, num_classes=config.num_classes,
                                 num_samples=max(config.sweep_samples, 1000))
    all_exact = all(r["rule_holds_exact"] and r["rule_matches_gradient_step"] for r in results)
    plot_panels(results, out / "panels.png")
    plot_tendencies(tendencies, out / "tendencies.png")
    plot_peak_grid(grid, out / "peak_pushdown_grid.png")
    for r in results:
        r.pop("_plot")
    numbers = dict(config=to_dict(config), panels=results, all_panels_rule_exact=all_exact,
                   tendencies=[t.to_dict() for t in tendencies], peak_pushdown_grid=grid.to_dict())
    (out / "results.json").write_text(json.dumps(numbers, indent=2))
    write_report(results, tendencies, all_exact, out / "report.md", grid)
    print(f"threshold rule exact in all {len(results)} panels: {all_exact}  ->  {out}/report.md")
    return numbers


if __name__ == "__main__":
    main(parse_config(Config))
