"""Architectures as data: the search space (ArchConfig), its layers, the model builder and the named points.

Flow: **arch** → data → dp → search → analysis. A config becomes a PyTorch model here and nowhere else; nothing in
this package knows about data, DP-SGD or Optuna.

May import: nothing of dpnas.
"""
