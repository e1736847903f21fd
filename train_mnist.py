#!/usr/bin/env python
"""MNIST with batch normalization (jbn), and the batch-norm paper's Fig. 1.

``python train_mnist.py`` trains a small CNN with :class:`jbn.BatchNorm` and
reaches about 99.4 % test accuracy in a few minutes on a laptop CPU. Options
select the model (``--model mlp|cnn``), the normalization (``--norm
jbn|flax|none``, where ``flax`` is :class:`flax.linen.BatchNorm` for a side by
side comparison), the optimizer and its schedule, and more; see ``--help``.

Two more modes show what batch norm does:

* ``--fig1`` reproduces Fig. 1 of Ioffe & Szegedy (2015), section 4.1: a
  784-100-100-100-10 sigmoid network trained for 50 000 steps of 60 examples,
  without and with batch norm before each sigmoid.
* ``--lr-sweep`` trains that network with and without batch norm at a range of
  learning rates for a fixed budget of steps and tabulates the test accuracy.

This file is intentionally kept short: the demo lives in the ``mnist_demo``
package beside it (data, models, configuration, training, checkpoints, the
paper's experiments, plots, command line).
"""

import sys

from mnist_demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
