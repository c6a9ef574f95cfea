"""The plots of omnimoe.eval.plots by their content: the figure each function saves (captured at ``savefig``) holds
the values it was given, and the PNG on disk has the expected size, is not blank, shows those values where the
axes put them, and changes when the data changes."""

import matplotlib
import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from PIL import Image

from omnimoe.eval.plots import plot_expert_load, plot_recall, plot_training_curves

matplotlib.use("Agg")
DPI = 120  # what the plot functions save at


@pytest.fixture
def saved(monkeypatch):
    """Every Figure saved during the test, with the path it was saved to."""
    figures: list[tuple[Figure, str]] = []
    real = Figure.savefig

    def record(self, fname, *args, **kwargs):
        figures.append((self, str(fname)))
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def png(path) -> np.ndarray:
    """The saved image as (H, W, 3) uint8."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def assert_not_blank(pixels: np.ndarray) -> None:
    non_white = (pixels < 250).any(-1).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.02 and colours > 20, (non_white, colours)


def pixel_of(fig: Figure, ax, x: float, y: float, image: np.ndarray, radius: int = 0) -> np.ndarray:
    """The PNG pixel at data point (x, y) of ``ax`` (display coordinates scaled from the figure's dpi to the saved
    one, y flipped: the PNG's first row is the top); with ``radius``, the (2r+1)^2 pixels around it, as (n, 3)."""
    dx, dy = ax.transData.transform((x, y))
    scale = image.shape[1] / (fig.get_figwidth() * fig.dpi)
    row, col = int(round(image.shape[0] - dy * scale)), int(round(dx * scale))
    if not radius:
        return image[row, col]
    return image[row - radius : row + radius + 1, col - radius : col + radius + 1].reshape(-1, 3)


def rgb(colour) -> np.ndarray:
    return np.array(matplotlib.colors.to_rgb(colour)) * 255


def summary_rows(values: dict[tuple[str, str], tuple[float, float]], head: str = "contrastive") -> list[dict]:
    """Summary rows as omnimoe.align.pipeline.summarise writes them: (method, direction) -> (R@1, its spread)."""
    rows = []
    for (method, direction), (r1, std) in values.items():
        q, t = direction.split("->")
        rows.append(
            {
                "method": method,
                "query": q,
                "target": t,
                "head": head,
                "R@1": r1,
                "R@1_std": std,
                "R@5": min(1.0, r1 + 0.2),
                "R@5_std": 0.0,
            }
        )
    return rows


RECALL = {
    ("linear", "text->image"): (0.50, 0.10),
    ("linear", "image->text"): (0.40, 0.05),
    ("moe-alternating", "text->image"): (0.70, 0.02),
    # moe-alternating has no image->text row: its bar there is 0
}


def test_plot_recall_bars_are_the_summary(tmp_path, saved):
    summary = summary_rows(RECALL) + summary_rows({("linear", "text->image"): (0.95, 0.0)}, head="contrastive+prior")
    path = plot_recall(summary, tmp_path / "recall.png")
    assert path == tmp_path / "recall.png" and len(saved) == 1 and saved[0][1] == str(path)
    fig, _ = saved[0]
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["linear", "moe-alternating"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["linear", "moe-alternating"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text->image", "image->text"]
    # one bar per direction and method, its height the mean R@1 of the head asked for, its error bar the spread
    np.testing.assert_allclose(bars[0].datavalues, [0.50, 0.40])
    np.testing.assert_allclose(bars[1].datavalues, [0.70, 0.0])
    spans = [[seg[:, 1] for seg in b.errorbar.lines[2][0].get_segments()] for b in bars]
    np.testing.assert_allclose(spans[0], [[0.40, 0.60], [0.35, 0.45]])
    np.testing.assert_allclose(spans[1], [[0.68, 0.72], [0.0, 0.0]])
    assert "R@1" in ax.get_ylabel() and "contrastive head" in ax.get_ylabel()

    image = png(path)
    assert image.shape == (4 * DPI, 6 * DPI, 3)  # figsize (6, 4) at 120 dpi
    assert_not_blank(image)
    # in the PNG: each bar's colour fills it half-way up and is gone a little above its top (off the error bar)
    for bar in bars:
        for rect in bar.patches:
            if rect.get_height() == 0:
                continue
            x = rect.get_x() + rect.get_width() * 0.25
            inside = pixel_of(fig, ax, x, rect.get_height() / 2, image)
            above = pixel_of(fig, ax, x, rect.get_height() + 0.05, image)
            np.testing.assert_allclose(inside, rgb(rect.get_facecolor()), atol=2)
            assert np.abs(above - rgb(rect.get_facecolor())).max() > 30, (rect, above)

    # another head and another metric are other bars; other numbers are another picture
    plot_recall(summary, tmp_path / "prior.png", head="contrastive+prior")
    np.testing.assert_allclose(saved[1][0].axes[0].containers[-1].datavalues, [0.95])
    plot_recall(summary, tmp_path / "r5.png", metric="R@5")
    r5 = [c for c in saved[2][0].axes[0].containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose(r5[0].datavalues, [0.70, 0.60])
    assert "R@5" in saved[2][0].axes[0].get_ylabel()
    changed = {**RECALL, ("linear", "text->image"): (0.2, 0.10)}
    plot_recall(summary_rows(changed), tmp_path / "changed.png")
    assert png(tmp_path / "changed.png").shape == image.shape and (png(tmp_path / "changed.png") != image).any()
    plot_recall(summary, tmp_path / "again.png")  # and the same numbers the same picture
    assert (png(tmp_path / "again.png") == image).all()


CURVES = {
    "linear": [
        {"step": 20, "val_mean_r1": 0.10, "loss": 2.0},
        {"step": 40, "val_mean_r1": 0.30, "loss": 1.0},
        {"step": 60, "val_mean_r1": 0.35, "loss": 0.5},
    ],
    "moe-alternating": [
        {"step": 20, "val_mean_r1": 0.05, "loss": 3.0},
        {"step": 40, "val_mean_r1": 0.45, "loss": 0.8},
    ],
}


def test_plot_training_curves_lines_are_the_history(tmp_path, saved):
    path = plot_training_curves(CURVES, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png" and len(saved) == 1
    fig, _ = saved[0]
    recall, loss = fig.axes
    assert [line.get_label() for line in recall.get_lines()] == list(CURVES)
    assert [line.get_label() for line in loss.get_lines()] == list(CURVES)
    for line_r, line_l, (method, hist) in zip(recall.get_lines(), loss.get_lines(), CURVES.items()):
        np.testing.assert_allclose(line_r.get_xdata(), [h["step"] for h in hist])
        np.testing.assert_allclose(line_r.get_ydata(), [h["val_mean_r1"] for h in hist])
        np.testing.assert_allclose(line_l.get_xdata(), [h["step"] for h in hist])
        np.testing.assert_allclose(line_l.get_ydata(), [h["loss"] for h in hist])
    assert recall.get_ylabel() == "validation mean R@1" and loss.get_yscale() == "log"
    assert [t.get_text() for t in recall.get_legend().get_texts()] == list(CURVES)

    image = png(path)
    assert image.shape == (4 * DPI, 11 * DPI, 3)
    assert_not_blank(image)
    # each method's line passes through its points in the PNG: its colour within 2 pixels of each, and not of
    # the other method's points where the lines are apart
    for ax, key in ((recall, "val_mean_r1"), (loss, "loss")):
        for line, (method, hist) in zip(ax.get_lines(), CURVES.items()):
            colour = rgb(line.get_color())
            for h in hist:
                near = np.abs(pixel_of(fig, ax, h["step"], h[key], image, radius=2) - colour).max(1)
                assert near.min() < 25, (method, key, h)
        a = rgb(ax.get_lines()[0].get_color())
        for h in CURVES["moe-alternating"][1:]:  # step 40: 0.45 against 0.30 (recall), 0.8 against 1.0 (loss)
            assert np.abs(pixel_of(fig, ax, h["step"], h[key], image, radius=1) - a).max(1).min() > 60
    other = {**CURVES, "linear": [{**h, "loss": h["loss"] * 3} for h in CURVES["linear"]]}
    plot_training_curves(other, tmp_path / "other.png")
    assert (png(tmp_path / "other.png") != image).any()


def test_plot_expert_load_cells_are_the_shares(tmp_path, saved):
    load = {"text->image": [0.4, 0.3, 0.2, 0.1], "image->text": [0.1, 0.1, 0.1, 0.7]}
    path = plot_expert_load(load, tmp_path / "load.png", title="moe: expert load")
    assert path == tmp_path / "load.png" and len(saved) == 1
    fig, _ = saved[0]
    ax, colorbar = fig.axes
    heat = ax.images[0]
    np.testing.assert_allclose(np.asarray(heat.get_array()), [load["text->image"], load["image->text"]])
    assert [t.get_text() for t in ax.get_yticklabels()] == list(load)
    assert ax.get_title() == "moe: expert load" and ax.get_xlabel() == "expert"
    assert colorbar.get_ylabel() == "share of assignments"

    image = png(path)
    assert image.shape == (int(round((0.6 * 2 + 1.8) * DPI)), 5 * DPI, 3)  # figsize (5, 3.0)
    assert_not_blank(image)
    # each cell of the PNG has the colour map's colour of its share (row r, expert e at data point (e, r))
    for r, shares in enumerate(load.values()):
        for e, share in enumerate(shares):
            expected = np.array(heat.cmap(heat.norm(share))[:3]) * 255
            np.testing.assert_allclose(pixel_of(fig, ax, e, r, image), expected, atol=3, err_msg=f"{r}, {e}")
    plot_expert_load({**load, "image->text": [0.25] * 4}, tmp_path / "even.png", title="moe: expert load")
    assert (png(tmp_path / "even.png") != image).any()
