"""The finetuning engine: jit-compiled steps, optax optimizers, data parallelism, orbax checkpoints.

- :mod:`ldjax.train.config`      typed configs (optimizer, loop, the pretrain/sft/dpo jobs)
- :mod:`ldjax.train.optim`       SGD / Adam(W) / RMSprop with warm-up and clipping
- :mod:`ldjax.train.steps`       the pure compiled step, gradient accumulation
- :mod:`ldjax.train.sharding`    the ("data", "fsdp") mesh: batch split on data, params/moments split on fsdp
- :mod:`ldjax.train.distributed` multi-process runs with jax.distributed (TPU pods, SLURM, env variables)
- :mod:`ldjax.train.checkpoint`  orbax checkpoints with data position, RNG, model and resume-signature checks
- :mod:`ldjax.train.loop`        the loop: metrics JSONL, progress, eval hooks, probe tracking, NaN guard
- :mod:`ldjax.train.objectives`  pretraining, SFT and preference losses on a causal LM
- :mod:`ldjax.train.sampling`    temperature / top-k sampling for on-policy preference training
"""
from ldjax.train.checkpoint import CheckpointConfigMismatch, CheckpointError, RunCheckpointer, file_digest
from ldjax.train.config import (RESUMABLE_FIELDS, ConfigError, DPOConfig, LoopConfig, ModelConfig, OptimizerConfig,
                                PretrainConfig, SFTConfig, TrackingConfig, paper_rmsprop, resume_signature)
from ldjax.train.loop import NonFiniteLossError, TrainResult, train
from ldjax.train.optim import build_optimizer, learning_rate_schedule, torch_rmsprop
from ldjax.train.sharding import (data_mesh, fsdp_partition_spec, make_mesh, param_shardings, replicate, shard_batch,
                                  shard_train_state)
from ldjax.train.steps import TrainState, init_train_state, make_train_step, split_model
