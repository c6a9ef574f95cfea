"""Frozen unimodal encoders (text, vision, audio) behind one small interface, plus a registry of names."""

from omnimoe.encoders.base import BadInput, EncoderOptions, EncoderOutput, FrozenEncoder, LabelHead
from omnimoe.encoders.registry import REGISTRY, encoder_modality, load_encoder

__all__ = [
    "BadInput",
    "EncoderOptions",
    "EncoderOutput",
    "FrozenEncoder",
    "LabelHead",
    "REGISTRY",
    "encoder_modality",
    "load_encoder",
]
