"""Two CPU processes joined by jax.distributed (gloo collectives) train the run one process trains.

Each process is ``python -m ldjax dpo --distributed env`` with 2 fake CPU devices and the
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
TINY = ["dpo", "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--max-length", "48",
        "--max-prompt-length", "20", "--world-entities", "8", "--world-train", "16", "--world-test", "4",
        "--world-pretrain", "16", "--batch-size", "4", "--progress", "false", "--learning-rate", "1e-2",
        "--optimizer", "adam", "--num-steps", "6", "--checkpoint-every", "3", "--fsdp", "2",
        "--track-every", "3", "--track-prompts", "4", "--eval-every", "3"]
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
    return subprocess.Popen([sys.executable, "-m", "ldjax", *args], cwd=ROOT, env=env,
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


def _flat(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in ("time", "tokens_per_s"):
                yield from _flat(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _flat(v, f"{path}[{i}]")
    else:
        yield path, x


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """DPO (reference log-probs, eval hook, probe tracker, checkpoints) on params spread over two
    processes follows the one-process run; the checkpoint then resumes in one process, one device."""
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
    for name in ("metrics.jsonl", "tracking.jsonl"):
        a = [json.loads(line) for line in (one / name).read_text().splitlines()]
        b = [json.loads(line) for line in (two / name).read_text().splitlines()]
        assert [r["step"] for r in a] == [r["step"] for r in b], name  # process 0 alone wrote each record
        for ra, rb in zip(a, b):
            fa, fb = dict(_flat(ra)), dict(_flat(rb))
            assert fa.keys() == fb.keys()
            for k, v in fa.items():
                if isinstance(v, float):
                    np.testing.assert_allclose(fb[k], v, rtol=1e-5, atol=1e-5, err_msg=f"{name} {k}")
    assert [r["step"] for r in metrics(two) if "loss" in r] == list(range(1, 7))
    assert any("eval/loss" in r for r in metrics(two))
    assert [json.loads(l)["step"] for l in (two / "tracking.jsonl").read_text().splitlines()] == [0, 3, 6]
    w1, w2 = weights(one), weights(two)  # the final model, gathered from both processes
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)
    # Both processes wrote their shards of every checkpoint (Orbax, multi-process).
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]

    # The 2-process checkpoint resumes in one process on another mesh (1 device, no fsdp): step 7.
    finish([launch([*TINY, "--num-steps", "7", "--fsdp", "1", "--num-devices", "1", "--out", str(two)], env_for(4))])
    assert [r["step"] for r in metrics(two) if "loss" in r] == list(range(1, 8))
    assert json.loads((two / "summary.json").read_text())["resumed_from"] == 6
