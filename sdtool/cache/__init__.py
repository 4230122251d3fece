"""`sdtool cache` (CONTRACT §F): latents of bucketed images on disk.

`pixels` (the pixel pipeline) → `placement` (where each image lands) → `job` (the encode run, `ranks` under
torchrun) writing `entry` files (sdtool's format) or `kohya_npz` files; `fingerprint` says what an entry was made
from, and `store` finds and checks an entry for training and `--status`.
"""
