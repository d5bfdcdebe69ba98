"""raymmc: unsupervised clustering of image-caption archives on Ray."""

__version__ = "0.1.0"
