"""Video into the Uni-MoE model, as ``omnimoe mllm chat --video`` takes it: a folder of frames, each frame through
the image encoder, the token states averaged over time, then the video connector, spliced where ``<video>``
stands. A tiny random LLM (no download) with the real image encoder, its connectors trained for two steps on
generated videos (no Tux Paint needed)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import TINY_RECIPE
from omnimoe.mllm.chat import ChatSession
from omnimoe.mllm.train import MLLMTrainConfig, run_stage

FRAMES = 3
VIDEOS = {
    "red-ball": ((220, 20, 20), "ball"),
    "blue-box": ((30, 60, 220), "box"),
    "green-ball": ((20, 160, 40), "ball"),
}


def write_video(folder: Path, rgb: tuple[int, int, int], shape: str, frames: int = FRAMES) -> Path:
    """A shape moving left to right: ``frame-0.png`` ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        img = Image.new("RGB", (64, 64), "white")
        box = (8 + 16 * t, 20, 32 + 16 * t, 44)
        (ImageDraw.Draw(img).ellipse if shape == "ball" else ImageDraw.Draw(img).rectangle)(box, fill=rgb)
        img.save(folder / f"frame-{t}.png")
    return folder


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A stage-1 folder trained on video records (its recipe has image and video connectors), and the videos."""
    root = tmp_path_factory.mktemp("video")
    videos = {name: write_video(root / "videos" / name, rgb, shape) for name, (rgb, shape) in VIDEOS.items()}
    records = [
        {
            "id": name,
            "video": [f"videos/{name}/frame-{t}.png" for t in range(FRAMES)],
            "conversations": [
                {"from": "human", "value": "<video>\nWhat moves?"},
                {"from": "gpt", "value": f"A {name.replace('-', ' ')}."},
            ],
        }
        for name in VIDEOS
    ]
    (root / "train.json").write_text(json.dumps(records))
    recipe = {
        **TINY_RECIPE,
        "steps": 2,
        "batch_size": 2,
        "encoders": {"image": "efficientnet-lite0"},
        "connectors": {"image": {"kind": "mlp", "max_tokens": 8}, "video": {"kind": "mlp", "max_tokens": 8}},
    }
    cfg = MLLMTrainConfig(stage=1, data=str(root / "train.json"), **recipe)
    result = run_stage(cfg, root / "s1", progress=False)
    assert set(result["modalities"]) == {"image", "video"}
    return root / "s1", videos


@pytest.fixture(scope="module")
def session(stage):
    return ChatSession(stage[0])


def test_video_is_its_frames_through_the_image_encoder_averaged(stage, session, tmp_path):
    _, videos = stage
    red = session.media("video", videos["red-ball"])
    frames = [session.media("image", videos["red-ball"] / f"frame-{t}.png") for t in range(FRAMES)]
    assert red.shape == frames[0].shape == (49, 1280)  # EfficientNet-Lite0: a 7x7 map of 1280 channels
    torch.testing.assert_close(red, torch.stack(frames).mean(0), rtol=0, atol=0)
    assert not torch.equal(frames[0], frames[-1])  # the ball moved: the frames differ, their mean is not one frame
    assert torch.equal(session.media("video", videos["red-ball"]), red)  # the same video, the same states
    for other in ("blue-box", "green-ball"):
        assert (session.media("video", videos[other]) - red).abs().max() > 0.1, other
    # training reads the same states: the stored features of a record's frames, averaged by MediaFeatures.item
    from omnimoe.mllm.data import MediaFeatures

    root = stage[0].parent
    features = MediaFeatures.build([root / "train.json"], {"image": "efficientnet-lite0"}, root / "features", False)
    keys = [MediaFeatures.key(root, root, f"videos/red-ball/frame-{t}.png") for t in range(FRAMES)]
    torch.testing.assert_close(features.item("video", keys), red, atol=0.05, rtol=0.01)
    # one image file is a one-frame video
    one = videos["red-ball"] / "frame-1.png"
    assert torch.equal(session.media("video", one), frames[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frames"):
        session.media("video", tmp_path / "empty")


def test_chat_input_and_output_depend_on_the_video(stage, session, monkeypatch):
    """The prompt's embeddings carry the video's connector tokens at the <video> positions and only there: the
    same video twice gives the same embeddings, logits and answer; another video changes exactly those positions
    and the next-token logits."""
    _, videos = stage
    model = session.model
    seen = []
    real = model.embed

    def record(input_ids, media=None):
        out = real(input_ids, media)
        seen.append((input_ids.clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(model, "embed", record)
    answers = [session.ask("What moves?", videos=[str(videos[v])], max_new_tokens=4) for v in ("red-ball",) * 2]
    answers += [session.ask("What moves?", videos=[str(videos["blue-box"])], max_new_tokens=4)]
    assert len(seen) == 3 and answers[0] == answers[1]
    (ids, red), (ids2, red2), (ids3, blue) = seen
    assert torch.equal(ids, ids2) and torch.equal(ids, ids3) and torch.equal(red, red2)
    where = ids[0] == model.config.placeholder_ids["video"]
    assert int(where.sum()) == model.connectors["video"].num_tokens(49) == 8  # 49 frame tokens pooled to 8
    assert not (ids[0] == model.config.placeholder_ids["image"]).any()
    changed = (red[0] - blue[0]).abs().amax(-1) > 1e-4
    assert torch.equal(changed, where)  # every video position differs, no text position does
    with torch.no_grad():
        logits = [model.llm(inputs_embeds=e).logits[0, -1] for e in (red, red2, blue)]
    assert torch.equal(logits[0], logits[1]) and (logits[0] - logits[2]).abs().max() > 1e-3


def test_chat_video_from_the_command_line(stage, session, monkeypatch):
    """`omnimoe mllm chat --video FOLDER` (in process, the model's embedding step recorded): the command feeds the
    model that video's states and the library's prompt, so it embeds exactly what the library embeds and answers
    what it answers; a folder without frames is refused with exit code 2."""
    from typer.testing import CliRunner

    from omnimoe.cli import app
    from omnimoe.mllm.model import MultimodalLLM

    folder, videos = stage
    seen = []
    real = MultimodalLLM.embed

    def record(self, input_ids, media=None):
        out = real(self, input_ids, media)
        seen.append((input_ids.clone(), {m: b.tokens.clone() for m, b in (media or {}).items()}, out.detach().clone()))
        return out

    monkeypatch.setattr(MultimodalLLM, "embed", record)
    args = ["mllm", "chat", "--model", str(folder), "--max-new-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--video", str(videos["green-ball"]), "What moves?"])
    assert result.exit_code == 0, result.output
    expected = session.ask("What moves?", videos=[str(videos["green-ball"])], max_new_tokens=3)
    assert result.stdout.strip() == expected.strip() and len(seen) == 2
    (ids, media, embeds), (lib_ids, lib_media, lib_embeds) = seen
    assert set(media) == {"video"} and torch.equal(media["video"][0], session.media("video", videos["green-ball"]))
    assert torch.equal(ids, lib_ids) and torch.equal(media["video"], lib_media["video"])
    assert torch.equal(embeds, lib_embeds)
    assert (ids == session.model.config.placeholder_ids["video"]).sum() == 8

    empty = folder.parent / "empty-video"
    empty.mkdir()
    result = CliRunner().invoke(app, [*args, "--video", str(empty), "What moves?"])
    assert result.exit_code == 2 and "no frames" in result.stderr


def write_video_file(path: Path, rgb: tuple[int, int, int], shape: str, frames: int) -> Path:
    """The same moving shape as :func:`write_video`, encoded as an MPEG-4 file with PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for t in range(frames):
            img = Image.new("RGB", (64, 64), "white")
            box = (4 + 4 * t, 20, 28 + 4 * t, 44)
            (ImageDraw.Draw(img).ellipse if shape == "ball" else ImageDraw.Draw(img).rectangle)(box, fill=rgb)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_video_file_is_read_as_evenly_spaced_frames(stage, session, tmp_path):
    """A video file (not a folder) works: 8 frames evenly spaced over its 12, each through the image encoder,
    averaged; the states equal those of the same 8 decoded frames given as a folder. A broken file is named."""
    from omnimoe.encoders.base import BadInput
    from omnimoe.encoders.media import read_video_frames

    video = write_video_file(tmp_path / "ball.mp4", (220, 20, 20), "ball", frames=12)
    decoded = read_video_frames(video, frames=12)
    frames = read_video_frames(video)
    assert len(decoded) == 12 and len(frames) == 8
    picked = [0, 2, 3, 5, 6, 8, 9, 11]  # round(i * 11 / 7)
    assert all(f.tobytes() == decoded[i].tobytes() for f, i in zip(frames, picked))
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame-{i}.png")
    states = session.media("video", video)
    assert torch.equal(states, session.media("video", folder))
    assert not torch.equal(
        states, session.media("video", write_video_file(tmp_path / "box.mp4", (30, 60, 220), "box", 12))
    )
    assert session.ask("What moves?", videos=[str(video)], max_new_tokens=2) == session.ask(
        "What moves?", videos=[str(folder)], max_new_tokens=2
    )
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(BadInput, match="broken.mp4"):
        session.media("video", broken)
