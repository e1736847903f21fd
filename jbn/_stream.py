"""Statistics that follow a stream: test-time adaptation with a memory of the test statistics.

In the stream mode of :func:`jbn.bn_forward` (``train=jbn.Stream(horizon,
prior)``) each example is normalized on its own, as in the prior mode
(:mod:`jbn._prior`) at batch 1, but with a *memory* of the stream's statistics
in place of the running ones: the example's values' statistics are pooled with
the memory, counted as ``prior`` = N examples, by Chan's formula. An example's
output does not depend on the rest of its batch, so every batch size gives the
same outputs for the same memory. An example that gives each feature a single
value (a dense layer's) has no statistics of its own and is normalized with the
memory alone. The memory is then updated with the whole batch, exactly: the
memory (n_m, μ_m, σ²_m) and the batch (n_b, μ_b, σ²_b) are combined by Chan's
formula,

    w = n_m / (n_m + n_b),   μ = w μ_m + (1 - w) μ_b,
    σ² = w σ²_m + (1 - w) σ²_b + w (1 - w) (μ_m - μ_b)²,

and the count n_m + n_b is capped at ``horizon`` examples. Capping scales the
count and the sum of squares M2 = n σ² alike, so σ² is kept and older data
decays in proportion: a horizon counted in examples serves any batch size.
With ``surprise`` (on by default), the count is first cut when the batch holds
an example the memory does not describe (:func:`surprise_cut`): the memory
follows a domain shift fast and stays long, and so class-balanced, otherwise.
With ``anchor`` (on by default), an example the training statistics describe
better is normalized with them in place of the memory and restarts the memory
from them; with ``settle`` (on by default), a memory that holds few examples
after the cut counts as one example. With ``gate`` (on by default), only the
examples that the model's first batch norm finds far from the training
statistics count in the cut (:func:`gate_verdict`, passed between layers by
:mod:`jbn._relay`).

The memory starts from the running (training) statistics, counted as
``horizon`` examples, and lives in the state as ``stream_mean``,
``stream_var`` and ``stream_count`` (per feature), created when absent;
:func:`reset_stream` drops them, so the next call starts again from the
training statistics. With ``horizon=inf`` the memory never leaves the training
statistics (the prior mode on each example); with ``prior=0`` each example is
normalized with its own statistics (instance normalization). A feature whose
example has no counted value, or whose statistics are not finite, is normalized
with the memory alone; a feature whose batch has none leaves the memory as it
was. The memory carries no gradient; each example's share does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks as checks
from . import _relay as relay
from ._prior import batch_share, examples_size, prior_forward, prior_stats
from ._stats import StatsConfig, abs_sq, compute_dtype, real_dtype
from ._train import TrainConfig
from ._tree import split_entries

Array = jax.Array

# The state entries of the memory, each of the feature shape.
MEMORY = ("stream_mean", "stream_var", "stream_count")


@dataclasses.dataclass(frozen=True)
class Stream:
    """The stream mode of :func:`jbn.bn_forward` (its ``train`` argument).

    Each example is normalized on its own: its values' statistics (over a
    convolution's H·W positions, say) pooled with a memory of the stream's
    statistics counted as ``prior`` examples (Chan's formula), the prior mode at
    batch 1 with the memory as the prior. Its output does not depend on the rest
    of its batch, so batches of 1, 8 or 64 give the same outputs. An example
    that gives each feature one value (a dense layer's) has no statistics of its
    own: it is normalized with the memory alone. The memory, an exact
    count-weighted pool of the batches seen over the last ``horizon`` examples,
    then takes the batch in. It starts from the running (training) statistics
    and is returned in the new state (``stream_mean``, ``stream_var``,
    ``stream_count``)::

      >>> import jax.numpy as jnp, jbn
      >>> params, state = jbn.bn_init(3)
      >>> y, state = jbn.bn_forward(params, state, jnp.ones((2, 3)), jbn.Stream(100.0, 16.0))
      >>> float(state["stream_count"][0])
      100.0

    A long memory stays balanced when a stream's classes come in runs, but
    leaves stale statistics slowly; ``surprise`` lets the data shorten it. Each
    example's surprise is r, the mean over features of its values' mean
    (x - μ_m)² / (σ²_m + ε): its second moment about the memory's mean in units
    of the memory's variance, about 1 for an example the memory describes. Before
    a batch is taken in, the memory's count is cut to horizon / (1 + (log r /
    τ)²) for the batch's most surprising example (over all devices), so any
    batch size behaves as batches of one; it then grows back by the examples
    taken in, up to ``horizon``. A domain shift (|log r| of 0.5 to 1.7 on the
    demo's shifted MNIST) is followed within a few hundred examples, while a
    run of one class (|log r| up to about 0.5) barely shortens the memory.

    The training statistics stay at hand when a shift ends (``anchor``). Each
    example is scored against the training statistics and against the memory
    by s = the mean over features of (x - μ)² / (σ² + ε) + log(σ² + ε), its
    values' Gaussian negative log-likelihood (times 2, less a constant). An
    example whose score under the training statistics is lower by more than
    ``anchor`` takes them in place of the memory (its own statistics pooled
    with them, counted as ``prior``), and the memory is re-seeded from the
    training statistics before it takes the batch in: a stream that comes back
    to the training domain gets the training statistics back at once, where
    the surprise cut alone would leave a stale memory for thousands of
    examples. The margin is large enough that a run of one class, or a shifted
    domain the memory has learned, does not trigger it.

    A memory cut short is trusted less (``settle``). While it holds fewer than
    ``settle`` · ``horizon`` examples after the surprise cut (800 by default),
    it counts as one example for each example that is not anchored. A memory
    cut at every batch, as when domains are mixed example by example, then
    speaks little for examples it does not describe, and one just cut by a
    shift waits until it has seen enough of the new domain.

    Only an example far from the training domain may cut a memory (``gate``).
    Deep in a network a run of one class and a domain shift look alike: a
    dense layer's features cluster for one class as they shrink under a
    shift. The model's first batch norm, close to the input, tells them apart:
    against the training statistics, its examples' |log r| stays below 0.55
    on clean MNIST and reaches 0.5 to 1.7 on shifted domains. Each example's
    verdict, |log r| > ``gate`` at the first batch norm a forward pass runs,
    is passed to the batch norms after it (the frontends do this:
    :mod:`jbn._relay`); a batch norm called on its own gives its own verdict.
    The surprise cut of every memory then counts only the examples found far.

    The defaults were chosen on the demo's CNN. On two trained copies they
    give 62.4 to 67.1 % mean accuracy over four shifted domains and 99.12 to
    99.6 % clean, at batch 1, 8 and 64, with the test set streamed in its own
    order or sorted by label (runs of one class), and 99.3 to 99.6 % clean
    when the stream returns to clean data after the four shifts. With the five
    domains mixed example by example they keep 98.5 to 99.0 % on the clean
    examples and 49 to 50 % on the shifted ones. Two more copies, trained with
    other seeds, get 59.8 to 61.5 % (iid), 60.1 to 60.9 % (sorted) and 41.6 to
    41.9 % (mixed) on the shifted domains; see the test-time adaptation guide,
    which says where the mode still fails.

    Attributes:
      horizon: the memory's length in examples, > 0 (``inf``: the memory never
        leaves the training statistics). Default 8000.
      prior: N, the examples the memory counts as when an example's own
        statistics are pooled with it, >= 0 (``inf``: the memory alone; 0: each
        example's own statistics, instance normalization). Default 2.
      surprise: τ > 0, how much a surprising example shortens the memory
        (smaller: more), or None: never. Default 0.6.
      anchor: δ > 0, the margin of score by which the training statistics must
        describe an example better than the memory for it to be normalized with
        them and for the memory to be re-seeded from them, or None: never.
        Default 0.7.
      settle: the share of ``horizon``, in (0, 1], that the memory must hold
        (after the surprise cut) to be counted as ``prior`` examples; a younger
        memory counts as one example (no effect when ``prior`` <= 1). None:
        always ``prior``. Default 0.1.
      gate: the |log r| against the training statistics, > 0, beyond which the
        first batch norm of a forward pass finds an example far from the
        training domain, so that it may cut the memories; or None: every
        example may. Default 0.9.
    """

    horizon: float = 8000.0
    prior: float = 2.0
    surprise: float | None = 0.6
    anchor: float | None = 0.7
    settle: float | None = 0.1
    gate: float | None = 0.9

    def __post_init__(self) -> None:
        horizon = checks.real(self.horizon, "horizon", low=0.0, strict=True)
        object.__setattr__(self, "horizon", horizon)
        object.__setattr__(self, "prior", checks.real(self.prior, "prior", low=0.0))
        if self.surprise is not None:
            surprise = checks.real(self.surprise, "surprise", low=0.0, strict=True)
            object.__setattr__(self, "surprise", surprise)
        if self.anchor is not None:
            anchor = checks.real(self.anchor, "anchor", low=0.0, strict=True)
            object.__setattr__(self, "anchor", anchor)
        if self.settle is not None:
            settle = checks.real(self.settle, "settle", low=0.0, high=1.0, strict=True)
            object.__setattr__(self, "settle", settle)
        if self.gate is not None:
            gate = checks.real(self.gate, "gate", low=0.0, strict=True)
            object.__setattr__(self, "gate", gate)


def split_memory(state: Any) -> tuple[Any, dict[str, Any]]:
    """``state`` as ``(running statistics, memory)``: the entries of :data:`MEMORY` apart."""
    return split_entries(state, MEMORY)


def start_memory(mean: Array, var: Array, stream: Stream) -> dict[str, Array]:
    """A memory seeded with running statistics ``(mean, var)``, counted as ``stream.horizon``."""
    cd = compute_dtype(jnp.asarray(mean).dtype)
    mean = jnp.asarray(mean).astype(cd)
    var = jnp.asarray(var).astype(real_dtype(cd))
    count = jnp.full(mean.shape, stream.horizon, real_dtype(cd))
    return {"stream_mean": mean, "stream_var": var, "stream_count": count}


def start_stream(state: Mapping[str, Any], stream: Stream) -> dict[str, Array]:
    """``state`` with the memory of ``stream`` seeded from its running statistics.

    Any memory already in ``state`` is replaced. Use it to give ``jax.lax.scan``
    a carry of fixed structure before the first batch.

    Args:
      state: running statistics ``{"mean", "var", ...}`` (see :func:`jbn.bn_init`).
      stream: a :class:`jbn.Stream`.

    Returns:
      A new state with ``stream_mean``, ``stream_var`` and ``stream_count``.
    """
    stream = check_stream(stream)
    rest, _ = split_memory(_mapping(state))
    for key in ("mean", "var"):
        if key not in rest:
            raise ValueError(f"state is missing {key!r}: pass the running statistics")
    return {**rest, **start_memory(rest["mean"], rest["var"], stream)}


def reset_stream(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the memory of the stream mode: back to the training statistics.

    The next :func:`jbn.bn_forward` in the stream mode starts the memory again
    from the running statistics, bit for bit as the first time.
    """
    rest, _ = split_memory(_mapping(state))
    return rest


def _mapping(state: Any) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of running statistics, got {type(state).__name__}")
    return state


def check_stream(value: Any) -> Stream:
    if not isinstance(value, Stream):
        raise TypeError(f"stream must be a jbn.Stream(horizon, prior), got {value!r}")
    return value


def check_memory(
    memory: Mapping[str, Any], feature_shape: tuple[int, ...], needs: str
) -> dict[str, Array]:
    """The memory entries, all or none, each of the feature shape."""
    hint = "jbn.reset_stream drops them"
    return checks.state_entries(memory, MEMORY, "stream memory", hint, feature_shape, needs)


def example_scores(
    x: Array, mask: Array | None, stats: tuple[Array, Array], cfg: TrainConfig
) -> tuple[Array, Array, Array]:
    """Per example, how well ``stats = (μ, σ²)`` describe it: ``(r, s, counted)``.

    For each feature with a counted finite value, e is the mean over the
    example's values of (x - μ)² / (σ² + ε) and l the mean of log(σ² + ε);
    ``r`` is the mean of e over those features (about 1 for an example the
    statistics describe) and ``s`` the mean of e + l (its Gaussian negative
    log-likelihood per value, times 2, less a constant); ``counted`` says
    whether the example has such a feature. An example is a slice along axis 0
    when axis 0 is reduced, the whole local array otherwise (one example per
    device, as under Equinox's vmap); each result has one entry per example.
    """
    mean, var = (lax.stop_gradient(v) for v in stats)
    x = lax.stop_gradient(x).astype(compute_dtype(x.dtype))
    scaled = var.astype(real_dtype(x.dtype)) + cfg.epsilon
    sq = abs_sq(x - mean.astype(x.dtype)) / scaled
    log_var = jnp.broadcast_to(jnp.log(scaled), x.shape)
    counted = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    inner = tuple(a for a in cfg.stats.reduce_axes if a != 0)
    if 0 not in cfg.stats.reduce_axes:  # the whole local array is one example
        sq, log_var, counted = sq[None], log_var[None], counted[None]
        inner = tuple(a + 1 for a in cfg.stats.reduce_axes)
    values = jnp.maximum(jnp.sum(counted, inner, keepdims=True), 1)
    e = jnp.sum(jnp.where(counted, sq, 0.0), inner, keepdims=True) / values
    lv = jnp.sum(jnp.where(counted, log_var, 0.0), inner, keepdims=True) / values
    valid = jnp.any(counted, inner, keepdims=True) & jnp.isfinite(e)
    rest = tuple(range(1, e.ndim))
    features = jnp.sum(valid, rest)
    per_feature = jnp.maximum(features, 1)
    r = jnp.sum(jnp.where(valid, e, 0.0), rest) / per_feature
    score = jnp.sum(jnp.where(valid, e + lv, 0.0), rest) / per_feature
    return r, score, features > 0


def surprise_cut(
    scored: tuple[Array, Array, Array],
    stream: Stream,
    cfg: TrainConfig,
    may_cut: Array | None = None,
) -> Array:
    """The count the memory is cut to before a batch: the strongest cut of its examples.

    Each example's cut is ``horizon / (1 + (log r / τ)²)``, with ``scored`` =
    :func:`example_scores` against the memory; the batch's is the least over
    its examples (and over the devices of ``axis_name``), so a batch of n
    examples is cut as its most surprising example would cut it alone, at any
    batch size. Only the examples ``may_cut`` allows (:func:`gate_verdict`;
    None: all) count. ``horizon`` where no example counts.
    """
    assert stream.surprise is not None
    r, _, counted = scored
    if may_cut is not None:
        counted = counted & may_cut
    log_r = jnp.log(jnp.maximum(r, jnp.finfo(r.dtype).tiny)) / stream.surprise
    cuts = jnp.where(counted, stream.horizon / (1.0 + log_r * log_r), stream.horizon)
    cut = jnp.min(cuts)
    if cfg.stats.axis_name is not None:
        cut = lax.pmin(cut, cfg.stats.axis_name, axis_index_groups=cfg.stats.axis_index_groups)
    return cut


def update_memory(
    memory: Mapping[str, Array],
    batch: tuple[Array, Array, Array],
    horizon: float,
    cut: Array | None = None,
) -> dict[str, Array]:
    """The memory after taking in a batch's ``(mean, var, examples)`` (Chan, capped at horizon).

    With ``cut`` (see :func:`surprise_cut`), the memory's count is first cut to
    it. A feature with no examples (0: no counted value, or not finite) keeps its
    memory, count included.
    """
    mean_m, var_m, count = (lax.stop_gradient(memory[k]) for k in MEMORY)
    mean_b, var_b, n_b = (lax.stop_gradient(v).reshape(count.shape) for v in batch)
    rd = count.dtype
    n_b, var_b, mean_b = n_b.astype(rd), var_b.astype(rd), mean_b.astype(mean_m.dtype)
    kept = count
    if cut is not None:
        kept = jnp.minimum(count, cut.astype(rd))
    # w = n_m / (n_m + n_b) as 1 / (1 + n_b / n_m): 1 for an infinite memory.
    w = jnp.where(n_b > 0, 1.0 / (1.0 + n_b / kept), 1.0).astype(rd)
    mean, var = prior_stats(mean_m, var_m, mean_b, var_b, w, "pooled")
    new_count = jnp.minimum(kept + n_b, jnp.asarray(horizon, rd))
    took = n_b > 0
    return {
        "stream_mean": jnp.where(took, mean, mean_m).astype(mean_m.dtype),
        "stream_var": jnp.where(took, var, var_m).astype(var_m.dtype),
        "stream_count": jnp.where(took, new_count, count),
    }


def stream_forward(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    memory: Mapping[str, Array],
    training: tuple[Array, Array],
    stream: Stream,
    cfg: TrainConfig,
) -> tuple[Array, dict[str, Array]]:
    """y with each example normalized on its own against the memory, and the updated memory.

    Each example's statistics are pooled with a reference counted as
    ``stream.prior`` examples (:func:`example_forward`): the memory, or for an
    anchored example the training statistics; a young memory (``settle``)
    counts as one example; an example that gives each feature one value (a
    dense layer's) is normalized with the reference alone. The memory then takes
    in the whole batch (:func:`update_memory`), cut first by its most surprising
    example, or re-seeded from the training statistics if an example was anchored.

    Args:
      x: the input.
      scale, bias: already in the broadcast feature shape.
      mask: boolean of ``x``'s shape, or None.
      memory: ``{"stream_mean", "stream_var", "stream_count"}`` of the feature shape.
      training: the running (training) statistics ``(mean, var)``, of the feature shape.
      stream: the mode's settings.
      cfg: the call's ``TrainConfig``.

    Returns:
      ``(y, new_memory)``.
    """
    bshape = scale.shape
    running = (memory["stream_mean"].reshape(bshape), memory["stream_var"].reshape(bshape))
    trained = (training[0].reshape(bshape), training[1].reshape(bshape))
    prior = jnp.asarray(stream.prior, jnp.float32)
    scored = None  # how well the memory describes each example, where something reads it
    if stream.surprise is not None or stream.anchor is not None:
        scored = example_scores(x, mask, running, cfg)
    to_training = None  # how well the training statistics describe it, likewise
    if stream.anchor is not None or (stream.surprise is not None and stream.gate is not None):
        to_training = example_scores(x, mask, trained, cfg)
    batch = batch_share(x, mask, running, cfg)  # what the memory takes in
    reference, counted_as, back, per_example = running, prior, None, None
    if stream.anchor is not None:  # an anchored example's reference: the training statistics
        assert scored is not None and to_training is not None
        back = anchored(to_training, scored, stream.anchor, cfg)
        per_example = back.reshape(back.shape + (1,) * (x.ndim - back.ndim))
        reference = (
            jnp.where(per_example, trained[0], running[0]),
            jnp.where(per_example, trained[1], running[1]),
        )
    cut = None
    if stream.surprise is not None:
        assert scored is not None
        may_cut = None
        if stream.gate is not None:
            assert to_training is not None
            may_cut = gate_verdict(to_training, stream.gate)
        cut = surprise_cut(scored, stream, cfg, may_cut)
    if examples_size(x.shape, cfg.stats.reduce_axes) == 1:  # one value has no statistics
        counted_as = jnp.asarray(jnp.inf, jnp.float32)
    elif stream.settle is not None and stream.prior > 1:  # a young memory counts as one example
        count = memory["stream_count"].reshape(bshape)
        kept = count if cut is None else jnp.minimum(count, cut.astype(count.dtype))
        young = kept < stream.settle * stream.horizon
        if per_example is not None:  # not for the training statistics of anchored examples
            young = young & ~per_example
        counted_as = jnp.where(young, jnp.asarray(1.0, jnp.float32), prior)
    y = example_forward(x, scale, bias, mask, reference, counted_as, cfg)
    if back is not None:  # the memory restarts from the training statistics
        fire = memory_reseeded(back, cfg)
        shape = memory["stream_mean"].shape
        seed = start_memory(training[0].reshape(shape), training[1].reshape(shape), stream)
        memory = {k: jnp.where(fire, seed[k].astype(memory[k].dtype), memory[k]) for k in MEMORY}
        if cut is not None:  # and is not cut
            cut = jnp.where(fire, stream.horizon, cut)
    return y, update_memory(memory, batch, stream.horizon, cut)


def gate_verdict(to_training: tuple[Array, Array, Array], gate: float) -> Array:
    """Per example: whether it may cut a memory, by the forward pass's first batch norm.

    An example is far from the training domain when |log r| > ``gate``, with r
    from ``to_training`` = :func:`example_scores` against the training
    statistics. Inside a link (:mod:`jbn._relay`: the frontends' models) the
    first batch norm of a forward pass gives the verdict and the layers after it
    take it; a layer outside one, or the first, gives its own.
    """
    r, _, counted = to_training
    log_r = jnp.log(jnp.maximum(r, jnp.finfo(r.dtype).tiny))
    own = counted & (jnp.abs(log_r) > gate)
    link = relay.current()
    if link is None:
        return own
    passing, key, root = link
    given = passing.receive(key, root, own.shape)
    if given is not None:
        return given
    passing.send(own)
    return own


def anchored(
    to_training: tuple[Array, Array, Array],
    scored: tuple[Array, Array, Array],
    anchor: float,
    cfg: TrainConfig,
) -> Array:
    """Per example: whether the training statistics describe it better by ``anchor``.

    Compares :func:`example_scores`' Gaussian scores under the training
    statistics (``to_training``) with ``scored``, the memory's; an example
    without a counted value is never anchored. One entry per example (axis 0
    when it is reduced, else one for the whole local array).
    """
    _, s_train, counted = to_training
    _, s_memory, _ = scored
    back = counted & (s_train + anchor < s_memory)
    if 0 not in cfg.stats.reduce_axes:
        return back.reshape(())
    return back


def memory_reseeded(back: Array, cfg: TrainConfig) -> Array:
    """Whether any example of the batch (on any device of ``axis_name``) is anchored."""
    fire = jnp.any(back)
    if cfg.stats.axis_name is not None:
        groups = cfg.stats.axis_index_groups
        fire = lax.pmax(fire.astype(jnp.int32), cfg.stats.axis_name, axis_index_groups=groups) > 0
    return fire


def example_forward(
    x: Array,
    scale: Array,
    bias: Array,
    mask: Array | None,
    running: tuple[Array, Array],
    prior: Array,
    cfg: TrainConfig,
) -> Array:
    """y with each example's own statistics pooled with ``running`` counted as ``prior`` examples.

    The prior mode on batches of one: an example is a slice along axis 0 when
    axis 0 is reduced, the whole local array otherwise; nothing is summed over
    devices. ``running`` and ``prior`` may differ from example to example (they
    broadcast against the per-example statistics, of ``x``'s rank).
    """
    # Per example: the reduced axes without the batch axis, on this device alone.
    axes = tuple(a for a in cfg.stats.reduce_axes if a != 0)
    local = dataclasses.replace(cfg, stats=StatsConfig(axes))
    return prior_forward(x, scale, bias, mask, running, prior, local, "pooled", finite_only=True)[0]
