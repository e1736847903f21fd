"""The options every frontend passes to the core, declared once.

A frontend (``jbn.linen.BatchNorm``, ``jbn.nnx.BatchNorm``, ``jbn.equinox``)
stores these as attributes of the same names and hands them to
:func:`jbn.bn_forward` with :func:`forward_kwargs`, so an option added to the core
is forwarded by every frontend once it is listed here.
"""

from __future__ import annotations

from typing import Any

# flax's BatchNorm settings that bn_forward takes under the same name.
FLAX = ("axis", "momentum", "epsilon", "axis_name", "axis_index_groups")

# jbn's own settings, with their defaults (the same in every frontend).
JBN = {
    "unbiased_running_var": False,
    "finite_running_stats": True,
    "residual": "input",
    "min_scale": 1e-3,
    "virtual_batch_size": None,
    "renorm": False,
    "rmax": 3.0,
    "dmax": 5.0,
    "prior": None,
    "prior_form": "pooled",
}

# Settings a call may override (renorm's bounds, e.g. from a schedule).
PER_CALL = ("rmax", "dmax")


def forward_kwargs(module: Any, **per_call: Any) -> dict[str, Any]:
    """``bn_forward``'s keyword arguments from ``module``'s attributes.

    Args:
      module: any object with the attributes named in ``FLAX`` and ``JBN``.
      **per_call: values given to this call (``rmax``, ``dmax``); None means
        "use the attribute".
    """
    kwargs = {name: getattr(module, name) for name in (*FLAX, *JBN)}
    for name, value in per_call.items():
        if name not in PER_CALL:
            raise TypeError(f"{name} cannot be set per call; set it on the module")
        if value is not None:
            kwargs[name] = value
    return kwargs
