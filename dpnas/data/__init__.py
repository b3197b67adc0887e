"""The datasets (CIFAR-10, ImageNette, digits, synthetic), their splits, and augmentation.

Flow: arch → **data** → dp → search → analysis. Data is loaded into memory as uint8 tensors and split into
train / validation / test; this package knows nothing of models or privacy.

May import: nothing of dpnas.
"""
