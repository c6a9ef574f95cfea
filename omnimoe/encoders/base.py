"""The frozen-encoder interface: one small contract for text, vision and audio towers.

An encoder turns raw items (a caption string, an image path, an audio path) into

* ``tokens`` (B, L, D) with a boolean ``mask`` (B, L): per-token states, e.g. the mean of the last two hidden
  layers as Alt-MoE uses;
* ``pooled`` (B, D): one vector per item (masked mean, CLS or last token).

Encoders are always in eval mode and run under ``torch.no_grad()``. Reading an item is separate from
encoding a batch (:meth:`FrozenEncoder.load_item` then :meth:`FrozenEncoder.encode`), so a data loader can
read and decode in worker processes, and so a bad item is reported on its own (:class:`BadInput`)
without losing the batch.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from omnimoe.io import file_sha256
from omnimoe.runtime import autocast_dtype

Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[str, ...] = ("text", "image", "audio")


class BadInput(ValueError):
    """One input item cannot be encoded; the message says why (the caller adds the sample id)."""


@dataclass
class EncoderOptions:
    """Options every encoder understands (some encoders ignore some of them, as documented there)."""

    # Which hidden layers make the token states: "last", "last2" (mean of the last two, as Alt-MoE), or a
    # comma list of indices into the hidden-state tuple (e.g. "-1,-4").
    layers: str = "last"
    pooling: Literal["mean", "cls", "last"] = "mean"
    batch_size: int = 32
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # "auto": bf16 where this CPU runs it fast
    max_length: int = 128  # text tokens
    max_audio_seconds: float = 10.0  # audio window (Whisper via faster-whisper; HF Whisper always uses 30 s)
    device: str = "cpu"


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D) float32
    tokens: torch.Tensor | None = None  # (B, L, D) float32
    mask: torch.Tensor | None = None  # (B, L) bool, True = real token

    def __post_init__(self) -> None:
        if self.tokens is not None and self.mask is None:
            self.mask = torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)

    @property
    def lengths(self) -> torch.Tensor | None:
        return None if self.mask is None else self.mask.sum(1)


def select_layers(hidden_states: Sequence[torch.Tensor], spec: str) -> torch.Tensor:
    """Combine a model's hidden-state tuple as ``spec`` says (see :class:`EncoderOptions`)."""
    if spec == "last":
        return hidden_states[-1]
    if spec == "last2":
        return (hidden_states[-1] + hidden_states[-2]) / 2
    try:
        idx = [int(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"layers={spec!r}: expected 'last', 'last2' or comma-separated integers") from None
    n = len(hidden_states)
    if any(not -n <= i < n for i in idx):
        raise ValueError(f"layers={spec!r}: the model has {n} hidden-state entries")
    return torch.stack([hidden_states[i] for i in idx]).mean(0)


def pool(tokens: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, D) + (B, L) -> (B, D): masked mean, first token, or last real token."""
    if how == "mean":
        m = mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1)
    if how == "cls":
        return tokens[:, 0]
    if how == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return tokens[torch.arange(tokens.shape[0]), last]
    raise ValueError(f"pooling must be mean, cls or last, got {how!r}")


def resolve_dtype(option: str) -> torch.dtype:
    """An encoder's compute dtype (encoders run where this CPU is fast: bf16 with AMX / AVX512-BF16)."""
    return autocast_dtype(option)


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A short, stable fingerprint of a model's weights (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():  # 0-d tensors too; the bytes are read in place (no copy)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def hash_file(path) -> str:
    """A short fingerprint of a weights file's bytes."""
    return file_sha256(path)[:16]


@dataclass
class LabelHead:
    """An encoder's own classifier over named labels, applied to its pooled latent: ``logits = pooled @ weight.T
    + bias``. It lets a text encoder place this encoder's items in text space (see ``omnimoe.align.prior``)."""

    weight: torch.Tensor  # (num_labels, dim)
    bias: torch.Tensor  # (num_labels,)
    names: list[str]  # one readable name per label

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float() @ self.weight.t() + self.bias


class FrozenEncoder(ABC):
    """Base class. Subclasses set ``name``, ``modality`` and ``dim`` and implement the three methods."""

    name: str
    modality: Modality
    dim: int

    def __init__(self, options: EncoderOptions | None = None) -> None:
        self.options = options or EncoderOptions()
        self.dtype = resolve_dtype(self.options.dtype)
        self.device = torch.device(self.options.device)

    @abstractmethod
    def load_item(self, item: Any) -> Any:
        """Read one raw item (text, or a path); raise :class:`BadInput` with the reason when it is unusable."""

    @abstractmethod
    def encode(self, loaded: list[Any]) -> EncoderOutput:
        """Encode a batch of loaded items (float32 outputs on the CPU)."""

    @property
    def weights_hash(self) -> str:
        """Fingerprint of the weights: stored latents are tied to it. The default hashes ``self.model``'s
        state dict once; encoders whose weights are a file (or not a torch module) override this."""
        if getattr(self, "_hash", None) is None:
            model = getattr(self, "model", None)
            if not isinstance(model, torch.nn.Module):
                raise NotImplementedError(f"{type(self).__name__} must define weights_hash")
            self._hash = hash_state_dict(model.state_dict())
        return self._hash

    def describe(self) -> dict[str, Any]:
        """What a latent store records about the encoder: enough to refuse mismatched reads."""
        return {
            "encoder": self.name,
            "modality": self.modality,
            "dim": self.dim,
            "weights_hash": self.weights_hash,
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": self.preprocessing(),
        }

    def label_head(self) -> LabelHead | None:
        """The classifier that maps this encoder's *pooled* latent to named labels, when it has one."""
        return None

    def preprocessing(self) -> dict[str, Any]:
        return {"layers": self.options.layers, "pooling": self.options.pooling}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def store_linear_in_compute_dtype(self, model: torch.nn.Module) -> None:
        """Under bf16 autocast every ``nn.Linear`` casts its float32 weight and bias to bf16 at each call: store
        them in bf16 once instead. The outputs are bit-identical (the same rounding, done once), the weights
        take half the memory, and a one-caption query is about 1.5x faster (mpnet, 2 threads: 12.3 against 18.7
        ms, where reading the weights is most of the time; ``benchmarks/encoder_weights.py``). ``weights_hash``
        stays that of the weights as loaded (hashed here, before the cast), so latents stored before still
        match. A model that runs a linear layer outside autocast would now fail loudly (bf16 weight, float32
        input) rather than differ."""
        if self.dtype == torch.float32:
            return
        if getattr(self, "_hash", None) is None:
            self._hash = hash_state_dict(model.state_dict())
        # A weight shared with another kind of layer (an output layer tied to the embedding) stays as it is:
        # outside the linear layer it is not cast at each call.
        shared = {
            id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)
        }
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not any(id(p) in shared for p in module.parameters()):
                module.to(self.dtype)
