"""Pictures of a dataset for people: a contact sheet of a shard's images (a JPEG grid of small
thumbnails), a bar chart of the stats (SVG, written by hand: a few rectangles and labels need no
plotting library), and the data URIs that put either into Dagster's markdown metadata or an HTML page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

SHEET_THUMB = 64  # pixels on the long side
SHEET_COLUMNS = 8
SHEET_IMAGES = 24  # 3 rows of 8: about 10 KB of JPEG per shard in the event log
SHEET_QUALITY = 70


def thumbnail(data: bytes, size: int = SHEET_THUMB) -> np.ndarray | None:
    """The image, decoded at a reduced scale where its format allows, fitted in ``size`` x ``size``;
    None when it does not decode."""
    if not data:
        return None
    array = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(array, cv2.IMREAD_REDUCED_COLOR_4)
        if img is None or min(img.shape[:2]) < size // 2:
            img = cv2.imdecode(array, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def contact_sheet(
    images: Iterable[bytes], limit: int = SHEET_IMAGES, columns: int = SHEET_COLUMNS, size: int = SHEET_THUMB
) -> bytes | None:
    """A JPEG grid of the first ``limit`` images that decode, each centred in its cell on white;
    None when there is none."""
    thumbs = []
    for data in images:
        thumb = thumbnail(data, size)
        if thumb is not None:
            thumbs.append(thumb)
        if len(thumbs) == limit:
            break
    if not thumbs:
        return None
    gap = 2
    cols = min(columns, len(thumbs))
    rows = -(-len(thumbs) // cols)
    sheet = np.full((rows * (size + gap) + gap, cols * (size + gap) + gap, 3), 255, np.uint8)
    for index, thumb in enumerate(thumbs):
        r, c = divmod(index, cols)
        h, w = thumb.shape[:2]
        y = gap + r * (size + gap) + (size - h) // 2
        x = gap + c * (size + gap) + (size - w) // 2
        sheet[y : y + h, x : x + w] = thumb
    ok, encoded = cv2.imencode(".jpg", sheet, [cv2.IMWRITE_JPEG_QUALITY, SHEET_QUALITY])
    return encoded.tobytes() if ok else None


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def markdown_image(data: bytes, mime: str, alt: str) -> str:
    """Markdown that Dagster's UI shows as the image itself."""
    return f"![{alt}]({data_uri(data, mime)})"


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str = "", width: int = 560) -> str:
    """A horizontal bar chart as SVG: one labelled bar per (label, value), longest first as given."""
    row, left, right = 22, 190, 90
    height = 30 + row * max(1, len(bars))
    top = max((v for _, v in bars), default=0.0) or 1.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="18" font-weight="bold">{html.escape(title)}</text>',
    ]
    for index, (label, value) in enumerate(bars):
        y = 28 + index * row
        length = (width - left - right) * value / top
        shown = label if len(label) <= 28 else label[:27] + "\u2026"
        parts += [
            f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(shown)}</text>',
            f'<rect x="{left}" y="{y}" width="{max(length, 1):.1f}" height="{row - 6}" fill="#4f6bed"/>',
            f'<text x="{left + length + 4:.1f}" y="{y + 13}">{_number(value)}{html.escape(unit)}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.2f}"
