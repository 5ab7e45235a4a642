"""``ldjax pretrain | sft | dpo``: train a causal LM on the embedded world or on a JSONL file.

Each subcommand parses its dataclass (:mod:`ldjax.train.config`) from flags and an optional
``--config file.json`` and writes into ``--out``: ``config.json``, ``metrics.jsonl``,
``checkpoints/`` (resumed automatically when present) and ``model/`` (a Hugging Face
directory that ``--model`` of the next job, or :func:`ldjax.models.load_pretrained`, reads).
``sft`` and ``dpo`` with ``--track-every k`` also write ``tracking.jsonl`` (the probe families
of SPEC §3 scored every k steps, :mod:`ldjax.tracking`) and ``probes.json`` (their texts).

    ldjax pretrain --out runs/base --num-steps 2000
    ldjax sft --model runs/base/model --out runs/sft --num-steps 400 --track-every 20
    ldjax dpo --model runs/sft/model --out runs/dpo --loss-type ipo --beta 0.1
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any, Sequence

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
from ldjax.tracking import TRACKING_FILE

COMMANDS = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}


# ------------------------------------------------------------------------------- data

def _world(config: DataConfig):
    from ldjax.data.world import WorldConfig, build_world
    # The probes come from their own random stream: their number never changes the pairs or
    # the pretraining texts.
    return build_world(WorldConfig(
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
    """``(model, tokenizer or None)``: a fresh tiny model, or one loaded from a directory."""
    from ldjax.models.transformer import CausalLM, TransformerConfig
    if config.model == "tiny":
        tcfg = TransformerConfig.tiny(config.arch, vocab_size=tokenizer_vocab, hidden_size=config.d_model,
                                      num_layers=config.num_layers, num_heads=config.num_heads,
                                      num_kv_heads=config.num_heads, intermediate_size=4 * config.d_model)
        return CausalLM(tcfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32), None
    from ldjax.models.hf import load_pretrained
    return load_pretrained(config.model, dtype=jnp.float32, param_dtype=jnp.float32)


def _model_signature(model) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(model.config)))


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


# ------------------------------------------------------------------------------- jobs

def run(command: str, config) -> dict[str, Any]:
    """Runs one job; returns its final numbers (also in ``<out>/summary.json``)."""
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
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only {vocab}")
    check_lengths(config, model.config)
    texts_of_probes = probe_texts(config) if getattr(config, "track_every", 0) else None

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
        (out / "config.json").write_text(json.dumps({"command": command, **to_dict(config)}, indent=1))
        return _run_job(command, config, out, checkpointer, model, tokenizer, train_set, test_set, texts,
                        texts_of_probes)
    finally:
        checkpointer.close()


def _make_tracker(command, config, out, model, tokenizer, kw, texts_of_probes, params):
    """The run's :class:`ldjax.tracking.Tracker`: probes tokenised as the training data; for
    ``dpo`` the probe pairs' reference log-probs are scored here, with the starting policy."""
    from ldjax import probes, tracking
    probe_set = probes.tokenize_probes(texts_of_probes, tokenizer, **kw)
    preference = None
    if command == "dpo":
        preference = tracking.PreferenceTracking(
            config.loss_type, config.beta, config.label_smoothing,
            {"gamma": config.simpo_gamma} if config.loss_type == "simpo" else {})
    tracker = tracking.Tracker(probe_set, model, every=config.track_every, path=out / TRACKING_FILE,
                               preference=preference, batch_size=config.track_batch_size or config.batch_size,
                               progress=config.progress, subset=config.track_subset, fused=True)
    if preference is not None:
        tracker.set_reference(params)
    return tracker


def _run_job(command, config, out, checkpointer, model, tokenizer, train_set, test_set, texts,
             texts_of_probes=None) -> dict[str, Any]:
    vocab = model.config.vocab_size
    kw = _token_kwargs(config, tokenizer, vocab)  # vocab_size: every id is range-checked here, not under jit

    from ldjax.data.preference import SFTExample
    from ldjax.data.tokenize import batches, tokenize_preference, tokenize_sft
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
        loss_fn = objectives.preference_objective(config.loss_type, beta=config.beta,
                                                  label_smoothing=config.label_smoothing,
                                                  **({"gamma": config.simpo_gamma} if config.loss_type == "simpo" else {}))

    mesh = sharding.data_mesh(num_devices=config.num_devices)
    graphdef, params, rest = steps.split_model(model)
    schedule = optim.learning_rate_schedule(config, config.num_steps)
    optimizer = optim.build_optimizer(config, config.num_steps)

    prepare_fn, constants = None, None
    if command == "dpo":
        # The policy starts as the reference: its log-probs are computed once, here.
        arrays = {**arrays, **objectives.reference_logps(graphdef, params, rest, arrays, batch_size=config.batch_size, mesh=mesh)}
        test_arrays = {**test_arrays, **objectives.reference_logps(graphdef, params, rest, test_arrays, batch_size=config.batch_size, mesh=mesh)}
        if config.on_policy != "off":
            constants = jax.tree.map(jnp.copy, params)  # frozen reference for the sampled responses
            eos, pad = kw["eos_id"], kw["pad_id"]

            def prepare_fn(p, batch, key, ref_params):
                policy = nnx.merge(graphdef, p, rest)
                reference = nnx.merge(graphdef, ref_params, rest)
                return sampling.on_policy_batch(  # the models themselves: sampling uses their KV cache
                    policy, reference, batch, key, mode=config.on_policy,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                    eos_id=eos, pad_id=pad)

    step = steps.make_train_step(graphdef, loss_fn, optimizer, rest=rest, accumulation_steps=config.accumulation_steps,
                                 learning_rate=schedule, prepare_fn=prepare_fn, constants=constants, mesh=mesh)
    state = sharding.replicate(steps.init_train_state(params, optimizer, config.seed), mesh)

    eval_fn = _make_eval(graphdef, rest, loss_fn, test_arrays, config.batch_size, mesh) if config.eval_every else None
    tracker = (_make_tracker(command, config, out, model, tokenizer, kw, texts_of_probes, params)
               if texts_of_probes is not None else None)
    result = train(step, state, lambda epoch: batches(arrays, config.batch_size, seed=config.seed, epoch=epoch),
                   config, checkpointer=checkpointer, eval_fn=eval_fn, tracker=tracker, desc=f"ldjax {command}")

    nnx.update(model, jax.device_get(result.state.params))
    from ldjax.models.hf import save_pretrained
    save_pretrained(model, tokenizer, out / "model")
    last = [h for h in result.history if "loss" in h]
    summary = {"command": command, "steps": int(result.state.step), "resumed_from": result.resumed_from,
               "final": last[-1] if last else None, "num_train_examples": int(len(next(iter(arrays.values())))),
               "devices": int(mesh.devices.size), "out": str(out)}
    if tracker is not None:
        summary["tracking"] = {"file": str(out / TRACKING_FILE), "families": list(tracker.probe_set.families),
                               "omitted": dict(tracker.probe_set.texts.omitted),
                               "num_prompts": tracker.probe_set.num_prompts,
                               "track_s": tracker.track_seconds, "train_s": result.train_seconds}
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = __doc__.strip() + f"\n\nusage: ldjax {{{','.join(COMMANDS)}}} [--help] [flags]"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    command = argv[0]
    config = parse_config(COMMANDS[command], argv[1:], prog=f"ldjax {command}")
    summary = run(command, config)
    print(json.dumps(summary.get("final") or {}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
