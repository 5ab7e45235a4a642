"""The neural-tangents oracle leg (run in .venv-oracle: jax 0.5.3 + neural-tangents 0.6.5).

neural-tangents 0.6.5 imports TensorFlow from its ``experimental`` subpackage; an empty module
registered under that name first keeps TensorFlow out (SPEC §4). If neural-tangents still cannot
import, the whole leg is skipped with the reason printed, never silently.
"""
import sys
import types

import jax

jax.config.update("jax_enable_x64", True)

_NAME = "neural_tangents.experimental"
sys.modules.setdefault(_NAME, types.ModuleType(_NAME, "empty stand-in: keeps TensorFlow out"))

try:
    import neural_tangents  # noqa: F401

    NEURAL_TANGENTS_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure makes the oracle unavailable
    NEURAL_TANGENTS_ERROR = f"{type(e).__name__}: {e}"
    sys.stderr.write(f"\n*** neural-tangents does not import (jax {jax.__version__}): "
                     f"{NEURAL_TANGENTS_ERROR}; the oracle leg is SKIPPED ***\n")
