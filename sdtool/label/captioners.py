"""Captioning with transformers image-to-text models: BLIP, GIT, and any model `AutoModelForImageTextToText` knows.

The captions are exactly what the model's own `generate` returns for the same batch and settings, decoded with the
processor, with the prompt removed from the front and whitespace collapsed into one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.console import Output, SkipReporter, info, plural, progress_bar
from sdtool.errors import ModelError, UsageError
from sdtool.images import find_images
from sdtool.label.loading import SidecarWriter, check_extension, iter_batches, sidecar_targets

# Remote-code models name their classes in `config.auto_map`; these are tried in this order.
_REMOTE_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings: greedy (default), beam search (`num_beams` > 1) or nucleus sampling (`top_p`)."""

    num_beams: int = 1
    top_p: float | None = None
    max_length: int = 75
    min_length: int = 5
    seed: int = 42

    def validate(self) -> None:
        """Reject settings that contradict each other before any model is loaded."""
        if self.min_length > self.max_length:
            raise UsageError(f"--min-length {self.min_length} is larger than --max-length {self.max_length}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p {self.top_p}: expected a value in (0, 1]")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`; lengths count new tokens, not the prompt."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_length,
            "min_new_tokens": self.min_length,
            "num_beams": self.num_beams,
            "do_sample": self.top_p is not None,
        }
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs


class CaptionPreprocessor:
    """Runs in the DataLoader workers: one decoded image → the processor's tensors (batch dimension 1)."""

    def __init__(self, processor: Any, prompt: str | None, drop_trailing_sep: bool):
        self.processor = processor
        self.prompt = prompt
        self.drop_trailing_sep = drop_trailing_sep

    def __call__(self, image: Any) -> dict[str, Any]:
        if self.prompt:
            features = self.processor(images=image, text=self.prompt, return_tensors="pt")
        else:
            features = self.processor(images=image, return_tensors="pt")
        tensors = dict(features.items())
        if self.drop_trailing_sep and "input_ids" in tensors:
            # GIT continues the prompt: the tokenizer's closing [SEP] would end the caption before it starts
            # (the way GIT's model card prompts it: [CLS] + prompt tokens).
            tensors["input_ids"] = tensors["input_ids"][:, :-1]
            if "attention_mask" in tensors:
                tensors["attention_mask"] = tensors["attention_mask"][:, :-1]
        return tensors


def stack_features(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-image processor outputs along the batch dimension."""
    import torch

    return {key: torch.cat([item[key] for item in items], dim=0) for key in items[0]}


class Captioner:
    """A loaded image-to-text model with its processor, ready to caption batches."""

    def __init__(
        self,
        source: str,
        *,
        settings: GenerationSettings,
        prompt: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
        trust_remote_code: bool = False,
    ):
        from sdtool.console import loading
        from sdtool.models import hub
        from sdtool.runtime import quiet_third_party, resolve_device, torch_dtype

        quiet_third_party()
        self.source = source
        if hub.is_hub_id(source):  # from the local cache (or downloaded once): transformers never goes online
            source = str(hub.local_model(source, what="the captioning model", folders={"": True}))
        self.settings = settings
        self.prompt = prompt or None
        self.device = resolve_device(device)
        self.dtype = torch_dtype(precision)
        with loading(f"the captioning model {self.source}"):
            self.processor = _load_processor(source, trust_remote_code)
            self.model = _load_model(source, trust_remote_code, self.dtype).to(self.device).eval()
        self.model_type = getattr(self.model.config, "model_type", "")
        # Some processors return token_type_ids that the model's generate() rejects as unused (GIT does).
        self.drop_token_types = "token_type_ids" not in inspect.signature(self.model.forward).parameters
        self.prompt_text = self._decoded_prompt()

    def preprocessor(self) -> CaptionPreprocessor:
        """The picklable per-image preprocessing the workers run."""
        return CaptionPreprocessor(self.processor, self.prompt, drop_trailing_sep=self.model_type == "git")

    def caption_batch(self, features: dict[str, Any]) -> list[str]:
        """Generate and decode captions for one collated batch."""
        import torch

        inputs = {
            key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in features.items()
            if not (key == "token_type_ids" and self.drop_token_types)
        }
        with torch.inference_mode():
            generated = self.model.generate(**inputs, **self.settings.generate_kwargs())
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [self._clean(text) for text in texts]

    def _decoded_prompt(self) -> str:
        """The prompt as the tokenizer gives it back (e.g. lower-cased by BERT), so it can be found in the output."""
        if not self.prompt:
            return ""
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            return self.prompt.strip()
        ids = tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())  # a sidecar holds one line
        if self.prompt_text and text.lower().startswith(self.prompt_text.lower()):
            text = text[len(self.prompt_text) :].strip()
        return text


def _load_processor(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _model_error(source, "processor", exc) from exc


def _load_model(source: str, trust_remote_code: bool, dtype: Any) -> Any:
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _model_error(source, "config", exc) from exc
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        names = [name for name in _REMOTE_AUTO_CLASSES if name in auto_map]
        if not names:
            raise ModelError(f"{source}: its remote code declares no image-to-text model class ({sorted(auto_map)})")
        auto_class = getattr(transformers, names[0], None) or transformers.AutoModelForCausalLM
    elif config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto_class = AutoModelForImageTextToText
    else:
        raise ModelError(
            f"{source}: model type {config.model_type!r} is not an image-to-text model transformers knows",
            hint="use a BLIP, GIT or other image-to-text model, or --trust-remote-code for one that ships its code",
        )
    try:
        return auto_class.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _model_error(source, "weights", exc) from exc


def _model_error(source: str, what: str, exc: Exception) -> ModelError:
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text:
        return ModelError(
            f"{source} needs its own code from the hub to load", hint="add --trust-remote-code if you trust it"
        )
    return ModelError(
        f"cannot load the captioning {what} from {source}: {text[:300]}",
        hint="check the hub id or folder; without internet the model must already be in the Hugging Face cache",
    )


@dataclass
class CaptionRun:
    """What a caption run did."""

    written: int = 0
    kept: int = 0


def caption_images(
    dirs: Sequence[Path],
    *,
    model: str,
    settings: GenerationSettings,
    prompt: str | None,
    extension: str,
    overwrite: bool,
    recursive: bool,
    batch_size: int,
    workers: int | None,
    precision: str,
    device: str,
    trust_remote_code: bool,
    out: Output,
    skips: SkipReporter,
) -> CaptionRun:
    """Caption every image in `dirs` that has no caption sidecar yet (all of them with `overwrite`)."""
    check_extension(extension, "--caption-extension")
    settings.validate()
    run = CaptionRun()
    pairs = sidecar_targets(find_images(dirs, recursive), extension, skips)
    todo = [(image, target) for image, target in pairs if overwrite or not target.exists()]
    run.kept = len(pairs) - len(todo)
    if run.kept:
        info(f"kept {plural(run.kept, 'existing ' + extension + ' file')} (--overwrite replaces them)")
    if not todo:
        return run

    captioner = Captioner(
        model,
        settings=settings,
        prompt=prompt,
        device=device,
        precision=precision,
        trust_remote_code=trust_remote_code,
    )
    info(f"captioning {plural(len(todo), 'image')} with {model} on {captioner.device}")
    import torch

    # Seeded once per run (kohya does the same): sampled captions repeat for the same images, batch size and seed.
    torch.manual_seed(settings.seed)
    images = [image for image, _ in todo]

    def report(image: Path, target: Path, text: str) -> Callable[[], None]:
        def done() -> None:
            out.path(target)
            out.record({"path": str(image), "caption": text})
            run.written += 1
            skips.ok()

        return done

    with progress_bar("caption", len(todo)) as advance, SidecarWriter() as writer:
        for batch in iter_batches(images, captioner.preprocessor(), stack_features, batch_size, workers):
            for index, reason in batch.failures:
                skips.skip(images[index], reason)
            if batch.indices:
                for index, text in zip(batch.indices, captioner.caption_batch(batch.data), strict=True):
                    image, target = todo[index]
                    writer.write(target, text, report(image, target, text))
            advance(len(batch.indices) + len(batch.failures))
    return run
