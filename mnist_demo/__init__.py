"""The MNIST demo of jbn: a small package behind ``train_mnist.py``.

One concept per module, following flax's MNIST example:

- :mod:`mnist_demo.files`: atomic writes with the user's file mode.
- :mod:`mnist_demo.lock`: the lock of the output directory (one run at a time).
- :mod:`mnist_demo.mnist`: finding, downloading, verifying and reading the IDX files.
- :mod:`mnist_demo.data`: preprocessing, the data order and augmentation.
- :mod:`mnist_demo.models`: the CNN, the MLP and the paper's sigmoid network.
- :mod:`mnist_demo.config`: the configuration, declared once; the command line is generated
  from it.
- :mod:`mnist_demo.train`: train state, steps, epochs, evaluation, ``train_and_evaluate``.
- :mod:`mnist_demo.checkpoints`: one verified msgpack file per run.
- :mod:`mnist_demo.distributed`: runs across processes (``jax.distributed``) and the
  ``--processes N`` launcher.
- :mod:`mnist_demo.paper`: Fig. 1 of Ioffe & Szegedy (2015) and the learning-rate sweep.
- :mod:`mnist_demo.plots`: the figures.
- :mod:`mnist_demo.cli`: the command line.

It is not part of the ``jbn`` wheel and uses jbn's public API only.
"""
