"""One process of tests/core/test_multiprocess.py: a shard_map'd bn_forward over a 2-process mesh.

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in the environment
(each process has 2 CPU devices). Every process builds the same global batch,
keeps only its own rows, and writes the globally gathered results to OUT.npz.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jbn

SHAPE = (16, 2, 2, 5)  # NHWC; 4 examples per device, 8 per process


def global_data():
    """The global batch, the same in every process and in the test's reference."""
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=SHAPE)).astype(np.float32)
    w = rng.normal(size=SHAPE).astype(np.float32)
    params = {
        "scale": (1.0 + 0.3 * rng.normal(size=5)).astype(np.float32),
        "bias": (0.1 * rng.normal(size=5)).astype(np.float32),
    }
    state = {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}
    # Device d keeps d + 1 of its 4 examples: process 0 keeps 3, process 1 keeps 7.
    keep = np.zeros((4, 4), bool)
    for d in range(4):
        keep[d, : d + 1] = True
    masks = {"plain": np.ones((16, 1, 1, 1), bool), "masked": keep.reshape(16, 1, 1, 1)}
    return x, w, params, state, masks


def loss(params, state, x, w, mask, axis_name):
    y, new = jbn.bn_forward(params, state, x, True, mask=mask, momentum=0.9, axis_name=axis_name)
    return jnp.sum(jnp.sin(y) * w), (y, new)


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    # This process's rows of the global batch: those its devices hold.
    index = rows.addressable_devices_indices_map(SHAPE).values()
    start = min(i[0].start for i in index)
    stop = max(i[0].stop for i in index)
    x, w, params, state, masks = global_data()

    def sharded(a):
        return jax.make_array_from_process_local_data(rows, a[start:stop], a.shape)

    def everywhere(tree):
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(replicated, a), tree)

    def sharded_loss(params, state, x, w, mask):
        def per_device(p, s, x, w, m):
            value, aux = loss(p, s, x, w, m, "data")
            return jax.lax.psum(value, "data"), aux

        f = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), (P("data"), P())),
        )
        return f(params, state, x, w, mask)

    grad = jax.jit(jax.grad(sharded_loss, argnums=(0, 2), has_aux=True))
    results = {
        "process_count": np.int32(jax.process_count()),
        "local_devices": np.int32(jax.local_device_count()),
        "global_devices": np.int32(jax.device_count()),
        "rows": np.array([start, stop], np.int32),
    }
    for name, mask in masks.items():
        (gp, gx), (y, new) = grad(
            everywhere(params), everywhere(state), sharded(x), sharded(w), sharded(mask)
        )
        gathered = multihost_utils.process_allgather(
            {"y": y, "gx": gx, "new": new, "gp": gp}, tiled=True
        )
        for key, value in jax.tree_util.tree_flatten_with_path(gathered)[0]:
            results["/".join([name, *(k.key for k in key)])] = np.asarray(value)
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
