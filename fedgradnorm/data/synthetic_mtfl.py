"""Synthetic MTFL: :func:`generate_mtfl` writes the published layout (see :mod:`fedgradnorm.data.mtfl`).

Procedurally drawn faces whose attributes are visible in the pixels and whose landmarks are exactly the
points that were drawn, for tests, demos and experiments; :func:`fedgradnorm.data.mtfl.read_mtfl` reads
the folder back like the real ``MTFL.zip``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from fedgradnorm.atomic import atomic_write_bytes
from fedgradnorm.data.mtfl import FOLDERS

__all__ = ["GENERATOR_VERSION", "generate_mtfl"]

# Version of the drawing: the same seed gives other faces when it changes, so caches of generated sets
# carry it in their name (see :func:`fedgradnorm.data.sources.synthetic_mtfl`). 2: a smile is an open,
# wide mouth with lifted corners and visible teeth (version 1's closed smile moved under 2 px at 40x40).
GENERATOR_VERSION = 2

# Head yaw in degrees of each pose class (1..5); negative yaw turns the nose to the image's left.
_POSE_YAW: dict[int, tuple[float, float]] = {
    1: (-78.0, -45.0),
    2: (-45.0, -15.0),
    3: (-15.0, 15.0),
    4: (15.0, 45.0),
    5: (45.0, 78.0),
}
_POSE_P = (0.07, 0.2, 0.46, 0.2, 0.07)
# Spread (degrees) added to the yaw drawn from the class range, so that neighbouring poses overlap the way
# annotators' coarse pose labels do; it makes pose the hardest attribute.
_YAW_NOISE = 7.0
_P_MALE, _P_SMILE, _P_GLASSES = 0.56, 0.5, 0.4
_JPEG_QUALITY = 90
_CHUNK = 100  # faces per task handed to a worker thread
_BANK = 320  # side of the square bank of noise values (larger than any image side)
_IRIS = ((70, 45, 25), (40, 28, 20), (60, 80, 110), (80, 95, 60), (95, 75, 50))
# Fraction of training images placed in lfw_5590 (the rest in net_7876); testing goes to AFLW, as in the
# published split (10,000 training faces from LFW and the web, 2,995 test faces from AFLW).
_LFW_SHARE = 5590 / (5590 + 7876)

_FIRST = (
    "Aaron",
    "Alice",
    "Ana",
    "Ben",
    "Carlos",
    "Chen",
    "Diana",
    "Emma",
    "Fatima",
    "Ivan",
    "Jin",
    "Kofi",
    "Laura",
    "Omar",
    "Priya",
    "Yuki",
)
_LAST = (
    "Adams",
    "Brown",
    "Diaz",
    "Eckhart",
    "Garcia",
    "Gupta",
    "Kim",
    "Lopez",
    "Meyer",
    "Nguyen",
    "Okafor",
    "Patel",
    "Rossi",
    "Sato",
    "Silva",
    "Zhang",
)


@dataclass(frozen=True)
class _Attributes:
    """Raw 1-based attribute values of one generated face."""

    gender: int
    smile: int
    glasses: int
    pose: int


@dataclass(frozen=True)
class _Head:
    """Geometry of one head: centre, half-width ``r`` and half-height ``rh`` in pixels, yaw and roll."""

    cx: float
    cy: float
    r: float
    rh: float
    yaw: float
    roll: float

    def to_image(self, dx: float, dy: float) -> tuple[float, float]:
        """Image point of an offset (pixels, face frame: x right, y down) from the head centre."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        return self.cx + c * dx - s * dy, self.cy + s * dx + c * dy

    def offset(self, point: tuple[float, float], dx: float, dy: float) -> tuple[float, float]:
        """Image point at a face-frame offset (pixels) from an image point."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        return point[0] + c * dx - s * dy, point[1] + s * dx + c * dy

    def surface(self, azimuth: float, y: float, protrusion: float = 1.0) -> tuple[float, float]:
        """Projection of the head-surface point at ``azimuth`` (radians, 0 = facing the camera) and height
        ``y`` (units of ``rh``, downwards), pushed out by ``protrusion``; orthographic, yawed by ``yaw``."""
        width = math.sqrt(max(0.1, 1.0 - (0.9 * y) ** 2))
        return self.to_image(self.r * width * protrusion * math.sin(azimuth + self.yaw), self.rh * y)

    def facing(self, azimuth: float) -> float:
        """Horizontal foreshortening of a feature at ``azimuth`` (1 facing the camera, small at the rim)."""
        return max(0.25, math.cos(azimuth + self.yaw))

    def face_span(self) -> tuple[float, float]:
        """Horizontal centre offset and half-width (pixels) of the face: the part of the head in front of
        the ears (azimuth within ±95°), which narrows and moves towards the nose as the head turns."""
        limit = math.radians(95)
        left = math.sin(max(self.yaw - limit, -math.pi / 2))
        right = math.sin(min(self.yaw + limit, math.pi / 2))
        return self.r * (left + right) / 2, self.r * (right - left) / 2

    def ellipse(
        self,
        center: tuple[float, float],
        rx: float,
        ry: float,
        n: int = 18,
        start: float = 0.0,
        stop: float = 2 * math.pi,
    ) -> list[tuple[float, float]]:
        """Polygon of an ellipse (or an arc of it) in the face frame, rotated by the roll."""
        angles = np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi - 1e-9)
        dx, dy = rx * np.cos(angles), ry * np.sin(angles)
        c, s = math.cos(self.roll), math.sin(self.roll)
        xs, ys = center[0] + c * dx - s * dy, center[1] + s * dx + c * dy
        return list(zip(xs.tolist(), ys.tolist(), strict=True))


def generate_mtfl(
    out_dir: str | Path,
    *,
    n_train: int = 10000,
    n_test: int = 3000,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a synthetic MTFL folder (same layout as ``MTFL.zip``) and return its path.

    Training faces go to ``lfw_5590/`` (250×250, like LFW) and ``net_7876/``, test faces to ``AFLW/``, as in
    the published split. Every face is drawn with Pillow: attributes are visible at 40×40 (hair, jaw,
    eyebrows and beard for gender; for smile a wide open mouth with lifted corners and bright teeth against
    a narrower closed one; frames for glasses; yaw for pose) and the landmarks written are exactly the drawn
    eye centres, nose tip and mouth corners. Each face has its own random stream derived from ``seed``, so
    the output is identical for the same seed whatever ``workers`` is (the number of threads drawing;
    default ``min(4, os.cpu_count())``); :data:`GENERATOR_VERSION` names the drawing, which another version
    changes. The annotation files are written atomically after all images.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    out = Path(out_dir)
    for folder in FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    for split_id, (split, n) in enumerate((("training", n_train), ("testing", n_test))):
        names = _file_names(split, n, np.random.default_rng([seed, split_id, 0]))
        lines = _render_all(out, names, seed, split_id, workers)
        atomic_write_bytes(out / f"{split}.txt", "".join(lines).encode("ascii"), mode=0o644, durable=False)
    return out


def _render_all(out: Path, names: list[str], seed: int, split_id: int, workers: int) -> list[str]:
    """Draw and save every face of one split, in worker threads when the split is large.

    Threads rather than processes: Pillow's drawing and JPEG encoding and NumPy release the GIL for most of
    the work, and threads need neither pickling nor the ``__main__`` guard that spawned processes require.
    """
    if workers <= 1 or len(names) <= _CHUNK:
        return _render_chunk(out, names, seed, split_id, 0)
    starts = range(0, len(names), _CHUNK)
    chunks = [names[s : s + _CHUNK] for s in starts]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_render_chunk, repeat(out), chunks, repeat(seed), repeat(split_id), starts)
        return [line for chunk in results for line in chunk]


def _render_chunk(out: Path, names: Sequence[str], seed: int, split_id: int, start: int) -> list[str]:
    """Draw faces ``start``, ``start + 1``, ... of a split; return their annotation lines."""
    bank = np.random.default_rng([seed, split_id, 2]).standard_normal((_BANK, _BANK), dtype=np.float32)
    return [
        _generate_one(out, name, np.random.default_rng([seed, split_id, 1, start + i]), bank)
        for i, name in enumerate(names)
    ]


def _file_names(split: str, n: int, rng: np.random.Generator) -> list[str]:
    """Windows-style relative paths styled like the real ones, unique within the split."""
    if split == "testing":
        ids = rng.choice(np.arange(10000, 80000), size=n, replace=False)
        return [f"AFLW\\{i + 1:04d}-image{ids[i]}.jpg" for i in range(n)]
    names = []
    counts: dict[str, int] = {}
    for i in range(n):
        if rng.random() < _LFW_SHARE:
            person = f"{_FIRST[rng.integers(len(_FIRST))]}_{_LAST[rng.integers(len(_LAST))]}"
            counts[person] = counts.get(person, 0) + 1
            names.append(f"lfw_5590\\{person}_{counts[person]:04d}.jpg")
        else:
            names.append(f"net_7876\\_{rng.integers(1, 100)}_{i + 1}_{rng.integers(0, 3)}.jpg")
    return names


def _generate_one(out: Path, name: str, rng: np.random.Generator, noise: np.ndarray) -> str:
    """Draw one face, save it as JPEG and return its annotation line."""
    attrs = _Attributes(
        gender=1 if rng.random() < _P_MALE else 2,
        smile=1 if rng.random() < _P_SMILE else 2,
        glasses=1 if rng.random() < _P_GLASSES else 2,
        pose=int(rng.choice(5, p=_POSE_P)) + 1,
    )
    folder = name.split("\\", 1)[0]
    width, height, face_frac = _image_geometry(folder, rng)
    image, points = _draw_face(rng, width, height, attrs, noise, face_frac)
    image.save(out.joinpath(*PureWindowsPath(name).parts), format="JPEG", quality=_JPEG_QUALITY)
    coords = [f"{x:.2f}" for x, _ in points] + [f"{y:.2f}" for _, y in points]
    return f" {name} {' '.join(coords)} {attrs.gender} {attrs.smile} {attrs.glasses} {attrs.pose}\n"


def _image_geometry(folder: str, rng: np.random.Generator) -> tuple[int, int, float]:
    """(width, height, face half-height as a fraction of the image height) for one image of ``folder``."""
    if folder == "lfw_5590":
        return 250, 250, float(rng.uniform(0.18, 0.26))
    if folder == "net_7876":
        w = int(rng.integers(150, 231))
        return w, int(w * rng.uniform(0.95, 1.1)), float(rng.uniform(0.22, 0.32))
    return int(rng.integers(140, 221)), int(rng.integers(140, 221)), float(rng.uniform(0.21, 0.32))


def _draw_face(
    rng: np.random.Generator,
    width: int,
    height: int,
    attrs: _Attributes,
    noise: np.ndarray,
    face_frac: float = 0.22,
) -> tuple[Image.Image, list[tuple[float, float]]]:
    """Draw one face on a cluttered background; return the RGB image and its five landmarks (x, y).

    ``noise`` is a bank of standard normal values, larger than the image, that the sensor noise is cut from.
    """
    image = Image.new("RGB", (width, height), _color(rng, 60, 200))
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, width, height)
    head = _make_head(rng, width, height, attrs.pose, face_frac)
    skin = _skin_tone(rng)
    hair = _hair_color(rng)
    hair_len = _hair_length(rng, attrs.gender)
    jaw = float(rng.normal(0.9, 0.04) if attrs.gender == 1 else rng.normal(0.8, 0.04))
    _draw_body(draw, rng, head, skin)
    _draw_back_hair(draw, head, hair, hair_len)
    _draw_skin(draw, head, skin, jaw)
    _draw_ears(draw, head, _shade(skin, 0.9))
    if attrs.gender == 1 and rng.random() < 0.2:
        _draw_beard(draw, head, _shade(skin, 0.72), jaw)
    _draw_hair_cap(draw, rng, head, hair, hair_len)
    eyes = _draw_eyes(draw, rng, head, skin, hair, attrs.gender)
    nose = _draw_nose(draw, head, skin)
    mouth = _draw_mouth(draw, rng, head, skin, attrs.smile == 1)
    if attrs.glasses == 1:
        _draw_glasses(draw, rng, head, eyes)
    return _photometric(image, rng, noise), [*eyes, nose, *mouth]


def _hair_length(rng: np.random.Generator, gender: int) -> float:
    """How far the hair falls, in units of ``rh`` below the head centre: mostly long for women, short for
    men, with some short-haired women and long-haired men so hair alone does not decide the gender."""
    long_hair = rng.random() < (0.8 if gender == 2 else 0.1)
    return float(rng.normal(1.4, 0.3) if long_hair else rng.normal(0.1, 0.25))


def _make_head(rng: np.random.Generator, width: int, height: int, pose: int, face_frac: float) -> _Head:
    rh = face_frac * height
    r = rh * float(rng.uniform(0.7, 0.8))
    lo, hi = _POSE_YAW[pose]
    return _Head(
        cx=width / 2 + float(np.clip(rng.normal(0, 0.05), -0.12, 0.12)) * width,
        cy=height * 0.48 + float(np.clip(rng.normal(0, 0.05), -0.12, 0.12)) * height,
        r=r,
        rh=rh,
        yaw=math.radians(float(np.clip(rng.uniform(lo, hi) + rng.normal(0, _YAW_NOISE), -85, 85))),
        roll=math.radians(float(np.clip(rng.normal(0, 6), -14, 14))),
    )


def _color(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    base = rng.uniform(lo, hi)
    r, g, b = np.clip(base + rng.normal(0, 25, 3), 0, 255)
    return int(r), int(g), int(b)


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    r, g, b = (int(min(255, max(0, c * factor))) for c in color)
    return r, g, b


def _skin_tone(rng: np.random.Generator) -> tuple[int, int, int]:
    light, dark = np.array([238, 205, 180]), np.array([100, 66, 48])
    t = float(rng.beta(1.6, 2.2))
    r, g, b = np.clip((1 - t) * light + t * dark + rng.normal(0, 6, 3), 0, 255)
    return int(r), int(g), int(b)


def _hair_color(rng: np.random.Generator) -> tuple[int, int, int]:
    palette = [(25, 20, 18), (60, 40, 25), (110, 75, 40), (190, 160, 105), (150, 150, 150)]
    base = palette[int(rng.choice(5, p=[0.45, 0.25, 0.13, 0.1, 0.07]))]
    return _shade(base, float(rng.uniform(0.85, 1.15)))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    for _ in range(int(rng.integers(3, 10))):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * width)
        y0, y1 = sorted(rng.uniform(-0.2, 1.2, 2) * height)
        kind = rng.integers(3)
        color = _color(rng, 20, 235)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 9)))


def _draw_body(draw: ImageDraw.ImageDraw, rng: np.random.Generator, head: _Head, skin: tuple[int, int, int]) -> None:
    neck = [head.to_image(dx * head.r, dy * head.rh) for dx, dy in ((-0.45, 0.5), (0.45, 0.5), (0.5, 1.5), (-0.5, 1.5))]
    draw.polygon(neck, fill=_shade(skin, 0.8))
    shoulders = head.ellipse(head.to_image(0.0, 2.05 * head.rh), 2.4 * head.r, 0.75 * head.rh, n=24)
    draw.polygon(shoulders, fill=_color(rng, 20, 230))


def _draw_back_hair(draw: ImageDraw.ImageDraw, head: _Head, hair: tuple[int, int, int], hair_len: float) -> None:
    """Hair on the back of the skull (seen beside the face when the head turns) and, when the hair is long,
    falling behind the head down to ``hair_len`` (units of ``rh`` below the head centre)."""
    if hair_len > 0.15:
        top = head.ellipse(
            head.to_image(0.0, 0.0), 1.13 * head.r, 1.08 * head.rh, n=14, start=math.pi, stop=2 * math.pi
        )
        bottom = head.ellipse(
            head.to_image(0.0, (hair_len - 0.15) * head.rh), 1.13 * head.r, 0.15 * head.rh, n=10, stop=math.pi
        )
        draw.polygon([head.to_image(-1.13 * head.r, 0.0), *top, *bottom], fill=_shade(hair, 0.85))
    skull = [
        head.to_image(1.02 * head.r * math.cos(t), min(math.sin(t), 0.3) * head.rh)
        for t in np.linspace(0, 2 * math.pi, 28, endpoint=False)
    ]
    draw.polygon(skull, fill=_shade(hair, 0.92))


def _draw_skin(draw: ImageDraw.ImageDraw, head: _Head, skin: tuple[int, int, int], jaw: float) -> None:
    """Face outline: upper half an ellipse, lower half narrowing to the jaw; see :meth:`_Head.face_span`."""
    center, half = head.face_span()
    points = []
    for t in np.linspace(0, 2 * math.pi, 40, endpoint=False):
        sin_t = math.sin(t)
        squeeze = 1.0 - (1.0 - jaw) * sin_t**2 if sin_t > 0 else 1.0
        points.append(head.to_image(center + half * squeeze * math.cos(t), head.rh * sin_t))
    draw.polygon(points, fill=skin)


def _draw_ears(draw: ImageDraw.ImageDraw, head: _Head, color: tuple[int, int, int]) -> None:
    for side in (-1.0, 1.0):
        azimuth = side * math.pi / 2
        if math.cos(azimuth + head.yaw) < -0.35:
            continue
        center = head.surface(azimuth, 0.02, protrusion=1.02)
        draw.polygon(head.ellipse(center, 0.13 * head.r, 0.2 * head.rh, n=12), fill=color)


def _draw_beard(draw: ImageDraw.ImageDraw, head: _Head, color: tuple[int, int, int], jaw: float) -> None:
    center, half = head.face_span()
    points = [
        head.to_image(center + 0.92 * jaw * half * math.cos(t), head.rh * (0.72 + 0.28 * math.sin(t)))
        for t in np.linspace(0.15, math.pi - 0.15, 14)
    ]
    draw.polygon(points, fill=color)


def _draw_hair_cap(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    head: _Head,
    hair: tuple[int, int, int],
    hair_len: float,
) -> None:
    """Hair over the top of the head down to a hairline, with locks beside the face when the hair is long
    (not on the side the face turns to, where the hair falls behind)."""
    hairline = float(rng.uniform(-0.62, -0.42))
    cap = []
    for t in np.linspace(math.pi, 2 * math.pi, 20):
        dy = min(math.sin(t) * 1.1, hairline)
        cap.append(head.to_image(1.06 * head.r * math.cos(t), dy * head.rh))
    draw.polygon(cap, fill=hair)
    if hair_len <= 0.6:
        return
    lock = min(hair_len, 1.3)
    center, half = head.face_span()
    for side in (-1.0, 1.0):
        if side * math.sin(head.yaw) > math.sin(math.radians(35)):
            continue
        edge = center + side * half
        quad = [
            (edge + side * 0.06 * head.r, hairline),
            (edge - side * 0.26 * head.r, hairline),
            (edge - side * 0.16 * head.r, lock),
            (edge + side * 0.08 * head.r, lock),
        ]
        draw.polygon([head.to_image(dx, dy * head.rh) for dx, dy in quad], fill=hair)


def _draw_eyes(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    head: _Head,
    skin: tuple[int, int, int],
    hair: tuple[int, int, int],
    gender: int,
) -> list[tuple[float, float]]:
    """Eyebrows and eyes; return the eye centres (left, right in the image)."""
    spread = math.radians(float(rng.uniform(26, 32)))
    eye_y = float(rng.normal(-0.04, 0.04))
    brow_thick = float(rng.normal(0.075, 0.015) if gender == 1 else rng.normal(0.04, 0.012)) * head.rh
    brow_color = _shade(hair, 0.8) if hair[0] < 120 else _shade(skin, 0.55)
    iris = _shade(_IRIS[int(rng.integers(len(_IRIS)))], float(rng.uniform(0.8, 1.2)))
    centers = []
    for side in (-1.0, 1.0):
        azimuth = side * spread
        center = head.surface(azimuth, eye_y)
        f = head.facing(azimuth)
        # An eye turned past 80° from the camera shows only its half towards the face centre.
        start, stop = 0.0, 2 * math.pi
        if abs(azimuth + head.yaw) > math.radians(80):
            start = math.pi / 2 if azimuth + head.yaw > 0 else -math.pi / 2
            stop = start + math.pi
        brow = [
            head.offset(center, dx * f * head.r, -0.17 * head.rh + 0.04 * head.rh * (dx / 0.2) ** 2)
            for dx in (-0.2, 0.0, 0.2)
        ]
        draw.line(brow, fill=brow_color, width=max(1, round(brow_thick)), joint="curve")
        for rx, ry, n, color in (
            (0.2, 0.075, 18, (232, 230, 225)),
            (0.085, 0.07, 12, iris),
            (0.04, 0.035, 10, (10, 10, 10)),
        ):
            outline = head.ellipse(center, rx * f * head.r, ry * head.rh, n=n, start=start, stop=stop)
            draw.polygon(outline, fill=color)
        centers.append(center)
    return centers


def _draw_nose(draw: ImageDraw.ImageDraw, head: _Head, skin: tuple[int, int, int]) -> tuple[float, float]:
    """Nose ridge and nostrils; return the nose tip."""
    bridge = head.surface(0.0, 0.05, protrusion=1.05)
    tip = head.surface(0.0, 0.34, protrusion=1.22)
    back = -1.0 if math.sin(head.yaw) >= 0 else 1.0
    wing = head.offset(tip, back * 0.2 * head.r * (0.5 + 0.5 * abs(math.sin(head.yaw))), -0.02 * head.rh)
    draw.polygon([bridge, tip, wing], fill=_shade(skin, 0.78))
    draw.line([bridge, tip], fill=_shade(skin, 0.62), width=max(1, round(0.03 * head.r)))
    for side in (-1.0, 1.0):
        azimuth = side * math.radians(10)
        nostril = head.surface(azimuth, 0.38, protrusion=1.05)
        if head.facing(azimuth) > 0.3:
            draw.polygon(
                head.ellipse(nostril, 0.05 * head.r * head.facing(azimuth), 0.025 * head.rh, n=8),
                fill=_shade(skin, 0.35),
            )
    return tip


def _draw_mouth(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    head: _Head,
    skin: tuple[int, int, int],
    smiling: bool,
) -> list[tuple[float, float]]:
    """Mouth between the two corners; return the corners.

    Sized to be seen at 40×40: a smile is wide, its corners lifted well above the middle of the lips, and
    open (a dark mouth with a band of bright upper teeth between the lips), with the cheek folds that run
    from the nose past the corners; a neutral mouth is narrower and closed, a thin line, flat or slightly
    turned down.
    """
    mouth_y = float(rng.normal(0.6, 0.03))
    lip = _shade((int(skin[0] * 0.9 + 30), int(skin[1] * 0.7), int(skin[2] * 0.7)), 0.75)
    if not smiling:
        spread = math.radians(float(rng.uniform(17, 21)))
        sag = float(rng.uniform(-0.04, 0.005)) * head.rh  # negative: the corners turn down
        corners = [head.surface(-spread, mouth_y), head.surface(spread, mouth_y)]
        draw.line(_bezier(head, corners, sag), fill=lip, width=max(1, round(0.035 * head.rh)), joint="curve")
        return corners
    spread = math.radians(float(rng.uniform(28, 34)))
    lift = float(rng.uniform(0.07, 0.11)) * head.rh  # corners above the middle of the upper lip
    gape = float(rng.uniform(0.17, 0.26)) * head.rh  # opening in the middle
    corners = [head.surface(-spread, mouth_y - lift / head.rh), head.surface(spread, mouth_y - lift / head.rh)]
    upper, lower = _bezier(head, corners, lift), _bezier(head, corners, lift + gape)
    teeth = _bezier(head, corners, lift + float(rng.uniform(0.35, 0.5)) * gape)
    draw.polygon(upper + lower[::-1], fill=(35, 8, 10))
    draw.polygon(upper + teeth[::-1], fill=_shade((240, 236, 226), float(rng.uniform(0.9, 1.05))))
    draw.line(upper, fill=lip, width=max(1, round(0.04 * head.rh)), joint="curve")
    draw.line(lower, fill=lip, width=max(2, round(0.07 * head.rh)), joint="curve")
    fold = _shade(skin, 0.7)
    for side, corner in zip((-1.0, 1.0), corners, strict=True):
        if head.facing(side * math.radians(40)) < 0.5:
            continue  # the fold of a cheek turned away is hidden
        wing = head.surface(side * math.radians(14), 0.36, protrusion=1.05)
        outside = head.offset(corner, side * 0.05 * head.r, 0.05 * head.rh)
        bend = head.offset(((wing[0] + outside[0]) / 2, (wing[1] + outside[1]) / 2), side * 0.07 * head.r, 0.0)
        draw.line([wing, bend, outside], fill=fold, width=max(1, round(0.035 * head.rh)), joint="curve")
    return corners


def _bezier(head: _Head, corners: Sequence[tuple[float, float]], sag: float, n: int = 12) -> list[tuple[float, float]]:
    """Quadratic curve between two points, its middle ``sag`` pixels below their midpoint (face frame)."""
    (x0, y0), (x2, y2) = corners
    mid = ((x0 + x2) / 2, (y0 + y2) / 2)
    x1, y1 = head.offset(mid, 0.0, 2.0 * sag)
    points = []
    for t in np.linspace(0.0, 1.0, n):
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t**2
        points.append((a * x0 + b * x1 + c * x2, a * y0 + b * y1 + c * y2))
    return points


def _draw_glasses(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, head: _Head, eyes: Sequence[tuple[float, float]]
) -> None:
    """Frames round both eyes, a bridge and the temple arms; sometimes dark lenses."""
    frame = _color(rng, 5, 70) if rng.random() < 0.9 else _color(rng, 110, 180)
    width = max(2, round(float(rng.uniform(0.09, 0.14)) * head.r))
    sunglasses = rng.random() < 0.15
    rx, ry = float(rng.uniform(0.26, 0.32)) * head.r, float(rng.uniform(0.15, 0.19)) * head.rh
    inner = []
    for side, eye in zip((-1.0, 1.0), eyes, strict=True):
        f = head.facing(side * math.radians(29))
        center = head.offset(eye, 0.0, 0.02 * head.rh)
        lens = head.ellipse(center, rx * f, ry, n=20)
        draw.polygon(lens, fill=(25, 25, 30) if sunglasses else None, outline=frame, width=width)
        inner.append(head.offset(center, -side * rx * f, 0.0))
        arm_end = head.surface(side * math.pi / 2, -0.02)
        if math.cos(side * math.pi / 2 + head.yaw) > -0.35:
            draw.line([head.offset(center, side * rx * f, 0.0), arm_end], fill=frame, width=width)
    draw.line(inner, fill=frame, width=width)


def _photometric(image: Image.Image, rng: np.random.Generator, noise: np.ndarray) -> Image.Image:
    """Contrast change, a lighting gradient and sensor noise (a random crop of the ``noise`` bank)."""
    w, h = image.size
    angle = float(rng.uniform(0, 2 * math.pi))
    strength = float(rng.uniform(0, 60))
    contrast = float(rng.uniform(0.75, 1.15))
    sigma = np.float32(rng.uniform(2, 9))
    oy, ox = int(rng.integers(0, noise.shape[0] - h + 1)), int(rng.integers(0, noise.shape[1] - w + 1))
    field = noise[oy : oy + h, ox : ox + w] * sigma
    field += (math.sin(angle) * strength) * (np.arange(h, dtype=np.float32)[:, None] / h - 0.5) + 128
    field += (math.cos(angle) * strength) * (np.arange(w, dtype=np.float32) / w - 0.5)
    np.clip(field, 0, 255, out=field)
    light = Image.fromarray(field.astype(np.uint8))
    lut = np.clip(np.rint((np.arange(256) - 128) * contrast + 128), 0, 255).astype(np.uint8).tolist() * 3
    return ImageChops.add(image.point(lut), Image.merge("RGB", (light, light, light)), offset=-128)
