"""Peer of benchmarks/maml_step.py: one second-order MAML meta-step of the 4-block
conv net in PyTorch with torch.func (functional_call + grad + vmap over tasks).

Run from the peer's own environment (the benchmark passes its python path):
    python maml_step_torch.py --tasks 32 --ways 5 --shots 1 --queries 15 --inner-steps 1
Prints one JSON line: {"seconds": [...], "loss": ..., "torch": version, "threads": n}.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


class Conv4(nn.Module):
    """4 x [3x3 conv, batch norm with batch statistics, ReLU, 2x2 max-pool] + linear head."""

    def __init__(self, ways, filters, image_size=28):
        super().__init__()
        chans = [1] + [filters] * 4
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(filters, track_running_stats=False) for _ in range(4))
        side = image_size
        for _ in range(4):
            side //= 2
        self.head = nn.Linear(filters * side * side, ways)

    def forward(self, x):  # x: [N, 1, H, W]
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)
        return self.head(x.flatten(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--first-order", action="store_true", help="detach the inner gradients (FOMAML)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Conv4(a.ways, a.filters)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    fast_names = [k for k in params if not k.startswith("norms.")]  # batch norm is not adapted
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    T, W, S, Q = a.tasks, a.ways, a.shots, a.queries
    sx = torch.rand(T, W * S, 1, 28, 28)
    sy = torch.arange(W).repeat_interleave(S).expand(T, -1)
    qx = torch.rand(T, W * Q, 1, 28, 28)
    qy = torch.arange(W).repeat_interleave(Q).expand(T, -1)

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def task_loss(p, sx, sy, qx, qy):
        fast = dict(p)
        for _ in range(a.inner_steps):
            g = grad(lambda f: loss({**fast, **f}, sx, sy))({k: fast[k] for k in fast_names})
            if a.first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast.update({k: fast[k] - a.inner_lr * g[k] for k in fast_names})
        return loss(fast, qx, qy)

    def meta_loss(p):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0), randomness="same")(p, sx, sy, qx, qy).mean()

    def step():
        opt.zero_grad()
        value = meta_loss(params)
        value.backward()
        opt.step()
        return float(value.detach())

    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": times, "loss": value, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
