"""The validation picture: cosine similarity against label, so users see separation and not only a number.

Continuous labels get a scatter; binary labels get one histogram of cosine per label. Drawn with Pillow
(which W&B needs for images anyway), so no plotting library is required. Pillow is imported only when a
picture is drawn, so training without it (a bare GPU machine with the logger off) still works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH, HEIGHT, MARGIN = 560, 420, 56
BACKGROUND, AXES, TEXT = (255, 255, 255), (60, 60, 60), (20, 20, 20)
COLOURS = ((214, 39, 40), (31, 119, 180))  # label 0, label 1 (and the scatter)
HISTOGRAM_BINS = 40


def cosine_label_picture(cosine: np.ndarray, labels: np.ndarray, title: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 12), title, fill=TEXT)
    draw.rectangle((MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN), outline=AXES)
    if np.isin(labels, (0.0, 1.0)).all():
        _histograms(draw, cosine, labels)
    else:
        _scatter(draw, cosine, labels)
    return image


def save_cosine_label_picture(cosine: np.ndarray, labels: np.ndarray, title: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cosine_label_picture(cosine, labels, title).save(path)
    return path


def _to_pixels(values: np.ndarray, low: float, high: float, start: int, end: int) -> np.ndarray:
    return start + (np.clip(values, low, high) - low) / (high - low) * (end - start)


def _scatter(draw, cosine: np.ndarray, labels: np.ndarray) -> None:
    low = min(0.0, float(cosine.min()))
    xs = _to_pixels(labels, 0.0, 1.0, MARGIN, WIDTH - MARGIN)
    ys = _to_pixels(cosine, low, 1.0, HEIGHT - MARGIN, MARGIN)
    for x, y in zip(xs, ys):
        draw.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=COLOURS[1])
    _axis_labels(draw, "label", "cosine", ("0", "1"), (f"{low:.1f}", "1"))


def _histograms(draw, cosine: np.ndarray, labels: np.ndarray) -> None:
    low = min(0.0, float(cosine.min()))
    edges = np.linspace(low, 1.0, HISTOGRAM_BINS + 1)
    counts = [np.histogram(cosine[labels == value], bins=edges)[0] for value in (0.0, 1.0)]
    tallest = max(1, max(int(c.max()) for c in counts))
    bin_width = (WIDTH - 2 * MARGIN) / HISTOGRAM_BINS
    for colour, count in zip(COLOURS, counts):
        for i, n in enumerate(count):
            if n:
                x = MARGIN + i * bin_width
                top = _to_pixels(np.array(n), 0, tallest, HEIGHT - MARGIN, MARGIN)
                draw.rectangle((x + 1, float(top), x + bin_width - 1, HEIGHT - MARGIN), outline=colour)
    draw.text((WIDTH - MARGIN - 150, MARGIN + 6), "label 0", fill=COLOURS[0])
    draw.text((WIDTH - MARGIN - 150, MARGIN + 20), "label 1", fill=COLOURS[1])
    _axis_labels(draw, "cosine", "pairs", (f"{low:.1f}", "1"), ("0", str(tallest)))


def _axis_labels(draw, x_name: str, y_name: str, x_ends: tuple, y_ends: tuple) -> None:
    bottom, right = HEIGHT - MARGIN, WIDTH - MARGIN
    draw.text((MARGIN, bottom + 4), x_ends[0], fill=TEXT)
    draw.text((right - 10, bottom + 4), x_ends[1], fill=TEXT)
    draw.text(((MARGIN + right) // 2 - 20, bottom + 18), x_name, fill=TEXT)
    draw.text((8, bottom - 10), y_ends[0], fill=TEXT)
    draw.text((8, MARGIN), y_ends[1], fill=TEXT)
    draw.text((8, HEIGHT // 2), y_name, fill=TEXT)
