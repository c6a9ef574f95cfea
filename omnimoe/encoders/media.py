"""Reading media files for the encoders, with a clear :class:`BadInput` for every way a file can be unusable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from omnimoe.encoders.base import BadInput

AUDIO_RATE = 16_000


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"missing file {path}")
    if not path.is_file():
        raise BadInput(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise BadInput(f"empty file {path}")
    return path


def read_image(path: str | Path):
    """An RGB PIL image; SVG is rendered (cairosvg) and transparency composited onto white."""
    from PIL import Image, UnidentifiedImageError

    path = _check_file(path)
    try:
        if path.suffix.lower() == ".svg":
            import cairosvg

            data = cairosvg.svg2png(url=str(path), output_width=512)
            img = Image.open(io.BytesIO(data))
        else:
            img = Image.open(path)
        img.load()  # decode now: truncated files fail here, not later
    except UnidentifiedImageError:
        raise BadInput(f"{path} is not a readable image") from None
    except Exception as exc:  # PIL/cairosvg raise many types for corrupt data
        raise BadInput(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit greyscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.width < 2 or img.height < 2:
        raise BadInput(f"{path} is too small ({img.width}x{img.height})")
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def square_resize(img, size: int):
    """Pad to a white square (nothing cropped away), then resize to ``size`` x ``size``."""
    from PIL import Image

    side = max(img.width, img.height)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas.resize((size, size), Image.BICUBIC)


def read_audio(path: str | Path, rate: int = AUDIO_RATE) -> np.ndarray:
    """Mono float32 samples at ``rate`` Hz, decoded with PyAV (ogg, wav, mp3, flac, ...)."""
    import av

    path = _check_file(path)
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise BadInput(f"{path} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"{path} is not readable audio ({type(exc).__name__}: {exc})") from None
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if audio.size < rate // 100:
        raise BadInput(f"{path} holds no audio (decoded {audio.size} samples)")
    if not np.isfinite(audio).all():
        raise BadInput(f"{path} decodes to non-finite samples")
    return audio


VIDEO_FRAMES = 8  # frames a video file is read as (evenly spaced over its length)


def read_video_frames(path: str | Path, frames: int = VIDEO_FRAMES) -> list:
    """``frames`` RGB PIL images evenly spaced over a video file (any container and codec PyAV decodes); a
    shorter video gives all its frames. A video, for the models here, is its frames through the image encoder."""
    import av

    path = _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"{path} has no video stream")
            decoded = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    except BadInput:
        raise
    except Exception as exc:  # PyAV raises its own error types for unreadable or corrupt data
        raise BadInput(f"{path} is not a readable video ({type(exc).__name__}: {exc})") from None
    if not decoded:
        raise BadInput(f"{path}: no frame could be decoded")
    if len(decoded) <= frames:
        return decoded
    return [decoded[round(i * (len(decoded) - 1) / (frames - 1))] for i in range(frames)] if frames > 1 else decoded[:1]
