"""Resume after a real kill: SIGKILL a training process right after a checkpoint, run the same
command again, and get bitwise the parameters of a run that was never stopped (issue 3, item 7).

The kill is real — the process gets SIGKILL from itself, so no ``finally``, no orbax close, no
flush — and deterministic: it happens right after the checkpoint of a chosen step returns.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

TINY = ["--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--max-length", "48",
        "--max-prompt-length", "20", "--world-entities", "8", "--world-train", "16", "--world-test", "4",
        "--world-pretrain", "16", "--batch-size", "4", "--progress", "false", "--num-devices", "1",
        "--optimizer", "adam", "--learning-rate", "1e-3", "--num-steps", "9", "--checkpoint-every", "3",
        "--keep-checkpoints", "2", "--seed", "3"]

# Runs the CLI; with KILL_AT set, SIGKILLs itself as soon as that step's checkpoint is written.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from ldjax import cli
    from ldjax.train import checkpoint

    kill_at = int(os.environ.get("KILL_AT", "0"))
    save = checkpoint.RunCheckpointer.save

    def save_then_maybe_die(self, state, **kw):
        step = save(self, state, **kw)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step

    checkpoint.RunCheckpointer.save = save_then_maybe_die
    sys.exit(cli.main(sys.argv[1:]))
""")


def _run(out: pathlib.Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, KILL_AT=str(kill_at), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run([sys.executable, "-c", DRIVER, "sft", *TINY, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three subprocess runs, each compiling a tiny model (~10-20 s apiece on 2 cores)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run(tmp_path / "killed", kill_at=6)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert not (tmp_path / "killed" / "model").exists()  # it really died before finishing
    steps_on_disk = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_on_disk[-1] == 6

    resumed = _run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bitwise on CPU
    # The second launch really resumed (from step 6, not from scratch) and logged the same
    # losses for the steps it replayed as the straight run did.
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from"] == 6
    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines)}
    straight_losses, resumed_losses = losses("straight"), losses("killed")
    assert [straight_losses[s] for s in (7, 8, 9)] == [resumed_losses[s] for s in (7, 8, 9)]
    assert straight_losses[9] != straight_losses[1]  # training moved the model
