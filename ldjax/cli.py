"""``ldjax pretrain | sft | dpo``: train a causal LM on the embedded world or on a JSONL file.

Each subcommand parses its dataclass (:mod:`ldjax.train.config`) from flags and an optional
``--config file.json`` and writes into ``--out``: ``config.json``, ``metrics.jsonl``,
``checkpoints/`` (resumed automatically when present) and ``model/`` (a Hugging Face
directory that ``--model`` of the next job, or :func:`ldjax.models.load_pretrained`, reads).
``sft`` and ``dpo`` with ``--track-every k`` also write ``tracking.jsonl`` (the probe families
of SPEC §3 scored every k steps, :mod:`ldjax.tracking`) and ``probes.json`` (their texts).
``ldjax reproduce`` runs the paper's experiments (:func:`experiments.reproduce.cli_main`).

A bad input (a flag, a data file, the model directory, a checkpoint of another run, a missing
data package) ends with one line on stderr, ``ldjax <command>: error: <what> — <what to do>``,
and exit status 2, before anything in ``--out`` is touched; a run that fails (a NaN loss) ends
with one such line and status 1, keeping its last good checkpoint. ``--debug`` anywhere shows
the full traceback instead. An unexpected exception is a bug: its traceback is printed, then
an ``internal error`` line (status 1). See :func:`main`.

    ldjax pretrain --out runs/base --num-steps 2000
    ldjax sft --model runs/base/model --out runs/sft --num-steps 400 --track-every 20
    ldjax dpo --model runs/sft/model --out runs/dpo --loss-type ipo --beta 0.1
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldjax.config import parse_config, to_dict
from ldjax.train import objectives, optim, sampling, sharding, steps
from ldjax.train.checkpoint import CheckpointError, RunCheckpointer, file_digest
from ldjax.train.config import (ConfigError, DataConfig, DPOConfig, ModelConfig, PretrainConfig, SFTConfig,
                                resume_signature)
from ldjax.train.loop import train

COMMANDS = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}
TRACKING_FILE = "tracking.jsonl"  # ldjax.tracking.TRACKING_FILE (not imported here: it pulls the world and probes)


# ------------------------------------------------------------------------------- data

WORLD_FLAGS = {"seed": "--world-seed", "num_entities": "--world-entities", "num_train": "--world-train",
               "num_test": "--world-test", "num_pretrain_answers": "--world-pretrain", "rejected_style": "--world-rejected-style"}


def _world(config: DataConfig):
    """The embedded world of the ``--world-*`` flags.

    Raises:
      ConfigError: the flags describe no valid world (names the flags).
    """
    try:
        return _build_world(config)
    except ValueError as e:
        message = str(e)
        for name, world_flag in WORLD_FLAGS.items():
            message = re.sub(rf"(?<![\w.-]){name}\b", world_flag, message)
        raise ConfigError(f"embedded world: {message} — change the --world-* flags (see --help)") from e


def _build_world(config: DataConfig):
    from ldjax.data.world import WorldConfig, shared_world
    # The probes come from their own random stream: their number never changes the pairs or
    # the pretraining texts.
    return shared_world(WorldConfig(
        seed=config.world_seed, num_entities=config.world_entities, num_train=config.world_train,
        num_test=config.world_test, num_probe=min(getattr(config, "track_prompts", 32), config.world_train),
        num_pretrain_answers=config.world_pretrain, num_pretrain_narrative=max(1, config.world_pretrain // 4),
        rejected_style=getattr(config, "world_rejected_style", "rare_slots")))


def _split(items: list) -> tuple[list, list]:
    """``(train, test)`` of a data file: the last 10 % held out (the first item when under 10)."""
    n_test = len(items) // 10
    if not n_test:
        return items, items[:1]
    return items[: len(items) - n_test], items[len(items) - n_test:]


def load_examples(config: DataConfig, tokenizer=None):
    """``(train, test, pretrain_texts, tokenizer)`` from ``--data`` or the embedded world.

    With ``--data`` and no tokenizer (a tiny model from scratch), a word-level tokenizer over
    the file's words (those of the optional probe fields of :mod:`ldjax.probes` included) is
    built; the test split is the last 10 % of the file (its first record when it has under 10,
    which is then not held out).
    """
    if not config.data:
        world = _world(config)
        return world.train, world.test, world.pretrain_texts, tokenizer or world.tokenizer
    from ldjax.probes import read_probe_records
    records = read_probe_records(config.data, config.data_format)
    examples = [r.example for r in records]
    if tokenizer is None:
        from ldjax.data.world import build_tokenizer
        words = {w for e in examples for text in (e.prompt, e.chosen, e.rejected) for w in text.split()}
        words |= {w for r in records for text in r.extras.values() for w in text.split()}
        tokenizer = build_tokenizer(sorted(words))
    train_set, test_set = _split(examples)
    texts = [f"{e.prompt} {e.chosen}" for e in train_set]
    return train_set, test_set, texts, tokenizer


TRACK_SEED = 0  # probe prompts of --data files: the same for every run on the same file


def probe_texts(config):
    """The probe families of a run's training data (:mod:`ldjax.probes`): the embedded world's
    probes, or those of ``--data`` (``--track-prompts`` seeded training records, held-out
    records for ``other_test`` / ``random_sentence``).
    """
    from ldjax import probes
    if not config.data:
        return probes.probe_texts_from_world(_world(config), min(config.track_prompts, config.world_train))
    records = probes.read_probe_records(config.data, config.data_format)
    train_records, test_records = _split(records)
    return probes.probe_texts_from_records(train_records, test_records, seed=TRACK_SEED, origin=str(config.data),
                                           num_prompts=min(config.track_prompts, len(train_records)))


# A BOS is optional (without one the prompt's first token starts the sequence), so unlike EOS
# and PAD its absence is not an error.
BOS_CANDIDATES = ("<bos>", "<s>", "<|endoftext|>")


def special_ids(tokenizer) -> dict[str, int | None]:
    """``{bos_id, eos_id, pad_id}`` resolved as :mod:`ldjax.data.tokenize` resolves them.

    EOS is the first of ``EOS_CANDIDATES`` the tokenizer knows; PAD the first of
    ``PAD_CANDIDATES``, falling back to EOS (padding is masked everywhere); BOS the first of
    :data:`BOS_CANDIDATES`, or None. The same ids go to tokenisation and to on-policy sampling.

    Raises:
      TokenizationError: the tokenizer has no EOS-like token.
    """
    from ldjax.data.tokenize import EOS_CANDIDATES, PAD_CANDIDATES, TokenizationError, special_token_id
    eos = special_token_id(tokenizer, None, EOS_CANDIDATES, "eos_id")
    pad = special_token_id(tokenizer, None, PAD_CANDIDATES + EOS_CANDIDATES, "pad_id")
    try:
        bos = special_token_id(tokenizer, None, BOS_CANDIDATES, "bos_id")
    except TokenizationError:
        bos = None
    return {"bos_id": bos, "eos_id": eos, "pad_id": pad}


def _token_kwargs(config: DataConfig, tokenizer, vocab_size: int) -> dict[str, Any]:
    return dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length, vocab_size=vocab_size,
                pad_to_max_length=True, **special_ids(tokenizer))


def check_lengths(config: DataConfig, model_config) -> None:
    """Refuses sequences longer than the model's positions, before any training.

    Every batch is padded to ``max_length``; on-policy sampling appends ``max_new_tokens``.

    Raises:
      ConfigError: naming the fields and the model's ``max_position_embeddings``.
    """
    limit = model_config.max_position_embeddings
    sampled = getattr(config, "on_policy", "off") != "off"
    total = config.max_length + (config.max_new_tokens if sampled else 0)
    if total > limit:
        what = (f"max_length={config.max_length} + max_new_tokens={config.max_new_tokens} (on-policy samples) = {total}"
                if sampled else f"max_length={config.max_length}")
        raise ConfigError(f"{what} exceeds the model's max_position_embeddings={limit}")


# ------------------------------------------------------------------------------- model

def build_model(config: ModelConfig, tokenizer_vocab: int, seed: int):
    """``(model, tokenizer or None)``: a fresh tiny model, or one loaded from a directory.

    Parameters are float32 (the master weights the optimizer updates); ``--compute-dtype
    bfloat16`` runs the layers in bf16 on them, ``--remat`` rematerialises each block.
    """
    from ldjax.models.transformer import CausalLM, TransformerConfig
    compute = jnp.bfloat16 if getattr(config, "compute_dtype", "float32") == "bfloat16" else jnp.float32
    remat = bool(getattr(config, "remat", False))
    if config.model == "tiny":
        tcfg = TransformerConfig.tiny(config.arch, vocab_size=tokenizer_vocab, hidden_size=config.d_model,
                                      num_layers=config.num_layers, num_heads=config.num_heads,
                                      num_kv_heads=config.num_heads, intermediate_size=4 * config.d_model, remat=remat)
        return CausalLM(tcfg, rngs=nnx.Rngs(seed), dtype=compute, param_dtype=jnp.float32), None
    from ldjax.models.hf import load_pretrained
    return load_pretrained(config.model, dtype=compute, param_dtype=jnp.float32, remat=remat)


def _model_signature(model) -> dict[str, Any]:
    # remat changes memory, not values: a run may resume with it turned on or off
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(model.config))).items() if k != "remat"}


def run_sources(config) -> dict[str, str]:
    """Where the data and the starting model come from: resolved paths and content hashes.

    Part of the resume signature: the same path with other contents (a regenerated JSONL, a
    model directory overwritten by a later job) gives another data order or another policy
    and reference, so it must not resume the old checkpoint.
    """
    sources: dict[str, str] = {}
    if config.data:
        data = pathlib.Path(config.data).resolve()
        sources.update(data=str(data), data_sha256=file_digest([data]))
    if config.model != "tiny":
        model_dir = pathlib.Path(config.model).resolve()
        files = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.safetensors.index.json"))
        files += [p for p in (model_dir / "config.json", model_dir / "tokenizer.json") if p.exists()]
        sources.update(model=str(model_dir), model_sha256=file_digest(files))
    return sources


# ------------------------------------------------------------------------------- checks

def flag(name: str) -> str:
    """The command-line flag of a config field: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def check_usage(command: str, config) -> None:
    """Refuses flag values the job cannot run with, before anything is loaded or written.

    These are the checks that the config dataclasses leave to the CLI (a library caller may
    want, say, a zero learning rate); each message names the flag and what to do.

    Raises:
      ConfigError: ``--flag ...: what is wrong — what to do``.
    """
    import math

    def refuse(what: str, todo: str):
        raise ConfigError(f"{what} — {todo}")

    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        refuse(f"--learning-rate must be a positive number, got {config.learning_rate}",
               "pass e.g. --learning-rate 1e-4")
    if config.max_length < 1 or config.max_prompt_length < 1:
        refuse(f"--max-length and --max-prompt-length must be >= 1, got {config.max_length} and "
               f"{config.max_prompt_length}", "pass e.g. --max-length 64 --max-prompt-length 32")
    if config.max_prompt_length >= config.max_length:
        refuse(f"--max-prompt-length {config.max_prompt_length} must be smaller than --max-length "
               f"{config.max_length} (the response needs room)", "lower --max-prompt-length or raise --max-length")
    if config.batch_size % config.accumulation_steps:
        refuse(f"--batch-size {config.batch_size} is not a multiple of --accumulation-steps {config.accumulation_steps}",
               "choose a --batch-size that --accumulation-steps divides")
    visible = len(jax.devices())
    if config.num_devices > visible:
        refuse(f"--num-devices {config.num_devices} but only {visible} devices are visible",
               f"pass --num-devices {visible} or less (0 = all)")
    devices = config.num_devices or visible
    if config.fsdp < 1 or devices % config.fsdp:
        refuse(f"--fsdp {config.fsdp} does not divide the {devices} devices of the mesh",
               f"pass an --fsdp that divides {devices} (1 = plain data parallelism), or change --num-devices")
    if config.batch_size % devices:  # every device computes its own rows, fsdp devices too
        refuse(f"--batch-size {config.batch_size} is not a multiple of the {devices} devices of the mesh",
               "choose a --batch-size that --num-devices divides")
    from ldjax.data.preference import PREFERENCE_FORMATS
    if config.data_format not in ("auto",) + PREFERENCE_FORMATS:
        refuse(f"--data-format {config.data_format!r} is not one of {('auto',) + PREFERENCE_FORMATS}",
               "pass one of those, or auto")
    if config.data:
        data = pathlib.Path(config.data)
        if not data.is_file():
            refuse(f"--data {config.data}: {'is a directory' if data.is_dir() else 'no such file'}",
                   "pass a JSONL file of preference records, or leave --data out for the embedded world")
    elif config.world_rejected_style not in ("rare_slots", "foreign"):
        refuse(f"--world-rejected-style {config.world_rejected_style!r} is not one of ('rare_slots', 'foreign')",
               "pass one of those")
    if config.model == "tiny":
        from ldjax.models.transformer import ARCHITECTURES
        if config.arch not in ARCHITECTURES:
            refuse(f"--arch {config.arch!r} is not one of {ARCHITECTURES}", "pass one of those")
        for name in ("d_model", "num_layers", "num_heads"):
            if getattr(config, name) < 1:
                refuse(f"{flag(name)} must be >= 1, got {getattr(config, name)}", f"pass a positive {flag(name)}")
        if config.d_model % config.num_heads:
            refuse(f"--d-model {config.d_model} is not a multiple of --num-heads {config.num_heads}",
                   "choose a --d-model that --num-heads divides")
    else:
        model = pathlib.Path(config.model)
        todo = ("pass --model tiny or a Hugging Face model directory (config.json, model.safetensors, tokenizer.json), "
                "e.g. the model/ folder that an earlier ldjax job wrote into its --out")
        if not model.is_dir():
            refuse(f"--model {config.model}: {'not a directory' if model.exists() else 'no such directory'}", todo)
        if not (model / "config.json").is_file():
            refuse(f"--model {config.model}: no config.json in this directory", todo)
        from ldjax.models.hf import PretrainedFormatError, read_config
        try:
            read_config(model)
        except PretrainedFormatError as e:
            refuse(f"--model {config.model}: {e}", todo)
    if command == "dpo":
        from ldjax.losses import LOSS_TYPES
        if config.loss_type not in (*LOSS_TYPES, objectives.PPO_CLIP):
            refuse(f"--loss-type {config.loss_type!r} is not a known preference loss",
                   f"pass one of {', '.join((*LOSS_TYPES, objectives.PPO_CLIP))}")
        if config.loss_type == objectives.PPO_CLIP and config.on_policy != "off":
            refuse("--loss-type ppo_clip takes its old policy's token log-probs from the data's responses, "
                   "so not with --on-policy", "drop --on-policy, or use a preference loss type")
        if config.loss_type == objectives.PPO_CLIP and config.negative_weight_power:
            refuse("--negative-weight-power reweights a preference loss's rejected log-probs, not ppo_clip's tokens",
                   "drop --negative-weight-power with --loss-type ppo_clip")
        if not config.beta > 0:
            refuse(f"--beta must be > 0 (an inverse temperature), got {config.beta}", "pass e.g. --beta 0.1")
        if config.on_policy != "off" and config.max_new_tokens < 1:
            refuse(f"--max-new-tokens must be >= 1 with --on-policy {config.on_policy}, got {config.max_new_tokens}",
                   "pass e.g. --max-new-tokens 24")
        if config.top_k < 0:
            refuse(f"--top-k must be >= 0, got {config.top_k}", "pass 0 (all tokens) or a positive k")
        if config.on_policy_candidates > 1 and config.on_policy == "off":
            refuse(f"--on-policy-candidates {config.on_policy_candidates} ranks on-policy samples, but --on-policy is off",
                   "add --on-policy rejected (or both), or drop --on-policy-candidates")
        if config.on_policy_candidates > 1 and config.on_policy_judge == "none":
            refuse(f"--on-policy-candidates {config.on_policy_candidates} needs a judge to rank the candidates",
                   "add --on-policy-judge world (embedded world only)")
        if config.on_policy_judge == "world" and config.data:
            refuse("--on-policy-judge world judges the embedded world's styles, not --data's responses",
                   "drop --data, or rank with --on-policy-candidates 1 (no judge)")
    out = pathlib.Path(config.out)
    if out.exists() and not out.is_dir():
        refuse(f"--out {config.out}: exists and is not a directory", "pass a new or existing run directory")


# ------------------------------------------------------------------------------- jobs

def run(command: str, config, *, tracker_hook: Callable[[Any, Any], None] | None = None,
        optimizer_wrapper: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Runs one job; returns its final numbers (also in ``<out>/summary.json``).

    Everything that can be refused is checked before the run directory is touched: the flags
    (:func:`check_usage`), the data and the model, the token arrays and the batch size, and
    whether an existing checkpoint may be resumed. A failing check leaves ``--out`` as it was.

    Hooks for analyses that the flags do not express (from Python; they never change what is
    checked): ``tracker_hook(tracker, model)`` is called once on the job's
    :class:`ldjax.tracking.Tracker` (e.g. to set its ``decompose_fn``), and
    ``optimizer_wrapper(optax_optimizer) -> optax_optimizer`` wraps the job's optimizer (e.g. a
    trainable subset via ``optax.multi_transform``). Name them in your own cache keys: they
    change what is written or trained, not the job's config.
    """
    from ldjax.train import distributed
    distributed.maybe_initialize(getattr(config, "distributed", "off"))  # before any computation
    check_usage(command, config)
    out = pathlib.Path(config.out)
    tokenizer = None
    if config.model != "tiny":
        from ldjax.models.hf import load_tokenizer
        tokenizer = load_tokenizer(config.model)
    train_set, test_set, texts, tokenizer = load_examples(config, tokenizer)
    model, loaded_tokenizer = build_model(config, tokenizer.get_vocab_size(), config.seed)
    tokenizer = loaded_tokenizer or tokenizer
    vocab = model.config.vocab_size
    if tokenizer.get_vocab_size() > vocab:
        raise ConfigError(f"--model {config.model}: its tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                          f"only {vocab} embeddings — pass a model directory whose tokenizer.json matches its weights")
    check_lengths(config, model.config)
    texts_of_probes = probe_texts(config) if getattr(config, "track_every", 0) else None
    data = _prepare_data(command, config, tokenizer, vocab, train_set, test_set, texts)

    # Refuse to continue another run's checkpoint before writing anything or computing reference
    # log-probs: its saved data position and optimizer state only make sense on its trajectory.
    checkpointer = RunCheckpointer(out / "checkpoints", model_config=_model_signature(model),
                                   run_config={"command": command, **to_dict(config)},
                                   resume_signature=resume_signature(config, command=command, sources=run_sources(config)),
                                   keep=config.keep_checkpoints)
    try:
        if checkpointer.latest_step() is not None:
            if not config.resume:
                # Starting over next to old checkpoints would let a later resume pick up a
                # step of the old run; the user must choose.
                raise CheckpointError(
                    f"{out / 'checkpoints'} already holds checkpoints (latest step "
                    f"{checkpointer.latest_step()}) and --resume is false: use another --out, "
                    "delete that folder, or pass --resume true")
            checkpointer.check_resumable()
            if texts_of_probes is not None:
                from ldjax.tracking import check_tracking_resumable
                check_tracking_resumable(out / TRACKING_FILE, texts_of_probes, checkpointer.latest_step())
        if distributed.is_primary():  # process 0 writes the run's files; every process checkpoints
            (out / "config.json").write_text(json.dumps({"command": command, **to_dict(config)}, indent=1))
        return _run_job(command, config, out, checkpointer, model, tokenizer, data, texts_of_probes,
                        tracker_hook=tracker_hook, optimizer_wrapper=optimizer_wrapper)
    finally:
        checkpointer.close()


def _prepare_data(command, config, tokenizer, vocab, train_set, test_set, texts) -> dict[str, Any]:
    """The token arrays and the objective of a job, checked against the batch size.

    Raises:
      TokenizationError: an example that cannot be tokenised (names its index).
      ConfigError: fewer training rows than ``--batch-size``.
    """
    kw = _token_kwargs(config, tokenizer, vocab)  # vocab_size: every id is range-checked here, not under jit
    from ldjax.data.preference import SFTExample
    from ldjax.data.tokenize import tokenize_preference, tokenize_sft
    if command == "pretrain":
        arrays = tokenize_sft([SFTExample("", t) for t in texts], tokenizer, **kw)
        test_arrays = tokenize_sft([SFTExample("", f"{e.prompt} {e.chosen}") for e in test_set], tokenizer, **kw)
        loss_fn = objectives.pretrain_objective()
    elif command == "sft":
        rows = [SFTExample(e.prompt, e.chosen) for e in train_set]
        if config.sft_on_both:
            rows += [SFTExample(e.prompt, e.rejected) for e in train_set]
        arrays = tokenize_sft(rows, tokenizer, **kw)
        test_arrays = tokenize_sft([SFTExample(e.prompt, e.chosen) for e in test_set], tokenizer, **kw)
        loss_fn = objectives.sft_objective()
    else:
        arrays = tokenize_preference(train_set, tokenizer, **kw)
        test_arrays = tokenize_preference(test_set, tokenizer, **kw)
        if config.loss_type == objectives.PPO_CLIP:
            loss_fn = objectives.ppo_clip_objective(epsilon=config.ppo_epsilon)
        else:
            loss_fn = objectives.preference_objective(
                config.loss_type, beta=config.beta, label_smoothing=config.label_smoothing,
                negative_weight_power=config.negative_weight_power,
                **({"gamma": config.simpo_gamma} if config.loss_type == "simpo" else {}))
    rows = int(len(next(iter(arrays.values()))))
    if rows < config.batch_size:
        source = f"--data {config.data}" if config.data else "the embedded world (--world-train, --world-pretrain)"
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {rows} training rows of {source} — "
                          "lower --batch-size or use more training data")
    return dict(kw=kw, arrays=arrays, test_arrays=test_arrays, loss_fn=loss_fn)


def _make_tracker(command, config, out, model, tokenizer, kw, texts_of_probes, params):
    """The run's :class:`ldjax.tracking.Tracker`: probes tokenised as the training data; for
    ``dpo`` the probe pairs' reference log-probs are scored here, with the starting policy."""
    from ldjax import probes, tracking
    probe_set = probes.tokenize_probes(texts_of_probes, tokenizer, **kw)
    preference = None
    if command == "dpo" and config.loss_type != "ppo_clip":  # (ppo_clip's coefficients are per token: none logged)
        preference = tracking.PreferenceTracking(
            config.loss_type, config.beta, config.label_smoothing,
            {"gamma": config.simpo_gamma} if config.loss_type == "simpo" else {})
    tracker = tracking.Tracker(probe_set, model, every=config.track_every, path=out / TRACKING_FILE,
                               preference=preference, batch_size=config.track_batch_size or config.batch_size,
                               progress=config.progress, subset=config.track_subset, fused=True)
    if preference is not None:
        tracker.set_reference(params)
    return tracker


def _on_policy_judge(config, tokenizer, vocab_size: int, eos_id):
    """``score_fn(input_ids, loss_mask) -> (B,)`` ranking on-policy candidates inside the step: the
    world's style judge as token tables over the model's ``vocab_size`` ids
    (:func:`ldjax.judge.token_judge_scores`)."""
    from ldjax.data.world import SPECIAL_TOKENS
    from ldjax.judge import StyleNgramJudge, token_judge_scores
    tables = StyleNgramJudge.of_world(_world(config)).token_tables(tokenizer.get_vocab(), vocab_size, SPECIAL_TOKENS)
    return lambda ids, mask: token_judge_scores(tables, ids, mask, eos_id)


def _run_job(command, config, out, checkpointer, model, tokenizer, data, texts_of_probes=None, *,
             tracker_hook=None, optimizer_wrapper=None) -> dict[str, Any]:
    kw, arrays, test_arrays, loss_fn = data["kw"], data["arrays"], data["test_arrays"], data["loss_fn"]
    from ldjax.data.tokenize import batches

    mesh = sharding.make_mesh(num_devices=config.num_devices, fsdp=getattr(config, "fsdp", 1))
    graphdef, params, rest = steps.split_model(model)
    schedule = optim.learning_rate_schedule(config, config.num_steps)
    optimizer = optim.build_optimizer(config, config.num_steps)
    if optimizer_wrapper is not None:
        optimizer = optimizer_wrapper(optimizer)

    prepare_fn, constants = None, None
    if command == "dpo":
        # The policy starts as the reference: its log-probs are computed once, here.
        per_token = config.loss_type == objectives.PPO_CLIP  # its old policy is per token
        arrays = {**arrays, **objectives.reference_logps(graphdef, params, rest, arrays, batch_size=config.batch_size,
                                                         mesh=mesh, per_token=per_token)}
        test_arrays = {**test_arrays, **objectives.reference_logps(graphdef, params, rest, test_arrays,
                                                                   batch_size=config.batch_size, mesh=mesh,
                                                                   per_token=per_token)}
        if config.on_policy != "off":
            constants = jax.tree.map(jnp.copy, params)  # frozen reference for the sampled responses
            eos, pad = kw["eos_id"], kw["pad_id"]

            score_fn = (_on_policy_judge(config, tokenizer, model.config.vocab_size, eos)
                        if config.on_policy_candidates > 1 else None)

            def prepare_fn(p, batch, key, ref_params):
                policy = nnx.merge(graphdef, p, rest)
                reference = nnx.merge(graphdef, ref_params, rest)
                return sampling.on_policy_batch(  # the models themselves: sampling uses their KV cache
                    policy, reference, batch, key, mode=config.on_policy,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                    eos_id=eos, pad_id=pad, candidates=config.on_policy_candidates, score_fn=score_fn)

    step = steps.make_train_step(graphdef, loss_fn, optimizer, rest=rest, accumulation_steps=config.accumulation_steps,
                                 learning_rate=schedule, prepare_fn=prepare_fn, constants=constants, mesh=mesh)
    state = sharding.shard_train_state(steps.init_train_state(params, optimizer, config.seed), mesh)

    eval_fn = _make_eval(graphdef, rest, loss_fn, test_arrays, config.batch_size, mesh) if config.eval_every else None
    tracker = (_make_tracker(command, config, out, model, tokenizer, kw, texts_of_probes, params)
               if texts_of_probes is not None else None)
    if tracker is not None and tracker_hook is not None:
        tracker_hook(tracker, model)
    result = train(step, state, lambda epoch: batches(arrays, config.batch_size, seed=config.seed, epoch=epoch),
                   config, checkpointer=checkpointer, eval_fn=eval_fn, tracker=tracker, desc=f"ldjax {command}")

    nnx.update(model, sharding.gather(result.state.params))  # every process takes part in the gather
    from ldjax.models.hf import save_pretrained
    from ldjax.train.distributed import is_primary
    if is_primary():
        save_pretrained(model, tokenizer, out / "model")
    last = [h for h in result.history if "loss" in h]
    summary = {"command": command, "steps": int(result.state.step), "resumed_from": result.resumed_from,
               "final": last[-1] if last else None, "num_train_examples": int(len(next(iter(arrays.values())))),
               "devices": int(mesh.devices.size), "fsdp": sharding.axis_size(mesh, sharding.FSDP_AXIS),
               "processes": jax.process_count(), "out": str(out)}
    if tracker is not None:
        summary["tracking"] = {"file": str(out / TRACKING_FILE), "families": list(tracker.probe_set.families),
                               "omitted": dict(tracker.probe_set.texts.omitted),
                               "num_prompts": tracker.probe_set.num_prompts,
                               "track_s": tracker.track_seconds, "train_s": result.train_seconds}
    if is_primary():
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _make_eval(graphdef, rest, loss_fn, arrays, batch_size, mesh):
    """Mean loss over the first (up to 4) full batches of the held-out arrays."""
    n = len(next(iter(arrays.values())))
    fixed = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, min(n, 4 * batch_size) - batch_size + 1, batch_size)]

    @jax.jit
    def evaluate(params, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)[0]

    def eval_fn(state, step):
        if not fixed:
            return {}
        values = [float(evaluate(state.params, sharding.shard_batch(b, mesh))) for b in fixed]
        return {"loss": float(np.mean(values))}

    return eval_fn


# ------------------------------------------------------------------------------- errors

DEBUG_FLAG = "--debug"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _flags_named(message: str, command: str) -> str:
    """Config field names at the start of a clause (``num_steps: ...``, ``max_length=3000``)
    written as their flags (``--num-steps``)."""
    cls = COMMANDS.get(command)
    if cls is None:
        return message
    names = sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True)
    pattern = re.compile(rf"(?<![\w./-])({'|'.join(names)})(?=[:=])")
    return pattern.sub(lambda m: flag(m.group(1)), message)


def describe_error(exc: BaseException, command: str) -> tuple[int, str] | None:
    """``(exit status, "what — what to do")`` of an expected failure; None for a bug.

    Status 2: the input or the environment must change (flags, data files, the model
    directory, a checkpoint of another run, a missing data package). Status 1: the run
    started and failed (a NaN/inf loss, a full disk). Status 130: interrupted.
    """
    from ldjax.data.mnist import MnistFormatError
    from ldjax.data.preference import DataFormatError
    from ldjax.data.text import MissingDataPackageError
    from ldjax.data.tokenize import TokenizationError
    from ldjax.models.hf import PretrainedFormatError
    from ldjax.models.transformer import TransformerConfigError
    from ldjax.tracking import TrackingMismatch
    from ldjax.train.loop import NonFiniteLossError
    from ldjax.train.sharding import ShardingError

    message = _one_line(str(exc) or type(exc).__name__)
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted — rerun the same command to resume from the last checkpoint in --out"
    if isinstance(exc, NonFiniteLossError):
        return 1, (f"the loss became non-finite: {message} — lower --learning-rate or set --clip-norm "
                   "(nothing after the last good checkpoint was saved)")
    if isinstance(exc, (ConfigError, CheckpointError)):
        message = _flags_named(message, command)
        if " — " in message or "use another" in message:
            return 2, message
        return 2, f"{message} — see `ldjax {command} --help`"
    if isinstance(exc, DataFormatError):
        todo = ("fix or remove that line, or pass the right --data-format" if exc.line is not None
                else "pass a JSONL file with one preference record (a JSON object) per line")
        return 2, f"{message} — {todo}"
    if isinstance(exc, TokenizationError):
        where = f" of the {'--data file' if command in COMMANDS else 'data'}" if exc.index is not None else ""
        return 2, f"cannot tokenize {message}{where} — fix that record, or change --max-length / --max-prompt-length"
    if isinstance(exc, (PretrainedFormatError, TransformerConfigError)):
        return 2, (f"--model: {message} — pass --model tiny or a Hugging Face model directory (config.json, "
                   "model.safetensors, tokenizer.json), e.g. the model/ folder of an earlier ldjax job")
    if isinstance(exc, TrackingMismatch):
        return 2, f"{message} — use another --out, or the tracking settings of the run in it"
    if isinstance(exc, ShardingError):
        return 2, f"{message} — set --num-devices so that it divides --batch-size"
    if isinstance(exc, (MissingDataPackageError, MnistFormatError)):
        return 2, message  # names the install step
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = exc.filename if exc.filename is not None else message
        return 2, f"{where}: {exc.strerror or message} — check that path"
    if isinstance(exc, OSError):
        return 1, f"{message} — check the disk and the --out directory"
    return None


def _report(command: str | None, exc: BaseException) -> int:
    """One line on stderr for an expected failure; the traceback plus a line for a bug."""
    import traceback
    prog = f"ldjax {command}" if command else "ldjax"
    described = describe_error(exc, command or "")
    if described is None:
        traceback.print_exception(exc)
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} — this is a bug in ldjax, not in "
              "your input; please report it with the traceback above", file=sys.stderr)
        return 1
    status, line = described
    print(f"{prog}: error: {line}", file=sys.stderr)
    return status


def _plan(argv: list[str]) -> int:
    from ldjax import memory_plan
    return int(memory_plan.main(argv) or 0)


def _reproduce(argv: list[str]) -> int:
    try:
        from experiments import reproduce
    except ModuleNotFoundError as e:
        if e.name not in ("experiments", "experiments.reproduce"):
            raise
        raise ConfigError("the experiments package is not installed next to ldjax — install ldjax from its "
                          "repository (`pip install .` there), which ships experiments/ too") from e
    return int(reproduce.cli_main(argv) or 0)


USAGE = f"""usage: ldjax {{{','.join(COMMANDS)}}} [--help] [flags]
       ldjax reproduce [--help] [flags]
       ldjax plan [--help] [flags]
       (any command also takes {DEBUG_FLAG}: show the full traceback of a failure)

commands:
  pretrain   next-token prediction on the embedded world or the prompts+chosen of --data
  sft        supervised finetuning on (prompt, chosen)
  dpo        a preference loss (--loss-type) against the starting policy
  reproduce  the paper's experiments and the report (experiments/reproduce.py)
  plan       per-device memory of a model, recipe and mesh, and whether it fits a device (ldjax/memory_plan.py)"""


def main(argv: Sequence[str] | None = None, *, report_errors: bool | None = None) -> int:
    """The ``ldjax`` command; returns its exit status.

    Errors: with ``report_errors`` (the default when ``argv`` is None, i.e. the console script
    and ``python -m ldjax``) an expected failure (:func:`describe_error`) prints one line on
    stderr, ``ldjax <command>: error: <what> — <what to do>``, and returns 2 for bad input
    (flags, data files, the model directory, a checkpoint of another run, a missing data
    package), 1 for a run that started and failed (a NaN loss: the last good checkpoint
    stays). Anything else is a bug: its traceback is printed, then one ``internal error``
    line, and the status is 1. ``--debug`` anywhere in ``argv`` re-raises every failure
    with its traceback. Called with an ``argv`` list (from Python), failures are raised.
    Usage errors of the flag parser exit (``SystemExit(2)``) after one line either way.
    """
    if report_errors is None:
        report_errors = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    report_errors = report_errors and not debug
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    if not argv or argv[0] not in (*COMMANDS, "reproduce", "plan"):
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"ldjax: error: {what} — use one of {', '.join((*COMMANDS, 'reproduce'))} "
              "(see `ldjax --help`)", file=sys.stderr)
        return 2
    command = argv[0]
    try:
        if command == "reproduce":
            return _reproduce(argv[1:])
        if command == "plan":
            return _plan(argv[1:])
        config = parse_config(COMMANDS[command], argv[1:], prog=f"ldjax {command}")
        summary = run(command, config)
    except (Exception, KeyboardInterrupt) as exc:
        if not report_errors:
            raise
        return _report(command, exc)
    print(json.dumps(summary.get("final") or {}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
