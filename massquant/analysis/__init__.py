"""Analyses no single paper's tool offers: where the quantization loss comes from (by token class and by layer),
rotation kinds compared, the compression valley, and how massive activations emerge during training.

One module per analysis; each keeps its arithmetic in plain functions (tested against independent computations)
apart from the loops and hooks that feed them. Commands: ``massquant analyze NAME`` (``massquant/cli/analyze.py``).
This package sits above evaluation, massive, mitigations and training in the import order, below reporting's
tables (it draws figures with ``massquant.reporting.figures``, as ``massquant.massive.plots`` does).
"""
