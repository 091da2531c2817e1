"""The model card's picture of a merge with the base (MergeWithBase): the monitored dev metric and the forgetting
guard against α, one panel each (their ranges differ), the base's guard as a dashed line and the chosen α marked.
Drawn with Pillow, imported only when a picture is drawn."""

from __future__ import annotations

from pathlib import Path

WIDTH, PANEL_HEIGHT, MARGIN = 560, 190, 64
BACKGROUND, AXES, TEXT, CHOSEN = (255, 255, 255), (60, 60, 60), (20, 20, 20), (120, 120, 120)
COLOURS = ((31, 119, 180), (214, 39, 40))  # dev metric, guard
MERGE_PICTURE = "merge_curve.png"


def save_merge_picture(merge: dict, path: Path) -> Path:
    """Draw a run record's `merge` (its curve, chosen α, monitor and guard names) as a PNG at `path`."""
    from PIL import Image, ImageDraw

    alphas = [row["alpha"] for row in merge["curve"]]
    panels = [(merge["monitor"], [row["dev"] for row in merge["curve"]], None)]
    if merge["guard"]:
        guards = [row["guard"] for row in merge["curve"]]
        panels.append((f"guard: {merge['guard']} (dashed: the base's)", guards, guards[alphas.index(0.0)]))
    height = MARGIN + len(panels) * PANEL_HEIGHT + MARGIN // 2
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    # ASCII only: Pillow's default font has no Greek letters.
    draw.text((MARGIN, 12), f"Merge with the base: (1 - alpha) * base + alpha * fine-tuned; chosen alpha = "
              f"{merge['chosen']:g}", fill=TEXT)
    for index, (name, values, reference) in enumerate(panels):
        top = MARGIN // 2 + 8 + index * PANEL_HEIGHT
        _panel(draw, top, top + PANEL_HEIGHT - 40, alphas, values, name, COLOURS[index], reference)
    chosen_x = _x(merge["chosen"])
    draw.line((chosen_x, MARGIN // 2 + 8, chosen_x, height - MARGIN // 2 - 24), fill=CHOSEN, width=1)
    draw.text(((WIDTH - MARGIN) // 2 - 40, height - 22), "alpha (0: base, 1: fine-tuned)", fill=TEXT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _x(alpha: float) -> float:
    return MARGIN + alpha * (WIDTH - 2 * MARGIN)


def _panel(draw, top: int, bottom: int, alphas: list[float], values: list[float], name: str, colour: tuple,
           reference: float | None) -> None:
    """One curve in its own box, its y range from its lowest to its highest value (and the reference's)."""
    low, high = min(values), max(values)
    spread = (high - low) or 1e-3  # a flat curve still gets a range to sit in
    low, high = low - spread * 0.1, high + spread * 0.1

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    draw.rectangle((MARGIN, top, WIDTH - MARGIN, bottom), outline=AXES)
    if reference is not None:
        for start in range(MARGIN, WIDTH - MARGIN, 12):  # dashed
            draw.line((start, y(reference), start + 6, y(reference)), fill=colour, width=1)
    points = [(_x(alpha), y(value)) for alpha, value in zip(alphas, values)]
    draw.line(points, fill=colour, width=2)
    for x, point_y in points:
        draw.ellipse((x - 3, point_y - 3, x + 3, point_y + 3), fill=colour)
    draw.text((MARGIN + 6, top + 4), name, fill=colour)
    draw.text((6, top), f"{high:.4f}", fill=TEXT)
    draw.text((6, bottom - 10), f"{low:.4f}", fill=TEXT)
    for alpha in (0.0, 1.0):
        draw.text((_x(alpha) - 4, bottom + 4), f"{alpha:g}", fill=TEXT)
