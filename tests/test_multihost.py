"""Two CPU processes joined by jax.distributed (gloo collectives) train the run one process trains.

Each process is ``python -m ldjax sft --distributed env`` with 2 fake CPU devices and the
``LDJAX_*`` variables (:mod:`ldjax.train.distributed`); the 4 global devices form a
``data=2 x fsdp=2`` mesh (the batch split across the processes, each parameter split over a
process's two devices). The reference is one process with 4 devices and the same flags.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--max-length", "48", "--max-prompt-length", "20",
        "--world-entities", "8", "--world-train", "16", "--world-test", "4", "--world-pretrain", "16",
        "--batch-size", "4", "--progress", "false", "--learning-rate", "1e-2", "--optimizer", "adam",
        "--num-steps", "12", "--checkpoint-every", "6", "--fsdp", "2"]
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(local_devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDJAX_", "XLA_FLAGS", "JAX_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def launch(args, env):
    return subprocess.Popen([sys.executable, "-m", "ldjax", "sft", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs):
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


def weights(run: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def metrics(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [launch([*TINY, "--distributed", "env", "--out", str(two)],
                    env_for(2, LDJAX_COORDINATOR=coordinator, LDJAX_NUM_PROCESSES="2", LDJAX_PROCESS_ID=str(i),
                            LDJAX_INIT_TIMEOUT="120"))
             for i in range(2)]
    procs.append(launch([*TINY, "--out", str(one)], env_for(4)))
    finish(procs)

    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["fsdp"] == 2
    assert json.loads((one / "summary.json").read_text())["processes"] == 1
    # Only process 0 wrote the log: each step once.
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m2] == list(range(1, 13)) == [r["step"] for r in m1]
    np.testing.assert_allclose([r["loss"] for r in m2], [r["loss"] for r in m1], rtol=1e-5, atol=1e-6)
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)
    # Both processes wrote their shards of the checkpoints (Orbax, multi-process).
    steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 12]

    # The 2-process checkpoint resumes in one process on another mesh (1 device): steps 13-14.
    more = ["--num-steps", "14", "--fsdp", "1", "--num-devices", "1", "--out", str(two)]
    finish([launch([*TINY, *more], env_for(4))])
    resumed = metrics(two)
    assert [r["step"] for r in resumed] == list(range(1, 15))
    assert json.loads((two / "summary.json").read_text())["resumed_from"] == 12
