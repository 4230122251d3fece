"""Hypernetwork training (issue 12) on the tiny model: the loss falls, the U-Net and text encoder stay untouched, the
file is A1111's and continues training, periodic saves prune, and a state resumes exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtool.train.hypernetwork.attention import apply_hypernetwork, context_widths, remove_hypernetwork
from sdtool.train.hypernetwork.network import Hypernetwork
from tests.train.conftest import run_outputs, write_config, write_train_config

CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 3
max_data_loader_n_workers = 0
learning_rate = {lr}
optimizer_type = "AdamW"
train_hypernetwork = true
{extra}
"""
A1111_META = {
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "activate_output",
    "step",
    "name",
    "sd_checkpoint",
    "sd_checkpoint_name",
}


def config(tmp_path: Path, model: Path, out: str, steps: int, lr: float = 1e-3, extra: str = "", n: int = 1) -> Path:
    return write_train_config(tmp_path, out, CONFIG, n, model=model, steps=steps, lr=lr, extra=extra)


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def run_recipe(config_path: Path):
    """Train in-process through the same entry points as `sdtool train`, keeping the recipe to inspect its models."""
    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan
    from sdtool.train.recipe import FineTuneRecipe

    cfg = load_config(config_path)
    recipe = FineTuneRecipe(cfg, make_plan(cfg))
    out = recipe.run()
    return recipe, out


def eval_loss(model_dir: Path, image: Path, caption: str, hypernetwork: Path | None) -> float:
    """An independent denoising loss on fixed noise and timesteps: the source U-Net (+ the hypernetwork file)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    if hypernetwork is not None:
        hn = Hypernetwork.load(hypernetwork)
        apply_hypernetwork(unet, hn, 1.0)
        hn.eval()
    with Image.open(image) as im:
        pixels = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float32)
    x = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        ids = tok([caption], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        states = te(ids)[0]
        n = 32
        noise = torch.randn((n, *latents.shape[1:]), generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        noisy = sched.add_noise(latents.expand(n, -1, -1, -1), noise, t)
        pred = unet(noisy, t, states.expand(n, -1, -1)).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


@pytest.mark.slow
def test_hypernetwork_trains_on_a_frozen_model_and_writes_an_a1111_file(tmp_path, tiny_v1):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    source_digest = folder_digest(tiny_v1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red cat --w 64 --h 64 --s 2 --d 1\n")
    extra = (
        "save_every_n_steps = 1\ngradient_checkpointing = true\nhypernetwork_multiplier = 0.5\n"
        f'sample_prompts = "{prompts}"\nsample_every_n_steps = 15\n'
    )
    # A high learning rate: on the tiny random U-Net, attention context changes move the loss only slowly.
    cfg = config(tmp_path, tiny_v1, "out", steps=30, lr=3e-2, extra=extra)
    recipe, out = run_recipe(cfg)
    out_dir = tmp_path / "out"
    assert out == out_dir / "m.pt"

    # Only hypernetwork files come out: no full model in any format.
    produced = set(run_outputs(out_dir))
    assert produced == {"m.pt", "metrics.jsonl", "sample"} | {f"m-step{s:08d}.pt" for s in range(1, 30)}
    assert sorted(p.name for p in (out_dir / "sample").glob("*.png"))  # rendered with the hypernetwork applied

    # The U-Net and text encoder are bit-identical to the source model, which is untouched on disk.
    assert folder_digest(tiny_v1) == source_digest
    fresh_unet = UNet2DConditionModel.from_pretrained(tiny_v1, subfolder="unet")
    fresh_te = CLIPTextModel.from_pretrained(tiny_v1, subfolder="text_encoder")
    for trained, fresh in ((recipe.model.unet, fresh_unet), (recipe.model.text_encoder, fresh_te)):
        a, b = trained.state_dict(), fresh.state_dict()
        assert a.keys() == b.keys()
        assert not [k for k in a if not torch.equal(a[k].cpu(), b[k])]
    # Sampling gave back training mode, and the hypernetwork is still in the U-Net's attention.
    assert all(m.training for m in recipe.hypernetwork.modules())
    assert remove_hypernetwork(recipe.model.unet) > 0

    # A1111's structure, readable without unpickling code; A1111's own safe-loader check passes on every file.
    from tests import a1111

    for written in out_dir.glob("*.pt"):
        a1111.check_pt(written)
    data = torch.load(out, weights_only=True)
    widths = [k for k in data if isinstance(k, int)]
    assert sorted(widths) == context_widths(fresh_unet)
    assert set(data) - set(widths) == A1111_META
    for width in widths:
        k, v = data[width]
        dims = [width, 2 * width, width]
        for state in (k, v):
            assert type(state) is dict
            assert {name: tuple(t.shape) for name, t in state.items()} == {
                "linear.0.weight": (dims[1], dims[0]),
                "linear.0.bias": (dims[1],),
                "linear.1.weight": (dims[2], dims[1]),
                "linear.1.bias": (dims[2],),
            }
    assert data["layer_structure"] == [1, 2, 1]
    assert data["activation_func"] == "linear" and data["is_layer_norm"] is False
    assert data["step"] == 30 and data["name"] == "m" and data["sd_checkpoint_name"] == tiny_v1.name
    assert torch.load(out_dir / "m-step00000007.pt", weights_only=True)["step"] == 7

    # The loss falls, measured independently on fixed noise: after 30 steps against after 1.
    image, caption = tmp_path / "data" / "images" / "img0.png", "a photo of a red cat"
    first = eval_loss(tiny_v1, image, caption, out_dir / "m-step00000001.pt")
    last = eval_loss(tiny_v1, image, caption, out)
    assert last < 0.9 * first, (first, last)


@pytest.mark.slow
def test_a_written_file_continues_training(tmp_path, tiny_v1):
    first = config(tmp_path, tiny_v1, "a", steps=3, extra="hypernetwork_layer_structure = [1, 1.5, 1]")
    _, written = run_recipe(first)
    start = Hypernetwork.load(written).state_dict()

    # Learning rate 0: the continued weights must equal the file exactly, and the step count goes on from it.
    extra = f'hypernetwork_weights = "{written}"'
    recipe, out = run_recipe(config(tmp_path, tiny_v1, "b", steps=2, lr=0.0, extra=extra))
    assert recipe.hypernetwork.layer_structure == [1, 1.5, 1]
    after = Hypernetwork.load(out)
    assert after.step == 5
    assert all(torch.equal(start[k], t) for k, t in after.state_dict().items())

    # And with a learning rate it trains on from there.
    _, out = run_recipe(config(tmp_path, tiny_v1, "c", steps=2, extra=extra))
    changed = Hypernetwork.load(out).state_dict()
    assert any(not torch.equal(start[k], t) for k, t in changed.items())


@pytest.mark.slow
def test_periodic_saves_prune_and_a_state_resumes_exactly(tmp_path, tiny_v1):
    extra = "save_every_n_steps = 1\nsave_last_n_steps = 2\nsave_state = true\nuse_ema = true"
    _, full = run_recipe(config(tmp_path, tiny_v1, "full", steps=4, extra=extra, n=3))
    out = tmp_path / "full"
    names = {p.name for p in out.iterdir()}
    assert {"m-step00000002.pt", "m-step00000003.pt", "m-step00000002-state", "m-step00000003-state"} <= names
    assert "m-step00000001.pt" not in names and "m-step00000001-state" not in names

    state = out / "m-step00000002-state"
    assert not [p for p in state.iterdir() if p.stat().st_size > 1 << 20]  # the frozen U-Net is not in the state
    resumed = config(tmp_path, tiny_v1, "resumed", steps=4, extra=f'use_ema = true\nresume = "{state}"')
    _, out2 = run_recipe(resumed)
    a, b = torch.load(full, weights_only=True), torch.load(out2, weights_only=True)
    for width in (k for k in a if isinstance(k, int)):
        for sa, sb in zip(a[width], b[width], strict=True):
            assert not [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert a["step"] == b["step"] == 4


def test_hypernetwork_keys_are_checked_before_any_model_loads(cli, tmp_path, tiny_v1):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    extra = (
        "train_text_encoder = true\nsave_model_as = 'safetensors'\nhypernetwork_layer_structure = [2, 1]\n"
        "hypernetwork_activation = 'nope'\nmem_eff_attn = true\n"
    )
    result = cli("train", str(config(tmp_path, tiny_v1, "x", steps=1, extra=extra)))
    assert result.exit_code == 2
    for key in ("train_text_encoder", "save_model_as", "hypernetwork_layer_structure", "hypernetwork_activation"):
        assert f"{key}:" in result.stderr
    assert "mem_eff_attn:" in result.stderr

    result = cli("train", str(config(tmp_path, tiny_v1, "y", steps=1, extra=f'hypernetwork_weights = "{bad}"')))
    assert result.exit_code == 2 and "hypernetwork_weights:" in result.stderr

    text = config(tmp_path, tiny_v1, "z", steps=1).read_text().replace("train_hypernetwork = true", "")
    path = write_config(tmp_path / "plain.toml", text + "\n")
    result = cli("train", str(path), "--set", "hypernetwork_dropout=0.1", "--set", "save_model_as=pt")
    assert result.exit_code == 2
    assert "hypernetwork_dropout: needs train_hypernetwork = true" in result.stderr
    assert "save_model_as:" in result.stderr


def test_print_config_shows_the_structure_of_the_file_continued_from(cli, tmp_path, tiny_v1):
    from sdtool.train.hypernetwork.network import Hypernetwork

    file = Hypernetwork([32, 64], [1, 3, 1], "relu", True, 0.1).save(tmp_path / "start.pt")
    cfg = config(tmp_path, tiny_v1, "p", steps=1, extra=f'hypernetwork_weights = "{file}"')
    result = cli("train", str(cfg), "--print-config")
    assert result.exit_code == 0, result.stderr
    assert "hypernetwork_layer_structure = [1.0, 3.0, 1.0]" in result.stdout
    assert 'hypernetwork_activation = "relu"' in result.stdout
    assert 'save_model_as = "pt"' in result.stdout

    result = cli("train", str(cfg), "--set", "hypernetwork_layer_norm=false")
    assert result.exit_code == 2 and "hypernetwork_layer_norm = False contradicts" in result.stderr


@pytest.mark.slow
def test_two_gloo_processes_train_one_hypernetwork(tmp_path, tiny_v1):
    import json

    from tests.train.test_distributed import _torchrun

    digests = tmp_path / "digests"
    two = config(tmp_path, tiny_v1, "two", steps=3, n=4)
    result = _torchrun("train", two, env={"SDTOOL_RANK_DIGESTS": str(digests)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "two" / "m.pt")
    assert run_outputs(tmp_path / "two") == ["m.pt", "metrics.jsonl"]
    # DDP synchronised the hypernetwork: both ranks end bit-identical (the wrapper's only weights are the MLPs).
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]

    # The same global batches as one process with twice the batch. Only losses are compared: the hypernetwork's
    # gradients at its near-identity start are sums that nearly cancel, so fp32 summation order moves them by up to
    # a few percent (float64 agrees to 1e-12), and Adam turns that into visible weight differences.
    one = config(tmp_path, tiny_v1, "one", steps=3, n=4)
    one.write_text(one.read_text().replace("batch_size = 1", "batch_size = 2"))
    run_recipe(one)
    loss = [
        [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("two", "one")
    ]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)
