"""Input checks shared by every public entry point.

Each raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device, value) with
the argument's name, what was expected and what was received, so that callers can fail before any
state changes.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    x,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> torch.Tensor:
    """Check a tensor argument; ``None`` entries of ``shape`` match any size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, x.shape)):
            if want is not None and want != got:
                expected = tuple("*" if s is None else s for s in shape)
                raise ValueError(
                    f"{name} has size {got} in dimension {axis}, expected shape {expected}, got {tuple(x.shape)}"
                )
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if device is not None and not same_device(x.device, torch.device(device)):
        raise ValueError(f"{name} must be on device {torch.device(device)}, got {x.device}")
    return x


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if not same_device(t.device, first.device):
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Reject NaN/inf where they would poison stored state."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
