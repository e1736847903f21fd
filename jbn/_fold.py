"""Folding an evaluation-mode batch norm into the Dense or Conv before it.

At evaluation a batch norm is a per-feature affine map, y = (z - μ) a + β with
a = γ/√(var + ε) (``eval_multiplier`` and ``eval_affine``, the same functions
``bn_forward`` evaluates with). After a Dense or Conv, z = x W + b, so

    y = x (W a) + ((b - μ) a + β):

the same layer with kernel W a (each output feature's column scaled) and bias
(b - μ) a + β, and no batch norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks as checks
from . import _tree as tree
from ._batch_norm import eval_affine, eval_multiplier
from ._stats import compute_dtype

# fold_batch_norm_variables' check: (apply_fn, folded_apply_fn, probe batch).
Check = tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any], ArrayLike]


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    bn_params: Mapping[str, ArrayLike] | None,
    bn_state: Mapping[str, ArrayLike],
    *,
    epsilon: float = 1e-5,
    feature_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    """Folds an evaluation-mode batch norm into the kernel and bias before it.

    ``layer(x, kernel, bias)`` followed by batch norm with the running statistics
    equals ``layer(x, new_kernel, new_bias)`` for any layer linear in its kernel
    whose output features are one axis of the kernel: the last for flax ``Dense``
    (in, out), ``Conv`` (kh, kw, in, out) and ``ConvTranspose``, the first
    (``feature_axis=0``) for Equinox's ``Linear`` (out, in) and ``Conv`` (out, in, kh, kw).

    Args:
      kernel: the layer's kernel, output features on axis ``feature_axis``, C of them.
      bias: the layer's bias, shape (C,), or None (a layer with ``use_bias=False``).
      bn_params: ``{"scale", "bias"}`` of shape (C,), either may be missing
        (``use_scale=False`` / ``use_bias=False``), or None.
      bn_state: ``{"mean", "var"}`` running statistics of shape (C,).
      epsilon: the batch norm's epsilon (default 1e-5, flax's and jbn's default).
      feature_axis: the kernel's output-feature axis (default -1, the last).

    Returns:
      ``(new_kernel, new_bias)`` in the kernel's dtype (the bias's, if given).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 1 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(
            "kernel must be a floating-point array with the output features on one axis, got "
            f"shape {kernel.shape} dtype {kernel.dtype}"
        )
    if not isinstance(feature_axis, int) or not -kernel.ndim <= feature_axis < kernel.ndim:
        raise ValueError(
            f"feature_axis must be an axis of the kernel of shape {kernel.shape}, got {feature_axis!r}"
        )
    feature_axis %= kernel.ndim
    features = (kernel.shape[feature_axis],)
    needs = f"the kernel of shape {kernel.shape} (output features on axis {feature_axis})"
    bn_state = checks.state(bn_state, features, needs, need_count=False, name="bn_state")
    scale, shift = checks.params(bn_params, features, needs, name="bn_params")
    epsilon = checks.static_float(epsilon, "epsilon", positive=True)
    cd = compute_dtype(kernel.dtype)
    mean, var = bn_state["mean"].astype(cd), bn_state["var"].astype(cd)
    scale = jnp.ones(features, cd) if scale is None else scale.astype(cd)
    shift = jnp.zeros(features, cd) if shift is None else shift.astype(cd)
    bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
    bias = jnp.zeros(features, cd) if bias is None else checks.vector(bias, "bias", features, needs)
    a = eval_multiplier(scale, var, epsilon)
    shape = [1] * kernel.ndim
    shape[feature_axis] = features[0]
    new_kernel = kernel.astype(cd) * a.reshape(shape)
    new_bias = eval_affine(bias.astype(cd), mean, a, shift)
    return new_kernel.astype(kernel.dtype), new_bias.astype(bias_dtype)


def fold_batch_norm_variables(
    variables: Mapping[str, Any],
    pairs: Iterable[tuple[tree.Path, tree.Path]],
    *,
    epsilon: float = 1e-5,
    check: Check | None = None,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Folds batch-norm layers of a linen model into the Dense or Conv layers before them.

    For each ``(layer, bn)`` pair, the layer's kernel and bias become those of
    :func:`fold_batch_norm` (the layer gains a ``bias`` if it had none), and the
    batch norm's ``params`` and ``batch_stats`` are removed. The result is the
    variables of the same model built without those batch norms and with
    ``use_bias=True`` on those layers: give the model a switch, e.g. a field
    ``fold: bool``, that skips each batch norm and turns on the layer's bias. Its
    outputs equal the original model's evaluation-mode outputs up to float32
    rounding, provided each pair's layer feeds its batch norm directly and
    ``epsilon`` is the batch norms' own: the variables cannot tell, so pass
    ``check`` to have the folded model compared with the original on a probe
    batch, and get an error instead of a silently different model.

    Args:
      variables: the trained model's variables, with ``params`` and ``batch_stats``.
      pairs: ``(layer_path, bn_path)`` per batch norm to fold, each path a module
        path as in ``variables["params"]``: ``"Conv_0"``, ``"block/Dense_1"`` or a
        tuple of names. The layer must be the one right before the batch norm,
        with its output features on the kernel's last axis.
      epsilon: the batch norms' epsilon (default 1e-5).
      check: optional ``(apply_fn, folded_apply_fn, x)``: ``apply_fn(variables,
        x)`` runs the original model in evaluation mode and
        ``folded_apply_fn(folded_variables, x)`` the folded one, e.g.
        ``(Model().apply, Model(fold=True).apply, x)``. Their outputs must agree
        to ``rtol`` (relative to the largest output), or a ValueError says by how
        much and what usually causes it.
      rtol: the tolerance of ``check`` (default 1e-4).

    Returns:
      New variables (dicts); the batch norms' entries are gone, and
      ``batch_stats`` is dropped when nothing is left in it.

    Raises:
      ValueError: a path or pair that does not fit the variables, or, with
        ``check``, a folded model that does not match the original.
    """
    if check is not None:
        if not (isinstance(check, tuple) and len(check) == 3 and all(map(callable, check[:2]))):
            raise TypeError(
                "check must be (apply_fn, folded_apply_fn, x), e.g. "
                f"(Model().apply, Model(fold=True).apply, x); got {check!r}"
            )
        rtol = checks.static_float(rtol, "rtol", positive=True)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a linen model's variables with a 'params' collection")
    variables = tree.to_dicts(variables)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: give (layer_path, bn_path) for each batch norm to fold")
    seen = set()
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"each pair must be (layer_path, bn_path), got {pair!r}")
        layer_path, bn_path = (
            tree.parse_path(pair[0], "layer_path"),
            tree.parse_path(pair[1], "bn_path"),
        )
        if layer_path in seen or bn_path in seen:
            raise ValueError(
                f"pair {pair!r} folds a layer or batch norm that another pair already uses"
            )
        seen.update((layer_path, bn_path))
        params, stats = fold_pair(
            params, stats, layer_path, bn_path, epsilon, where=f" (pair {pair!r})"
        )
    out = with_collections(variables, params, stats)
    if check is not None:
        _check_folded(variables, out, check, rtol, epsilon, pairs)
    return out


def with_collections(variables: Mapping[str, Any], params: Any, stats: Any) -> dict[str, Any]:
    """``variables`` with new ``params`` and ``batch_stats``, the latter dropped when empty."""
    out = {**variables, "params": params}
    if stats:
        out["batch_stats"] = stats
    else:
        out.pop("batch_stats", None)
    return out


def fold_pair(
    params: Any,
    stats: Any,
    layer_path: tree.Path,
    bn_path: tree.Path,
    epsilon: float,
    *,
    feature_axis: int = -1,
    where: str = "",
) -> tuple[Any, Any]:
    """Folds the batch norm at ``bn_path`` into the layer at ``layer_path`` of linen collections.

    The layer's ``kernel`` and ``bias`` (added if missing) are replaced, the batch
    norm's ``params`` and ``batch_stats`` removed; returns ``(params, stats)``.
    """
    layer_path = tree.parse_path(layer_path, "layer_path")
    bn_path = tree.parse_path(bn_path, "bn_path")
    layer = tree.lookup(params, layer_path)
    if not isinstance(layer, Mapping) or "kernel" not in layer:
        raise ValueError(f"params has no layer with a 'kernel' at {'/'.join(layer_path)!r}{where}")
    bn_state = tree.lookup(stats, bn_path)
    if not isinstance(bn_state, Mapping) or "mean" not in bn_state or "var" not in bn_state:
        raise ValueError(
            f"batch_stats has no batch norm ('mean' and 'var') at {'/'.join(bn_path)!r}{where}"
        )
    bn_params = tree.lookup(params, bn_path)
    if bn_params is not None and not isinstance(bn_params, Mapping):
        raise ValueError(f"params at {'/'.join(bn_path)!r} is not a batch norm's parameters{where}")
    kernel, bias = fold_batch_norm(
        layer["kernel"],
        layer.get("bias"),
        bn_params,
        bn_state,
        epsilon=epsilon,
        feature_axis=feature_axis,
    )
    params = tree.replace(params, layer_path, {**layer, "kernel": kernel, "bias": bias})
    if bn_params is not None:
        params = tree.remove(params, bn_path)
    return params, tree.remove(stats, bn_path)


def _check_folded(
    variables: Mapping[str, Any],
    folded: Mapping[str, Any],
    check: Check,
    rtol: float,
    epsilon: float,
    pairs: Sequence[tuple[tree.Path, tree.Path]],
) -> None:
    """Compares the folded model with the original on a probe batch; a clear error if they differ."""
    apply_fn, folded_apply_fn, x = check
    error = relative_difference(apply_fn(variables, x), folded_apply_fn(folded, x))
    if not error <= rtol:
        raise ValueError(
            f"the folded model differs from the original by {error:.3g} (relative to the "
            f"largest output; rtol={rtol:g}) on the probe batch, so folding {pairs} does not "
            f"preserve the model. Usual causes: the batch norms' epsilon is not {epsilon:g} "
            "(pass their epsilon), something sits between a pair's layer and its batch norm "
            "(an activation or pooling: such a batch norm cannot be folded into that layer), "
            "or apply_fn does not run the original in evaluation mode"
        )


def relative_difference(y: Any, y_folded: Any) -> float:
    """max |y - y_folded| / max |y| over the leaves of two outputs (pytrees of arrays).

    Raises:
      ValueError: the outputs differ in structure or shape.
    """
    leaves, treedef = jax.tree.flatten(y)
    folded_leaves, folded_treedef = jax.tree.flatten(y_folded)
    shapes = [jnp.shape(a) for a in leaves]
    folded_shapes = [jnp.shape(a) for a in folded_leaves]
    if treedef != folded_treedef or shapes != folded_shapes:
        raise ValueError(
            f"the folded model's output has shapes {folded_shapes} ({folded_treedef}), the "
            f"original's {shapes} ({treedef})"
        )
    largest: list[Any] = [0.0]
    error: list[Any] = [0.0]  # jnp.max, unlike max, keeps a NaN
    for a, b in zip(leaves, folded_leaves, strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        if a.size:
            largest.append(jnp.max(jnp.abs(a)))
            error.append(jnp.max(jnp.abs(a - b)))
    return float(jnp.max(jnp.asarray(error))) / (float(jnp.max(jnp.asarray(largest))) or 1.0)
