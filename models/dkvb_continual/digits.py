"""Class-incremental digits: scikit-learn's bundled 8x8 digits, 5 tasks of 2 classes, no replay.

A fixed random-projection encoder (64 -> 256, ReLU, never trained) stands in for the frozen
pretrained encoder of the paper. On top of it: a discrete key-value bottleneck (keys fitted on the
unlabeled training images, then frozen; non-parametric voting decoder), a linear probe and a small
MLP, all trained task after task with plain SGD.

    python models/dkvb_continual/digits.py --out models/dkvb_continual/results
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mlp, recipe_main, split_tasks, train_and_evaluate  # noqa: E402

from memlayers.layers.dkvb import DiscreteKeyValueBottleneck  # noqa: E402

FEATURES, NUM_CLASSES, CLASSES_PER_TASK = 256, 10, 2


def load_digits(seed: int):
    """(x_train, y_train, x_test, y_test): a stratified 75/25 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data / 16.0, data.target, test_size=0.25, stratify=data.target, random_state=seed
    )
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


class RandomEncoder(nn.Module):
    """Frozen random features: ReLU(x W + b), standardized with the training statistics."""

    def __init__(self, x_train: torch.Tensor, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(x_train.shape[1], FEATURES, generator=gen) / x_train.shape[1] ** 0.5)
        self.register_buffer("b", 0.1 * torch.randn(FEATURES, generator=gen))
        h = torch.relu(x_train @ self.w + self.b)
        self.register_buffer("mean", h.mean(0))
        self.register_buffer("std", h.std(0).clamp_min(1e-3))

    def forward(self, x):
        return (torch.relu(x @ self.w + self.b) - self.mean) / self.std


def run(seed: int = 0, epochs: int = 10, batch_size: int = 32, backend: str = "auto"):
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    encoder = RandomEncoder(x_tr, seed)
    with torch.no_grad():
        h_tr, h_te = encoder(x_tr), encoder(x_te)
    tasks = split_tasks(h_tr, y_tr, CLASSES_PER_TASK)
    test_tasks = split_tasks(h_te, y_te, CLASSES_PER_TASK)

    torch.manual_seed(seed)
    dkvb = DiscreteKeyValueBottleneck(
        FEATURES, num_codebooks=64, num_keys=256, key_dim=8, value_dim=NUM_CLASSES,
        splitter="random", decoder="vote", mask_untrained=True, backend=backend,
    )
    gen = torch.Generator().manual_seed(seed)
    unlabeled = [h_tr[torch.randperm(len(h_tr), generator=gen)[:256]] for _ in range(30)]
    dkvb.init_keys(unlabeled)
    dkvb.freeze_keys()
    models = {"dkvb": (dkvb, 64.0), "linear": (nn.Linear(FEATURES, NUM_CLASSES), 0.05), "mlp": (mlp(FEATURES, 128, NUM_CLASSES), 0.05)}
    return train_and_evaluate(models, tasks, test_tasks, h_te, y_te, epochs=epochs, batch_size=batch_size, seed=seed)


def main(argv=None) -> int:
    return recipe_main(__doc__, run, "digits.json", argv)


if __name__ == "__main__":
    raise SystemExit(main())
