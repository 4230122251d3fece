"""`sdtool bucket` (CONTRACT §E): kohya's bucket maths in `algorithm` (pure, no I/O) and the folder scan in `scan`
(header-only sizes, sidecars, the metadata file)."""
