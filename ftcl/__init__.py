"""ftcl: feature-level transformations for contrastive self-supervised learning."""

__version__ = "0.1.0"
