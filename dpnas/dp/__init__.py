"""DP-SGD at a fixed budget: the training and privacy configs, recipes, noise calibration and accounting,
per-sample gradients and clipping, and the training loop.

Flow: arch → data → **dp** → search → analysis. ``train`` orchestrates one private run of one architecture on one
dataset; it never sees an Optuna trial.

May import: dpnas.arch, dpnas.data.
"""
