"""Answer one prompt with a trained Uni-MoE model: media go through the recipe's frozen encoders live,
then the connectors, spliced where the placeholders stand (prepended when the prompt has none)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from omnimoe.mllm.data import encode_turns, pad_items, template_for
from omnimoe.mllm.evaluate import stop_ids
from omnimoe.mllm.model import PLACEHOLDERS, MultimodalLLM

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".svg")


def _remove_all(folders: list[Path]) -> None:
    import shutil

    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


class ChatSession:
    """A loaded model plus its encoders (each loaded on first use)."""

    def __init__(self, model_dir: str | Path) -> None:
        from omnimoe.mllm.train import load_stage

        self.model, self.tokenizer, self.cfg = load_stage(model_dir)
        self._encoders: dict[str, Any] = {}
        self._frame_dirs: list[Path] = []  # frames of decoded video files, removed with the session
        weakref.finalize(self, _remove_all, self._frame_dirs)

    def _encoder(self, kind: str) -> Any:
        from omnimoe.encoders.registry import load_encoder

        if kind not in self._encoders:
            if kind not in self.cfg.encoders:
                raise ValueError(f"the model's recipe has no {kind} encoder")
            self._encoders[kind] = load_encoder(self.cfg.encoders[kind])
        return self._encoders[kind]

    def _states(self, kind: str, path: Path) -> torch.Tensor:
        encoder = self._encoder(kind)
        out = encoder.encode([encoder.load_item(path)])  # BadInput names the file and the reason
        n = int(out.mask[0].sum()) if getattr(out, "mask", None) is not None else out.tokens.shape[1]
        return out.tokens[0, :n]

    def _frames(self, path: Path) -> list[Path]:
        """A video's frames as image files: a folder of frames (sorted by name), one image, or a video file
        (:data:`~omnimoe.encoders.media.VIDEO_FRAMES` frames evenly spaced, written to a temporary folder)."""
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTS)
            if not frames:
                raise ValueError(f"video {path}: no frames ({', '.join(FRAME_EXTS)}) in the folder")
            return frames
        if path.suffix.lower() in FRAME_EXTS or not path.is_file():
            return [path]  # one image (a missing file is named by the image reader)
        import tempfile

        from omnimoe.encoders.media import read_video_frames

        images = read_video_frames(path)
        folder = Path(tempfile.mkdtemp(prefix="omnimoe-frames-"))
        self._frame_dirs.append(folder)
        for i, image in enumerate(images):
            image.save(folder / f"frame-{i:03d}.png")
        return sorted(folder.iterdir())

    def media(self, modality: str, path: str | Path) -> torch.Tensor:
        path = Path(path)
        if modality not in self.model.connectors:
            raise ValueError(f"this model has no {modality} connector (it has {sorted(self.model.connectors)})")
        if modality == "video":
            states = [self._states("image", f) for f in self._frames(path)]
            n = min(len(s) for s in states)
            return torch.stack([s[:n] for s in states]).mean(0)
        if not path.is_file():
            raise FileNotFoundError(f"{modality} file {path} does not exist")
        return self._states("image" if modality == "image" else "audio", path)

    @torch.no_grad()
    def ask(
        self,
        text: str,
        images: list[str] = (),
        audios: list[str] = (),
        videos: list[str] = (),
        max_new_tokens: int = 64,
    ) -> str:  # type: ignore[assignment]
        given = {"image": list(images), "audio": list(audios), "video": list(videos)}
        prompt = text
        for modality in ("video", "audio", "image"):
            missing = len(given[modality]) - prompt.count(PLACEHOLDERS[modality])
            if missing < 0:
                raise ValueError(f"the prompt has more {PLACEHOLDERS[modality]} than {modality} files")
            prompt = (PLACEHOLDERS[modality] + "\n") * missing + prompt
        states = {m: [self.media(m, p) for p in files] for m, files in given.items() if files}
        model: MultimodalLLM = self.model
        counts = {m: [model.connectors[m].num_tokens(len(s)) for s in ss] for m, ss in states.items()}
        template = template_for(self.tokenizer, self.cfg.template)
        enc = encode_turns(
            [("user", prompt)], self.tokenizer, template, model.config.placeholder_ids, counts, generation=True
        )
        media = {m: pad_items(ss) for m, ss in states.items()}
        ids = torch.tensor([enc.input_ids])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = model.generate(
            ids,
            media=media,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop_ids(self.tokenizer, self.cfg.template),
        )
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
