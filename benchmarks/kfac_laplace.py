"""Fitting a K-FAC Laplace posterior on an MLP: metaprior vs laplace-torch's KronLaplace.

Same network (weights copied), same data, same prior precision, exact-expectation
(GGN / "type-2") Fisher on both sides. Times the whole fit -- curvature factors plus
the log-determinant of the posterior precision -- after a warm-up (JAX: after
compilation), and checks that the two log-determinants agree.

The MLP has no biases: laplace-torch (through curvlinops) keeps a layer's weight and
bias in separate Kronecker blocks, while metaprior uses Martens & Grosse's homogeneous
coordinate (one block per layer), so with biases the two curvatures differ by design.

    .venv/bin/python benchmarks/kfac_laplace.py --peer-python /tmp/torchvenv/bin/python

Writes ``benchmarks/results/kfac_laplace.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import numpyro.distributions as dist

from metaprior.inference import laplace as L

HERE = Path(__file__).resolve().parent


class BiasFreeMLP(eqx.Module):
    """ReLU MLP of bias-free ``eqx.nn.Linear`` layers; ``x: [in] -> [out]``."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, sizes, *, key):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(eqx.nn.Linear(a, b, use_bias=False, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=None, help="python of the laplace-torch environment")
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 100, 10])
    p.add_argument("--num-data", type=int, default=2000)
    p.add_argument("--prior-precision", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "kfac_laplace.json")
    a = p.parse_args(argv)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    net = BiasFreeMLP(a.sizes, key=k1)
    x = jax.random.normal(k2, (a.num_data, a.sizes[0]))
    y = jax.random.randint(k3, (a.num_data,), 0, a.sizes[-1])

    @jax.jit
    def fit(net, x, y):
        post = L.laplace(
            None,
            net,
            x,
            y,
            apply_fn=L.vmap_apply,
            likelihood=lambda f: dist.Categorical(logits=f),
            structure="kfac",
            fisher="exact",
            prior_precision=a.prior_precision,
        )
        return L.log_det(post)

    t = time.perf_counter()
    log_det = float(jax.block_until_ready(fit(net, x, y)))
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        jax.block_until_ready(fit(net, x, y))
        times.append(time.perf_counter() - t)
    result = {
        "benchmark": "kfac_laplace",
        "sizes": a.sizes,
        "num_data": a.num_data,
        "num_params": sum(layer.weight.size for layer in net.layers),
        "prior_precision": a.prior_precision,
        "jax_seconds": times,
        "jax_median_s": float(np.median(times)),
        "jax_compile_s": compile_s,
        "jax_log_det": log_det,
        "jax": jax.__version__,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if a.peer_python:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mlp.npz"
            np.savez(
                path,
                x=np.asarray(x),
                y=np.asarray(y),
                num_layers=len(net.layers),
                batch_size=a.num_data,
                **{f"w{i}": np.asarray(l.weight) for i, l in enumerate(net.layers)},
            )
            cmd = [
                a.peer_python,
                str(HERE / "peers" / "kfac_laplace_torch.py"),
                str(path),
                "--prior-precision",
                str(a.prior_precision),
                "--repeats",
                str(a.repeats),
            ]
            peer = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
        result.update(
            torch_seconds=peer["seconds"],
            torch_median_s=float(np.median(peer["seconds"])),
            torch_log_det=peer["log_det"],
            torch_backend=peer["backend"],
            torch_versions=peer["versions"],
            torch_over_jax=float(np.median(peer["seconds"]) / np.median(times)),
            log_det_rel_diff=abs(peer["log_det"] - log_det) / abs(log_det),
        )
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("seconds")}, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
