"""What a model family is: everything that differs between SD 1.x, SD 2.x, SDXL (and the families to come) behind
one seam.

A family knows how to recognise its weights (in LDM single files and in diffusers configs), which text encoders and
tokenizers it has and how they are laid out in an LDM file, which shipped diffusers configs and tokenizers a bare
single file is read with, how prompts become U-Net conditioning, and how it is named in modelspec metadata.
Everything else in sdtool (loading, saving, converting, training, sampling) asks the family instead of branching on
the model type itself; adding a family means adding one module here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

# The diffusers configs sdtool ships for single files loaded without `--config` (package data).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a family: its SDModel attribute, its tokenizer's, the transformers class, and the hub
    (repo, subfolder) its tokenizer is read from for a bare single file."""

    encoder: str
    tokenizer: str
    encoder_class: str
    default_tokenizer: tuple[str, str | None]
    lr_key: str  # the config key of its learning rate (kohya's names)


@dataclass
class TextConditioning:
    """What prompts become for the U-Net: cross-attention states (B, L, D) and, for SDXL, the pooled embedding."""

    hidden: Any
    pooled: Any = None

    def to(self, *args: Any, **kwargs: Any) -> TextConditioning:
        pooled = self.pooled.to(*args, **kwargs) if self.pooled is not None else None
        return TextConditioning(self.hidden.to(*args, **kwargs), pooled)

    def __getitem__(self, rows: Any) -> TextConditioning:
        return TextConditioning(self.hidden[rows], self.pooled[rows] if self.pooled is not None else None)


class ModelFamily:
    """One family of Stable Diffusion models. Subclasses are used through their single instance."""

    name: ClassVar[str]  # the value of --model-type and of SDModel.model_type ("v1", "v2", …)
    title: ClassVar[str]  # for people: "SD v1"
    # LDM single-file prefixes of this family's text encoder(s)
    text_encoder_prefixes: ClassVar[tuple[str, ...]]
    # LDM U-Net transformer proj_in/out: linear [C, C] weights, else 1×1 convs [C, C, 1, 1]
    linear_projection: ClassVar[bool]
    # the text encoders and tokenizers, in the order their states are concatenated
    text_parts: ClassVar[tuple[TextPart, ...]]
    # the diffusers pipeline class of a saved folder, and what it is built with beside the components
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    pipeline_options: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    # modelspec architecture per prediction type: {False: epsilon, True: v-prediction}
    architectures: ClassVar[dict[bool, str]]
    # shipped diffusers config folder per prediction type: {False: epsilon, True: v-prediction}
    config_names: ClassVar[dict[bool, str]]
    # native image size per prediction type (modelspec resolution, default training resolution)
    resolutions: ClassVar[dict[bool, int]]
    # what kohya's `v2` flag says for this family (True for SD 2.x only)
    kohya_v2: ClassVar[bool] = False
    # dataset keys whose defaults differ for this family (its native resolution and bucket sides)
    dataset_defaults: ClassVar[dict[str, Any]] = {}
    # how many U-Net blocks kohya's `block_lr` gives rates for (None: the family has no block_lr)
    block_lr_blocks: ClassVar[int | None] = None
    # whether A1111-style hypernetworks apply to its U-Net
    supports_hypernetworks: ClassVar[bool] = True
    # whether the U-Net is conditioned on each image's original size and crop (metadata must hold image_size)
    needs_original_size: ClassVar[bool] = False
    # whether its released VAE overflows in fp16 (then it runs in fp32 unless its config says it was fixed)
    vae_overflows_in_fp16: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def architecture(self, v_prediction: bool) -> str:
        """The modelspec architecture, e.g. stable-diffusion-v2-768-v."""
        return self.architectures[bool(v_prediction)]

    def owns_architecture(self, architecture: str) -> bool:
        """Whether a modelspec architecture names this family."""
        return architecture.strip().lower() in self.architectures.values()

    def prediction_from_architecture(self, architecture: str) -> bool | None:
        """v-prediction as a modelspec architecture of this family says it (None: not this family's name)."""
        arch = architecture.strip().lower()
        if arch == self.architectures[True] and arch != self.architectures[False]:
            return True
        return False if arch == self.architectures[False] else None

    def config_dir(self, v_prediction: bool) -> Path:
        """The shipped diffusers configs for this family and prediction type."""
        return CONFIGS_DIR / self.config_names[bool(v_prediction)]

    def default_resolution(self, v_prediction: bool) -> int:
        """The side of the square images the family's base models were trained on."""
        return self.resolutions[bool(v_prediction)]

    def has_text_encoder(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether an LDM state dict holds this family's text encoder."""
        return any(key.startswith(self.text_encoder_prefixes) for key in state_dict)

    def text_encoders_to_ldm(self, encoders: Mapping[str, Any], extras: Mapping[str, Any] | None) -> dict[str, Any]:
        """The text encoders' weights (modules by SDModel attribute; any may be missing) in this family's LDM layout,
        with `extras` as `ldm_extras` gave them."""
        raise NotImplementedError

    def unused_text_modules(self, text_encoders: Sequence[Any], clip_skip: int | None) -> list[Any]:
        """Text-encoder modules whose output no conditioning reads (frozen when the encoder trains)."""
        return []

    def ldm_markers(self, v_prediction: bool, zero_terminal_snr: bool) -> dict[str, Any]:
        """Extra keys a single file of this family carries to say how it predicts (none for SD1/SD2)."""
        return {}

    # --- prompts → conditioning --------------------------------------------------------------------------------
    def check_clip_skip(self, clip_skip: int | None) -> str | None:
        """Why `clip_skip` cannot be used with this family (None: it can)."""
        return None

    def tokenize(self, tokenizers: Sequence[Any], prompts: Sequence[str], max_token_length: int | None) -> Any:
        """(ids, lengths): one (B, n, 77) id tensor per tokenizer, and each prompt's own token count."""
        from sdtool.text import tokenize_chunks

        ids: list[Any] = []
        lengths: list[int] = []
        for tokenizer in tokenizers:
            tensor, counts = tokenize_chunks(tokenizer, prompts, max_token_length)
            ids.append(tensor)
            lengths = lengths or counts
        return ids, lengths

    def encode_ids(self, text_encoders: Sequence[Any], ids: Sequence[Any], clip_skip: int | None) -> TextConditioning:
        """Token ids (as `tokenize` made them) → conditioning; CLIP families use `sdtool.text` (CONTRACT §G)."""
        from sdtool.text import encode_chunks

        (encoder,), (tensor,) = text_encoders, ids
        return TextConditioning(encode_chunks(encoder, tensor, clip_skip))

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        prompts: Sequence[str],
        max_token_length: int | None = None,
        clip_skip: int | None = None,
    ) -> TextConditioning:
        """Prompts → conditioning, reporting prompts cut at `max_token_length` (training and sampling alike)."""
        from sdtool.text import default_reporter

        problem = self.check_clip_skip(clip_skip)
        if problem is not None:
            from sdtool.errors import UsageError

            raise UsageError(problem)
        ids, lengths = self.tokenize(tokenizers, prompts, max_token_length)
        for prompt, n_tokens in zip(prompts, lengths, strict=True):
            default_reporter.report(prompt, n_tokens, max_token_length)
        return self.encode_ids(text_encoders, ids, clip_skip)

    def unet_inputs(self, conditioning: TextConditioning, time_ids: Any = None) -> dict[str, Any]:
        """Keyword arguments of `unet(sample, timestep, **…)` for this conditioning (`time_ids`: SDXL's (B, 6))."""
        return {"encoder_hidden_states": conditioning.hidden}

    def ldm_extras(self, state_dict: Mapping[str, Any], config_dir: Path) -> dict[str, Any]:
        """LDM keys of a source file that the diffusers text encoder (configured in `config_dir`) has no place for,
        kept to be written again on save."""
        return {}

    @property
    def prediction_matters(self) -> bool:
        """Whether the family has epsilon and v-prediction variants that a file without metadata cannot tell apart."""
        return self.architectures[True] != self.architectures[False]
