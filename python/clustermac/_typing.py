"""Type aliases shared by the package: each is defined here once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["PathLike", "ImageInput", "Box"]

#: A file-system path.
PathLike = Union[str, "os.PathLike[str]"]
#: An image argument: a path, a PIL image, or an H×W×3 / H×W×4 / H×W uint8 array.
ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
#: A box (x1, y1, x2, y2) in pixels, x to the right, y down.
Box = Sequence[float]
