"""The on-disk bundle format (docs/FORMAT.md) and materialization of experts."""
from .format import FORMAT_VERSION, Bundle, BundleError

__all__ = ["Bundle", "BundleError", "FORMAT_VERSION"]
