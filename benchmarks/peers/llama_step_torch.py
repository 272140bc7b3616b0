"""Peer of benchmarks/llama_step.py: one LLAMA (ML-LAPLACE, K-FAC) meta-step of the
4-block conv net in PyTorch with torch.func.

The same computation as ``metaprior.inference.maml.kfac_llama`` with the exact Fisher
and K-FAC's factored damping: per task, ``inner_steps`` SGD steps on the conv and linear
weights (batch norm shared and not adapted), the query cross-entropy at the adapted
weights, and, for the first ``log_det_tasks`` tasks, ``eta / 2 log det`` of the K-FAC
Laplace precision of the support negative log-likelihood at the adapted weights:
``A_l`` from the layer inputs (conv inputs as 3x3 patches, a homogeneous 1 appended),
``G_l`` from the output gradients of the K columns of the softmax Hessian's square root
``diag(sqrt p) - p sqrt(p)^T``, and per block ``log det((A/sqrt c + pi sqrt(tau) I)
kron (G/sqrt c + sqrt(tau)/pi I))``. All of it differentiated (second order through
the inner loop and the curvature), then an Adam step.

Weights and the batch come from the ``--npz`` that the JAX side writes, so both sides
start from the same numbers; the first step's loss is printed for the comparison.
Prints one JSON line: {"seconds": [...], "loss0": ..., "log_det0": ..., "grad_norm0": ..., "torch": ..., "threads": n}.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

TINY = float(np.finfo(np.float32).tiny)


def forward(p, x, probes=None):
    """Logits ``[N, K]`` and the inputs of the five layers (conv inputs, flattened features)."""
    inputs = []
    h = x
    for layer in range(4):
        inputs.append(h)
        out = F.conv2d(h, p[f"conv{layer}.weight"], p[f"conv{layer}.bias"], padding=1)
        if probes is not None:
            out = out + probes[layer]
        mean = out.mean(dim=(0, 2, 3), keepdim=True)
        var = out.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        out = (out - mean) * torch.rsqrt(var + 1e-5)
        out = out * p[f"norm{layer}.scale"][None, :, None, None] + p[f"norm{layer}.shift"][None, :, None, None]
        h = F.max_pool2d(F.relu(out), 2)
    flat = h.flatten(1)
    inputs.append(flat)
    logits = flat @ p["head.weight"].T + p["head.bias"]
    if probes is not None:
        logits = logits + probes[4]
    return logits, inputs


def nll(p, x, y):
    return F.cross_entropy(forward(p, x)[0], y)


def chol_log_det(m):
    return 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(m))).sum()


def factored_log_det(a, g, count, shift):
    root = count**0.5
    a, g = a / root, g / root
    da, dg = a.shape[0], g.shape[0]
    pi = torch.sqrt((torch.trace(a) / da + TINY) / (torch.trace(g) / dg + TINY))
    s = shift**0.5
    eye_a = torch.eye(da, dtype=a.dtype)
    eye_g = torch.eye(dg, dtype=g.dtype)
    return dg * chol_log_det(a + pi * s * eye_a) + da * chol_log_det(g + s / pi * eye_g)


def kfac_log_det(phi, x, tau):
    logits, inputs = forward(phi, x)
    n = x.shape[0]
    blocks_a, counts = [], []
    for h in inputs[:4]:
        cols = F.unfold(h, 3, padding=1)  # [N, C*9, L]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        cols = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype)], 1)
        blocks_a.append(cols.T @ cols)
        counts.append(cols.shape[0])
    flat = torch.cat([inputs[4], torch.ones(n, 1, dtype=x.dtype)], 1)
    blocks_a.append(flat.T @ flat)
    counts.append(n)
    prob = torch.softmax(logits, -1)
    sp = torch.sqrt(prob)
    root = torch.diag_embed(sp) - prob[:, :, None] * sp[:, None, :]  # [N, K, S]
    shapes = [(n, phi[f"conv{i}.weight"].shape[0], x.shape[2] >> i, x.shape[3] >> i) for i in range(4)]
    probes = [torch.zeros(s, dtype=x.dtype) for s in shapes] + [torch.zeros_like(logits)]

    def contract(probes, v):
        return (forward(phi, x, probes)[0] * v).sum()

    gs = vmap(grad(contract), in_dims=(None, 2))(probes, root)  # per block [S, N, O, ...]
    total = 0.0
    for a, g, c in zip(blocks_a, gs, counts):
        g = g.movedim(2, -1).reshape(-1, g.shape[2]) if g.ndim == 5 else g.reshape(-1, g.shape[-1])
        total = total + factored_log_det(a, g.T @ g, float(c), tau)
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--npz", required=True)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--eta", type=float, default=1e-6)
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--log-det-tasks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data = np.load(a.npz)
    params = {k[2:]: torch.tensor(data[k]).requires_grad_(True) for k in data.files if k.startswith("p.")}
    sx, qx = (torch.tensor(data[k]).permute(0, 1, 4, 2, 3).contiguous() for k in ("sx", "qx"))
    sy, qy = (torch.tensor(data[k]).long() for k in ("sy", "qy"))
    fast_names = [k for k in params if not k.startswith("norm")]  # batch norm is not adapted
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    m = a.log_det_tasks

    def adapt(p, sx, sy):
        fast = dict(p)
        for _ in range(a.inner_steps):
            g = grad(lambda f: nll({**fast, **f}, sx, sy))({k: fast[k] for k in fast_names})
            fast.update({k: fast[k] - a.inner_lr * g[k] for k in fast_names})
        return fast

    def meta_loss(p):
        # adapt every task once (as the JAX side does), then the query term on all tasks
        # and the log-determinant on the first m
        phis = vmap(adapt, in_dims=(None, 0, 0))(p, sx, sy)
        query = vmap(nll)(phis, qx, qy).mean()
        head = {k: v[:m] for k, v in phis.items()}
        ld = vmap(lambda phi, x: kfac_log_det(phi, x, a.tau))(head, sx[:m]).mean()
        return query + a.eta * 0.5 * ld, ld

    def step():
        opt.zero_grad()
        value, ld = meta_loss(params)
        value.backward()
        norm = float(torch.sqrt(sum((q.grad**2).sum() for q in params.values())))
        opt.step()
        return float(value.detach()), float(ld.detach()), norm

    loss0, ld0, norm0 = step()  # warm-up, at the JAX side's initial weights
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out = {"seconds": times, "loss0": loss0, "log_det0": ld0, "grad_norm0": norm0, "torch": torch.__version__}
    print(json.dumps({**out, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
