"""`sdtool train` (CONTRACT §H, §I): full fine-tuning from a kohya-style TOML config.

`config/` reads and checks the config; `plan` lays out the data; `recipe` runs setup → train → cleanup with
`dataset`, `captions`, `loss`, `optim`, `ema`, `distributed`; `checkpoints`, `outputs` and `saving` write models and
states; `sampling` and `sample_prompts` render samples; `hypernetwork/` trains A1111 hypernetworks instead.
"""
