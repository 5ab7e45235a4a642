"""ldjax: learning dynamics of LLM finetuning in JAX/Flax.

Where things live:

- ``ldjax.ntk``       the exact empirical NTK and its implicit products (pure JAX, no flax)
- ``ldjax.dynamics``  the A·K·G decomposition of one update (classification)
- ``ldjax.squeeze``   the closed-form squeezing lemma and its claims
- ``ldjax.losses``    SFT and preference losses with their residual coefficients
- ``ldjax.models``    NNX models: vision nets, causal transformers, Hugging Face import
- ``ldjax.data``      MNIST (embedded and IDX), preference JSONL, the embedded world
- ``ldjax.train``     jit-compiled train steps, optimizers, sharding, checkpoints
- ``ldjax.xla_cpu_fixes`` an XLA:CPU flag (applied on import) that avoids a float32 miscompile
- ``ldjax.host_memory`` glibc malloc settings (applied on import) that keep XLA:CPU's per-step
  scratch buffer mapped between steps instead of faulting it in afresh every step

Submodules are imported on demand so that ``ldjax.ntk`` runs in the neural-tangents oracle
environment (jax 0.5.3, no flax).
"""

__version__ = "0.1.0"

# Before JAX creates XLA's threads: keep XLA:CPU's per-step scratch memory mapped (see
# ldjax.host_memory; LDJAX_HOST_MALLOC=system opts out).
from ldjax import host_memory as _host_memory

_host_memory.retain_freed_memory()

# Also before JAX's backends exist: keep XLA:CPU's YNNPACK reduce fusions off, which miscompile
# float32 eNTKs of transformer-like functions on jaxlib 0.10 (see ldjax.xla_cpu_fixes).
from ldjax import xla_cpu_fixes as _xla_cpu_fixes

_xla_cpu_fixes.disable_ynn_reduce_fusion()
