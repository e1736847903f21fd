"""Training across processes: JAX's distributed runtime, and a launcher for one machine.

A run across processes is the data-parallel run of :mod:`mnist_demo.train` over one
``'data'`` mesh of every process's devices. Each process runs the same program on its
own rows of every global batch (the batch order is that of a one-process run), and
process 0 alone logs and writes the metrics, plots and checkpoints.

- :func:`initialize` joins JAX's distributed runtime with the coordinator address,
  number of processes and process id of the configuration (``--coordinator``,
  ``--num-processes``, ``--process-id``) or, where they are not given, what JAX
  reads itself: ``$JAX_COORDINATOR_ADDRESS``, and a cluster's environment (SLURM,
  Open MPI, ...) for all three.
- :func:`launch` is ``--processes N``: N processes on this machine, on localhost
  with CPU collectives over gloo.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import Config, ConfigError, check_coordinator

#: The environment variable JAX reads the coordinator's address from.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"

#: Set by :func:`launch` in its processes' environment: its own process id, so that
#: each process ends when the launcher is gone (even killed with SIGKILL).
LAUNCHER_ENV = "JBN_DEMO_LAUNCHER_PID"

#: Seconds between a launched process's checks that its launcher still runs.
WATCH_S = 0.5


def is_distributed(config: Config) -> bool:
    """Whether ``config`` asks for a run across processes (not the launcher itself)."""
    given = (config.coordinator, config.num_processes or None, config.process_id)
    return (
        config.processes == 0
        and config.mode == "train"
        and (any(v is not None for v in given) or bool(os.environ.get(COORDINATOR_ENV)))
    )


def initialize(config: Config) -> None:
    """Joins JAX's distributed runtime if ``config`` asks for a run across processes.

    Must run before anything else touches JAX's devices. Values not in ``config``
    are left to JAX: the coordinator from ``$JAX_COORDINATOR_ADDRESS``, the rest
    from a cluster's environment.

    Raises:
      ConfigError: If a value is missing, or ``$JAX_COORDINATOR_ADDRESS`` is not
        ``HOST:PORT``.
    """
    if not is_distributed(config):
        return
    watch_launcher()
    import jax

    if config.coordinator is None:
        expected = check_coordinator(os.environ.get(COORDINATOR_ENV, ""))
        if expected is not None and os.environ.get(COORDINATOR_ENV):
            raise ConfigError(
                f"${COORDINATOR_ENV} must be {expected}; got {os.environ[COORDINATOR_ENV]!r}"
            )
    # JAX's preemption service catches SIGTERM (to let jobs reach a sync point), so a
    # process kept training after a SIGTERM until it was killed or done. Off, SIGTERM
    # ends each process at once, its last complete checkpoint kept (--resume).
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator_address=config.coordinator,
            num_processes=config.num_processes or None,
            process_id=config.process_id,
        )
    except ValueError as e:
        missing = {
            "coordinator_address": f"--coordinator HOST:PORT (or ${COORDINATOR_ENV})",
            "Number of processes": "--num-processes N",
            "process id": "--process-id I",
        }
        for key, what in missing.items():
            if key in str(e):
                raise ConfigError(
                    f"a run across processes needs {what}: give it, or run under a cluster "
                    "manager JAX reads it from (SLURM, Open MPI)"
                ) from None
        raise
    # CPU collectives across processes (before the CPU backend starts, at the first use
    # of the devices); without them a CPU run cannot span processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def watch_launcher() -> None:
    """In a process :func:`launch` started: ends it (SIGTERM) once the launcher is gone.

    A launcher killed outright (SIGKILL, a crash) cannot pass anything on; its
    processes would train on, orphaned, writing into ``--out``. Each one checks its
    parent every :data:`WATCH_S` seconds instead. POSIX only (on Windows a process's
    parent id does not change when the parent ends); a no-op outside ``launch``.
    """
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher or not launcher.isdigit() or os.name != "posix":
        return
    pid = int(launcher)

    def end_if_orphaned() -> bool:
        if os.getppid() == pid:
            return False
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    def watch() -> None:
        while not end_if_orphaned():
            time.sleep(WATCH_S)

    if not end_if_orphaned():
        threading.Thread(target=watch, name="jbn-demo-launcher-watch", daemon=True).start()


def shutdown(config: Config) -> None:
    """Leaves JAX's distributed runtime if :func:`initialize` joined it."""
    if is_distributed(config):
        import jax

        jax.distributed.shutdown()


def is_main_process() -> bool:
    """Whether this process logs and writes the results (process 0, or the only one)."""
    import jax

    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (every process must call this)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag, np.int32))))


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Process 0's ``data``, in every process (every process must call this).

    Lets every process restore the checkpoint that process 0 read from its disk,
    also when the others have no copy of it. The other processes' ``data`` is ignored.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return data
    main = is_main_process()
    length = -1 if data is None or not main else len(data)
    length = int(multihost_utils.broadcast_one_to_all(np.int64(length)))
    if length < 0:
        return None
    buf = np.frombuffer(data, np.uint8) if main else np.zeros(length, np.uint8)
    return multihost_utils.broadcast_one_to_all(buf).tobytes()


def local_rows(sharding: Any, n: int) -> slice:
    """The rows of an ``n``-row global batch that this process's devices hold under ``sharding``.

    Raises:
      ValueError: If they are not one contiguous block (the mesh is then not ordered
        by process).
    """
    starts_stops = sorted(
        (
            index[0].indices(n)[:2]
            for index in sharding.addressable_devices_indices_map((n,)).values()
        ),
    )
    start, stop = starts_stops[0][0], starts_stops[-1][1]
    if any(a[1] != b[0] for a, b in zip(starts_stops, starts_stops[1:], strict=False)):
        raise ValueError(f"this process's rows of the batch are not contiguous: {starts_stops}")
    return slice(start, stop)


def global_batch(sharding: Any, n: int, *local: np.ndarray) -> tuple[Any, ...]:
    """Global arrays of ``n`` rows, sharded by ``sharding``, from this process's rows of each."""
    import jax

    return tuple(
        jax.make_array_from_process_local_data(sharding, a, (n, *a.shape[1:])) for a in local
    )


def replicate(tree: Any, sharding: Any) -> Any:
    """``tree`` (the same in every process) as global arrays replicated by ``sharding``."""
    import jax

    def put(a):  # through jnp: Python scalars get JAX's dtypes (int32, not int64)
        return jax.make_array_from_process_local_data(sharding, np.asarray(jax.numpy.asarray(a)))

    return jax.tree.map(put, tree)


# ---------------------------------------------------------------------------
# --processes N: N processes on this machine.
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_argv(argv: Sequence[str], process_id: int, processes: int, port: int) -> list[str]:
    """The command line of one of the launched processes.

    The flags added last win over the user's (argparse keeps the last value):
    ``--processes 0`` makes it a process of the run rather than another launcher.
    """
    return [
        *argv,
        "--processes",
        "0",
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        str(processes),
        "--process-id",
        str(process_id),
    ]


def child_env() -> dict[str, str]:
    """The launched processes' environment: this one, on the CPU unless told otherwise."""
    env = dict(os.environ)
    env.pop(COORDINATOR_ENV, None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env[LAUNCHER_ENV] = str(os.getpid())
    return env


#: The signals the launcher passes on to its processes (those this platform has).
FORWARDED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)

#: Seconds the launcher waits for its processes after passing on a signal, before
#: it kills them.
GRACE_S = 10.0


def launch(
    config: Config,
    argv: Sequence[str],
    *,
    script: str | os.PathLike[str] | None = None,
    log=print,
    grace_s: float | None = None,
) -> int:
    """Runs ``argv`` in ``config.processes`` processes on localhost and waits for them.

    Process 0's output goes to this process's stdout and stderr; the others'
    output is kept in temporary files and shown when a process fails. When one
    process fails, the others are killed (they would wait for it forever).

    SIGTERM and SIGHUP are passed on to the processes; the launcher waits up to
    ``grace_s`` seconds (default :data:`GRACE_S`) for them to end, kills those
    still running, and returns 128 + the signal's number (143 for SIGTERM). Each
    process ends at the signal; what it wrote before (its last complete
    checkpoint) stays, for ``--resume``. Ctrl-C (SIGINT, which reaches the whole
    process group) ends them too (130).

    Args:
      config: The parsed ``argv``; uses ``processes``.
      argv: The command line of ``train_mnist.py``, without the program name.
      script: The entry point to run (default: ``train_mnist.py`` beside the package).
      log: Called with a line about the launch, and one with the processes' ids.
      grace_s: Seconds to wait for the processes after passing on a signal.

    Returns:
      0 if every process succeeded, 128 + N if the launcher got signal N, else the
      exit status of the first process that failed.
    """
    if script is None:
        script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "train_mnist.py")
    grace_s = GRACE_S if grace_s is None else grace_s
    n, port = config.processes, free_port()
    log(f"starting {n} processes on localhost:{port} (CPU collectives over gloo)")
    procs: list[subprocess.Popen] = []
    logs: list[Any] = [None]  # process 0 writes to this process's stdout and stderr
    failed: tuple[int, int] | None = None  # (process, exit status) of the first failure
    received: list[int] = []  # the signals passed on

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except OSError:  # it ended meanwhile
                    pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        for i in range(n):
            if received:
                break
            if i:
                logs.append(tempfile.TemporaryFile())
            command = [sys.executable, str(script), *child_argv(argv, i, n, port)]
            out = logs[i]
            procs.append(
                subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                    env=child_env(),
                )
            )
        if not received:
            log(f"process ids (pids): {', '.join(str(p.pid) for p in procs)}")
            sys.stdout.flush()  # shown now also when stdout is a file or a pipe
        while failed is None and not received and any(p.poll() is None for p in procs):
            time.sleep(0.1)
            failed = next(
                ((i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)),
                None,
            )
        if received:
            _wait_all(procs, grace_s)
        elif failed is None:
            failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    except KeyboardInterrupt:
        failed = (-1, 130)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        if received:
            name = signal.Signals(received[0]).name
            print(
                f"error: stopped by {name}: passed it on to the {len(procs)} processes, which "
                f"ended (killed if still running after {grace_s:g} s); continue with --resume "
                "from the last complete checkpoint",
                file=sys.stderr,
            )
            return 128 + received[0]
        if failed is None:
            return 0
        first, code = failed
        for i in range(1, len(procs)):
            logs[i].seek(0)
            tail = logs[i].read()[-5000:].decode(errors="replace")
            status = procs[i].returncode
            print(
                f"--- process {i} (exit status {status}), its output: ---\n{tail}", file=sys.stderr
            )
        if first >= 0:
            print(
                f"error: process {first} of {n} failed (exit status {code}); stopped the others",
                file=sys.stderr,
            )
        return code if code > 0 else 1
    finally:
        for f in logs[1:]:
            f.close()


def _wait_all(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    """Waits until every process has ended, or ``timeout_s`` seconds have passed."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


__all__ = (
    "COORDINATOR_ENV",
    "LAUNCHER_ENV",
    "FORWARDED_SIGNALS",
    "GRACE_S",
    "any_process",
    "broadcast_bytes",
    "child_argv",
    "global_batch",
    "initialize",
    "is_distributed",
    "is_main_process",
    "launch",
    "local_rows",
    "replicate",
    "shutdown",
)
