"""Labelling images: captioners (BLIP, GIT, any image-to-text model) and booru taggers (WD14, DeepDanbooru).

`loading` reads and preprocesses images in parallel DataLoader workers and plans which sidecars to write;
`captioners` and `taggers` hold the models and the per-command runs.
"""
