"""The package version (its own module, so ``io`` can write it without importing the package root)."""

__version__ = "0.1.0"
