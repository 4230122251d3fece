"""`sdtool caption` and `sdtool tag` (CONTRACT §K): captioners (BLIP, GIT, any image-to-text model) and booru
taggers (WD14, DeepDanbooru).

`loading` reads and preprocesses images in parallel DataLoader workers and plans which sidecars to write;
`captioners` holds the caption models and run; `tagger_model` the ONNX taggers, `tags` the tag-text rules and
`taggers` the tag run.
"""
