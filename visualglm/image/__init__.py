"""Images: safe loading from untrusted sources and the reference preprocessing. The only PIL user.

* :mod:`visualglm.image.sources`: ``load_image`` / ``image_bytes`` (paths, bytes, base64, data URLs,
  http(s) URLs, PIL images) under byte, side, aspect-ratio and pixel limits;
* :mod:`visualglm.image.remote`: the http(s) fetcher (public addresses only, checked at every hop);
* :mod:`visualglm.image.preprocess`: ``preprocess``, bit-exact with the reference transforms.

It depends on nothing else in ``visualglm``.
"""

from visualglm.image.errors import ImageError
from visualglm.image.preprocess import CLIP_MEAN, CLIP_STD, GLM4V_IMAGE_SIZE, VISUALGLM_IMAGE_SIZE, preprocess
from visualglm.image.remote import MAX_REDIRECTS
from visualglm.image.sources import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    NOT_A_SOURCE,
    SUPPORTED_FORMATS,
    image_bytes,
    load_image,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "GLM4V_IMAGE_SIZE",
    "ImageError",
    "MAX_REDIRECTS",
    "NOT_A_SOURCE",
    "SUPPORTED_FORMATS",
    "VISUALGLM_IMAGE_SIZE",
    "image_bytes",
    "load_image",
    "preprocess",
]
