"""Images of a batch job, read and preprocessed in a background pool while the model generates.

A row's ``image`` is resolved as the rest of the package reads images (:mod:`visualglm.image`: byte, side,
aspect and pixel limits before decoding, only known formats): a ``data:image/...;base64,`` URL; an http(s)
URL only when remote images are allowed (public addresses only); anything else is a file path, relative
to the input file's folder unless absolute (never read as base64). Each result is the model's pixel
values and the sha256 of the image's bytes, which names the image (the same file used by many rows is
encoded once and its cached positions can be shared).
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from visualglm.image import ImageError, image_bytes, load_image, preprocess
from visualglm.image.remote import host_of

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def read_image(source: str, *, base_dir: Path, allow_remote: bool, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """(pixel values ``[1, 3, H, W]`` float32, sha256 of the bytes) of ``source``; :class:`ImageError`."""
    scheme = _SCHEME_RE.match(source.strip())
    name = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else None  # C:\ is a path
    if name == "data":
        data, label = image_bytes(source.strip()), "data URL"
    elif name in ("http", "https"):
        if not allow_remote:
            raise ImageError("remote images are disabled (pass --allow-remote-images to fetch http(s) URLs)")
        data, label = image_bytes(source.strip(), allow_remote=True), f"URL {host_of(source.strip())}"
    elif name is not None and source.strip().startswith(f"{scheme.group(1)}://"):
        raise ImageError(f"unsupported URL scheme {name!r}: use a file path, a data: URL or an http(s) URL")
    else:
        path = Path(source)
        path = path if path.is_absolute() else base_dir / path
        data, label = image_bytes(path), f"file '{path}'"
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = load_image(data)
    except ImageError as exc:  # name the source, not "image bytes"
        raise ImageError(f"{label}: {str(exc).removeprefix('image bytes: ')}") from None
    try:
        return preprocess(image, size), digest
    finally:
        image.close()


class ImagePool:
    """``submit(source)`` -> a Future of :func:`read_image`'s result, computed on ``workers`` threads
    (PIL decodes and resizes outside the GIL)."""

    def __init__(self, *, base_dir: str | Path, allow_remote: bool, size: tuple[int, int], workers: int = 2) -> None:
        self.base_dir = Path(base_dir)
        self.allow_remote = allow_remote
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="visualglm-image")

    def submit(self, source: str) -> Future:
        return self._pool.submit(read_image, source, base_dir=self.base_dir, allow_remote=self.allow_remote,
                                 size=self.size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
