"""One process of a multi-process data-parallel ``fit`` (run by tests/test_parallel.py).

Usage: python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz [DATA_DIR]

With DATA_DIR (holding x.npy and y.npy), every process streams the same memory-mapped arrays and
reads only its share of each batch; otherwise each passes its rows as one global array.
"""

import sys

import numpy as np

from jaxnet import parallel


def problem():
    """A small deterministic classification problem, the same in every process."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(41, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return x, y


CONFIG = dict(loss="softmax_cross_entropy", epochs=3, batch_size=8)


def train(x, y, mesh=None):
    import jax
    import optax

    from jaxnet import fit, mlp

    net = mlp([5, 16, 3])
    params = net.init(jax.random.key(0))
    state = fit(net, params, x, y, optimizer=optax.adam(1e-2), key=jax.random.key(1), mesh=mesh, **CONFIG)
    return state.params


def main(coordinator, num_processes, process_id, out, data=None):
    parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))
    import jax

    mesh = parallel.make_data_mesh()
    if data is not None:
        x, y = (np.load(f"{data}/{name}.npy", mmap_mode="r") for name in ("x", "y"))
        params = train(x, y, mesh)
    else:
        x, y = problem()
        rows = parallel.process_rows(len(x))
        params = train(parallel.global_rows(x[rows], mesh), parallel.global_rows(y[rows], mesh), mesh)
    leaves = jax.tree.leaves(params)
    np.savez(out, *[np.asarray(a) for a in leaves], devices=jax.device_count(), processes=jax.process_count())
    parallel.sync("saved")


if __name__ == "__main__":
    main(*sys.argv[1:])
