"""NovelAI/A1111-style hypernetworks: residual MLPs on the attention context, trained on a frozen model.

A hypernetwork holds, for every context width the U-Net's attention layers see (each block's channel width for
self-attention, the text encoder width for cross-attention), a pair of small residual MLPs `(k, v)` (`structure`,
`network`). Attention then computes `k = to_k(hn_k(context))` and `v = to_v(hn_v(context))` with
`hn(x) = x + mlp(x)·m` (`attention`); the U-Net and text encoder stay frozen and untouched. Files are A1111's `.pt`
format, so files written here load in A1111, and A1111's files load here. `options` holds the training keys and
`training` what the fine-tuning recipe needs. Training learns the full-strength MLP (training mode uses multiplier 1)
and `hypernetwork_multiplier` scales it when sampling (eval mode).
"""
