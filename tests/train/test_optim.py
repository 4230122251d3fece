"""Optimizers by kohya's names and safe optimizer_args parsing."""

from __future__ import annotations

import pytest
import torch

from sdtool.errors import ConfigError
from sdtool.train.optim import build_lr_scheduler, build_optimizer, parse_optimizer_args


def test_optimizer_args_are_literals_never_code(tmp_path):
    marker = tmp_path / "pwned"
    args = parse_optimizer_args(
        ["weight_decay=0.01", "betas=(0.9, 0.99)", "mode=fast", f"x=__import__('pathlib').Path('{marker}').touch()"]
    )
    assert args["weight_decay"] == 0.01 and args["betas"] == (0.9, 0.99) and args["mode"] == "fast"
    assert isinstance(args["x"], str) and not marker.exists()
    with pytest.raises(ConfigError):
        parse_optimizer_args(["no equals sign"])


@pytest.mark.parametrize(
    "name", ["AdamW", "AdamW8bit", "Lion", "SGDNesterov", "Adafactor", "Prodigy", "torch.optim.RMSprop"]
)
def test_each_optimizer_steps(name):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    opt = build_optimizer(name, [{"params": list(layer.parameters()), "lr": 1e-2}], 1e-2, {})
    for _ in range(2):
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, layer.weight)
    if name == "SGDNesterov":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_arguments_are_config_errors():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer("AdamW", [{"params": list(layer.parameters())}], 1e-3, {"bogus": 1})
    with pytest.raises(ConfigError, match=r"not a torch\.optim\.Optimizer"):
        build_optimizer("collections.OrderedDict", [{"params": list(layer.parameters())}], 1e-3, {})


def test_warmup_as_ratio():
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    sched = build_lr_scheduler("constant_with_warmup", opt, warmup=0.25, total_steps=8)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.5, 1.0, 1.0]
