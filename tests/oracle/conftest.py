"""The neural-tangents oracle leg (run in .venv-oracle: jax 0.5.3 + neural-tangents 0.6.5).

neural-tangents 0.6.5 imports TensorFlow from its ``experimental`` subpackage; an empty module
registered under that name first keeps TensorFlow out (SPEC §4). The leg is a must-show of
the eNTK issue, so a neural-tangents that still cannot import is an error that fails the run,
never a skip.
"""
import sys
import types

import jax

jax.config.update("jax_enable_x64", True)

_NAME = "neural_tangents.experimental"
sys.modules.setdefault(_NAME, types.ModuleType(_NAME, "empty stand-in: keeps TensorFlow out"))

try:
    import neural_tangents  # noqa: F401
except Exception as e:  # noqa: BLE001 - whatever breaks the import, say what and where
    raise ImportError(
        f"the oracle leg needs neural-tangents, which does not import here "
        f"(python {sys.executable}, jax {jax.__version__}): {type(e).__name__}: {e}. "
        f"Build the oracle environment with `make oracle-venv` (jax 0.5.3, neural-tangents "
        f"0.6.5 --no-deps, tests/oracle/requirements.txt) and run this leg with its python."
    ) from e
