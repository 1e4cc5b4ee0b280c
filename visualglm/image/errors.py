"""The one error type of :mod:`visualglm.image`."""

from __future__ import annotations


class ImageError(ValueError):
    """An image that cannot be loaded: unreadable, too large, not an image, or a refused URL."""
