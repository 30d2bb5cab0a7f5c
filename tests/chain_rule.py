"""An independent float64 reference for the worked example: the notes' chain rule, written out by hand.

Plain Python floats and ``math.exp``, one loop per index, weights before the update (as backprop
requires). Shared by ``test_seed.py`` and ``test_cli_seed.py``; nothing here imports jaxnet.
"""

import math

# The notes' network: W[l][j][k] = w_jk^(l+1), from input k to neuron j.
W = [[[0.1, 0.2, 0.5], [0.4, 0.1, 0.5]], [[0.6, 0.1], [0.5, 0.2]]]
B = [[0.2, 0.2], [0.2, 0.1]]


def sigma(z):
    return 1.0 / (1.0 + math.exp(-z))


def chain_rule(x, target, lr, W=W, B=B):
    """Forward pass, the notes' backprop and one SGD step, in the JSON layout of ``jaxnet seed``."""
    a0 = list(x)
    z1 = [sum(W[0][j][k] * a0[k] for k in range(3)) + B[0][j] for j in range(2)]
    a1 = [sigma(z) for z in z1]
    z2 = [sum(W[1][j][k] * a1[k] for k in range(2)) + B[1][j] for j in range(2)]
    a2 = [sigma(z) for z in z2]
    loss = 0.5 * sum((a2[i] - target[i]) ** 2 for i in range(2))

    # Output layer: dC/dw_jk^2 = dC/da_j^2 * da_j^2/dz_j^2 * dz_j^2/dw_jk^2.
    dC_da2 = [a2[j] - target[j] for j in range(2)]
    da2_dz2 = [a2[j] * (1.0 - a2[j]) for j in range(2)]
    gw2 = [[dC_da2[j] * da2_dz2[j] * a1[k] for k in range(2)] for j in range(2)]
    gb2 = [dC_da2[j] * da2_dz2[j] for j in range(2)]
    # Hidden layer: dC/da_j^1 sums over both output neurons i, with dz_i^2/da_j^1 = w_ij^2.
    dC_da1 = [sum(W[1][i][j] * da2_dz2[i] * dC_da2[i] for i in range(2)) for j in range(2)]
    da1_dz1 = [a1[j] * (1.0 - a1[j]) for j in range(2)]
    gw1 = [[dC_da1[j] * da1_dz1[j] * a0[k] for k in range(3)] for j in range(2)]
    gb1 = [dC_da1[j] * da1_dz1[j] for j in range(2)]

    grads = [{"w": gw1, "b": gb1}, {"w": gw2, "b": gb2}]
    params = [{"w": W[0], "b": B[0]}, {"w": W[1], "b": B[1]}]
    updated = [
        {
            "w": [[p["w"][j][k] - lr * g["w"][j][k] for k in range(len(p["w"][j]))] for j in range(2)],
            "b": [p["b"][j] - lr * g["b"][j] for j in range(2)],
        }
        for p, g in zip(params, grads)
    ]
    return {
        "x": list(x),
        "target": list(target),
        "lr": lr,
        "layers": [{"z": z1, "a": a1}, {"z": z2, "a": a2}],
        "loss": loss,
        "params": params,
        "grads": grads,
        "updated": updated,
    }


def flatten(tree):
    """All numbers of a nested dict/list structure, in a fixed order, with their paths."""
    if isinstance(tree, dict):
        return [(f"{k}.{p}" if p else k, v) for k in sorted(tree) for p, v in flatten(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [(f"{i}.{p}" if p else str(i), v) for i, t in enumerate(tree) for p, v in flatten(t)]
    return [("", tree)]
