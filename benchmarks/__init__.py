"""Benchmarks of jbn against flax.linen.BatchNorm, autodiff and torch: ``python -m benchmarks``.

See ``python -m benchmarks --help``; results go to ``benchmarks/results/``
(JSON, Markdown, PNG). ``layer`` times one batch-norm layer, ``model`` a whole
train step; ``_timing`` holds the timing discipline and machine description.
"""

from .run import main as main

__all__ = ("main",)
