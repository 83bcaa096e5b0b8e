"""The built-in procedurally generated WSSS demo dataset, as a tfds builder ("puzzle_demo").

This module owns everything about the demo data: the appearance of its classes (one documented
place, `GENERATION` and `CLASS_APPEARANCES`, for whoever tunes it), the renderer of one example, the
tfds builder that prepares the splits to `array_record` without TensorFlow. Preview a split as a
contact sheet with

    python -m puzzle_jax.data.cli preview-demo --preview out.png --data_dir /tmp/puzzle_demo_data

Why it looks the way it does: the demo must pose a *real* weakly-supervised segmentation problem.
Every object is a large body (an ellipse) with a small head (a two-colour disc at one end of the
long axis). The head is a compact, saturated colour pair unique to its class: the easy evidence. The
body is evidence too (its hue band belongs to its class) but spread thin over a large region of
varying brightness, stripes and shading. Backgrounds are cluttered with desaturated shapes, some of
them ring-shaped like heads. A classifier trained on image labels locks on to the head and its CAM
under-covers the body; Puzzle-CAM, whose 2x2 tiles often hold body without head, must learn the
body's evidence too, and its CAMs cover more of each object (README, demo section). Each record
says which is which in its part map (`parts`: 2 on the heads, 1 on the bodies), so `eval_cam`
reports how much of the bodies and of the heads the CAMs recover.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from puzzle_jax.data import announce, records
from puzzle_jax.labels import IGNORE_LABEL

# --------------------------------------------------------------------------------------------------
# Class generation parameters: the one place to tune the demo problem.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassAppearance:
    """How the objects of one demo class look.

    Attributes:
      name: class name shown in reports.
      body_hue: mean hue of the body, in [0, 1) (OpenCV HSV scaled to 1). Body hues are drawn from
        a normal distribution around this mean (`GENERATION.body_hue_std`).
      head_ring_rgb: colour of the outer ring of the head disc. Strong evidence.
      head_core_rgb: colour of the inner core of the head disc. Strong evidence: the (ring, core)
        pair is unique to the class.
    """

    name: str
    body_hue: float
    head_ring_rgb: tuple[int, int, int]
    head_core_rgb: tuple[int, int, int]


# The five default classes' body hues are 0.2 apart around the colour wheel with a standard deviation
# of 0.025 (`GENERATION.body_hue_std`), and clutter is desaturated below every body
# (`GENERATION.clutter_saturation`): a body alone does tell its class, so the tiles that miss the
# head still carry evidence for Puzzle-CAM to learn from. Earlier designs took that away and
# Puzzle-CAM then scored below plain CAM (body hues 0.07 apart, so a body was ambiguous between
# neighbouring classes, and clutter of every saturation that passed for bodies: the head was the
# only reliable cue, and matching the tiles' CAMs shrank the maps onto it; README, demo section).
# The sixth class (used with num_classes=6 only) sits 0.1 from fish and from beetle. Heads use
# saturated colour pairs that the background clutter rarely reproduces.
CLASS_APPEARANCES: tuple[ClassAppearance, ...] = (
    # name, body_hue, head_ring_rgb, head_core_rgb
    ClassAppearance("beetle", 0.0, (230, 25, 25), (255, 255, 255)),
    ClassAppearance("moth", 0.2, (30, 60, 230), (255, 230, 0)),
    ClassAppearance("snail", 0.4, (15, 15, 15), (0, 225, 225)),
    ClassAppearance("frog", 0.6, (255, 255, 255), (200, 0, 200)),
    ClassAppearance("fish", 0.8, (255, 140, 0), (0, 0, 130)),
    ClassAppearance("bird", 0.9, (0, 165, 0), (255, 120, 200)),
)


@dataclasses.dataclass(frozen=True)
class DemoGenerationParameters:
    """Scene parameters shared by all classes (sizes are fractions of the image's shorter side).

    Attributes:
      objects_per_image: inclusive range of the number of objects tried per image (the first one is
        always placed; later ones are skipped when no placement satisfies the overlap rules).
      body_semi_major: range of the body ellipse's semi-major axis.
      body_aspect: range of semi-minor / semi-major.
      head_radius: head disc radius as a fraction of the body's semi-minor axis (so the head is
        ~10-15% of the object's area: the discriminative *part*).
      head_core_fraction: radius of the head's core relative to the head radius.
      min_body_inside: smallest fraction of the body ellipse that must lie inside the image.
      max_overlap: largest fraction of an existing object (or of the new one) that a new object may
        cover; heads are never covered, so every placed object keeps its class evidence.
      placement_attempts: tries per object before it is skipped.
      body_hue_std: spread of the body hue around the class mean (see `ClassAppearance.body_hue`).
      body_saturation: range of body saturation.
      body_value: range of body brightness.
      body_stripe_amplitude: range of the amplitude of random (class-independent) stripes on the
        body.
      body_stripe_period_px: range of the stripe period in pixels.
      shading_amplitude: amplitude of the smooth multiplicative shading on body and background.
      background_saturation: range of the background base colour's saturation.
      background_value: range of the background base colour's brightness.
      clutter_count: inclusive range of the number of clutter shapes in the background.
      clutter_size: range of the clutter shapes' radius.
      clutter_saturation: range of clutter saturation; hues are uniform, and the range ends below
        `body_saturation` so that clutter shapes do not pass for bodies.
      clutter_ring_probability: probability that a clutter shape is a two-colour ring (a head
        look-alike with random colours), so that "has a ring" alone is not the class evidence.
      blur_sigma: Gaussian blur of the final image, in pixels (softens the drawn edges).
      noise_std: per-pixel Gaussian noise of the final image, in 0..255 units.
    """

    objects_per_image: tuple[int, int] = (1, 3)
    body_semi_major: tuple[float, float] = (0.22, 0.34)
    body_aspect: tuple[float, float] = (0.5, 0.75)
    head_radius: float = 0.5
    head_core_fraction: float = 0.5
    min_body_inside: float = 0.75
    max_overlap: float = 0.25
    placement_attempts: int = 40
    body_hue_std: float = 0.025
    body_saturation: tuple[float, float] = (0.35, 0.8)
    body_value: tuple[float, float] = (0.45, 0.9)
    body_stripe_amplitude: tuple[float, float] = (0.0, 0.2)
    body_stripe_period_px: tuple[float, float] = (5.0, 12.0)
    shading_amplitude: float = 0.2
    background_saturation: tuple[float, float] = (0.0, 0.35)
    background_value: tuple[float, float] = (0.3, 0.75)
    clutter_count: tuple[int, int] = (8, 16)
    clutter_size: tuple[float, float] = (0.04, 0.13)
    clutter_saturation: tuple[float, float] = (0.0, 0.3)
    clutter_ring_probability: float = 0.15
    blur_sigma: float = 0.6
    noise_std: float = 6.0


GENERATION = DemoGenerationParameters()

# Each split draws from its own random stream, so the pretraining images are disjoint from
# train/val.
SPLIT_STREAMS = {"pretrain": 0, "train": 1, "val": 2}


# --------------------------------------------------------------------------------------------------
# Rendering one example.
# --------------------------------------------------------------------------------------------------


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """Returns a float32 RGB colour in [0, 1] for an HSV colour with all components in [0, 1]."""
    pixel = np.array([[[hue % 1.0 * 360.0, saturation, value]]], np.float32)
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0]


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Returns a smooth random field of shape (height, width), roughly in [-1, 1]."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _ellipse_region(
    ys: np.ndarray, xs: np.ndarray, center: tuple[float, float], semi_axes: tuple[float, float],
    angle: float,
) -> np.ndarray:
    """Boolean map of the filled ellipse; `angle` (radians) turns its first axis from the x axis."""
    dy, dx = ys - center[0], xs - center[1]
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    return (along / semi_axes[0]) ** 2 + (across / semi_axes[1]) ** 2 <= 1.0


def _disc_region(ys: np.ndarray, xs: np.ndarray, center: tuple[float, float], radius: float):
    return (ys - center[0]) ** 2 + (xs - center[1]) ** 2 <= radius**2


def _render_background(
    rng: np.random.Generator, height: int, width: int, params: DemoGenerationParameters
) -> np.ndarray:
    """Returns a cluttered float32 RGB background in [0, 1]."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = _hsv_to_rgb(
        rng.uniform(),
        rng.uniform(*params.background_saturation),
        rng.uniform(*params.background_value),
    )
    shading = 1.0 + params.shading_amplitude * _smooth_field(rng, height, width, 4)
    tint = 0.08 * np.stack([_smooth_field(rng, height, width, 5) for _ in range(3)], axis=-1)
    image = base[None, None, :] * shading[..., None] + tint
    short_side = min(height, width)
    for _ in range(rng.integers(params.clutter_count[0], params.clutter_count[1] + 1)):
        radius = rng.uniform(*params.clutter_size) * short_side
        center = (rng.uniform(0, height), rng.uniform(0, width))
        colour = _hsv_to_rgb(
            rng.uniform(), rng.uniform(*params.clutter_saturation), rng.uniform(0.2, 0.9)
        )
        kind = rng.uniform()
        if kind < params.clutter_ring_probability:
            # A head look-alike with random colours: rings alone must not identify a class.
            core = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
            image[_disc_region(ys, xs, center, radius)] = colour
            image[_disc_region(ys, xs, center, radius * params.head_core_fraction)] = core
        elif kind < 0.6:
            axes = (radius, radius * rng.uniform(0.3, 1.0))
            image[_ellipse_region(ys, xs, center, axes, rng.uniform(0, math.pi))] = colour
        elif kind < 0.85:
            half = (radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.5, 1.0))
            inside = (np.abs(ys - center[0]) <= half[0]) & (np.abs(xs - center[1]) <= half[1])
            image[inside] = colour
        else:
            # A thin stroke: clutter with long edges, like twigs or cables.
            axes = (radius * 2.0, max(1.0, radius * 0.12))
            image[_ellipse_region(ys, xs, center, axes, rng.uniform(0, math.pi))] = colour
    return image


@dataclasses.dataclass
class _PlacedObject:
    class_index: int
    visible: np.ndarray  # bool (H, W): pixels of this object not covered by later objects.
    head: np.ndarray  # bool (H, W): the head disc (never covered, by construction).


def _sample_object_geometry(
    rng: np.random.Generator, height: int, width: int, params: DemoGenerationParameters
) -> dict:
    short_side = min(height, width)
    semi_major = rng.uniform(*params.body_semi_major) * short_side
    semi_minor = semi_major * rng.uniform(*params.body_aspect)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    head_radius = params.head_radius * semi_minor
    center = (rng.uniform(0, height), rng.uniform(0, width))
    # The head sits on the end of the long axis, overlapping the body so that the object is one
    # region.
    head_distance = semi_major + 0.35 * head_radius
    head_center = (
        center[0] + head_distance * math.sin(angle),
        center[1] + head_distance * math.cos(angle),
    )
    return dict(
        center=center, semi_axes=(semi_major, semi_minor), angle=angle,
        head_center=head_center, head_radius=head_radius,
    )


def _try_place_object(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    placed: Sequence[_PlacedObject],
    params: DemoGenerationParameters,
) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """Samples geometries until one satisfies the placement rules; None when all attempts fail."""
    height, width = ys.shape
    for _ in range(params.placement_attempts):
        geometry = _sample_object_geometry(rng, height, width, params)
        head_y, head_x = geometry["head_center"]
        radius = geometry["head_radius"]
        # The head, the class evidence, must be entirely inside the image.
        head_inside = (
            radius + 1 <= head_y <= height - 2 - radius
            and radius + 1 <= head_x <= width - 2 - radius
        )
        if not head_inside:
            continue
        body = _ellipse_region(ys, xs, geometry["center"], geometry["semi_axes"], geometry["angle"])
        full_body_area = math.pi * geometry["semi_axes"][0] * geometry["semi_axes"][1]
        if body.sum() < params.min_body_inside * full_body_area:
            continue
        head = _disc_region(ys, xs, geometry["head_center"], radius)
        region = body | head
        region_area = region.sum()
        acceptable = True
        for other in placed:
            covered = np.logical_and(region, other.visible).sum()
            if (
                np.logical_and(region, other.head).any()
                or covered > params.max_overlap * other.visible.sum()
                or covered > params.max_overlap * region_area
            ):
                acceptable = False
                break
        if acceptable:
            return geometry, body, head
    return None


def _paint_object(
    rng: np.random.Generator,
    image: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    geometry: dict,
    body: np.ndarray,
    head: np.ndarray,
    appearance: ClassAppearance,
    params: DemoGenerationParameters,
) -> None:
    """Paints the body texture and the head pattern of one object into `image` (in place)."""
    height, width = ys.shape
    hue = rng.normal(appearance.body_hue, params.body_hue_std)
    colour = _hsv_to_rgb(hue, rng.uniform(*params.body_saturation), rng.uniform(*params.body_value))
    period = rng.uniform(*params.body_stripe_period_px)
    stripe_angle = rng.uniform(0.0, math.pi)
    stripes = np.sin(
        2.0 * math.pi * (xs * math.cos(stripe_angle) + ys * math.sin(stripe_angle)) / period
        + rng.uniform(0.0, 2.0 * math.pi)
    )
    shading = 1.0 + params.shading_amplitude * _smooth_field(rng, height, width, 3)
    texture = shading * (1.0 + rng.uniform(*params.body_stripe_amplitude) * stripes)
    body_pixels = body & ~head
    image[body_pixels] = colour[None, :] * texture[body_pixels][:, None]
    image[head] = np.asarray(appearance.head_ring_rgb, np.float32) / 255.0
    core_radius = geometry["head_radius"] * params.head_core_fraction
    core = _disc_region(ys, xs, geometry["head_center"], core_radius)
    image[core] = np.asarray(appearance.head_core_rgb, np.float32) / 255.0


def _boundary_band(region: np.ndarray) -> np.ndarray:
    """The 2-pixel band (one inside, one outside) along the boundary of a boolean region."""
    kernel = np.ones((3, 3), np.uint8)
    as_uint8 = region.astype(np.uint8)
    return (cv2.dilate(as_uint8, kernel) > 0) & ~(cv2.erode(as_uint8, kernel) > 0)


def generate_example(
    rng: np.random.Generator,
    *,
    num_classes: int,
    min_side: int,
    max_side: int,
    params: DemoGenerationParameters = GENERATION,
    classes: Sequence[ClassAppearance] = CLASS_APPEARANCES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Renders one demo image with its segmentation mask, image-level labels and part map.

    Args:
      rng: the only source of randomness (the same generator state gives the same example).
      num_classes: number of object classes to draw from (the first `num_classes` of `classes`).
      min_side: smallest image side in pixels (height and width are drawn independently).
      max_side: largest image side in pixels.
      params: scene parameters.
      classes: class appearances.

    Returns:
      image: uint8 (H, W, 3) RGB.
      mask: uint8 (H, W): 0 background, 1..num_classes objects, 255 on a 2-pixel band along the
        boundary of every object (like VOC's void border).
      labels: float32 (num_classes,) multi-hot: exactly the classes present in `mask`.
      parts: uint8 (H, W) part map (`records.PART_VALUES`): `PART_DISCRIMINATIVE` on each object's visible head,
        `PART_BODY` on the rest of its visible region, 255 where `mask` is 255 (the boundary band), 0 elsewhere.
        Derived from the objects' geometry after the fact: it draws no random number, so the image, mask and labels
        are those the generator gave before part maps existed.
    """
    height, width = (int(side) for side in rng.integers(min_side, max_side + 1, size=2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _render_background(rng, height, width, params)
    placed: list[_PlacedObject] = []
    num_objects = rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1)
    for object_number in range(num_objects):
        class_index = int(rng.integers(num_classes))
        placement = _try_place_object(rng, ys, xs, placed, params)
        if placement is None and object_number == 0:
            # Every image needs at least one object; relax the body rule (the head still fits
            # inside).
            relaxed = dataclasses.replace(params, min_body_inside=0.0, placement_attempts=1000)
            placement = _try_place_object(rng, ys, xs, placed, relaxed)
        if placement is None:
            continue
        geometry, body, head = placement
        _paint_object(rng, image, ys, xs, geometry, body, head, classes[class_index], params)
        region = body | head
        for other in placed:
            other.visible &= ~region
        placed.append(_PlacedObject(class_index=class_index, visible=region, head=head))

    if params.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma)
    image = image * 255.0 + rng.normal(0.0, params.noise_std, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    mask = np.zeros((height, width), np.uint8)
    for placed_object in placed:
        mask[placed_object.visible] = placed_object.class_index + 1
    for placed_object in placed:
        mask[_boundary_band(placed_object.visible)] = 255
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    labels = np.zeros((num_classes,), np.float32)
    labels[present - 1] = 1.0

    parts = np.full((height, width), records.PART_NONE, np.uint8)
    for placed_object in placed:
        parts[placed_object.visible] = records.PART_BODY
        # Heads are never covered by a later object (placement rule), so this is the whole head.
        parts[placed_object.head & placed_object.visible] = records.PART_DISCRIMINATIVE
    parts[mask == IGNORE_LABEL] = IGNORE_LABEL
    return image, mask, labels, parts


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of example `index` of `split`: independent of every other example."""
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


# --------------------------------------------------------------------------------------------------
# The tfds builder.
# --------------------------------------------------------------------------------------------------


# Bump when the renderer's code changes in a way that changes the records (see
# _generation_fingerprint). Revision 2: records carry a part map (`parts`); images, masks and
# labels are bit for bit those of revision 1.
DEMO_RENDERER_REVISION = 2


def _generation_fingerprint() -> str:
    """Short hash of the generation parameters, part of every config name.

    Tuning `GENERATION` or `CLASS_APPEARANCES` therefore lands in a new directory under data_dir
    instead of silently reusing data generated with the old parameters.
    """
    text = repr((GENERATION, CLASS_APPEARANCES, DEMO_RENDERER_REVISION))
    return hashlib.sha256(text.encode()).hexdigest()[:8]



@dataclasses.dataclass(eq=False, kw_only=True)
class PuzzleDemoConfig(tfds.core.BuilderConfig):
    """Sizes and seed of a demo dataset. Build one with `create_demo_config`, which names it."""

    seed: int = 0
    num_classes: int = 5
    num_pretrain: int = 1200
    num_train: int = 600
    num_val: int = 200
    min_side: int = 80
    max_side: int = 128


# The options of a demo config: `create_demo_config`'s overrides, also those of `data.cli preview-demo`.
CONFIG_FIELDS = (
    "seed", "num_classes", "num_pretrain", "num_train", "num_val", "min_side", "max_side"
)


def _config_name(values: dict) -> str:
    return (
        f"c{values['num_classes']}_seed{values['seed']}"
        f"_n{values['num_pretrain']}-{values['num_train']}-{values['num_val']}"
        f"_side{values['min_side']}-{values['max_side']}_g{_generation_fingerprint()}"
    )


def _validate_config_values(values: dict) -> None:
    unknown = sorted(set(values) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown puzzle_demo option(s) {unknown}; allowed: {list(CONFIG_FIELDS)}."
        )
    if not 1 <= values["num_classes"] <= len(CLASS_APPEARANCES):
        raise ValueError(
            f"puzzle_demo num_classes={values['num_classes']} is out of range; allowed: 1.."
            f"{len(CLASS_APPEARANCES)} (add entries to CLASS_APPEARANCES for more)."
        )
    for field in ("num_pretrain", "num_train", "num_val"):
        if values[field] < 1:
            raise ValueError(f"puzzle_demo {field}={values[field]} must be at least 1.")
    if not 32 <= values["min_side"] <= values["max_side"]:
        raise ValueError(
            f"puzzle_demo sides must satisfy 32 <= min_side <= max_side; got min_side="
            f"{values['min_side']}, max_side={values['max_side']}."
        )
    if values["seed"] < 0:
        raise ValueError(f"puzzle_demo seed={values['seed']} must be non-negative.")


def _make_config(**overrides) -> PuzzleDemoConfig:
    defaults = {field: getattr(PuzzleDemoConfig(name="unused"), field) for field in CONFIG_FIELDS}
    values = {**defaults, **overrides}
    _validate_config_values(values)
    return PuzzleDemoConfig(
        name=_config_name(values),
        description="Procedural WSSS demo: large bodies whose class evidence is weaker than their small heads'.",
        **values,
    )


_DEFAULT_CONFIG = _make_config()


def create_demo_config(**overrides) -> PuzzleDemoConfig:
    """Returns the demo config with the given fields overridden (the registered default if none).

    Args:
      **overrides: any of seed, num_classes, num_pretrain, num_train, num_val, min_side, max_side.

    Returns:
      A config whose name encodes every value, so datasets of different sizes or seeds live side by
      side in one data_dir.

    Raises:
      ValueError: for an unknown field or an out-of-range value.
    """
    config = _make_config(**overrides)
    # tfds refuses a custom config that has the name of a registered one: hand back the registered
    # one.
    return _DEFAULT_CONFIG if config.name == _DEFAULT_CONFIG.name else config


class PuzzleDemo(announce.AnnouncedPreparation, tfds.core.GeneratorBasedBuilder):
    """The procedurally generated demo dataset (tfds name "puzzle_demo")."""

    def _preparation_message(self) -> str:
        config = self.builder_config
        total = config.num_pretrain + config.num_train + config.num_val
        return (
            f"Generating the demo dataset ({total:,} images: pretrain {config.num_pretrain}, train {config.num_train}, "
            f"val {config.num_val}; nothing is downloaded) into {self.data_dir}"
        )

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [_DEFAULT_CONFIG]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds derives this path through `importlib_resources`, which its 4.9.10 wheel does not
        # declare as a dependency (so it is absent here); the builder's own file is the same answer.
        return epath.Path(__file__)

    @property
    def class_names(self) -> list[str]:
        """Names of this config's foreground classes, in label order."""
        return class_names(self.builder_config.num_classes)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = self.builder_config.num_classes
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            # Records stay in generation order, so record i of a split is example "<split>_<i>".
            disable_shuffling=True,
            features=records.record_features(num_classes, parts=True),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download: everything is generated.
        config = self.builder_config
        sizes = {"pretrain": config.num_pretrain, "train": config.num_train, "val": config.num_val}
        return {split: self._generate_examples(split, size) for split, size in sizes.items()}

    def _generate_examples(self, split: str, size: int) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for index in range(size):
            image, mask, labels, parts = generate_example(
                example_rng(config.seed, split, index),
                num_classes=config.num_classes,
                min_side=config.min_side,
                max_side=config.max_side,
                # Read at generation time, like the fingerprint in the config name, so the data always
                # matches the directory it lands in.
                params=GENERATION,
                classes=CLASS_APPEARANCES,
            )
            example_id = f"{split}_{index:05d}"
            yield example_id, records.encode_record(
                example_id,
                image=records.encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR)),
                mask=mask,
                labels=labels,
                parts=parts,
            )


def class_names(num_classes: int) -> list[str]:
    """Names of the first `num_classes` demo classes."""
    return [appearance.name for appearance in CLASS_APPEARANCES[:num_classes]]


def create_builder(*, data_dir: str, **config_overrides) -> PuzzleDemo:
    """Returns the demo builder for the given config overrides (see `create_demo_config`)."""
    return PuzzleDemo(
        config=create_demo_config(**config_overrides), data_dir=data_dir, file_format="array_record"
    )
