"""quality_vs_nfe.png: the evaluation's Frechet distances against network evaluations (drawn with Pillow).

Two panels (fd_hand, fd_proj), NFE on a log axis: the guided teacher as a curve over its step counts, the
unguided teacher as separate grey points (FDs to real data favour unguided sampling, which the student is not
trained to reproduce) and each student (EMA, raw) as points at 1, 2, 4 NFE. Rows of a guidance sweep (other CFG
scales of a guidance-conditioned student, "sweep": true) are not drawn.
"""

from __future__ import annotations

import math

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

SERIES = (  # (label, row filter, colour, line through the points, marker radius); later series drawn on top
    ("teacher, guided", lambda r: r["name"] == "teacher" and r["guidance"] is not None, (31, 119, 180), True, 4),
    ("teacher, unguided", lambda r: r["name"] == "teacher" and r["guidance"] is None, (150, 150, 150), True, 4),
    ("student (raw)", lambda r: r["name"] == "student", (255, 127, 14), False, 6),
    ("student (EMA)", lambda r: r["name"] == "student_ema", (214, 39, 40), False, 4),
)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 420, 300, 56, 16, 30, 44


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / max(count - 1, 1)
    step = 10 ** math.floor(math.log10(raw))
    step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
    return [v for v in np.arange(math.floor(lo / step) * step, hi + step / 2, step) if lo - 1e-9 <= v <= hi + 1e-9]


def _panel(draw: ImageDraw.ImageDraw, x0: int, rows: list[dict], metric: str, font, small) -> None:
    points = [(r["nfe"], r["metrics"][metric]) for r in rows if r["nfe"] and r["metrics"].get(metric) is not None]
    if not points:
        return
    nfes, vals = zip(*points)
    lx_lo, lx_hi = math.log10(min(nfes)) - 0.1, math.log10(max(nfes)) + 0.1
    y_hi = max(vals) * 1.08
    left, top = x0 + MARGIN_L, MARGIN_T
    width, height = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B

    def px(nfe, v):
        return (left + (math.log10(nfe) - lx_lo) / (lx_hi - lx_lo) * width, top + height - v / y_hi * height)

    draw.rectangle([left, top, left + width, top + height], outline=(0, 0, 0))
    for nfe in (1, 2, 4, 8, 16, 35, 70):
        if lx_lo <= math.log10(nfe) <= lx_hi:
            x = px(nfe, 0)[0]
            draw.line([x, top + height, x, top + height + 4], fill=(0, 0, 0))
            draw.text((x, top + height + 6), str(nfe), fill=(0, 0, 0), font=small, anchor="mt")
    for v in _nice_ticks(0.0, y_hi):
        y = px(1, v)[1]
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.line([left + 1, y, left + width - 1, y], fill=(235, 235, 235))
        draw.text((left - 6, y), f"{v:g}", fill=(0, 0, 0), font=small, anchor="rm")
    draw.text(
        (left + width / 2, PANEL_H - 6), "NFE (network evaluations, log scale)", fill=(0, 0, 0), font=small, anchor="mb"
    )
    draw.text((left + width / 2, 8), metric + " (lower is better)", fill=(0, 0, 0), font=font, anchor="mt")
    for _, keep, colour, line, radius in SERIES:
        pts = sorted(
            (r["nfe"], r["metrics"][metric])
            for r in rows
            if keep(r) and not r.get("sweep") and r["nfe"] and r["metrics"].get(metric) is not None
        )
        xy = [px(n, v) for n, v in pts]
        if line and len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))


def plot_quality_vs_nfe(result: dict, path) -> None:
    """Writes the two-panel PNG for an eval.json `result` ({"samplers": [...rows...]}) to `path` (local or gs://)."""
    rows = [r for r in result["samplers"] if r["name"] != "data"]
    font, small = _font(14), _font(11)
    legend_h = 24
    img = Image.new("RGB", (2 * PANEL_W, PANEL_H + legend_h), "white")
    draw = ImageDraw.Draw(img)
    for k, metric in enumerate(("fd_hand", "fd_proj")):
        _panel(draw, k * PANEL_W, rows, metric, font, small)
    x = MARGIN_L
    for label, keep, colour, _, _ in SERIES:
        if not any(keep(r) for r in rows):
            continue
        y = PANEL_H + legend_h / 2
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour, outline=(0, 0, 0))
        draw.text((x + 9, y), label, fill=(0, 0, 0), font=small, anchor="lm")
        x += 30 + draw.textlength(label, font=small)
    with epath.Path(path).open("wb") as f:
        img.save(f, format="PNG")
