"""The optional frameworks: one clear error naming the extra to install when one is missing."""

from __future__ import annotations

import importlib

# The extra of jbn that installs each optional framework.
EXTRAS = {"flax": "flax", "equinox": "equinox", "optax": "flax"}


def require(module: str, frontend: str) -> None:
    """Raises ``ModuleNotFoundError`` naming ``pip install "jbn[extra]"`` if ``module`` is missing.

    Args:
      module: the framework's top-level package, a key of ``EXTRAS``.
      frontend: what needs it, for the message (e.g. ``"jbn.linen"``).
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{frontend} needs {module}, which is not installed ({error}): "
            f'pip install "jbn[{EXTRAS[module]}]" (or "jbn[all]" for every frontend)',
            name=module,
        ) from error
