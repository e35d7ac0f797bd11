"""Arguments renamed in the public API: the old keyword keeps working for one release, with a warning."""
from __future__ import annotations

import warnings


def renamed_argument(where: str, old_name: str, old_value, new_name: str, new_value, new_default):
    """The value of ``new_name``, taken from ``old_name`` (with a ``DeprecationWarning``) when the
    caller used the old keyword; both at once is a ``TypeError``. ``old_value`` is ``None`` when unused."""
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise TypeError(f"{where}() got both {new_name}= and its deprecated name {old_name}=")
    warnings.warn(f"{where}(): {old_name}= is renamed {new_name}=; the old name will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    return old_value
