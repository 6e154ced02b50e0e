"""The SMPConv paper's sanity check (its section 4.1): do self-moving points help?

One SMPConv2d layer (1 channel, 51x51 grid, 204 points) is fitted to a sinusoid-based 2-D function by
minimising the mean squared error of its kernel. Two runs share the initial points (uniform over the
square), the optimiser (Adam) and the number of steps; in one the point positions move, in the other
they stay where they started (weights and radii are learned in both).

    python -m smpconv_timm.examples.sinusoid_fit [--steps 1000]
"""
import argparse
import math
from typing import Dict

import torch

from smpconv_timm import SMPConv2d


def target(kernel_size: int = 51) -> torch.Tensor:
    """f(x, y) = sin(3 pi x) cos(2 pi y) + 0.5 sin(4 pi (x + y)^2), sampled like an SMP kernel grid."""
    u = torch.linspace(-1., 1., kernel_size)
    y, x = torch.meshgrid(-u, u, indexing='ij')  # row i sits at height -u[i], as in the SMP kernel
    return torch.sin(3 * math.pi * x) * torch.cos(2 * math.pi * y) + 0.5 * torch.sin(4 * math.pi * (x + y) ** 2)


def fit(move_points: bool, steps: int = 600, n_points: int = 204, kernel_size: int = 51, lr: float = 1e-2,
        seed: int = 0) -> float:
    """Final mean squared error of the fitted kernel."""
    torch.manual_seed(seed)
    layer = SMPConv2d(1, kernel_size, n_points=n_points)
    with torch.no_grad():
        layer.weight_coord.uniform_(-1., 1.)
        layer.radius.fill_(8. / kernel_size)
    layer.weight_coord.requires_grad_(move_points)
    goal = target(kernel_size)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = (layer.make_kernel()[0, 0] - goal).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # radii are clamped to [1e-3, 1] by the SMPConv2d optimizer hooks
    with torch.no_grad():
        return (layer.make_kernel()[0, 0] - goal).pow(2).mean().item()


def compare(steps: int = 600, seed: int = 0) -> Dict[str, float]:
    return {'moving': fit(True, steps, seed=seed), 'fixed': fit(False, steps, seed=seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    r = compare(args.steps, args.seed)
    print(f'51x51 grid, 204 points, Adam, {args.steps} steps: MSE moving points {r["moving"]:.5f}, '
          f'fixed points {r["fixed"]:.5f} (ratio {r["moving"] / r["fixed"]:.2f})')


if __name__ == '__main__':
    main()
