"""Tiny labelling models built offline (for tests, benchmarks and demos): BLIP, GIT and ONNX taggers.

The captioners are real transformers models with random weights and a small BERT vocabulary; the taggers are ONNX
graphs whose outputs are sigmoids of affine functions of the per-channel means of the input, so every probability
can be predicted by hand. Building the ONNX graphs needs the `onnx` package (a development dependency).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [
    "a", "picture", "of", "photo", "cat", "dog", "red", "blue", "green", "the", "on", "with", "house", "tree",
    "sky", "girl", "boy", "sitting", "standing", "in", "field", "room", "water", "car", "white", "black", "small",
    "large", "and", "an", "street", "grass",
]  # fmt: skip


def _vocab(extra: int) -> dict[str, int]:
    words = SPECIAL_TOKENS + WORDS + [f"w{i}" for i in range(extra)]
    return {word: i for i, word in enumerate(words)}


def save_tiny_blip(
    path: str | Path,
    *,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 2,
    vocab_extra: int = 26,
    seed: int = 0,
) -> Path:
    """A random BlipForConditionalGeneration + BlipProcessor (BERT tokenizer with a [DEC] bos) saved to `path`."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = Path(path)
    vocab = _vocab(vocab_extra)
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    heads = max(2, hidden // 32)
    # A large initializer range makes the random decoder depend visibly on the image, so captions differ per image.
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": hidden * 2,
            "max_position_embeddings": 128,
            "bos_token_id": vocab["[DEC]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
            "pad_token_id": vocab["[PAD]"],
            "initializer_range": 0.5,
        },
        vision_config={
            "hidden_size": hidden,
            "image_size": image_size,
            "patch_size": max(4, image_size // 4),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": hidden * 2,
            "initializer_range": 0.5,
        },
        projection_dim=hidden,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(path)
    return path


def save_tiny_git(path: str | Path, *, image_size: int = 32, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random GitForCausalLM + GitProcessor (CLIP image processor, BERT tokenizer) saved to `path`."""
    import torch
    from transformers import BertTokenizer, GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    vocab = _vocab(26)
    tokenizer = BertTokenizer(vocab=vocab)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    config = GitConfig(
        vision_config={
            "hidden_size": hidden,
            "image_size": image_size,
            "patch_size": max(4, image_size // 4),
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "intermediate_size": hidden * 2,
        },
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        bos_token_id=vocab["[CLS]"],
        eos_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).eval().save_pretrained(path)
    return path


def save_mean_tagger(
    path: str | Path,
    *,
    weights: np.ndarray,
    bias: np.ndarray,
    size: int = 16,
    layout: str = "NHWC",
    batch: int | str = "batch",
    conv_channels: int = 0,
) -> Path:
    """An ONNX tagger: probability[t] = sigmoid(Σ_c mean(x[..., c]) · weights[c, t] + bias[t]).

    The means are taken over the spatial axes of the input (channel order as the model receives it). With
    `conv_channels` > 0 a 3×3 convolution stack is prepended whose output is discarded by a zero-weighted
    branch, making the graph cost real compute (for benchmarks) without changing the outputs.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = np.asarray(weights, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    n_tags = weights.shape[1]
    if layout == "NHWC":
        shape: list[int | str] = [batch, size, size, 3]
        spatial = [1, 2]
    else:
        shape = [batch, 3, size, size]
        spatial = [2, 3]
    nodes = [
        helper.make_node("ReduceMean", ["input", "spatial_axes"], ["means"], keepdims=0),
        helper.make_node("MatMul", ["means", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.asarray(spatial, dtype=np.int64), "spatial_axes"),
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "b"),
    ]
    if conv_channels:
        nodes.append(
            helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2] if layout == "NHWC" else [0, 1, 2, 3])
        )
        rng = np.random.default_rng(0)
        current, channels = "nchw", 3
        for i in range(3):
            w = (rng.standard_normal((conv_channels, channels, 3, 3)) * 0.01).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"conv{i}_w"))
            nodes.append(helper.make_node("Conv", [current, f"conv{i}_w"], [f"conv{i}"], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
            current, channels = f"relu{i}", conv_channels
        inits.append(numpy_helper.from_array(np.asarray([2, 3], dtype=np.int64), "hw_axes"))
        inits.append(numpy_helper.from_array(np.zeros((conv_channels, n_tags), dtype=np.float32), "Wz"))
        nodes.append(helper.make_node("ReduceMean", [current, "hw_axes"], ["pooled"], keepdims=0))
        nodes.append(helper.make_node("MatMul", ["pooled", "Wz"], ["zero_logits"]))
        nodes.append(helper.make_node("Add", ["logits", "zero_logits"], ["all_logits"]))
        nodes.append(helper.make_node("Sigmoid", ["all_logits"], ["output"]))
    else:
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mean_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, n_tags])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def write_selected_tags(path: str | Path, rows: Sequence[tuple[str, int]]) -> Path:
    """A SmilingWolf-style `selected_tags.csv` (tag_id,name,category,count), one row per model output, in order."""
    lines = ["tag_id,name,category,count"]
    lines += [f"{1000 + i},{name},{category},{100 - i}" for i, (name, category) in enumerate(rows)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
