"""One forward pass's verdict on each example, passed from its first batch norm to the rest.

In the stream mode (:class:`jbn.Stream`, ``gate``), only an example that the
model's *first* batch norm finds far from the training statistics may cut a
memory: a deeper layer cannot tell a run of one class from a domain shift
(the stream mode's guide measures it), the first layer, close to the pixels,
can. A :class:`Relay` carries that verdict from the first batch norm a
forward pass runs to the ones it runs after it. The frontends give each
model (each thread, for linen) one relay and each batch norm a key, and run
the layer's :func:`jbn.bn_forward` inside :func:`linked`;
:func:`jbn._stream.stream_forward` asks :func:`current` for the link.

A forward pass is not announced, so the relay finds where one starts: when a
layer that already ran in the current pass runs again (the next batch), when
the call runs under another JAX trace than the verdict was made in (another
``jit``, ``vmap`` or ``scan`` body: a verdict never leaks out of its trace),
when the model differs (linen: another root scope, i.e. another ``apply``),
or when the verdict does not fit the layer's examples. The layer then gives
its own verdict, which the layers after it receive. A batch norm called
outside any link (plain :func:`jbn.bn_forward`) gives its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Hashable, Iterator
from typing import Any

import jax
from jax.extend.core import get_opaque_trace_state


class Relay:
    """The verdict of one model's first batch norm in the current forward pass.

    ``size``, where known (NNX, Equinox: the layers switched into the mode), is
    the number of layers on the relay: once each has run in a pass, the verdict
    is dropped, so that no traced value outlives its trace (``jax.checking_leaks``).
    Linen's relay, per thread, is dropped by :meth:`clear` when the outermost
    module call returns.
    """

    def __init__(self, size: int | None = None) -> None:
        self._size = size
        self._verdict: jax.Array | None = None
        self._seen: set[Hashable] = set()  # the layers that ran in the current pass
        self._trace: Any = None
        self._root: Any = None

    def receive(self, key: Hashable, root: Any, shape: tuple[int, ...]) -> jax.Array | None:
        """The current pass's verdict for layer ``key``, or None: it starts a new pass.

        ``root`` names the model call (linen's root scope; None elsewhere) and
        ``shape`` is the layer's per-example shape, which the verdict must have.
        """
        trace = get_opaque_trace_state()
        verdict = self._verdict
        fits = (
            verdict is not None
            and key not in self._seen
            and root is self._root
            and trace == self._trace
            and verdict.shape == shape
        )
        if not fits:
            self._verdict, self._seen, self._root, self._trace = None, set(), root, trace
        self._seen.add(key)
        if self._size is not None and len(self._seen) >= self._size:
            self._verdict = None  # every layer has run: the pass is over
        return verdict if fits else None

    def send(self, verdict: jax.Array) -> None:
        """Keeps ``verdict`` for the layers after this one, if the pass has none yet."""
        if self._verdict is None and (self._size is None or len(self._seen) < self._size):
            self._verdict = verdict

    def clear(self) -> None:
        """Drops the verdict and the model call: the pass is over."""
        self._verdict = self._root = None


@dataclasses.dataclass(frozen=True)
class Link:
    """A batch norm's place on its model's relay: the relay and the layer's ``index``.

    A model holds it as a static field (Equinox) or attribute (NNX): the layers
    of a model share one relay, each has its own index. Links compare by index
    alone, so a model switched into the stream mode again keeps ``jax.jit``'s
    cache (the relay only acts while a call is traced).
    """

    relay: Relay = dataclasses.field(compare=False, repr=False)
    index: int


_CURRENT: contextvars.ContextVar[tuple[Relay, Hashable, Any] | None] = contextvars.ContextVar(
    "jbn_stream_link", default=None
)


@contextlib.contextmanager
def linked(link: Link | Relay | None, key: Hashable = None, root: Any = None) -> Iterator[None]:
    """Runs the body (one batch norm's call) on a relay (None: on none).

    ``link`` is the layer's :class:`Link` (its key is the link), or a
    :class:`Relay` with the layer's ``key`` and the model call's ``root``.
    """
    if isinstance(link, Link):
        link, key = link.relay, link
    token = _CURRENT.set(None if link is None else (link, key, root))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> tuple[Relay, Hashable, Any] | None:
    """The ``(relay, key, root)`` of the batch norm call running now, or None."""
    return _CURRENT.get()
