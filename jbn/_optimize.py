"""An optax transformation restricted to a mask (fine-tune only the batch norms, or all but them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._extras import require

if TYPE_CHECKING:
    import optax


def optimize_only(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``mask`` is True; zero updates everywhere else.

    ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)``: the
    masked-out leaves do not move at all (no weight decay either), and ``tx``
    keeps state only for the others. With a batch-norm mask::

      optimize_only(tx, mask)                                # train only the batch norms
      optimize_only(tx, jax.tree.map(lambda m: not m, mask)) # freeze the batch norms

    (``optax.masked(tx, mask)`` is not the same: it passes the raw gradient
    through as the update of the masked-out leaves.)

    Args:
      tx: the optimizer for the selected leaves.
      mask: a pytree of bools with the structure of the parameters (or a
        function of the parameters returning one).

    Returns:
      The combined gradient transformation.
    """
    # Only this tool needs optax: the core depends on jax alone.
    require("optax", "jbn.optimize_only")
    import optax

    return optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)
