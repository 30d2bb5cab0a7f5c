"""One process of a sharded ``fit`` (run by tests/test_sharding.py): a GPT on ``make_mesh(fsdp=8)``,
its params sharded across every device of every process; process 0 writes the round losses.

Usage: python sharded_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.json [CHECKPOINTS [save|resume]]
(NUM_PROCESSES 1: a single process, without jax.distributed.) ``save``: train 10 of the 20 steps
and checkpoint them at steps 5 and 10 into CHECKPOINTS (every process writing its shards); ``resume``: restore the
newest checkpoint there, each array read straight into its shards, and train on to step 20.
"""

import json
import sys

import numpy as np

from jaxnet import parallel


def main(coordinator, num_processes, process_id, out, checkpoints=None, mode=None):
    if int(num_processes) > 1:
        parallel.initialize_distributed(coordinator, int(num_processes), int(process_id))
    import jax
    import optax

    import jaxnet as jn

    net = jn.gpt(vocab_size=64, context=16, layers=2, heads=2, dim=128)
    params, state = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (160, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    mesh = jn.make_mesh(fsdp=8)
    if jax.process_count() > 1:  # each process holds its rows of one global array
        rows = parallel.process_rows(len(x))
        x, y = parallel.global_rows(x[rows], mesh), parallel.global_rows(y[rows], mesh)
    from jaxnet import callbacks as callbacklib
    from jaxnet import checkpoint

    optimizer, key, resume, callbacks, read = optax.adamw(1e-3), jax.random.key(1), None, [], None
    if mode == "save":
        callbacks = [callbacklib.Checkpointer(checkpoints, every=5)]  # steps 5 and 10
    if mode == "resume":
        template = jax.eval_shape(lambda: jn.init_fit_state(params, optimizer, key, model_state=state))
        resume = checkpoint.restore(checkpoints, template, mesh=mesh).state  # each process reads its shards
        w = resume.train.params["blocks"]["mlp"]["fc"]["w"]
        read = {"spec": list(w.sharding.spec), "whole_here": w.is_fully_addressable,
                "local_shards": len(w.addressable_shards), "step": int(resume.train.step)}  # fmt: skip
    result = jn.fit(
        net, params, x, y, loss="softmax_cross_entropy", optimizer=optimizer, steps=10 if mode == "save" else 20,
        eval_every=1, batch_size=8, key=key, model_state=state, mesh=mesh, shuffle=False, callbacks=callbacks,
        resume=resume,
    )  # fmt: skip
    if jax.process_index() == 0:
        table = result.train.params["blocks"]["mlp"]["fc"]["w"]
        shards = {str(s.device) for s in table.addressable_shards}
        figures = {"losses": [r["train_loss"] for r in result.history], "local_shards": len(shards), "read": read}
        with open(out, "w") as f:
            json.dump(figures, f)
    parallel.sync("done")


if __name__ == "__main__":
    main(*sys.argv[1:])
