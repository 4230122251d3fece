"""kohya sd-scripts' own rules for caching latents, copied here as the independent oracle of the interop tests.

Sources (kohya-ss/sd-scripts at 48d368fa557731ad0488c07304dfeba8c07910eb), verbatim but for names and formatting:
- library/utils.py `resize_image` (L216-264) and `pil_resize`;
- library/train_util.py `trim_and_resize_if_required` (L2965-2994), `BucketManager.get_crop_ltrb` (L348-366),
  `load_image` (L2948: no EXIF orientation) and `IMAGE_TRANSFORMS` (ToTensor + Normalize([0.5], [0.5]));
- library/strategy_sd.py `SdSdxlLatentsCachingStrategy.get_latents_npz_path` (L133-157) and
  library/strategy_base.py `_default_is_disk_cached_latents_expected` (L427-472, the key checks).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def pil_resize(image, size, interpolation):
    # kohya swaps BGR→RGB→BGR around PIL; on an RGB array the two swaps cancel, so PIL sees the same pixels.
    pil_image = Image.fromarray(image)
    resized_pil = pil_image.resize(size, resample=interpolation)
    return np.array(resized_pil)


def resize_image(image, width, height, resized_width, resized_height, resize_interpolation=None):
    import cv2

    width, height, resized_width, resized_height = int(width), int(height), int(resized_width), int(resized_height)
    if resize_interpolation is None:
        if width >= resized_width and height >= resized_height:
            resize_interpolation = "area"
        else:
            resize_interpolation = "lanczos"
    use_pil = resize_interpolation in ["lanczos", "lanczos4", "box"]
    resized_size = (resized_width, resized_height)
    if use_pil:
        interpolation = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}[resize_interpolation]
        return pil_resize(image, resized_size, interpolation=interpolation)
    interpolation = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[
        resize_interpolation
    ]
    return cv2.resize(image, resized_size, interpolation=interpolation)


def get_crop_ltrb(bucket_reso, image_size):
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width = bucket_reso[1] * image_ar
        resized_height = bucket_reso[1]
    else:
        resized_width = bucket_reso[0]
        resized_height = bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    crop_right = crop_left + resized_width
    crop_bottom = crop_top + resized_height
    return crop_left, crop_top, crop_right, crop_bottom


def trim_and_resize_if_required(random_crop, image, reso, resized_size, resize_interpolation=None):
    image_height, image_width = image.shape[0:2]
    original_size = (image_width, image_height)  # size before resize
    if image_width != resized_size[0] or image_height != resized_size[1]:
        image = resize_image(image, image_width, image_height, resized_size[0], resized_size[1], resize_interpolation)
    image_height, image_width = image.shape[0:2]
    if image_width > reso[0]:
        trim_size = image_width - reso[0]
        p = trim_size // 2
        image = image[:, p : p + reso[0]]
    if image_height > reso[1]:
        trim_size = image_height - reso[1]
        p = trim_size // 2
        image = image[p : p + reso[1]]
    crop_ltrb = get_crop_ltrb(reso, original_size)
    return image, original_size, crop_ltrb


def load_image(image_path):
    with Image.open(image_path) as image:
        if not image.mode == "RGB":  # noqa: SIM201 (kohya's spelling)
            image = image.convert("RGB")
        return np.array(image, np.uint8)


def image_transforms(image):
    """IMAGE_TRANSFORMS: torchvision ToTensor (x / 255, CHW) then Normalize([0.5], [0.5])."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)
    return (t - 0.5) / 0.5


def get_latents_npz_path(absolute_path, image_size, sd: bool):
    old_npz_file = os.path.splitext(absolute_path)[0] + ".npz"
    if os.path.exists(old_npz_file):
        return old_npz_file
    suffix = "_sd.npz" if sd else "_sdxl.npz"
    return os.path.splitext(absolute_path)[0] + f"_{image_size[0]:04d}x{image_size[1]:04d}" + suffix


def is_disk_cached_latents_expected(npz_path, flip_aug: bool) -> bool:
    if not os.path.exists(npz_path):
        return False
    npz = np.load(npz_path)
    if "latents" not in npz:
        return False
    return not (flip_aug and "latents_flipped" not in npz)


# Which scripts construct the strategy with sd=True (library/strategy_sd.py callers, 48d368fa):
SCRIPTS_SD = {
    "fine_tune.py": False,
    "train_db.py": False,
    "train_network.py": True,
    "train_textual_inversion.py": True,
    "train_control_net.py": True,
    "tools/cache_latents.py": True,
}
