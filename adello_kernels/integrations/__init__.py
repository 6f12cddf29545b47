"""Adapters to other training code bases (optional: importing `adello_kernels` never imports
them or their dependencies)."""
