"""The ImageFolder fast path: random-resized-crop and flip from a reduced JPEG decode, uint8 out.

``RandomResizedCrop`` decodes the whole image at full resolution, crops a random box and resizes it to the
output side. Here the box is drawn first, from the file's header size alone (the same draws as torchvision's
``RandomResizedCrop.get_params``), then the JPEG is decoded, scaled down by 2, 4 or 8 in the DCT where the box
still spans at least 2 x ``out_size`` pixels each way after it (``decode_factor``), and the box, mapped to that
scale, is resized to the output by torchvision's antialiased bicubic on the uint8 channels-last decode (torch's
vectorised uint8 kernel, PIL's filter). The image stays uint8 (C, S, S) through collation and pinned memory; the
data module converts batches to float32 [0, 1] on the device (``ImageFolderDataModule.on_after_batch_transfer``).

Decoders: ``simplejpeg`` (libjpeg-turbo, from bytes; the default: the faster of the two in
``benchmarks/input_pipeline.py``) or PIL's ``draft`` (libjpeg-turbo through Pillow). A file that is not a JPEG,
or a JPEG that ``simplejpeg`` cannot convert (CMYK), falls back to a full PIL decode with a warning naming it:
the same crop distribution, only slower.
"""

import math
import warnings
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from advmim_pl.data.device import ATTEMPTS, RATIO

JPEG_MAGIC = b"\xff\xd8"
Decoder = Literal["simplejpeg", "pil"]


def crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w) in integer pixels of a (height, width) image.

    The algorithm of torchvision's ``RandomResizedCrop.get_params``: up to ``ATTEMPTS`` candidates with area
    uniform in ``scale`` x height x width and aspect (w / h) log-uniform in ``ratio``, sides rounded; the first
    that fits is placed uniformly at random; with none, the whole image narrowed to the nearest allowed aspect,
    centred. Draws from ``generator`` (torch's global RNG if None).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(ATTEMPTS):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's header, without decoding it; ValueError if it is not a readable JPEG."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return height, width


def decode_factor(box_h: int, box_w: int, out_size: int) -> int:
    """The DCT scale-down factor of the decode: the largest of 8, 4 and 2 after which the (box_h, box_w) box still
    spans at least 2 x ``out_size`` pixels each way (a crop side of 2 x factor x ``out_size``: 2 from 448 px and 4
    from 896 px at 112, 2 from 896 px at 224), else 1.

    Measured (``tests/data/test_jpeg.py``; ``benchmarks/results/input_pipeline_cpu-2core_lowres.md``, decode and
    resize of a crop against the same box from a full decode): with that margin the mean absolute error is 1.0-1.5
    levels (of 255) where only 1/2 is taken and 1.2-2.0 with 1/4 and 1/8 too (95th percentile 2.2-4.4); with half
    the margin it is 3.4-4.1 (95th percentile 6-9.5), the reduced DCT being a coarser filter than the antialiased
    bicubic it replaces. A reduction saves IDCT, colour conversion and resize work, not the entropy decoding: on
    2,000 px JPEGs at 112-128 px the decode and resize run 1.23x faster than from a full decode with 1/2 alone and
    1.33-1.38x with 1/4 and 1/8 as well. ImageNet's images (sides of 300-500 px) almost never have crops that
    large, even at 112 px (1% of crops), so there nothing changes. libjpeg-turbo's n/8 scales other than 1/2, 1/4
    and 1/8 cost more than the full decode: not used.
    """
    side = min(box_h, box_w)
    return next((factor for factor in (8, 4, 2) if side >= 2 * factor * out_size), 1)


def decode_reduced(data: bytes, factor: int, channels: int, decoder: Decoder) -> Tensor:
    """Decode JPEG bytes scaled down by ``factor`` (1, 2, 4 or 8) in the DCT (``decode_factor`` chooses it).

    Returns uint8 (channels, H', W'), H' = ceil(H / factor), a channels-last view of the decoder's (H', W', channels)
    array (no copy); RGB for 3 channels, luma for 1. Raises ValueError where the decoder cannot (simplejpeg: CMYK,
    corrupt data), OSError where PIL cannot.
    """
    if decoder == "simplejpeg":
        height, width = jpeg_size(data)
        space = "RGB" if channels == 3 else "GRAY"
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=space, min_height=-(-height // factor), min_width=-(-width // factor)
        )
    else:
        image = Image.open(BytesIO(data))
        mode = "RGB" if channels == 3 else "L"
        image.draft(mode, (image.width // factor, image.height // factor))  # PIL picks the scale by floor division
        image = image.convert(mode)
        pixels = np.array(image).reshape(image.height, image.width, channels)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def resized_crop(
    image: Tensor,
    box: tuple[int, int, int, int],
    full_size: tuple[int, int],
    out_size: int,
    flip: bool,
) -> Tensor:
    """Crop a box of the full-resolution image out of a (possibly reduced) decode of it and resize it.

    image uint8 (C, H', W'), a decode of a (full_size = (H, W)) image; box (top, left, h, w) in full-resolution
    pixels, mapped to the decode by the scale (H' / H, W' / W) and rounded to its pixels. The resize is
    torchvision's bicubic with antialiasing (on uint8 channels-last images the same filter as PIL's, in torch's
    vectorised uint8 kernel); ``flip`` mirrors the result left-right. Returns uint8 (C, out_size, out_size).
    """
    height, width = full_size
    sy, sx = image.shape[1] / height, image.shape[2] / width
    top, left, h, w = box
    t, b = round(top * sy), round((top + h) * sy)
    lft, r = round(left * sx), round((left + w) * sx)
    out = TF.resized_crop(
        image, t, lft, max(1, b - t), max(1, r - lft), [out_size, out_size], TF.InterpolationMode.BICUBIC, True
    )
    return TF.horizontal_flip(out) if flip else out


class JpegCropFlip:
    """The fast training transform of ``ImageFolderDataModule(decode="fast")``: file path -> uint8 image.

    ``__call__(path)`` reads the file, draws a crop box (``crop_box``) and then, if ``hflip``, a flip coin from
    torch's global RNG (which ``SeededSamples`` seeds per sample), decodes the JPEG at a reduced scale and returns
    uint8 (channels, out_size, out_size). Not a JPEG, or a JPEG ``simplejpeg`` cannot convert: the same crop from a
    full PIL decode, with a warning naming the file. Unreadable data raises OSError (the dataset skips the file).
    """

    def __init__(
        self,
        out_size: int,
        scale: tuple[float, float],
        hflip: bool = True,
        channels: int = 3,
        decoder: Decoder = "simplejpeg",
    ) -> None:
        if decoder not in ("simplejpeg", "pil"):
            raise ValueError(f"decoder must be simplejpeg or pil, got {decoder!r}")
        self.out_size, self.scale, self.hflip, self.channels, self.decoder = out_size, scale, hflip, channels, decoder

    def __call__(self, path: str) -> Tensor:
        return self.from_bytes(Path(path).read_bytes(), path)

    def from_bytes(self, data: bytes, name: str) -> Tensor:
        """Encoded image bytes (``name``: where they come from, for the warning) -> uint8 (channels, out_size,
        out_size); the streaming path's entry, which reads records rather than files."""
        if data[:2] == JPEG_MAGIC:
            try:
                return self.from_jpeg(data)
            except ValueError as err:
                reason = f"the JPEG decoder refused it ({err})"
        else:
            reason = "not a JPEG"
        warnings.warn(f"decode fast: {name}: {reason}; decoding it in full with PIL instead", stacklevel=2)
        return self.from_pil(data)

    def draws(self, height: int, width: int) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box and the flip of one sample, in this order, from torch's global RNG."""
        box = crop_box(height, width, self.scale)
        flip = bool(torch.rand(1) < 0.5) if self.hflip else False
        return box, flip

    def from_jpeg(self, data: bytes) -> Tensor:
        """JPEG bytes -> uint8 (channels, out_size, out_size) through a reduced decode."""
        height, width = jpeg_size(data)
        box, flip = self.draws(height, width)
        image = decode_reduced(data, decode_factor(box[2], box[3], self.out_size), self.channels, self.decoder)
        return resized_crop(image, box, (height, width), self.out_size, flip)

    def from_pil(self, data: bytes) -> Tensor:
        """Any image PIL reads -> uint8 (channels, out_size, out_size) from a full decode; OSError if unreadable."""
        try:
            with Image.open(BytesIO(data)) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
        except SyntaxError as err:  # malformed headers
            raise OSError(str(err)) from err
        pixels = torch.from_numpy(np.array(image).reshape(image.height, image.width, self.channels))
        box, flip = self.draws(image.height, image.width)
        return resized_crop(pixels.permute(2, 0, 1), box, (image.height, image.width), self.out_size, flip)
