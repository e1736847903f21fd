"""Folding an evaluation-mode batch norm into the Dense or Conv before it.

At evaluation a batch norm is a per-feature affine map, y = a z + c with
a = γ/√(var + ε) and c = β - a μ. After a Dense or Conv, z = x W + b, so

    y = x (W a) + (a (b - μ) + β):

the same layer with kernel W a (each output feature's column scaled) and bias
a (b - μ) + β, and no batch norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _batch_norm

Path = str | Sequence[str]


def fold_batch_norm(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    bn_params: Mapping[str, ArrayLike] | None,
    bn_state: Mapping[str, ArrayLike],
    *,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an evaluation-mode batch norm into the kernel and bias before it.

    ``layer(x, kernel, bias)`` followed by batch norm with the running statistics
    equals ``layer(x, new_kernel, new_bias)`` for any layer linear in its kernel
    whose output features are the kernel's last axis: flax ``Dense`` (in, out),
    ``Conv`` (kh, kw, in, out), ``ConvTranspose``, ``Einsum``-like layers.

    Args:
      kernel: the layer's kernel, output features on the last axis, shape (..., C).
      bias: the layer's bias, shape (C,), or None (a layer with ``use_bias=False``).
      bn_params: ``{"scale", "bias"}`` of shape (C,), either may be missing
        (``use_scale=False`` / ``use_bias=False``), or None.
      bn_state: ``{"mean", "var"}`` running statistics of shape (C,).
      epsilon: the batch norm's epsilon (default 1e-5, flax's and jbn's default).

    Returns:
      ``(new_kernel, new_bias)`` in the kernel's dtype (the bias's, if given).
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 1 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(
            f"kernel must be a floating-point array with the output features last, got shape {kernel.shape} dtype {kernel.dtype}"
        )
    features = (kernel.shape[-1],)
    where = f"the kernel of shape {kernel.shape} (output features last)"

    def vector(value, name):
        value = jnp.asarray(value)
        if value.shape != features:
            raise ValueError(f"{name} has shape {value.shape}, but {where} needs shape {features}")
        return value

    if not isinstance(bn_state, Mapping) or "mean" not in bn_state or "var" not in bn_state:
        raise ValueError(
            "bn_state must be a dict with the running 'mean' and 'var' (a layer's batch_stats)"
        )
    if bn_params is not None and not isinstance(bn_params, Mapping):
        raise TypeError(
            f"bn_params must be a dict with 'scale' and/or 'bias', or None; got {type(bn_params).__name__}"
        )
    bn_params = bn_params or {}
    unknown = sorted(set(bn_params) - {"scale", "bias"})
    if unknown:
        raise ValueError(f"bn_params has unknown keys {unknown}; expected 'scale' and/or 'bias'")
    epsilon = _batch_norm._static_float(epsilon, "epsilon", positive=True)
    cd = _batch_norm._compute_dtype(kernel.dtype)
    mean = vector(bn_state["mean"], "bn_state['mean']").astype(cd)
    var = vector(bn_state["var"], "bn_state['var']").astype(cd)
    scale = (
        vector(bn_params["scale"], "bn_params['scale']").astype(cd)
        if "scale" in bn_params
        else jnp.ones(features, cd)
    )
    shift = (
        vector(bn_params["bias"], "bn_params['bias']").astype(cd)
        if "bias" in bn_params
        else jnp.zeros(features, cd)
    )
    bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
    bias = jnp.zeros(features, cd) if bias is None else vector(bias, "bias").astype(cd)
    a = scale * lax.rsqrt(var + epsilon)  # the same multiplier as bn_forward's evaluation mode
    new_kernel = (kernel.astype(cd) * a.reshape((1,) * (kernel.ndim - 1) + features)).astype(
        kernel.dtype
    )
    new_bias = ((bias - mean) * a + shift).astype(bias_dtype)
    return new_kernel, new_bias


def _path(path: Path, what: str) -> tuple[str, ...]:
    if isinstance(path, str):
        parts = tuple(p for p in path.split("/") if p)
    elif isinstance(path, Sequence) and all(isinstance(p, str) for p in path):
        parts = tuple(path)
    else:
        parts = ()
    if not parts:
        raise ValueError(
            f"{what} must be a module path such as 'Conv_0', 'block1/Dense_0' or ('block1', 'Dense_0'), got {path!r}"
        )
    return parts


def _lookup(tree: Mapping, parts: tuple[str, ...]) -> Any:
    for key in parts:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _remove(tree: Mapping, parts: tuple[str, ...]) -> dict:
    """A copy of ``tree`` without the entry at ``parts``; dicts left empty are removed too."""
    tree = dict(tree)
    if len(parts) == 1:
        tree.pop(parts[0], None)
    elif parts[0] in tree:
        sub = _remove(tree[parts[0]], parts[1:])
        if sub:
            tree[parts[0]] = sub
        else:
            del tree[parts[0]]
    return tree


def _replace(tree: Mapping, parts: tuple[str, ...], value: Any) -> dict:
    tree = dict(tree)
    tree[parts[0]] = value if len(parts) == 1 else _replace(tree[parts[0]], parts[1:], value)
    return tree


def fold_batch_norm_variables(
    variables: Mapping[str, Any],
    pairs: Iterable[tuple[Path, Path]],
    *,
    epsilon: float = 1e-5,
) -> dict[str, Any]:
    """Folds batch-norm layers of a linen model into the Dense or Conv layers before them.

    For each ``(layer, bn)`` pair, the layer's kernel and bias become those of
    :func:`fold_batch_norm` (the layer gains a ``bias`` if it had none), and the
    batch norm's ``params`` and ``batch_stats`` are removed. The result is the
    variables of the same model built without those batch norms and with
    ``use_bias=True`` on those layers: give the model a switch, e.g. a field
    ``fold: bool``, that skips each batch norm and turns on the layer's bias. Its
    outputs equal the original model's evaluation-mode outputs up to float32
    rounding.

    Args:
      variables: the trained model's variables, with ``params`` and ``batch_stats``.
      pairs: ``(layer_path, bn_path)`` per batch norm to fold, each path a module
        path as in ``variables["params"]``: ``"Conv_0"``, ``"block/Dense_1"`` or a
        tuple of names. The layer must be the one right before the batch norm,
        with its output features on the kernel's last axis.
      epsilon: the batch norms' epsilon (default 1e-5).

    Returns:
      New variables (dicts); the batch norms' entries are gone, and
      ``batch_stats`` is dropped when nothing is left in it.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a linen model's variables with a 'params' collection")
    variables = flax.core.unfreeze(variables)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: give (layer_path, bn_path) for each batch norm to fold")
    seen = set()
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"each pair must be (layer_path, bn_path), got {pair!r}")
        layer_path, bn_path = _path(pair[0], "layer_path"), _path(pair[1], "bn_path")
        if layer_path in seen or bn_path in seen:
            raise ValueError(
                f"pair {pair!r} folds a layer or batch norm that another pair already uses"
            )
        seen.update((layer_path, bn_path))
        layer = _lookup(params, layer_path)
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise ValueError(
                f"params has no layer with a 'kernel' at {'/'.join(layer_path)!r} (pair {pair!r})"
            )
        bn_state = _lookup(stats, bn_path)
        if not isinstance(bn_state, Mapping) or "mean" not in bn_state or "var" not in bn_state:
            raise ValueError(
                f"batch_stats has no batch norm ('mean' and 'var') at {'/'.join(bn_path)!r} (pair {pair!r})"
            )
        bn_params = _lookup(params, bn_path)
        if bn_params is not None and not isinstance(bn_params, Mapping):
            raise ValueError(
                f"params at {'/'.join(bn_path)!r} is not a batch norm's parameters (pair {pair!r})"
            )
        kernel, bias = fold_batch_norm(
            layer["kernel"], layer.get("bias"), bn_params, bn_state, epsilon=epsilon
        )
        params = _replace(params, layer_path, {**layer, "kernel": kernel, "bias": bias})
        if bn_params is not None:
            params = _remove(params, bn_path)
        stats = _remove(stats, bn_path)
    out = {**variables, "params": params}
    if stats:
        out["batch_stats"] = stats
    else:
        out.pop("batch_stats", None)
    return out
