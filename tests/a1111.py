"""AUTOMATIC1111's own rules for reading `.pt` / `.ckpt` files, copied here as the independent oracle of the tests.

Sources (AUTOMATIC1111/stable-diffusion-webui):
- `modules/safe.py` at 05933840f0676dd1a90a7e2ad3f2a0672624b2cd: `allowed_zip_names_re`, `data_pkl_re`,
  `check_zip_filenames`, `check_pt` and `RestrictedUnpickler`, verbatim but for names and formatting. A1111
  monkey-patches `torch.load` with this check, so every hypernetwork and checkpoint it opens goes through it.
- `modules/hypernetworks/hypernetwork.py` at 3157fe28c3d3b075dec53d6c9830bbafd79cec1b: `HypernetworkModule.__init__`
  (the layer layout), `parse_dropout_structure` and `Hypernetwork.load` (keys and their defaults).
"""

from __future__ import annotations

import collections
import inspect
import pickle
import re
import zipfile
from codecs import encode
from typing import ClassVar

import numpy
import torch
from torch.storage import TypedStorage

# modules/safe.py: "Regular expression that accepts 'dirname/version', 'dirname/data.pkl', and 'dirname/data/<number>'"
allowed_zip_names_re = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
data_pkl_re = re.compile(r"^([^/]+)/data\.pkl$")


class RestrictedUnpickler(pickle.Unpickler):
    """modules/safe.py's unpickler: storages are stubs, and only the listed globals may be named."""

    extra_handler = None

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        try:
            return TypedStorage(_internal=True)
        except TypeError:
            return TypedStorage()

    def find_class(self, module, name):
        if self.extra_handler is not None:
            res = self.extra_handler(module, name)
            if res is not None:
                return res
        if module == "collections" and name == "OrderedDict":
            return getattr(collections, name)
        if module == "torch._utils" and name in [
            "_rebuild_tensor_v2",
            "_rebuild_parameter",
            "_rebuild_device_tensor_from_numpy",
        ]:
            return getattr(torch._utils, name)
        if module == "torch" and name in [
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        ]:
            return getattr(torch, name)
        if module == "torch.nn.modules.container" and name in ["ParameterDict"]:
            return getattr(torch.nn.modules.container, name)
        if module == "numpy.core.multiarray" and name in ["scalar", "_reconstruct"]:
            return getattr(numpy.core.multiarray, name)
        if module == "numpy" and name in ["dtype", "ndarray"]:
            return getattr(numpy, name)
        if module == "_codecs" and name == "encode":
            return encode
        if module == "__builtin__" and name == "set":
            return set
        # (the two pytorch_lightning names are left out: importing pytorch_lightning is not needed to refuse)
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_zip_filenames(filename, names):
    for name in names:
        if allowed_zip_names_re.match(name):
            continue
        raise Exception(f"bad file inside {filename}: {name}")


def check_pt(filename, extra_handler=None):
    """modules/safe.py `check_pt`: raises when A1111 would refuse the file ("The file may be malicious")."""
    try:
        # new pytorch format is a zip file
        with zipfile.ZipFile(filename) as z:
            check_zip_filenames(filename, z.namelist())
            data_pkl_filenames = [f for f in z.namelist() if data_pkl_re.match(f)]
            if len(data_pkl_filenames) == 0:
                raise Exception(f"data.pkl not found in {filename}")
            if len(data_pkl_filenames) > 1:
                raise Exception(f"Multiple data.pkl found in {filename}")
            with z.open(data_pkl_filenames[0]) as file:
                unpickler = RestrictedUnpickler(file)
                unpickler.extra_handler = extra_handler
                unpickler.load()
    except zipfile.BadZipfile:
        # if it's not a zip file, it's an old pytorch format, with five objects written to pickle
        with open(filename, "rb") as file:
            unpickler = RestrictedUnpickler(file)
            unpickler.extra_handler = extra_handler
            for _ in range(5):
                unpickler.load()


def a1111_torch_load(filename):
    """What A1111's patched `torch.load` does: the check, then the real load (None where A1111 refuses)."""
    check_pt(filename)
    return torch.load(filename, map_location="cpu", weights_only=False)  # A1111's unsafe_torch_load, after the check


# --- modules/hypernetworks/hypernetwork.py ------------------------------------------------------------------------
class HypernetworkModule(torch.nn.Module):
    """A1111's HypernetworkModule (layer layout and forward); the weights come from the file."""

    activation_dict: ClassVar[dict] = {
        "linear": torch.nn.Identity,
        "relu": torch.nn.ReLU,
        "leakyrelu": torch.nn.LeakyReLU,
        "elu": torch.nn.ELU,
        "swish": torch.nn.Hardswish,
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
    }
    activation_dict.update(
        {
            cls_name.lower(): cls_obj
            for cls_name, cls_obj in inspect.getmembers(torch.nn.modules.activation)
            if inspect.isclass(cls_obj) and cls_obj.__module__ == "torch.nn.modules.activation"
        }
    )

    def __init__(self, dim, state_dict, layer_structure, activation_func, add_layer_norm, activate_output, dropout):
        super().__init__()
        self.multiplier = 1.0
        assert layer_structure is not None, "layer_structure must not be None"
        assert layer_structure[0] == 1, "Multiplier Sequence should start with size 1!"
        assert layer_structure[-1] == 1, "Multiplier Sequence should end with size 1!"
        linears = []
        for i in range(len(layer_structure) - 1):
            linears.append(torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if (
                activation_func == "linear"
                or activation_func is None
                or (i >= len(layer_structure) - 2 and not activate_output)
            ):
                pass
            elif activation_func in self.activation_dict:
                linears.append(self.activation_dict[activation_func]())
            else:
                raise RuntimeError(f"hypernetwork uses an unsupported activation function: {activation_func}")
            if add_layer_norm:
                linears.append(torch.nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout is not None and dropout[i + 1] > 0:
                assert 0 < dropout[i + 1] < 1, "Dropout probability should be 0 or float between 0 and 1!"
                linears.append(torch.nn.Dropout(p=dropout[i + 1]))
        self.linear = torch.nn.Sequential(*linears)
        self.fix_old_state_dict(state_dict)
        self.load_state_dict(state_dict)  # strict, as in A1111

    def fix_old_state_dict(self, state_dict):
        changes = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
                   "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}  # fmt: skip
        for fr, to in changes.items():
            x = state_dict.get(fr, None)
            if x is None:
                continue
            del state_dict[fr]
            state_dict[to] = x

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    if not use_dropout:
        return [0] * len(layer_structure)
    dropout_values = [0]
    dropout_values.extend([0.3] * (len(layer_structure) - 3))
    if last_layer_dropout:
        dropout_values.append(0.3)
    else:
        dropout_values.append(0)
    dropout_values.append(0)
    return dropout_values


def load_hypernetwork(filename):
    """A1111's `Hypernetwork.load`: {width: (k module, v module)} in eval mode, plus the metadata it reads."""
    state_dict = a1111_torch_load(filename)
    layer_structure = state_dict.get("layer_structure", [1, 2, 1])
    activation_func = state_dict.get("activation_func", None)
    add_layer_norm = state_dict.get("is_layer_norm", False)
    dropout_structure = state_dict.get("dropout_structure", None)
    use_dropout = (
        True if dropout_structure is not None and any(dropout_structure) else state_dict.get("use_dropout", False)
    )
    activate_output = state_dict.get("activate_output", True)
    last_layer_dropout = state_dict.get("last_layer_dropout", False)
    if dropout_structure is None:
        dropout_structure = parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    layers = {}
    for size, sd in state_dict.items():
        if type(size) == int:  # noqa: E721 (A1111's test: a str or numpy int key is silently skipped)
            args = (layer_structure, activation_func, add_layer_norm, activate_output, dropout_structure)
            layers[size] = (HypernetworkModule(size, sd[0], *args), HypernetworkModule(size, sd[1], *args))
    for k, v in layers.values():
        k.eval()
        v.eval()
    meta = {"name": state_dict.get("name"), "step": state_dict.get("step", 0)}
    return layers, meta
