"""The reference CLIP-style preprocessing of VisualGLM-6B and GLM-4V-9B.

``preprocess(image, size)`` reproduces ``BlipImageEvalProcessor(224)`` (VisualGLM-6B, spec B6) and the
GLM-4V-9B tokenizer transform (spec C6): RGB -> ``Resize((size, size), BICUBIC)`` -> ``ToTensor`` ->
``Normalize(CLIP_MEAN, CLIP_STD)``, batch dimension added. torchvision's ``Resize`` on a PIL image calls
``PIL.Image.resize`` (its ``antialias`` flag only concerns tensors), so PIL's bicubic resize is the
reference itself; the golden ``pixel_values`` are matched bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from visualglm.image.sources import load_image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
VISUALGLM_IMAGE_SIZE = 224  # BlipImageEvalProcessor(224), every VisualGLM-6B caller (spec B6)
GLM4V_IMAGE_SIZE = 1120  # vision_config.image_size of the released GLM-4V-9B (spec C6); read it from config.json


def preprocess(
    image: Any,
    size: int | tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference preprocessing: RGB, bicubic resize to exactly ``size``, ``[0, 1]``, normalise.

    ``size`` is an int (square) or ``(height, width)`` as in torchvision's ``Resize``; the aspect ratio
    is not kept and nothing is cropped. Returns a contiguous ``[1, 3, H, W]`` tensor of ``dtype`` (the
    arithmetic is float32, as in the reference, and the cast comes last). ``image`` is a PIL image, or
    anything :func:`load_image` accepts (loaded with its defaults: no remote URLs).
    """
    if isinstance(size, int):
        height = width = size
    else:
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"preprocess: size must be positive, got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("preprocess: mean and std need one value per RGB channel")
    image = image if isinstance(image, Image.Image) else load_image(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((width, height), Image.BICUBIC)  # PIL takes (width, height)
    # ToTensor: HWC uint8 -> CHW float32 / 255.
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    # Normalize: (x - mean) / std with float32 mean/std, per channel.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = pixels.sub(mean_t).div(std_t)
    return pixels.unsqueeze(0).to(dtype).contiguous()
