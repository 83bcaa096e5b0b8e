"""A second synthetic WSSS dataset ("parts"), written as a VOC-layout folder that the ``voc_folder`` builder reads.

This module owns the design of that dataset (`GROUPS`, `CLASSES`, `GenerationParameters`), the renderer of one
example, the folder writer and a contact-sheet preview::

    python -m studies.parts_dataset --out DIR [--seed 0] [--num-pretrain 1200] [--num-train 600]
        [--num-train-large 1200] [--num-val 200] [--preview sheet.png]

Why it exists: the built-in demo (``puzzle_jax/data/demo.py``) was reshaped until Puzzle-CAM beat plain CAM on it,
so a result on the demo alone says little. This dataset poses the same weakly-supervised problem with other
shapes, colours and textures, designed from the structure of the problem alone and not tuned on any training
result (nothing was trained on it while it was written):

* **Classes** (12): four *groups* of three. A group fixes the body's shape and texture: a five-pointed star with
  stripes, a rounded rectangle ("tile") with a checkerboard, a hexagon with dots, a plus-shaped cross with
  concentric rings. Within a group the body is the same for all three classes except for a **weak tint**: the body
  is nearly grey (saturation 0.10-0.24) and its hue is the class's (three hues 120 degrees apart, the set turned by
  30 degrees per group); a per-image colour cast of up to 6% per channel blurs that cue further. So the body is
  large, weak class evidence: its shape and texture tell the group, only the faint tint tells the class.
* **Emblem** (the discriminative part): a small glyph (triangle, diamond, disc or bar) in a saturated colour
  (magenta, yellow or cyan) with a dark outline, inside the body; the (glyph, colour) pair is unique to the class
  and the three classes of a group differ in both. It covers 4-12% of its object's pixels (6% on average).
* **Scenes**: 1-3 objects of independently drawn classes (the same class may repeat), which may overlap (a later
  object covers at most 30% of an earlier one and never its emblem); backgrounds are linear colour gradients with a
  smooth colour field, small distractor shapes (discs, ellipses, triangles, bars, rings; half of them carry one of
  the body textures, so that texture alone is not object evidence), and emblem look-alikes (a glyph in a colour
  no emblem has, or a non-glyph ring or square in an emblem colour), so that neither glyph nor colour alone is
  the class evidence. Image sides are drawn from 150-190 px and are never multiples of 32.
* **Labels**: ``SegmentationClass/<id>.png`` palette PNGs (0 background, 1..12 classes, 255 on a 2-pixel void band
  along every object's visible boundary, as VOC's), ``SegmentationParts/<id>.png`` uint8 (0 not an object, 1 body,
  2 emblem, 255 on the same band), ``labels.csv`` (exactly the classes present in the mask) and ``classes.txt``.
* **Splits** from independent random streams, each example from its own generator (the same seed, split and index
  always give the same image): ``pretrain`` (1,200; the stand-in for ImageNet pretraining), ``train`` (600, the
  Puzzle-CAM training and CAM evaluation split), ``val`` (200), and ``train_large`` (1,200): the first 600 are
  ``train``'s images, the rest continue the same stream, for the "more training images" study row.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from puzzle_jax import fileio
from puzzle_jax.labels import voc_palette, write_label_png

# --------------------------------------------------------------------------------------------------
# The design: groups, classes and scene parameters.
# --------------------------------------------------------------------------------------------------

# Body shape and texture of each group, in group order.
GROUPS: tuple[tuple[str, str, str], ...] = (
    # group name, body shape, body texture
    ("star", "star", "stripes"),
    ("tile", "rounded_rectangle", "checker"),
    ("hex", "hexagon", "dots"),
    ("cross", "cross", "rings"),
)
# Tint hue names by hue in degrees (each group uses three of them, 120 degrees apart).
_HUE_NAMES = {
    0: "red", 120: "green", 240: "blue",
    30: "orange", 150: "spring", 270: "violet",
    60: "yellow", 180: "cyan", 300: "magenta",
    90: "lime", 210: "azure", 330: "rose",
}
GLYPHS = ("triangle", "diamond", "disc", "bar")
# Emblem fill colours (RGB in [0, 1]): saturated, far from the nearly grey bodies.
EMBLEM_COLOURS: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 1.0), (1.0, 0.9, 0.0), (0.0, 0.85, 0.9))
# Colours of glyph look-alikes in the background: as saturated as emblems, but no emblem has them.
DECOY_COLOURS: tuple[tuple[float, float, float], ...] = ((1.0, 0.5, 0.0), (0.1, 0.75, 0.1), (0.15, 0.3, 1.0))
OUTLINE_RGB = (0.08, 0.08, 0.08)


@dataclasses.dataclass(frozen=True)
class PartsClass:
    """How the objects of one class look.

    Attributes:
      name: class name (``<group>_<tint>``).
      group: index into `GROUPS` (body shape and texture).
      tint_hue: hue of the body tint, in [0, 1).
      glyph: index into `GLYPHS` (the emblem's shape).
      emblem_colour: index into `EMBLEM_COLOURS` (the emblem's fill).
    """

    name: str
    group: int
    tint_hue: float
    glyph: int
    emblem_colour: int


def _make_classes() -> tuple[PartsClass, ...]:
    """Class k of group g: tint hue 30 g + 120 k degrees, emblem colour k and glyph (g + k) mod 4, so that every
    (glyph, colour) pair is used once and the three classes of a group differ in glyph and in colour."""
    classes = []
    for group, (group_name, _, _) in enumerate(GROUPS):
        for k in range(3):
            degrees = (30 * group + 120 * k) % 360
            classes.append(
                PartsClass(
                    name=f"{group_name}_{_HUE_NAMES[degrees]}",
                    group=group,
                    tint_hue=degrees / 360.0,
                    glyph=(group + k) % len(GLYPHS),
                    emblem_colour=k,
                )
            )
    return tuple(classes)


CLASSES = _make_classes()
NUM_CLASSES = len(CLASSES)


@dataclasses.dataclass(frozen=True)
class GenerationParameters:
    """Scene parameters shared by all classes (sizes relative to the image's shorter side unless said otherwise).

    Attributes:
      side: inclusive range of image height and width in pixels (drawn independently; a multiple of 32 becomes
        one more pixel).
      objects_per_image: inclusive range of objects tried per image (the first is always placed).
      body_radius: range of the body's circumradius.
      min_body_inside: smallest fraction of a body that must lie inside the image.
      max_cover: largest fraction of an earlier object's visible area that a new object may cover.
      placement_attempts: tries per object before it is skipped.
      star_inner_ratio: range of the star's inner radius relative to its outer radius.
      tile_aspect: range of the rounded rectangle's short side over its long side.
      hexagon_stretch: range of the hexagon's stretch along one axis.
      cross_arm: range of the cross's arm half-width relative to its radius.
      texture_period_px: range of the period of every texture, in pixels.
      tint_saturation: range of the body's saturation (the tint's strength).
      tint_hue_std: spread of the body hue around the class's tint hue.
      body_value: range of the brightness of the body's first texture tone.
      texture_contrast: range of the brightness difference of the two texture tones.
      shading_amplitude: smooth multiplicative shading on bodies.
      emblem_radius: range of the emblem glyph's radius relative to its body's radius.
      emblem_outline_px: width of the emblem's dark outline in pixels.
      background_saturation, background_value: ranges of the two gradient end colours.
      distractor_count: inclusive range of small distractor shapes.
      distractor_size: range of their radius.
      distractor_saturation: range of their saturation (hues uniform).
      distractor_texture_probability: probability that a distractor carries one of the body textures.
      decoy_count: inclusive range of emblem look-alikes in the background.
      colour_cast: largest per-channel multiplicative colour cast of an image.
      blur_sigma: Gaussian blur of the final image, in pixels.
      noise_std: per-pixel Gaussian noise of the final image, in 0..255 units.
    """

    side: tuple[int, int] = (150, 190)
    objects_per_image: tuple[int, int] = (1, 3)
    body_radius: tuple[float, float] = (0.24, 0.34)
    min_body_inside: float = 0.75
    max_cover: float = 0.3
    placement_attempts: int = 40
    star_inner_ratio: tuple[float, float] = (0.5, 0.6)
    tile_aspect: tuple[float, float] = (0.55, 0.85)
    hexagon_stretch: tuple[float, float] = (0.85, 1.15)
    cross_arm: tuple[float, float] = (0.32, 0.42)
    texture_period_px: tuple[float, float] = (6.0, 11.0)
    tint_saturation: tuple[float, float] = (0.10, 0.24)
    tint_hue_std: float = 0.02
    body_value: tuple[float, float] = (0.4, 0.85)
    texture_contrast: tuple[float, float] = (0.12, 0.3)
    shading_amplitude: float = 0.12
    emblem_radius: tuple[float, float] = (0.2, 0.26)
    emblem_outline_px: int = 1
    background_saturation: tuple[float, float] = (0.0, 0.3)
    background_value: tuple[float, float] = (0.3, 0.8)
    distractor_count: tuple[int, int] = (3, 9)
    distractor_size: tuple[float, float] = (0.04, 0.12)
    distractor_saturation: tuple[float, float] = (0.0, 0.35)
    distractor_texture_probability: float = 0.5
    decoy_count: tuple[int, int] = (0, 2)
    colour_cast: float = 0.06
    blur_sigma: float = 0.7
    noise_std: float = 5.0


GENERATION = GenerationParameters()

# Each split draws from its own stream (other numbers than the demo's, so the two datasets never share a stream);
# train_large continues train's stream.
SPLIT_STREAMS = {"pretrain": 101, "train": 102, "val": 103}
DEFAULT_SIZES = {"pretrain": 1200, "train": 600, "train_large": 1200, "val": 200}
# Bump when the renderer changes the images for the same parameters (part of the fingerprint).
RENDERER_REVISION = 1
# Values of SegmentationParts PNGs.
PART_NONE, PART_BODY, PART_EMBLEM, PART_VOID = 0, 1, 2, 255


def fingerprint(params: GenerationParameters = GENERATION) -> str:
    """Short hash of the design (parameters, classes, renderer revision), recorded in the folder's
    ``generation.json`` so that a folder written by another design is never taken for this one."""
    text = repr((params, GROUPS, CLASSES, GLYPHS, EMBLEM_COLOURS, DECOY_COLOURS, RENDERER_REVISION))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of example `index` of `split` (``train_large`` shares ``train``'s stream)."""
    stream = SPLIT_STREAMS["train" if split == "train_large" else split]
    return np.random.default_rng([seed, stream, index])


def example_id(split: str, index: int) -> str:
    """The id of an example; ``train_large`` reuses ``train``'s ids (its first images are train's)."""
    return f"{'train' if split == 'train_large' else split}_{index:05d}"


# --------------------------------------------------------------------------------------------------
# Geometry and textures.
# --------------------------------------------------------------------------------------------------


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """A float32 RGB colour in [0, 1] from HSV components in [0, 1]."""
    pixel = np.array([[[hue % 1.0 * 360.0, saturation, value]]], np.float32)
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0]


def _regular_polygon(vertices: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2.0 * math.pi * np.arange(vertices) / vertices
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _body_outline(shape: str, rng: np.random.Generator, params: GenerationParameters) -> np.ndarray:
    """The body's outline as an (N, 2) array of (x, y) points around the origin, circumradius about 1."""
    if shape == "star":
        inner = rng.uniform(*params.star_inner_ratio)
        outer_points = _regular_polygon(5, 1.0, -math.pi / 2)
        inner_points = _regular_polygon(5, inner, -math.pi / 2 + math.pi / 5)
        return np.stack([outer_points, inner_points], axis=1).reshape(10, 2)
    if shape == "rounded_rectangle":
        half_long = 0.95
        half_short = half_long * rng.uniform(*params.tile_aspect)
        corner = 0.35 * half_short
        points = []
        # Quarter circles around the four inner corners, in order, trace the rounded rectangle.
        for sign_x, sign_y, start in ((1, 1, 0.0), (-1, 1, 0.5), (-1, -1, 1.0), (1, -1, 1.5)):
            centre = (sign_x * (half_long - corner), sign_y * (half_short - corner))
            for t in np.linspace(start * math.pi, (start + 0.5) * math.pi, 8):
                points.append((centre[0] + corner * math.cos(t), centre[1] + corner * math.sin(t)))
        return np.asarray(points)
    if shape == "hexagon":
        return _regular_polygon(6, 1.0) * np.array([rng.uniform(*params.hexagon_stretch), 1.0])
    if shape == "cross":
        arm = rng.uniform(*params.cross_arm)
        quarter = [(1.0, -arm), (1.0, arm), (arm, arm)]
        points = []
        for turn in range(4):
            cos, sin = math.cos(turn * math.pi / 2), math.sin(turn * math.pi / 2)
            points.extend((x * cos - y * sin, x * sin + y * cos) for x, y in quarter)
        return np.asarray(points)
    raise ValueError(f"unknown body shape {shape!r}")


def _glyph_outline(glyph: str) -> np.ndarray:
    """The emblem glyph's outline, (x, y) points around the origin, radius about 1."""
    if glyph == "triangle":
        return _regular_polygon(3, 1.0, -math.pi / 2)
    if glyph == "diamond":
        return np.array([(1.0, 0.0), (0.0, 0.62), (-1.0, 0.0), (0.0, -0.62)])
    if glyph == "disc":
        return _regular_polygon(24, 0.8)
    if glyph == "bar":
        return np.array([(1.0, 0.4), (-1.0, 0.4), (-1.0, -0.4), (1.0, -0.4)])
    raise ValueError(f"unknown glyph {glyph!r}")


def _transform(outline: np.ndarray, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Outline points turned by `angle`, scaled by `radius` and moved to `centre` (x, y)."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = outline @ np.array([[cos, sin], [-sin, cos]])
    return rotated * radius + np.asarray(centre)


def _polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon of (x, y) points (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) map of a filled polygon given in (x, y) pixel coordinates (pixel centres at
    integers), rasterised with 4 bits of sub-pixel precision."""
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _placed_mask(
    outline: np.ndarray, centre: tuple[float, float], radius: float, angle: float, shape: tuple[int, int]
) -> np.ndarray:
    """Boolean map of the (height, width) `shape` covered by `outline` turned, scaled and moved (`_transform`)."""
    return _polygon_mask(_transform(outline, centre, radius, angle), *shape)


def _disc_kernel(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _texture(
    kind: str, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, centre: tuple[float, float],
    params: GenerationParameters,
) -> np.ndarray:
    """Boolean (H, W) map of a texture's second tone: random period, orientation and phase."""
    period = rng.uniform(*params.texture_period_px)
    angle = rng.uniform(0.0, math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    phase_u, phase_v = rng.uniform(0.0, 1.0, size=2)
    if kind == "stripes":
        return (u / period + phase_u) % 1.0 < 0.5
    if kind == "checker":
        return (np.floor(u / period * 2 + phase_u) + np.floor(v / period * 2 + phase_v)) % 2 == 0
    if kind == "dots":
        du = (u / period + phase_u) % 1.0 - 0.5
        dv = (v / period + phase_v) % 1.0 - 0.5
        return du**2 + dv**2 < 0.3**2
    if kind == "rings":
        distance = np.hypot(xs - centre[0], ys - centre[1])
        return (distance / period + phase_u) % 1.0 < 0.5
    raise ValueError(f"unknown texture {kind!r}")


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random (height, width) field, roughly in [-1, 1]."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _boundary_band(region: np.ndarray) -> np.ndarray:
    """The 2-pixel band (one inside, one outside) along the boundary of a boolean region."""
    kernel = np.ones((3, 3), np.uint8)
    as_uint8 = region.astype(np.uint8)
    return (cv2.dilate(as_uint8, kernel) > 0) & ~(cv2.erode(as_uint8, kernel) > 0)


# --------------------------------------------------------------------------------------------------
# Rendering one example.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered example.

    Attributes:
      image: uint8 (H, W, 3) RGB.
      mask: uint8 (H, W): 0 background, 1..NUM_CLASSES, 255 on the void band along object boundaries.
      parts: uint8 (H, W): PART_NONE, PART_BODY, PART_EMBLEM, PART_VOID (the same band).
      labels: float32 (NUM_CLASSES,) multi-hot: exactly the classes present in `mask`.
    """

    image: np.ndarray
    mask: np.ndarray
    parts: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass
class _Object:
    class_index: int
    visible: np.ndarray  # bool (H, W): body and emblem pixels not covered by later objects.
    emblem: np.ndarray  # bool (H, W): the emblem with its outline (never covered, by construction).


def _draw_side(rng: np.random.Generator, params: GenerationParameters) -> int:
    side = int(rng.integers(params.side[0], params.side[1] + 1))
    # A multiple of 32 would tile evenly at every output stride and hide padding and rounding paths.
    return side + 1 if side % 32 == 0 else side


def _render_background(
    rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, params: GenerationParameters
) -> np.ndarray:
    """A linear gradient between two muted colours, a smooth colour field and small distractor shapes."""
    height, width = ys.shape
    start, end = (
        _hsv_to_rgb(rng.uniform(), rng.uniform(*params.background_saturation), rng.uniform(*params.background_value))
        for _ in range(2)
    )
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    image = start[None, None] * (1.0 - along[..., None]) + end[None, None] * along[..., None]
    image = image + 0.06 * np.stack([_smooth_field(rng, height, width, 4) for _ in range(3)], axis=-1)
    short_side = min(height, width)
    for _ in range(int(rng.integers(params.distractor_count[0], params.distractor_count[1] + 1))):
        radius = rng.uniform(*params.distractor_size) * short_side
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        kind = ("disc", "ellipse", "triangle", "bar", "ring")[int(rng.integers(5))]
        angle = rng.uniform(0.0, 2.0 * math.pi)
        if kind == "ellipse":
            outline = _regular_polygon(20) * np.array([1.0, rng.uniform(0.35, 0.7)])
        elif kind == "triangle":
            outline = _regular_polygon(3)
        elif kind == "bar":
            outline = np.array([(1.6, 0.15), (-1.6, 0.15), (-1.6, -0.15), (1.6, -0.15)])
        else:
            outline = _regular_polygon(20)
        region = _placed_mask(outline, centre, radius, angle, ys.shape)
        if kind == "ring":
            region &= ~_placed_mask(outline, centre, 0.6 * radius, angle, ys.shape)
        value = rng.uniform(0.2, 0.9)
        colour = _hsv_to_rgb(rng.uniform(), rng.uniform(*params.distractor_saturation), value)
        image[region] = colour
        if rng.uniform() < params.distractor_texture_probability:
            texture_kind = GROUPS[int(rng.integers(len(GROUPS)))][2]
            second = region & _texture(texture_kind, rng, ys, xs, centre, params)
            image[second] = colour * (0.7 if value > 0.5 else 1.4)
    return image


def _paint_decoys(
    rng: np.random.Generator, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, params: GenerationParameters
) -> None:
    """Emblem look-alikes: a glyph in a colour no emblem has, or a ring or square in an emblem colour."""
    height, width = ys.shape
    typical_radius = np.mean(params.body_radius) * min(height, width) * np.mean(params.emblem_radius)
    for _ in range(int(rng.integers(params.decoy_count[0], params.decoy_count[1] + 1))):
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        if rng.uniform() < 0.5:
            glyph = _glyph_outline(GLYPHS[int(rng.integers(len(GLYPHS)))])
            region = _placed_mask(glyph, centre, typical_radius, angle, ys.shape)
            colour = DECOY_COLOURS[int(rng.integers(len(DECOY_COLOURS)))]
        else:
            if rng.uniform() < 0.5:
                region = _placed_mask(_regular_polygon(20, 0.9), centre, typical_radius, angle, ys.shape)
                region &= ~_placed_mask(_regular_polygon(20, 0.5), centre, typical_radius, angle, ys.shape)
            else:
                region = _placed_mask(_regular_polygon(4, 0.85), centre, typical_radius, angle, ys.shape)
            colour = EMBLEM_COLOURS[int(rng.integers(len(EMBLEM_COLOURS)))]
        outlined = cv2.dilate(region.astype(np.uint8), _disc_kernel(params.emblem_outline_px)) > 0
        image[outlined] = OUTLINE_RGB
        image[region] = colour


def _try_place_object(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    appearance: PartsClass,
    placed: Sequence[_Object],
    params: GenerationParameters,
) -> dict | None:
    """Samples a body and an emblem inside it until the placement rules hold; None when every attempt fails."""
    height, width = ys.shape
    short_side = min(height, width)
    shape = GROUPS[appearance.group][1]
    for _ in range(params.placement_attempts):
        radius = rng.uniform(*params.body_radius) * short_side
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        outline = _body_outline(shape, rng, params)
        points = _transform(outline, centre, radius, angle)
        body = _polygon_mask(points, height, width)
        if body.sum() < params.min_body_inside * _polygon_area(points):
            continue
        # The emblem, outline included, must lie inside the body and inside the image.
        emblem_radius = rng.uniform(*params.emblem_radius) * radius
        margin = math.ceil(1.1 * emblem_radius) + params.emblem_outline_px + 1
        inner = body.copy()
        inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
        inner = cv2.erode(inner.astype(np.uint8), _disc_kernel(margin)) > 0
        candidates = np.flatnonzero(inner)
        if candidates.size == 0:
            continue
        emblem_y, emblem_x = np.unravel_index(candidates[int(rng.integers(candidates.size))], (height, width))
        emblem_centre = (float(emblem_x), float(emblem_y))
        glyph_angle = rng.uniform(0.0, 2.0 * math.pi)
        glyph = _placed_mask(_glyph_outline(GLYPHS[appearance.glyph]), emblem_centre, emblem_radius, glyph_angle,
                             ys.shape)
        emblem = cv2.dilate(glyph.astype(np.uint8), _disc_kernel(params.emblem_outline_px)) > 0
        region = body | emblem
        acceptable = True
        for other in placed:
            covered = np.logical_and(region, other.visible).sum()
            near_emblem = cv2.dilate(other.emblem.astype(np.uint8), _disc_kernel(2)) > 0
            if np.logical_and(region, near_emblem).any() or covered > params.max_cover * other.visible.sum():
                acceptable = False
                break
        if acceptable:
            return dict(centre=centre, body=body, glyph=glyph, emblem=emblem)
    return None


def _paint_body(
    rng: np.random.Generator,
    image: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    placement: dict,
    appearance: PartsClass,
    params: GenerationParameters,
) -> None:
    """Paints the tinted, textured body and the outlined emblem of one object into `image` (in place)."""
    height, width = ys.shape
    hue = rng.normal(appearance.tint_hue, params.tint_hue_std)
    saturation = rng.uniform(*params.tint_saturation)
    first_value = rng.uniform(*params.body_value)
    contrast = rng.uniform(*params.texture_contrast)
    second_value = first_value - contrast if first_value - contrast >= 0.2 else first_value + contrast
    tones = np.stack([_hsv_to_rgb(hue, saturation, first_value), _hsv_to_rgb(hue, saturation, second_value)])
    second = _texture(GROUPS[appearance.group][2], rng, ys, xs, placement["centre"], params)
    shading = 1.0 + params.shading_amplitude * _smooth_field(rng, height, width, 3)
    body = placement["body"]
    image[body] = tones[second[body].astype(np.intp)] * shading[body][:, None]
    image[placement["emblem"]] = OUTLINE_RGB
    image[placement["glyph"]] = EMBLEM_COLOURS[appearance.emblem_colour]


def generate_example(rng: np.random.Generator, params: GenerationParameters = GENERATION) -> Example:
    """Renders one image with its class mask, part mask and image-level labels.

    Args:
      rng: the only source of randomness (the same generator state gives the same example).
      params: scene parameters.

    Returns:
      The example (see `Example`).
    """
    height, width = _draw_side(rng, params), _draw_side(rng, params)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _render_background(rng, ys, xs, params)
    _paint_decoys(rng, image, ys, xs, params)
    placed: list[_Object] = []
    num_objects = int(rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1))
    for object_number in range(num_objects):
        class_index = int(rng.integers(NUM_CLASSES))
        appearance = CLASSES[class_index]
        placement = _try_place_object(rng, ys, xs, appearance, placed, params)
        if placement is None and object_number == 0:
            # Every image needs an object: allow bodies mostly outside the image (the emblem still fits inside).
            relaxed = dataclasses.replace(params, min_body_inside=0.0, placement_attempts=1000)
            placement = _try_place_object(rng, ys, xs, appearance, placed, relaxed)
        if placement is None:
            continue
        _paint_body(rng, image, ys, xs, placement, appearance, params)
        region = placement["body"] | placement["emblem"]
        for other in placed:
            other.visible &= ~region
        placed.append(_Object(class_index=class_index, visible=region, emblem=placement["emblem"]))

    cast = 1.0 + rng.uniform(-params.colour_cast, params.colour_cast, size=3).astype(np.float32)
    image = image * cast
    if params.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma)
    image = image * 255.0 + rng.normal(0.0, params.noise_std, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    mask = np.zeros((height, width), np.uint8)
    parts = np.full((height, width), PART_NONE, np.uint8)
    for placed_object in placed:
        mask[placed_object.visible] = placed_object.class_index + 1
        parts[placed_object.visible] = PART_BODY
        parts[placed_object.emblem] = PART_EMBLEM
    for placed_object in placed:
        band = _boundary_band(placed_object.visible)
        mask[band] = 255
        parts[band] = PART_VOID
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= NUM_CLASSES)]
    labels = np.zeros((NUM_CLASSES,), np.float32)
    labels[present - 1] = 1.0
    return Example(image=image, mask=mask, parts=parts, labels=labels)


# --------------------------------------------------------------------------------------------------
# The VOC-layout folder.
# --------------------------------------------------------------------------------------------------


def _split_sizes(num_pretrain: int, num_train: int, num_train_large: int, num_val: int) -> dict[str, int]:
    sizes = {"pretrain": num_pretrain, "train": num_train, "val": num_val}
    for split, size in sizes.items():
        if size < 1:
            raise ValueError(f"--num-{split.replace('_', '-')}={size} must be at least 1.")
    if num_train_large:
        if num_train_large < num_train:
            raise ValueError(
                f"--num-train-large={num_train_large} must be 0 (no train_large split) or at least --num-train="
                f"{num_train}: train_large holds train's images and more."
            )
        sizes["train_large"] = num_train_large
    return sizes


def write_folder(
    out: str,
    *,
    seed: int = 0,
    num_pretrain: int = DEFAULT_SIZES["pretrain"],
    num_train: int = DEFAULT_SIZES["train"],
    num_train_large: int = DEFAULT_SIZES["train_large"],
    num_val: int = DEFAULT_SIZES["val"],
    params: GenerationParameters = GENERATION,
) -> dict:
    """Writes the dataset as a VOC-layout folder (module docstring), or finds it already written.

    Args:
      out: the folder.
      seed: the dataset seed.
      num_pretrain, num_train, num_val: split sizes.
      num_train_large: size of ``train_large`` (train's images first); 0 writes no such split.
      params: scene parameters.

    Returns:
      The contents of ``generation.json`` (seed, sizes, design fingerprint, class names), which is written last:
      a folder with it is complete.

    Raises:
      ValueError: for bad sizes, or when `out` holds a dataset of another seed, size or design.
    """
    sizes = _split_sizes(num_pretrain, num_train, num_train_large, num_val)
    description = {
        "generator": "studies.parts_dataset",
        "seed": seed,
        "sizes": sizes,
        "fingerprint": fingerprint(params),
        "classes": [appearance.name for appearance in CLASSES],
    }
    marker = os.path.join(out, "generation.json")
    if os.path.exists(marker):
        found = fileio.read_json(marker)
        if found != description:
            raise ValueError(
                f"{out} holds another parts dataset ({found}); wanted {description}. Use another --out or delete it."
            )
        return found
    folders = {name: os.path.join(out, name) for name in ("JPEGImages", "SegmentationClass", "SegmentationParts")}
    for folder in (*folders.values(), os.path.join(out, "ImageSets", "Segmentation")):
        os.makedirs(folder, exist_ok=True)
    # train_large's first images are train's: render each train stream index once.
    rendered = {"pretrain": num_pretrain, "train": max(num_train, num_train_large), "val": num_val}
    label_rows = ["id,labels"]
    for split, count in rendered.items():
        for index in range(count):
            identifier = example_id(split, index)
            example = generate_example(example_rng(seed, split, index), params)
            fileio.write_rgb_png(os.path.join(folders["JPEGImages"], f"{identifier}.png"), example.image)
            write_label_png(os.path.join(folders["SegmentationClass"], f"{identifier}.png"), example.mask)
            with fileio.atomic_path(os.path.join(folders["SegmentationParts"], f"{identifier}.png")) as temporary:
                Image.fromarray(example.parts).save(temporary, format="PNG")
            names = [CLASSES[k].name for k in np.flatnonzero(example.labels)]
            label_rows.append(f"{identifier},{';'.join(names)}")
    for split, size in sizes.items():
        ids = [example_id(split, index) for index in range(size)]
        fileio.write_text(os.path.join(out, "ImageSets", "Segmentation", f"{split}.txt"), "\n".join(ids) + "\n")
    fileio.write_text(os.path.join(out, "classes.txt"), "\n".join(description["classes"]) + "\n")
    fileio.write_text(os.path.join(out, "labels.csv"), "\n".join(label_rows) + "\n")
    fileio.write_json(marker, description)
    return description


# --------------------------------------------------------------------------------------------------
# Preview.
# --------------------------------------------------------------------------------------------------

# Part-mask colours of the preview: none black, body grey-blue, emblem yellow, void white.
_PART_COLOURS = np.zeros((256, 3), np.uint8)
_PART_COLOURS[PART_BODY] = (70, 110, 170)
_PART_COLOURS[PART_EMBLEM] = (250, 220, 40)
_PART_COLOURS[PART_VOID] = (255, 255, 255)


def render_preview(
    seed: int = 0, split: str = "train", count: int = 12, *, columns: int = 2, cell: int = 192,
    params: GenerationParameters = GENERATION,
) -> np.ndarray:
    """A contact sheet of the first `count` examples of `split`: image | class mask | part mask, captioned.

    Returns:
      uint8 RGB sheet.
    """
    caption, gap, column_gap = 16, 4, 16
    triplet_width = 3 * cell + 2 * gap + column_gap
    rows = math.ceil(count / columns)
    sheet = np.full((rows * (cell + caption + gap), columns * triplet_width, 3), 255, np.uint8)
    palette = voc_palette()
    for position in range(count):
        example = generate_example(example_rng(seed, split, position), params)
        top = (position // columns) * (cell + caption + gap)
        left = (position % columns) * triplet_width
        for panel, picture in enumerate((example.image, palette[example.mask], _PART_COLOURS[example.parts])):
            offset = left + panel * (cell + gap)
            sheet[top : top + picture.shape[0], offset : offset + picture.shape[1]] = picture
        names = [CLASSES[k].name for k in np.flatnonzero(example.labels)]
        emblem_share = (example.parts == PART_EMBLEM).sum() / max(int(np.isin(example.parts, (1, 2)).sum()), 1)
        text = f"{example_id(split, position)} {example.image.shape[1]}x{example.image.shape[0]}: {', '.join(names)}"
        text += f" (emblem {emblem_share:.0%})"
        cv2.putText(
            sheet, text, (left + 2, top + cell + caption - 4), cv2.FONT_HERSHEY_SIMPLEX, fontScale=0.4,
            color=(0, 0, 0), thickness=1, lineType=cv2.LINE_AA,
        )
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.parts_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder to write the VOC-layout dataset to (skipped when absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-pretrain", type=int, default=DEFAULT_SIZES["pretrain"])
    parser.add_argument("--num-train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument(
        "--num-train-large", type=int, default=DEFAULT_SIZES["train_large"],
        help="size of the train_large split (train's images first, then more of the same stream); 0 = none",
    )
    parser.add_argument("--num-val", type=int, default=DEFAULT_SIZES["val"])
    parser.add_argument("--preview", help="write a contact sheet of the first images of --preview-split here")
    parser.add_argument("--preview-split", default="train", choices=sorted(SPLIT_STREAMS))
    parser.add_argument("--preview-count", type=int, default=12)
    args = parser.parse_args(argv)
    if not args.out and not args.preview:
        parser.error("give --out, --preview or both")
    if args.out:
        description = write_folder(
            args.out, seed=args.seed, num_pretrain=args.num_pretrain, num_train=args.num_train,
            num_train_large=args.num_train_large, num_val=args.num_val,
        )
        print(f"parts dataset in {args.out}: {json.dumps(description['sizes'])}, design {description['fingerprint']}")
    if args.preview:
        sheet = render_preview(args.seed, args.preview_split, args.preview_count)
        fileio.write_rgb_png(args.preview, sheet)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    main()
