from .dispatch import interpreter_enabled, load_triton_module, resolve_backend, triton_installed
from .guards import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_positive_int,
    check_same_device,
    check_tensor,
)

__all__ = [
    "FLOAT_DTYPES",
    "check_choice",
    "check_finite",
    "check_positive_int",
    "check_same_device",
    "check_tensor",
    "interpreter_enabled",
    "load_triton_module",
    "resolve_backend",
    "triton_installed",
]
