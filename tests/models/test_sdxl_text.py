"""SDXL prompt encoding against an independent re-implementation of kohya's `sdxl_train` encoding.

The oracle below follows kohya sd-scripts (48d368fa) line by line: `library/strategy_base.py::_get_input_ids`
(tokenize once to max_length = max_token_length + 2, cut into [BOS] + 75 + [last] chunks; for a tokenizer whose pad
is not its EOS, a full chunk ends in EOS and an empty one starts with EOS) and
`library/strategy_sdxl.py::_get_hidden_states_sdxl` / `_pool_workaround` (text encoder 1's `hidden_states[11]` —
its penultimate layer of 12 — and text encoder 2's `hidden_states[-2]`, neither through the final layer norm; the
pooled output is encoder 2's last hidden state at the first EOS, through `text_projection`; chunks reassembled as
BOS + each chunk's 75 inner states + the last chunk's final state; the pooled output of the first chunk).
"""

from __future__ import annotations

import pytest
import torch

from sdtool.models.families.sdxl import SDXL
from sdtool.models.loading import load_model

LONG = ", ".join(["a photo of a red cat sitting on a blue car"] * 24)  # well over 225 tokens
PROMPTS = ["", "a cat", "a photo of a girl with long hair " * 9, "a photo of a girl with long hair " * 22, LONG]


def kohya_input_ids(tokenizer, text: str, max_length: int) -> torch.Tensor:
    input_ids = tokenizer(
        text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
    if max_length > tokenizer.model_max_length:
        input_ids = input_ids.squeeze(0)
        iids_list = []
        for i in range(1, max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
            ids_chunk = torch.cat(
                (
                    input_ids[0].unsqueeze(0),
                    input_ids[i : i + tokenizer.model_max_length - 2],
                    input_ids[-1].unsqueeze(0),
                )
            )
            if tokenizer.pad_token_id != tokenizer.eos_token_id:
                if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                    ids_chunk[-1] = tokenizer.eos_token_id
                if ids_chunk[1] == tokenizer.pad_token_id:
                    ids_chunk[1] = tokenizer.eos_token_id
            iids_list.append(ids_chunk)
        input_ids = torch.stack(iids_list)
    return input_ids


def kohya_encode(model, prompts: list[str], max_token_length: int | None):
    tok1, tok2, te1, te2 = model.tokenizer, model.tokenizer_2, model.text_encoder, model.text_encoder_2
    max_length = tok1.model_max_length if max_token_length is None else max_token_length + 2
    ids1 = torch.stack([kohya_input_ids(tok1, t, max_length) for t in prompts])
    ids2 = torch.stack([kohya_input_ids(tok2, t, max_length) for t in prompts])
    b_size = ids1.size()[0]
    mtl = None if ids1.size()[1] == 1 else ids1.size()[1] * ids1.size()[2]
    ids1 = ids1.reshape((-1, tok1.model_max_length))
    ids2 = ids2.reshape((-1, tok2.model_max_length))
    # kohya's hidden_states[11] is the penultimate layer of its 12-layer encoder 1
    h1 = te1(ids1, output_hidden_states=True)["hidden_states"][te1.config.num_hidden_layers - 1]
    out2 = te2(ids2, output_hidden_states=True, return_dict=True)
    h2 = out2["hidden_states"][-2]
    last = out2["last_hidden_state"]
    eos_index = torch.argmax((ids2 == tok2.eos_token_id).int(), dim=1)
    pool2 = last[torch.arange(last.shape[0]), eos_index]
    pool2 = te2.text_projection(pool2.to(te2.text_projection.weight.dtype)).to(last.dtype)
    n_size = 1 if mtl is None else mtl // 75
    h1 = h1.reshape((b_size, -1, h1.shape[-1]))
    h2 = h2.reshape((b_size, -1, h2.shape[-1]))
    if mtl is not None:
        states = [h1[:, 0].unsqueeze(1)]
        for i in range(1, mtl, tok1.model_max_length):
            states.append(h1[:, i : i + tok1.model_max_length - 2])
        states.append(h1[:, -1].unsqueeze(1))
        h1 = torch.cat(states, dim=1)
        states = [h2[:, 0].unsqueeze(1)]
        for i in range(1, mtl, tok2.model_max_length):
            states.append(h2[:, i : i + tok2.model_max_length - 2])
        states.append(h2[:, -1].unsqueeze(1))
        h2 = torch.cat(states, dim=1)
        pool2 = pool2[::n_size]
    return torch.cat([h1, h2], dim=2), pool2


@pytest.fixture(scope="module")
def model(tiny_sdxl):
    return load_model(tiny_sdxl, components=("text_encoder", "tokenizer"))


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_sdxl_encoding_equals_kohya(model, max_token_length):
    with torch.no_grad():
        ours = SDXL.encode_prompts(model.tokenizers, model.text_encoders, PROMPTS, max_token_length)
        hidden, pooled = kohya_encode(model, PROMPTS, max_token_length)
    n = (max_token_length or 75) // 75
    width = model.text_encoder.config.hidden_size + model.text_encoder_2.config.hidden_size
    assert ours.hidden.shape == (len(PROMPTS), 2 + 75 * n, width)
    assert torch.equal(ours.hidden, hidden)
    assert torch.equal(ours.pooled, pooled)


def test_second_tokenizer_pads_with_exclamation_and_gets_the_eos_fix(model):
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id
    assert model.tokenizer_2.pad_token == "!"
    ids, _ = SDXL.tokenize(model.tokenizers, ["a cat"], 150)
    empty_chunk = ids[1][0, 1].tolist()
    assert empty_chunk[1] == model.tokenizer_2.eos_token_id  # [BOS, EOS, !, !, …]
    assert ids[0][0, 1].tolist()[1] == model.tokenizer.eos_token_id


def test_pooled_embedding_comes_from_the_first_chunk(model):
    """Only the first 75 tokens reach the pooled embedding (kohya's choice, documented in families/sdxl.py)."""
    head = "a photo of a girl with long hair " * 12  # 96 tokens: the endings fall in the second chunk
    a = SDXL.encode_prompts(model.tokenizers, model.text_encoders, [head + "red sky"], 225)
    b = SDXL.encode_prompts(model.tokenizers, model.text_encoders, [head + "green tree"], 225)
    assert torch.equal(a.pooled, b.pooled) and not torch.equal(a.hidden, b.hidden)


@pytest.mark.parametrize("clip_skip", [1, 3])
def test_clip_skip_other_than_two_is_refused(model, clip_skip):
    from sdtool.errors import UsageError

    with pytest.raises(UsageError, match="penultimate"):
        SDXL.encode_prompts(model.tokenizers, model.text_encoders, ["a cat"], None, clip_skip)
    assert SDXL.check_clip_skip(2) is None and SDXL.check_clip_skip(None) is None
