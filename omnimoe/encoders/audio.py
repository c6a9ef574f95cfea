"""Audio towers: Whisper encoders, via faster-whisper (CTranslate2, the packaged tiny.en weights) or via
Hugging Face transformers (any Whisper checkpoint). Tokens are the encoder states, one per 20 ms, masked
to the clip's real length; the window is ``EncoderOptions.max_audio_seconds``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnimoe.encoders.base import EncoderOptions, EncoderOutput, FrozenEncoder, hash_file, pool, select_layers
from omnimoe.encoders.media import AUDIO_RATE, read_audio

HOP = 160  # samples per mel frame; the encoder halves the frame rate


def _window(audio: np.ndarray, samples: int) -> tuple[np.ndarray, int]:
    used = min(len(audio), samples)
    out = np.zeros(samples, np.float32)
    out[:used] = audio[:used]
    return out, used


def _state_mask(used: list[int], positions: int) -> torch.Tensor:
    lengths = torch.tensor([max(1, math.ceil(u / (2 * HOP))) for u in used])
    return torch.arange(positions)[None, :] < lengths.clamp(max=positions)[:, None]


class FasterWhisperEncoder(FrozenEncoder):
    """Whisper encoder in CTranslate2 (int8 on CPU). ``layers`` does not apply (final states only)."""

    modality = "audio"

    def __init__(self, name: str, path: str | Path, options: EncoderOptions | None = None) -> None:
        super().__init__(options)
        from faster_whisper import WhisperModel

        self.name, self.path = name, str(path)
        threads = torch.get_num_threads()
        self.model = WhisperModel(self.path, device="cpu", compute_type="int8", cpu_threads=threads)
        self.dim = self._probe_dim()
        self._hash = hash_file(Path(self.path) / "model.bin")

    def _probe_dim(self) -> int:
        import ctranslate2

        mel = np.zeros((1, self.model.model.n_mels, 200), np.float32)
        out = self.model.model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True)
        return int(np.array(out).shape[-1])

    def preprocessing(self) -> dict[str, Any]:
        return {
            "rate": AUDIO_RATE,
            "window_s": self.options.max_audio_seconds,
            "pooling": self.options.pooling,
            "compute_type": "int8",
        }

    def load_item(self, item: Any) -> np.ndarray:
        return read_audio(item)

    @torch.no_grad()
    def encode(self, loaded: list[np.ndarray]) -> EncoderOutput:
        import ctranslate2

        samples = int(self.options.max_audio_seconds * AUDIO_RATE)
        frames = samples // HOP
        mels, used = [], []
        for audio in loaded:
            clip, n = _window(audio, samples)
            mels.append(self.model.feature_extractor(clip)[:, :frames])
            used.append(n)
        batch = np.ascontiguousarray(np.stack(mels), dtype=np.float32)
        states = np.array(self.model.model.encode(ctranslate2.StorageView.from_array(batch), to_cpu=True))
        tokens = torch.from_numpy(states).float()
        mask = _state_mask(used, tokens.shape[1])
        return EncoderOutput(pool(tokens, mask, self.options.pooling), tokens, mask)


class HFWhisperEncoder(FrozenEncoder):
    """The encoder of any Hugging Face Whisper checkpoint (30 s windows, as the model requires)."""

    modality = "audio"

    def __init__(self, name: str, path: str | Path, options: EncoderOptions | None = None) -> None:
        super().__init__(options)
        from transformers import AutoFeatureExtractor, WhisperModel

        self.name, self.path = name, str(path)
        self.features = AutoFeatureExtractor.from_pretrained(self.path)
        self.model = WhisperModel.from_pretrained(self.path, dtype=torch.float32).get_encoder().eval().to(self.device)
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.d_model)

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "rate": AUDIO_RATE, "window_s": 30}

    def load_item(self, item: Any) -> np.ndarray:
        return read_audio(item)

    @torch.no_grad()
    def encode(self, loaded: list[np.ndarray]) -> EncoderOutput:
        feats = self.features([a[: 30 * AUDIO_RATE] for a in loaded], sampling_rate=AUDIO_RATE, return_tensors="pt")
        with self.autocast():
            out = self.model(feats["input_features"].to(self.device), output_hidden_states=True)
        tokens = select_layers(out.hidden_states, self.options.layers).float().cpu()
        mask = _state_mask([min(len(a), 30 * AUDIO_RATE) for a in loaded], tokens.shape[1])
        return EncoderOutput(pool(tokens, mask, self.options.pooling), tokens, mask)
