"""Two processes on localhost give what one process gives on the whole batch.

Each process (tests/core/multiprocess_worker.py, 2 CPU devices each) joins JAX's
distributed runtime over a free localhost port with CPU collectives over gloo,
builds a global 'data' mesh of all 4 devices, feeds only its own rows of the
global batch, and runs a shard_map'd ``jbn.bn_forward(..., axis_name="data")``
and its gradient. The results must equal one device on the whole batch.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multiprocess_worker import global_data, loss

WORKER = pathlib.Path(__file__).resolve().parent / "multiprocess_worker.py"
REPO = WORKER.parents[2]
PROCESSES = 2
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment with 2 CPU devices per process and jbn importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=2"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_processes(workdir: pathlib.Path) -> list[dict[str, np.ndarray]]:
    """Starts the worker processes, waits for all (or the first failure), returns their npz."""
    port = free_port()
    logs = [workdir / f"process{i}.log" for i in range(PROCESSES)]
    outs = [workdir / f"process{i}.npz" for i in range(PROCESSES)]
    procs = []
    for i in range(PROCESSES):
        with open(logs[i], "w") as log:
            command = [sys.executable, str(WORKER), str(i), str(PROCESSES), str(port), str(outs[i])]
            procs.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # A failed process leaves the others waiting for it: stop at the first failure.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(
            f"--- process {i} (exit code {p.returncode}) ---\n{logs[i].read_text()[-5000:]}"
            for i, p in enumerate(procs)
        )
        timed_out = time.monotonic() >= deadline
        pytest.fail(
            (f"timed out after {TIMEOUT_S} s; " if timed_out else "")
            + f"a worker process failed:\n{report}"
        )
    return [dict(np.load(out)) for out in outs]


def one_process():
    """One device, the whole batch, no axis_name."""
    x, w, params, state, masks = global_data()
    grad = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True), static_argnums=5)
    out = {}
    for name, mask in masks.items():
        (gp, gx), (y, new) = grad(params, state, x, w, mask, None)
        tree = {"y": y, "gx": gx, "new": new, "gp": gp}
        for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out["/".join([name, *(k.key for k in path)])] = np.asarray(value)
    return out


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    # One test, so that the processes start once even when pytest-xdist splits a file.
    results = run_processes(tmp_path)
    for i, r in enumerate(results):  # each process: 2 of the 4 devices, its half of the batch
        assert (r["process_count"], r["local_devices"], r["global_devices"]) == (2, 2, 4)
        np.testing.assert_array_equal(r["rows"], [8 * i, 8 * i + 8])

    # y, gx, the new mean and var, the gradients of scale and bias; without and with
    # masks that leave process 0 with 3 examples and process 1 with 7.
    expected = one_process()
    assert len(expected) == 12
    for r in results:
        for key, value in expected.items():
            np.testing.assert_allclose(r[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

    # Replicated results (new state, parameter gradients) must not drift apart.
    for key in expected:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
