from .dispatch import NATIVE_OPS, interpreter_enabled, load_triton_module, resolve_backend, triton_installed
from .empty import empty_result
from .guards import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_positive_int,
    check_same_device,
    check_tensor,
)
from .renames import renamed_argument

__all__ = [
    "FLOAT_DTYPES",
    "NATIVE_OPS",
    "check_choice",
    "check_finite",
    "check_positive_int",
    "check_same_device",
    "check_tensor",
    "empty_result",
    "interpreter_enabled",
    "load_triton_module",
    "renamed_argument",
    "resolve_backend",
    "triton_installed",
]
