"""Issue 20: Bayesian-net levers under a fixed deep weight prior, side by side.

    METAPRIOR_DATA=../shared/data .venv/bin/python benchmarks/dwp_bnn_levers.py prior PRIOR.npz SEED
    .venv/bin/python benchmarks/dwp_bnn_levers.py swap OUT.npz A.npz B.npz
    METAPRIOR_DATA=../shared/data [ONLY=dwp] [INIT=xavier|prior] .venv/bin/python benchmarks/dwp_bnn_levers.py \\
        bnn PRIOR.npz TAG field=value ...

``prior``: the kernel VAEs on the released kernels at the paper-size settings (10,000 steps,
hidden 64, 64), saved to PRIOR.npz (derived from the data: keep it out of the repository).
``swap``: a prior with the 7x7 layer's VAE of A and the 5x5 layer's of B.
``bnn``: ``bayesian_nets`` at the dwp-mnist default with the ``field=value`` overrides, for
the priors in ONLY; INIT replaces every prior's kernel initialisation; MIX=dwp7[:s] keeps
the deep weight prior on the 7x7 layer only and puts N(0, s^2) (s = 1 by default) on the
5x5 layer; PRIOR_PARTICLES=n averages the deep weight prior's term over n draws. One JSON line per
run is appended to ``benchmarks/results/dwp_bnn_levers_released.jsonl``.
"""

import ast
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from metaprior.data.dwp_kernels import load_released_kernels
from metaprior.experiments.dwp_mnist import make_config, mnist_splits
from metaprior.inference import dwp as D
from metaprior.models.dwp import ConvNet, DeepWeightPrior, NormalKernelPrior, dwp_model_params, kernel_sites

OUT = Path(__file__).parent / "results" / "dwp_bnn_levers_released.jsonl"


def train_prior(path: str, seed: int) -> None:
    cfg = dataclasses.replace(make_config("default"), source="released", vae_steps=10000, vae_hidden=(64, 64))
    prior, _, info = D.learn_prior(jax.random.key(seed), cfg, load_released_kernels(None, cfg.kernel_sizes))
    print({k: v for k, v in info.items() if not k.endswith("losses")})
    prior.save(path)


def init_override(mode: str):
    def init_bnn_params(rng_key, kind, settings, guide, prior):
        k_net, k_guide, k_prior = jax.random.split(rng_key, 3)
        net = ConvNet(filters=settings.filters, kernel_sizes=settings.kernel_sizes, key=k_net)
        if mode == "prior":
            net = prior.init_net(k_prior, net, noise=False)
        params = {**guide.init_params(k_guide), **dwp_model_params(net)}
        for layer, conv in enumerate(net.convs):
            name = kernel_sites(layer).w + "_loc"
            params[name] = conv.weight.reshape(params[name].shape)
        return params

    return init_bnn_params


def bnn(path: str, tag: str, overrides: list[str]) -> None:
    prior = DeepWeightPrior.load(path)
    kw = {}
    for item in overrides:
        k, v = item.split("=", 1)
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
        kw[k] = v
    cfg = dataclasses.replace(make_config("default"), **{"kl_weight": 1.0, **kw})  # the ELBO unless overridden
    D.PRIORS = tuple(os.environ.get("ONLY", "dwp,normal,loguniform").split(","))
    if os.environ.get("INIT"):
        D.init_bnn_params = init_override(os.environ["INIT"])
    if os.environ.get("MIX", "").startswith("dwp7"):  # the DWP on the 7x7 layer only, N(0, s^2) on the 5x5
        make, scale = D.make_priors, float(os.environ["MIX"].partition(":")[2] or 1.0)
        D.make_priors = lambda kind, p: (
            (make(kind, p)[0], NormalKernelPrior(scale=scale)) if kind == "dwp" else make(kind, p)
        )
    if os.environ.get("PRIOR_PARTICLES"):  # draws of (w, z) per step in the deep weight prior's term
        D.latent_elbo = functools.partial(D.latent_elbo, num_particles=int(os.environ["PRIOR_PARTICLES"]))
    px, py, tx, ty, orders = mnist_splits(cfg)
    start = time.time()
    accs, _ = D.bayesian_nets(jax.random.key(0), cfg, prior, px, py, tx, ty, orders)
    res = {f"{k}_n{n}": [round(float(a), 4) for a in v] for (k, n), v in accs.items()}
    line = {"tag": tag, "kw": {k: str(v) for k, v in kw.items()}, "kl_weight": cfg.kl_weight, **res}
    line["time_s"] = round(time.time() - start, 1)
    line.update({k + "_mean": round(float(np.mean(v)), 4) for k, v in res.items()})
    print(json.dumps(line))
    with OUT.open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "prior":
        train_prior(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "swap":  # swap OUT.npz A.npz B.npz: the 7x7 layer's VAE from A, the 5x5 layer's from B
        first, second = (DeepWeightPrior.load(p) for p in sys.argv[3:5])
        DeepWeightPrior([first.vaes[0], second.vaes[1]]).save(sys.argv[2])
    else:
        bnn(sys.argv[2], sys.argv[3], sys.argv[4:])
