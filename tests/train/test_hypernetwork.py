"""Hypernetworks: A1111 layout and file format, processors checked against diffusers' own, training a tiny U-Net."""

from __future__ import annotations

import fractions
import itertools
from collections import OrderedDict

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from sdtool.errors import ConfigError, InputError, MissingDependencyError, ModelError
from sdtool.train.hypernetwork.attention import (
    HypernetworkAttnProcessor,
    apply_hypernetwork,
    context_widths,
    remove_hypernetwork,
)
from sdtool.train.hypernetwork.network import Hypernetwork
from sdtool.train.hypernetwork.options import HypernetworkOptions, build_hypernetwork
from sdtool.train.hypernetwork.structure import ACTIVATIONS, HypernetworkModule


@pytest.fixture(scope="module")
def tiny():
    """The tiny v1 U-Net (eval, frozen) and a text-encoder context for two prompts (no VAE: not needed here)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtool.models.tiny import build_tiny_tokenizer, tiny_configs

    configs = tiny_configs("v1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs["unet"]).eval().requires_grad_(False)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval()
    # Short padding keeps the tests fast; the hypernetwork acts per token, so length does not matter.
    ids = build_tiny_tokenizer("v1")(
        ["a photo of a cat", "a red house"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        context = text_encoder(ids)[0]
    return unet, context


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700][:batch])
    return latents, timesteps


def _run(unet, context, seed: int = 0, **kwargs) -> torch.Tensor:
    latents, timesteps = _inputs(seed, context.shape[0])
    with torch.no_grad():
        return unet(latents, timesteps, context, **kwargs).sample


def _zero_last_linear(hypernetwork: Hypernetwork) -> None:
    with torch.no_grad():
        for module in hypernetwork.modules():
            if isinstance(module, HypernetworkModule):
                last = [layer for layer in module.linear if isinstance(layer, nn.Linear)][-1]
                last.weight.zero_()
                last.bias.zero_()


def _perturb(hypernetwork: Hypernetwork, seed: int = 1, scale: float = 0.2) -> None:
    """Weights large enough to change the U-Net output clearly (a fresh one is close to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hypernetwork.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# --- the U-Net side ----------------------------------------------------------------------------------------------


def test_context_widths_are_block_channels_and_cross_attention_dim():
    from diffusers import UNet2DConditionModel

    from sdtool.models.tiny import tiny_configs

    # A cross-attention width that differs from every block width, so the two sources are told apart.
    unet = UNet2DConditionModel(**{**tiny_configs("v1")["unet"], "cross_attention_dim": 48})
    assert context_widths(unet) == [32, 48, 64]
    hypernetwork = Hypernetwork(context_widths(unet))
    _perturb(hypernetwork)
    latents, timesteps = _inputs()
    context = torch.randn(2, 5, 48)
    with torch.no_grad():
        reference = unet(latents, timesteps, context).sample
        assert apply_hypernetwork(unet, hypernetwork.eval()) == 32  # 16 attention blocks x (self, cross)
        changed = unet(latents, timesteps, context).sample
    assert not torch.allclose(changed, reference)


def test_zero_mlp_gives_the_stock_unet_output_exactly(tiny):
    unet, context = tiny
    reference = _run(unet, context)  # diffusers' own AttnProcessor2_0
    hypernetwork = Hypernetwork(context_widths(unet), [1, 2, 2, 1], "relu", True, 0.3)
    _zero_last_linear(hypernetwork)
    apply_hypernetwork(unet, hypernetwork.eval())
    try:
        assert torch.equal(_run(unet, context), reference)
    finally:
        remove_hypernetwork(unet)


def test_zero_mlp_with_an_attention_mask_matches_the_stock_processor(tiny):
    unet, context = tiny
    mask = torch.ones(2, context.shape[1], dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, 5:] = False
    reference = _run(unet, context, encoder_attention_mask=mask)
    hypernetwork = Hypernetwork(context_widths(unet), activation="tanh")
    _zero_last_linear(hypernetwork)
    apply_hypernetwork(unet, hypernetwork.eval())
    try:
        assert torch.equal(_run(unet, context, encoder_attention_mask=mask), reference)
    finally:
        remove_hypernetwork(unet)


def test_multiplier_zero_is_identity_when_sampling_and_training_mode_runs_at_full_strength(tiny):
    unet, context = tiny
    reference = _run(unet, context)
    hypernetwork = Hypernetwork(context_widths(unet), activation="relu")
    _perturb(hypernetwork)
    try:
        apply_hypernetwork(unet, hypernetwork.eval(), multiplier=0.0)
        assert torch.equal(_run(unet, context), reference)
        hypernetwork.train()  # training ignores the multiplier (A1111's semantics)
        in_training = _run(unet, context)
        apply_hypernetwork(unet, hypernetwork.eval(), multiplier=1.0)
        full = _run(unet, context)
        apply_hypernetwork(unet, hypernetwork.eval(), multiplier=0.5)
        half = _run(unet, context)
    finally:
        remove_hypernetwork(unet)
    assert not torch.allclose(full, reference, atol=1e-3)
    assert torch.equal(in_training, full)
    assert not torch.allclose(half, full, atol=1e-4)


def test_remove_restores_the_original_processors(tiny):
    unet, _ = tiny
    originals = dict(unet.attn_processors)
    hypernetwork = Hypernetwork(context_widths(unet))
    n = apply_hypernetwork(unet, hypernetwork)
    assert n == len(originals)
    assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
    # The U-Net's own parameters and state dict are unchanged: the processors are not submodules.
    assert not any("hn_" in key for key in unet.state_dict())
    assert remove_hypernetwork(unet) == n
    assert all(unet.attn_processors[k] is p for k, p in originals.items())
    assert remove_hypernetwork(unet) == 0


def test_a_hypernetwork_for_other_widths_is_refused_unless_not_strict(tiny):
    unet, context = tiny
    reference = _run(unet, context)
    only_64 = Hypernetwork([64])
    _perturb(only_64)
    with pytest.raises(ModelError, match=r"context width\(s\) \[32\]"):
        apply_hypernetwork(unet, only_64)
    try:
        patched = apply_hypernetwork(unet, only_64.eval(), strict=False)  # A1111 leaves those layers alone
        assert 0 < patched < len(unet.attn_processors)
        assert not torch.allclose(_run(unet, context), reference, atol=1e-4)
    finally:
        remove_hypernetwork(unet)
    with pytest.raises(ModelError, match="match none"):
        apply_hypernetwork(unet, Hypernetwork([768, 1024]), strict=False)
    assert remove_hypernetwork(unet) == 0


def test_xformers_selection_without_xformers_is_a_clear_error(tiny):
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    unet, _ = tiny
    with pytest.raises(MissingDependencyError, match="xformers"):
        apply_hypernetwork(unet, Hypernetwork(context_widths(unet)), attention="xformers")
    remove_hypernetwork(unet)
    with pytest.raises(ConfigError, match="attention backend"):
        apply_hypernetwork(unet, Hypernetwork(context_widths(unet)), attention="flash")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "xformers"])
def test_zero_mlp_matches_diffusers_fp16_processors_on_cuda(attention):
    if attention == "xformers":
        pytest.importorskip("xformers")
    from diffusers import UNet2DConditionModel

    from sdtool.models.tiny import tiny_configs

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_configs("v1")["unet"]).to("cuda", torch.float16).eval()
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    latents, timesteps = _inputs()
    latents, timesteps = latents.to("cuda", torch.float16), timesteps.to("cuda")
    context = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    hypernetwork = Hypernetwork(context_widths(unet))  # stays fp32: the MLP runs in its own dtype
    _zero_last_linear(hypernetwork)
    with torch.no_grad():
        reference = unet(latents, timesteps, context).sample
        apply_hypernetwork(unet, hypernetwork.eval(), attention="auto")
        assert hypernetwork.pair(32)[0].linear[0].weight.is_cuda
        assert torch.equal(unet(latents, timesteps, context).sample, reference)


# --- training ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_moves_only_the_hypernetwork_and_the_loss_falls(tiny):
    unet, context = tiny
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)
    hypernetwork = Hypernetwork(context_widths(unet), [1, 2, 1], "relu", False, 0.0).train()
    apply_hypernetwork(unet, hypernetwork)
    optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=3e-3)
    latents, timesteps = _inputs(seed=3)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    losses = []
    try:
        for _ in range(6):
            loss = nn.functional.mse_loss(unet(latents, timesteps, context).sample, target)
            optimizer.zero_grad()
            loss.backward()
            grads = [p.grad for p in hypernetwork.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)  # type: ignore[union-attr]
            assert all(p.grad is None for p in unet.parameters())
            optimizer.step()
            losses.append(loss.item())
    finally:
        remove_hypernetwork(unet)
    assert losses[-1] < losses[0]
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_keeps_hypernetwork_gradients(tiny):
    # The U-Net is frozen and its inputs need no grad: only non-reentrant checkpointing (diffusers' default)
    # still back-propagates into the hypernetwork inside checkpointed blocks.
    unet, context = tiny
    hypernetwork = Hypernetwork(context_widths(unet), activation="relu").train()
    _perturb(hypernetwork, scale=0.05)
    latents, timesteps = _inputs(seed=5)

    def grads() -> list[torch.Tensor]:
        hypernetwork.zero_grad(set_to_none=True)
        unet(latents, timesteps, context).sample.square().mean().backward()
        return [p.grad.clone() for p in hypernetwork.parameters()]  # type: ignore[union-attr]

    apply_hypernetwork(unet, hypernetwork)
    try:
        plain = grads()
        unet.enable_gradient_checkpointing()
        unet.train()
        checkpointed = grads()
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
        remove_hypernetwork(unet)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(plain, checkpointed, strict=True))
    assert any(g.abs().sum() > 0 for g in checkpointed)


# --- the A1111 file format ---------------------------------------------------------------------------------------

# Hand-derived from A1111's layout: Linear, activation (not after the last Linear), LayerNorm, Dropout per layer.
LAYOUTS = [
    ([1, 2, 1], "linear", False, 0.0, ["linear.0", "linear.1"]),
    ([1, 2, 1], "relu", False, 0.0, ["linear.0", "linear.2"]),
    ([1, 2, 1], "relu", True, 0.0, ["linear.0", "linear.2", "linear.3", "linear.4"]),
    ([1, 2, 1], "relu", False, 0.3, ["linear.0", "linear.3"]),
    ([1, 2, 1], "elu", True, 0.3, ["linear.0", "linear.2", "linear.4", "linear.5"]),
    ([1, 2, 2, 1], "relu", False, 0.0, ["linear.0", "linear.2", "linear.4"]),
    ([1, 2, 2, 1], "relu", True, 0.3, ["linear.0", "linear.2", "linear.4", "linear.6", "linear.8", "linear.9"]),
    ([1, 2, 2, 1], "linear", False, [0, 0.1, 0, 0], ["linear.0", "linear.2", "linear.3"]),
    ([1, 2, 2, 1], "linear", True, 0.2, ["linear.0", "linear.1", "linear.3", "linear.4", "linear.6", "linear.7"]),
]


@pytest.mark.parametrize(("layer_structure", "activation", "layer_norm", "dropout", "prefixes"), LAYOUTS)
def test_saved_file_has_a1111_structure(tmp_path, layer_structure, activation, layer_norm, dropout, prefixes):
    hypernetwork = Hypernetwork([32, 64], layer_structure, activation, layer_norm, dropout)
    path = hypernetwork.save(tmp_path / "hn.pt", step=123, name="style", sd_checkpoint_name="tiny-v1")
    data = torch.load(path, map_location="cpu", weights_only=True)

    assert sorted(k for k in data if isinstance(k, int)) == [32, 64]
    expected_keys = sorted(f"{prefix}.{kind}" for prefix in prefixes for kind in ("weight", "bias"))
    for width in (32, 64):
        pair = data[width]
        assert isinstance(pair, list) and len(pair) == 2
        for state in pair:
            assert type(state) is dict
            assert sorted(state) == expected_keys
            assert all(t.dtype == torch.float32 for t in state.values())
        k_state = pair[0]
        # Linear shapes follow the layer structure (out, in) = (dim * ls[i+1], dim * ls[i]).
        linears = [key for key in sorted(k_state, key=lambda s: int(s.split(".")[1])) if key.endswith("weight")]
        linears = [key for key in linears if k_state[key].ndim == 2]
        shapes = [tuple(k_state[key].shape) for key in linears]
        assert shapes == [(int(width * b), int(width * a)) for a, b in itertools.pairwise(layer_structure)]

    assert data["layer_structure"] == layer_structure
    assert data["activation_func"] == activation
    assert data["is_layer_norm"] is layer_norm
    assert data["use_dropout"] is (dropout != 0.0)
    assert data["activate_output"] is False
    assert data["step"] == 123
    assert data["name"] == "style"
    assert data["sd_checkpoint_name"] == "tiny-v1"
    assert data["weight_initialization"] == "Normal"
    assert len(data["dropout_structure"]) == len(layer_structure)
    assert not list(tmp_path.glob(".*.tmp"))


def test_saved_file_loads_back_with_identical_outputs(tiny, tmp_path):
    unet, context = tiny
    hypernetwork = Hypernetwork(context_widths(unet), [1, 2, 2, 1], "swish", True, 0.3)
    _perturb(hypernetwork, scale=0.05)
    path = hypernetwork.save(tmp_path / "hn.pt", step=7)
    loaded = Hypernetwork.load(path)
    assert loaded.widths == hypernetwork.widths
    assert (loaded.layer_structure, loaded.activation, loaded.layer_norm) == ([1, 2, 2, 1], "swish", True)
    assert loaded.dropout_structure == [0.0, 0.3, 0.3, 0.0]
    assert (loaded.step, loaded.name) == (7, "hn")
    assert isinstance(loaded.pair(32)[0].linear[1], nn.Hardswish)  # A1111's "swish"
    try:
        apply_hypernetwork(unet, hypernetwork.eval(), multiplier=0.8)
        original = _run(unet, context)
        apply_hypernetwork(unet, loaded.eval(), multiplier=0.8)
        reloaded = _run(unet, context)
    finally:
        remove_hypernetwork(unet)
    assert torch.equal(original, reloaded)


def test_novelai_legacy_file_loads_with_a1111_defaults(tmp_path):
    # NovelAI's original files: two Linear layers named linear1/linear2, no metadata at all.
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    w2, b2 = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    state = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    torch.save({8: (state, dict(state))}, tmp_path / "nai.pt")
    loaded = Hypernetwork.load(tmp_path / "nai.pt").eval()
    assert loaded.layer_structure == [1, 2, 1] and loaded.activation is None
    x = torch.randn(3, 8, generator=g)
    k, _ = loaded.pair(8)
    with torch.no_grad():
        assert torch.allclose(k(x), x + (x @ w1.T + b1) @ w2.T + b2, atol=1e-5)


def test_a1111_file_without_dropout_structure_uses_a1111_defaults(tmp_path):
    # An A1111 file from before `dropout_structure`: [1, 2, 2, 1] + use_dropout → [0, 0.3, 0, 0] (no last-layer
    # dropout by default), so the Linear layers sit at 0, 3 and 5; pairs are tuples of OrderedDicts.
    def state(width: int) -> OrderedDict:
        return OrderedDict(
            [
                ("linear.0.weight", torch.randn(2 * width, width)),
                ("linear.0.bias", torch.zeros(2 * width)),
                ("linear.3.weight", torch.randn(2 * width, 2 * width)),
                ("linear.3.bias", torch.zeros(2 * width)),
                ("linear.5.weight", torch.randn(width, 2 * width)),
                ("linear.5.bias", torch.zeros(width)),
            ]
        )

    data = {
        16: (state(16), state(16)),
        "step": 5,
        "name": "old",
        "layer_structure": [1, 2, 2, 1],
        "activation_func": "relu",
        "is_layer_norm": False,
        "weight_initialization": "Normal",
        "use_dropout": True,
        "sd_checkpoint": "abcd1234",
        "sd_checkpoint_name": "sd15",
        "activate_output": False,
    }
    torch.save(data, tmp_path / "old.pt")
    loaded = Hypernetwork.load(tmp_path / "old.pt")
    assert loaded.dropout_structure == [0, 0.3, 0, 0]
    assert (loaded.step, loaded.name, loaded.sd_checkpoint) == (5, "old", "abcd1234")
    assert torch.equal(loaded.pair(16)[1].linear[5].weight, data[16][1]["linear.5.weight"])


def _good_file(tmp_path) -> dict:
    hypernetwork = Hypernetwork([16], [1, 2, 1], "relu", False, 0.0)
    return torch.load(hypernetwork.save(tmp_path / "good.pt"), weights_only=True)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: [d], "holds a list, not a dict"),
        (lambda d: {k: v for k, v in d.items() if not isinstance(k, int)}, "no integer width keys"),
        (lambda d: {**d, 16: [d[16][0]]}, r"width 16 must hold a \[k, v\] pair"),
        (lambda d: {**d, "is_layer_norm": True}, "keys do not match"),
        (lambda d: {**d, "activation_func": "linear"}, r"keys do not match.*missing \['linear.1.bias'"),
        (lambda d: {**d, "layer_structure": [1, 3, 1]}, "has shape"),
        (lambda d: {**d, "layer_structure": [2, 1]}, "must start and end with 1"),
        (lambda d: {**d, "activation_func": "sparkle"}, "unknown hypernetwork activation 'sparkle'"),
        (lambda d: {**d, "dropout_structure": [0, 0.5]}, "one entry per layer-structure entry"),
        (lambda d: {**d, "dropout_structure": [0, 1.5, 0]}, r"probabilities in \[0, 1\)"),
        (lambda d: {**d, 16: [{**d[16][0], "linear.0.bias": torch.full((32,), float("nan"))}, d[16][1]]}, "NaN"),
        (lambda d: {**d, 16: [{**d[16][0], "linear.0.bias": [0.0] * 32}, d[16][1]]}, "not a tensor"),
        (lambda d: {**d, 16: ["weights", d[16][1]]}, "not a state dict"),
    ],
)
def test_bad_structure_is_refused_with_a_clear_message(tmp_path, mutate, message):
    path = tmp_path / "bad.pt"
    torch.save(mutate(_good_file(tmp_path)), path)
    with pytest.raises(InputError, match=message) as info:
        Hypernetwork.load(path)
    assert str(path) in info.value.one_line()


def test_unreadable_and_unsafe_files_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such hypernetwork file"):
        Hypernetwork.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(InputError, match="cannot be read"):
        Hypernetwork.load(tmp_path / "junk.pt")
    data = _good_file(tmp_path)
    data["name"] = fractions.Fraction(1, 3)  # anything beyond plain data needs a full unpickler: refused
    torch.save(data, tmp_path / "pickle.pt")
    with pytest.raises(InputError, match=r"not a plain hypernetwork file: loading it would run code \(fractions"):
        Hypernetwork.load(tmp_path / "pickle.pt")


# --- activations and options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation_builds_runs_and_round_trips(tmp_path, activation):
    hypernetwork = Hypernetwork([8], [1, 2, 1], activation)
    k, _ = hypernetwork.pair(8)
    expected = ACTIVATIONS[activation]
    layers = list(k.linear)
    if expected is None:
        assert [type(m) for m in layers] == [nn.Linear, nn.Linear]
    else:
        assert [type(m) for m in layers] == [nn.Linear, expected, nn.Linear]
    x = torch.randn(2, 3, 8)
    _perturb(hypernetwork, scale=0.3)
    loaded = Hypernetwork.load(hypernetwork.save(tmp_path / f"{activation}.pt"))
    with torch.no_grad():
        assert torch.equal(loaded.eval().pair(8)[0](x), hypernetwork.eval().pair(8)[0](x))
    assert HypernetworkOptions(hypernetwork_activation=activation).hypernetwork_activation == activation


def test_unknown_activation_and_bad_structures_are_errors():
    with pytest.raises(ConfigError, match="unknown hypernetwork activation 'swiss'"):
        HypernetworkModule(8, [1, 2, 1], "swiss")
    with pytest.raises(ConfigError, match="must start and end with 1"):
        HypernetworkModule(8, [1, 2])
    with pytest.raises(ConfigError, match="at least two entries"):
        Hypernetwork([8], [1])
    with pytest.raises(ConfigError, match=r"dropout 1.0 must be in \[0, 1\)"):
        Hypernetwork([8], dropout=1.0)
    with pytest.raises(ConfigError, match="not True"):
        Hypernetwork([8], dropout=True)
    with pytest.raises(ConfigError, match="weight init"):
        HypernetworkModule(8, weight_init="Ones")
    with pytest.raises(ValidationError, match="unknown hypernetwork activation 'gelus'"):
        HypernetworkOptions(hypernetwork_activation="gelus")


def test_fresh_module_is_near_identity_with_a1111_initialisation():
    torch.manual_seed(0)
    module = HypernetworkModule(64, [1, 2, 1], "relu", True, 0.0).eval()
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in module.linear if hasattr(m, "bias"))
    stds = [m.weight.std().item() for m in module.linear if isinstance(m, nn.Linear | nn.LayerNorm)]
    assert all(0.005 < s < 0.015 for s in stds)  # N(0, 0.01) everywhere, LayerNorm weights included
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert (module(x) - x).abs().max() < 0.05  # LayerNorm output scaled by ~0.01 weights


def test_options_validate_and_build(tiny, tmp_path):
    unet, _ = tiny
    options = HypernetworkOptions(train_hypernetwork=True)
    assert options.hypernetwork_layer_structure == [1, 2, 1] and options.hypernetwork_activation == "linear"
    fresh = build_hypernetwork(unet, options, name="mine")
    assert fresh.widths == context_widths(unet) == [32, 64] and fresh.name == "mine"

    problems = [
        dict(hypernetwork_layer_structure=[1, 2]),
        dict(hypernetwork_dropout=[0, 0.2]),
        dict(hypernetwork_dropout=-0.1),
        dict(hypernetwork_multiplier=float("inf")),
        dict(hypernetwork_rank=4),
    ]
    for bad in problems:
        with pytest.raises(ValidationError):
            HypernetworkOptions(**bad)

    path = Hypernetwork([32, 64], [1, 2, 2, 1], "relu", True).save(tmp_path / "start.pt", step=40)
    continued = build_hypernetwork(unet, HypernetworkOptions(hypernetwork_weights=path))
    assert (continued.layer_structure, continued.activation, continued.step) == ([1, 2, 2, 1], "relu", 40)
    with pytest.raises(ConfigError, match="hypernetwork_activation = tanh contradicts"):
        build_hypernetwork(unet, HypernetworkOptions(hypernetwork_weights=path, hypernetwork_activation="tanh"))
    other = Hypernetwork([32, 768]).save(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"context width\(s\) \[64\]"):
        build_hypernetwork(unet, HypernetworkOptions(hypernetwork_weights=other))


# --- what A1111 and ComfyUI load (issue 18) ------------------------------------------------------------------------

# ComfyUI's `valid_activation` (comfy_extras/nodes_hypernetwork.py, load_hypernetwork_patch, commit 0323d874): any
# other `activation_func`, None included, makes it log an error and leave the model unpatched.
COMFYUI_VALID_ACTIVATIONS = {"linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"}


@pytest.mark.parametrize(("layer_structure", "activation", "layer_norm", "dropout", "prefixes"), LAYOUTS)
def test_a1111_check_and_loader_read_every_layout_back_equal(
    tmp_path, layer_structure, activation, layer_norm, dropout, prefixes
):
    from tests import a1111

    hypernetwork = Hypernetwork([32, 64], layer_structure, activation, layer_norm, dropout)
    _perturb(hypernetwork, scale=0.1)
    path = hypernetwork.save(tmp_path / "my-style.v2.pt", step=9)
    a1111.check_pt(path)  # A1111's modules/safe.py allow-list and restricted unpickler
    layers, meta = a1111.load_hypernetwork(path)  # A1111's own layout and defaults, strict load_state_dict
    assert meta == {"name": "my-style.v2", "step": 9}
    assert sorted(layers) == [32, 64]
    hypernetwork.eval()
    for width, (k, v) in layers.items():
        ours = hypernetwork.pair(width)
        x = torch.randn(2, 5, width)
        with torch.no_grad():
            assert torch.equal(k(x), ours[0](x)) and torch.equal(v(x), ours[1](x))


def test_a_file_without_activation_is_written_back_as_linear_for_comfyui(tmp_path):
    hypernetwork = Hypernetwork([8], activation=None)
    data = torch.load(hypernetwork.save(tmp_path / "none.pt"), weights_only=True)
    assert data["activation_func"] == "linear"
    assert data["activation_func"] in COMFYUI_VALID_ACTIVATIONS


def test_activations_comfyui_cannot_load_are_warned_about(cli, tmp_path, tiny_v1):
    from sdtool.train.hypernetwork.structure import COMFYUI_ACTIVATIONS, portability_warning

    assert set(COMFYUI_ACTIVATIONS) == COMFYUI_VALID_ACTIVATIONS
    for activation in ACTIVATIONS:
        warning = portability_warning(activation)
        assert (warning is None) == (activation in COMFYUI_VALID_ACTIVATIONS), activation
    assert "ComfyUI" in portability_warning("gelu") and "AUTOMATIC1111" in portability_warning("gelu")

    from tests.train.test_hypernetwork_train import config

    for activation, warned in (("gelu", True), ("silu", True), ("mish", False), ("linear", False)):
        path = config(tmp_path / activation, tiny_v1, "out", steps=1, extra=f'hypernetwork_activation = "{activation}"')
        result = cli("train", path, "--print-config")
        assert result.exit_code == 0, result.stderr
        assert ("not in ComfyUI" in result.stderr) is warned, (activation, result.stderr)
