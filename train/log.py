"""log.csv (one row per training step) and loss.png (the loss curve, drawn with PIL)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

class TrainingLog:
    """log.csv, one row per step, flushed as written. On resume, rows past the checkpoint's
    step (written after the last save, before the kill) are dropped."""

    def __init__(self, path: str | Path, fields: tuple[str, ...], resume_step: int | None = None):
        self.path, self.fields = Path(path), fields
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as file:
                self.rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
        with open(self.path, "w", newline="") as file:
            writer = csv.DictWriter(file, self.fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def append(self, **row):
        row = {key: row[key] for key in self.fields}
        self.rows.append(row)
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, self.fields).writerow(row)

    def column(self, name: str) -> list[float]:
        return [float(row[name]) for row in self.rows]


def plot_losses(steps: list[float], losses: list[float], path: str | Path,
                title: str = "training loss", size: tuple[int, int] = (640, 400)):
    """A line plot of the loss (thin grey) and its running mean over ~5% of the steps (blue),
    with axis ticks, drawn with PIL."""
    width, height = size
    left, right, top, bottom = 64, 16, 28, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    points = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l)]
    if points:
        xs, ys = zip(*points)
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-8

        def to_pixel(x, y):
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

        for i in range(5):  # ticks and grid: 5 on each axis
            fraction = i / 4
            px, py = to_pixel(x0 + fraction * (x1 - x0), y0 + fraction * (y1 - y0))
            draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
            draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
            draw.text((px - 10, height - bottom + 6), f"{x0 + fraction * (x1 - x0):.0f}", fill="black", font=font)
            draw.text((4, py - 6), f"{y0 + fraction * (y1 - y0):.4g}", fill="black", font=font)
        if len(points) > 1:
            draw.line([to_pixel(x, y) for x, y in points], fill=(170, 170, 170), width=1)
            window = max(1, len(ys) // 20)
            smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
            draw.line([to_pixel(x, y) for x, y in zip(xs[window - 1:], smooth)], fill=(31, 119, 180), width=2)
        draw.text((width - right - 40, height - 16), "step", fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    image.save(path)
