"""The DKVB paper's 2D toy: 8 Gaussian blobs (std 0.035) in the unit square, 4 tasks of 2 classes.

Trained in sequence without replay, a discrete key-value bottleneck keeps almost every class while a
linear probe and a small MLP trained the same way collapse to about the last task.

    python models/dkvb_continual/toy2d.py --out models/dkvb_continual/results

writes ``toy2d.json`` (accuracies) and ``toy2d_boundaries.png`` (decision boundaries).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mlp, recipe_main, split_tasks, train_and_evaluate  # noqa: E402

from memlayers.layers.dkvb import DiscreteKeyValueBottleneck  # noqa: E402

NUM_CLASSES, CLASSES_PER_TASK, STD = 8, 2, 0.035


def blob_centers(gen: torch.Generator, min_gap: float = 0.2) -> torch.Tensor:
    """8 centers in [0.1, 0.9]^2, pairwise at least ``min_gap`` apart (rejection sampling)."""
    centers = []
    while len(centers) < NUM_CLASSES:
        c = 0.1 + 0.8 * torch.rand(2, generator=gen)
        if all(float((c - o).norm()) >= min_gap for o in centers):
            centers.append(c)
    return torch.stack(centers)


def model_input(x: torch.Tensor) -> torch.Tensor:
    """The unit square mapped onto [-1, 1]^2, the same for every model (centered inputs let the
    baselines learn each task fully, so that their forgetting is not mistaken for underfitting)."""
    return 2.0 * x - 1.0


def make_data(seed: int, per_class: int):
    """(centers [8, 2], train x [8 * per_class, 2], train y, test x, test y), x in the unit square."""
    gen = torch.Generator().manual_seed(seed)
    centers = blob_centers(gen)

    def sample():
        y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        return centers[y] + STD * torch.randn(len(y), 2, generator=gen), y

    x_train, y_train = sample()
    x_test, y_test = sample()
    return centers, x_train, y_train, x_test, y_test


def build_dkvb(seed: int, backend: str = "auto") -> DiscreteKeyValueBottleneck:
    torch.manual_seed(seed)
    dkvb = DiscreteKeyValueBottleneck(
        dim=2, num_codebooks=64, num_keys=64, key_dim=2, value_dim=NUM_CLASSES, topk=1,
        splitter="random", decoder="vote", mask_untrained=True, backend=backend,
    )
    # Keys are fitted on unlabeled inputs covering the square, then frozen (the paper's recipe).
    gen = torch.Generator().manual_seed(seed + 1)
    dkvb.init_keys([model_input(torch.rand(256, 2, generator=gen)) for _ in range(40)])
    dkvb.freeze_keys()
    return dkvb


def run(seed: int = 0, per_class: int = 100, epochs: int = 10, batch_size: int = 32, backend: str = "auto") -> Dict[str, object]:
    """Train the three models on the 4 tasks in sequence; return accuracies and the trained models."""
    _, x_train, y_train, x_test, y_test = make_data(seed, per_class)
    x_train, x_test = model_input(x_train), model_input(x_test)
    tasks = split_tasks(x_train, y_train, CLASSES_PER_TASK)
    test_tasks = split_tasks(x_test, y_test, CLASSES_PER_TASK)
    torch.manual_seed(seed)
    models = {
        "dkvb": (build_dkvb(seed, backend), 64.0),  # the vote averages 64 codebooks: each value gets 1/64 of the gradient
        "linear": (nn.Linear(2, NUM_CLASSES), 0.5),
        "mlp": (mlp(2, 64, NUM_CLASSES), 0.5),
    }
    results: Dict[str, object] = train_and_evaluate(
        models, tasks, test_tasks, x_test, y_test, epochs=epochs, batch_size=batch_size, seed=seed
    )
    for name, (model, _) in models.items():
        results[name]["model"] = model
    results["data"] = (x_test, y_test)
    return results


def plot_boundaries(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_test, y_test = results["data"]
    g = torch.linspace(0, 1, 200)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
    names = ["dkvb", "linear", "mlp"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    for ax, name in zip(axes, names):
        model = results[name]["model"]
        model.eval()
        with torch.no_grad():
            pred = model(model_input(grid)).argmax(-1).reshape(200, 200)
        ax.imshow(pred.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="tab10", vmin=0, vmax=9, alpha=0.35)
        shown = (x_test + 1.0) / 2.0  # back to the unit square
        ax.scatter(shown[:, 0], shown[:, 1], c=y_test.numpy(), cmap="tab10", vmin=0, vmax=9, s=4)
        ax.set_title(f"{name}: {results[name]['accuracy']:.2f} on all 8 classes")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    fig.suptitle("2D toy, 4 tasks of 2 classes trained in sequence (no replay)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    def after_seed(seed, results, args):
        if seed == 0:
            plot_boundaries(results, args.out / "toy2d_boundaries.png")

    return recipe_main(__doc__, run, "toy2d.json", argv, after_seed=after_seed)


if __name__ == "__main__":
    raise SystemExit(main())
