"""Peer of benchmarks/kfac_laplace.py: fit laplace-torch's KronLaplace on the same MLP
(weights and data read from an .npz written by the JAX side) and report the time and
the log-determinant of the posterior precision.

    python kfac_laplace_torch.py DATA.npz --prior-precision 1.0 --repeats 3
Prints one JSON line: {"seconds": [...], "log_det": ..., "versions": {...}}.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def build(weights, biases):
    """``weights[i]: [out, in]``; ``biases[i]: [out]`` or ``None`` (bias-free layer)."""
    layers = []
    n = len(weights)
    for i, (w, b) in enumerate(zip(weights, biases)):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            if b is not None:
                lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < n - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--prior-precision", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from laplace import Laplace

    d = np.load(a.data)
    n = int(d["num_layers"])
    weights = [d[f"w{i}"] for i in range(n)]
    biases = [d[f"b{i}"] if f"b{i}" in d else None for i in range(n)]
    model = build(weights, biases).float()
    x = torch.from_numpy(d["x"]).float()
    y = torch.from_numpy(d["y"]).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=int(d["batch_size"]))
    times, log_det = [], None
    for r in range(a.repeats + 1):
        la = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            prior_precision=a.prior_precision,
        )
        t = time.perf_counter()
        la.fit(loader)
        log_det = float(la.log_det_posterior_precision)
        if r:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    import laplace

    print(
        json.dumps(
            {
                "seconds": times,
                "log_det": log_det,
                "backend": type(la.backend).__name__,
                "versions": {"torch": torch.__version__, "laplace-torch": getattr(laplace, "__version__", "0.3")},
            }
        )
    )


if __name__ == "__main__":
    main()
