"""Synthetic CVAT-like tasks: annotated frames for tests, benchmarks and the demo, with no CVAT and no downloads.

Each label has its own shape, colour and CVAT shape type, so a small detector learns them in minutes on a CPU:

=========  ===========  ================================================  ======================
label      CVAT type    drawn as                                          annotated as
=========  ===========  ================================================  ======================
box        rectangle    a red rectangle, sometimes rotated                rectangle (+ rotation)
disc       ellipse      a blue ellipse                                    ellipse
triangle   polygon      a green triangle                                  polygon
blob       mask         a yellow irregular star                           mask (its visible pixels)
=========  ===========  ================================================  ======================

Four more kinds are drawn only when named in ``labels`` (never by default): objects a detector trained on the
kinds above has never seen (``bench/ranking.py`` asks whether frames holding them are put first for review). Two
share a trained kind's colour, so only their outline is new:

=========  ===========  ================================================
label      CVAT type    drawn as
=========  ===========  ================================================
cross      polygon      a red plus sign (the colour of box)
crescent   polygon      a blue crescent (the colour of disc)
arrow      polygon      an orange arrow
bar        polygon      a purple long thin bar, at any angle
=========  ===========  ================================================

``background`` changes what is behind the objects: ``muted`` (the default: smooth muted colour noise with grey
stripes), or two a model trained on the default has never seen, ``checker`` (a black and white tiled floor) and
``foliage`` (saturated green and brown leaves).

With ``turned=True`` boxes and discs are long and turned at any angle (rotated rectangles, ellipses with a
rotation): what a mask model learns to serve in their own shape (``bench/rotated.py``; ``generate_turned``).

With ``tags=True`` every frame (but a few) also gets a CVAT tag — what a classifier learns — for its lighting, which
changes the whole picture, objects included: ``day`` (bright, warm), ``night`` (dark, blue) or ``fog`` (a pale haze
that flattens the contrast). The tag labels are of CVAT type ``tag``.

``generate_skeletons`` makes a pose task: stick figures (a ``figure`` skeleton of 7 keypoints — head, neck, hip, both
hands, both feet; left limbs orange, right limbs cyan) in random poses, grey boards in front of some of them (a
keypoint behind a board is ``outside``: not visible), and ``marker`` points (small green diamonds, a CVAT ``points``
label of one point).

Frames are textured (smooth colour noise, stripes, grain) and stored as JPEG or PNG bytes in ``InMemoryFrames``,
so they go through the same decoders and formats as CVAT's frames. Objects may overlap (then the one below is
``occluded``); some frames are empty, as real tasks have negatives. Everything is a function of ``seed``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from preannotate.formats import masks
from preannotate.frames import InMemoryFrames
from preannotate.models.keypoints import skeleton_label
from preannotate.shapes import (
    AnnotationSet,
    AttributeSpec,
    FrameAnnotations,
    Label,
    Shape,
    Track,
    ellipse_polygon,
    rectangle_corners,
)

LABELS = (Label("box", "rectangle", id=1), Label("disc", "ellipse", id=2), Label("triangle", "polygon", id=3),
          Label("blob", "mask", id=4))
UNSEEN_LABELS = (Label("cross", "polygon"), Label("crescent", "polygon"), Label("arrow", "polygon"),
                 Label("bar", "polygon"))  # drawn only when named: never part of the default task
COLOURS = {"box": (215, 45, 40), "disc": (40, 85, 225), "triangle": (35, 185, 60), "blob": (240, 205, 30),
           "cross": (215, 45, 40), "crescent": (40, 85, 225), "arrow": (245, 130, 20), "bar": (150, 60, 200)}
BACKGROUNDS = ("muted", "checker", "foliage")
# Unlabelled look-alikes: the same outlines in colours no label has (they are negatives a detector must refuse).
DISTRACTOR_COLOURS = ((150, 95, 60), (130, 60, 150), (200, 140, 170), (95, 130, 125))
TAG_LABELS = (Label("day", "tag"), Label("night", "tag"), Label("fog", "tag"))
UNTAGGED_FRAMES = 0.05  # the share of frames nobody tagged (a classifier leaves them out)
# A set a small detector does not learn perfectly in a short run (mAP@.5 stays below 1): three labels, smaller
# objects, look-alike distractors, more lines, colours that vary more.
HARD = {"labels": ("box", "disc", "triangle"), "objects": (1, 4), "size": (0.1, 0.3), "distractors": (1, 3),
        "lines": (4, 10), "colour_jitter": 55}


@dataclass
class SyntheticTask:
    """What reading a CVAT task gives: the annotations of every frame and the frame images."""

    annotations: AnnotationSet
    images: InMemoryFrames


def generate(num_frames: int = 40, width: int = 160, height: int = 120, seed: int = 0,
             labels: tuple[str, ...] | None = None, objects: tuple[int, int] = (1, 3),
             size: tuple[float, float] = (0.2, 0.45), empty_fraction: float = 0.05,
             image_format: str = "JPEG", distractors: tuple[int, int] = (0, 0), lines: tuple[int, int] = (2, 5),
             colour_jitter: int = 25, tags: bool = False, background: str = "muted", turned: bool = False
             ) -> SyntheticTask:
    """``num_frames`` annotated frames of ``width × height`` with ``objects`` (min, max) objects each, sized
    ``size`` (a fraction of the shorter side), of the named ``labels`` (default: all four); ``distractors`` (min,
    max) unlabelled look-alikes under them, ``lines`` (min, max) grey lines in the background, object colours
    varying by ``colour_jitter`` per channel; ``tags``: a lighting tag per frame; ``background``: one of
    ``BACKGROUNDS`` (see the module docstring); ``turned``: long boxes and discs at any angle. ``HARD`` is a harder
    set than the defaults."""
    named = [label.name for label in LABELS] if labels is None else labels
    chosen = [label for label in (*LABELS, *UNSEEN_LABELS) if label.name in named]
    if not chosen:
        known = ", ".join(label.name for label in (*LABELS, *UNSEEN_LABELS))
        raise ValueError(f"no known labels among {labels}; known: {known}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, not {background!r}")
    task_labels = [Label(label.name, label.type, id=i)
                   for i, label in enumerate([*chosen, *(TAG_LABELS if tags else ())], start=1)]
    frames, files = {}, {}
    extension = "png" if image_format.upper() == "PNG" else "jpg"
    for number in range(num_frames):
        rng = np.random.default_rng([seed, number])
        count = 0 if rng.random() < empty_fraction else int(rng.integers(objects[0], objects[1] + 1))
        image, shapes = _frame(rng, width, height, [chosen[int(rng.integers(len(chosen)))] for _ in range(count)],
                               size, distractors, lines, colour_jitter, background, turned)
        for shape in shapes:
            shape.frame = number
        frames[number] = FrameAnnotations(number, width, height, name=f"frame_{number:06d}.{extension}",
                                          shapes=shapes)
        if tags:  # drawn from a generator of its own: the frames with tags are the frames without, lit
            image, frames[number].tags = _lighting(np.random.default_rng([seed, number, 1]), image)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"quality": 92} if extension == "jpg" else {}))
        files[number] = buffer.getvalue()
    return SyntheticTask(AnnotationSet(frames=frames, labels=task_labels), InMemoryFrames(files))


def generate_turned(num_frames: int = 40, width: int = 160, height: int = 120, seed: int = 0,
                   **options) -> SyntheticTask:
    """Frames of long boxes (rotated rectangles) and discs (ellipses), each turned at any angle, among look-alike
    distractors: the rotated-rectangle and ellipse task (``generate`` with ``turned=True``)."""
    settings = {"labels": ("box", "disc"), "objects": (1, 3), "size": (0.3, 0.55), "distractors": (0, 1),
                **options}
    return generate(num_frames, width, height, seed, turned=True, **settings)


def _lighting(rng: np.random.Generator, image: Image.Image) -> tuple[Image.Image, list[str]]:
    """The frame under a lighting drawn at random, and its tag (none for a few frames)."""
    tag = TAG_LABELS[int(rng.integers(len(TAG_LABELS)))].name
    array = np.asarray(image, dtype=np.float32)
    strength = rng.uniform(0.8, 1.2)
    if tag == "day":
        array = array * (1 + 0.3 * strength) + np.array([30, 20, 0]) * strength
    elif tag == "night":
        array = array * (0.35 / strength) + np.array([0, 5, 25])
    else:
        array = array * (0.45 / strength) + 150 * min(strength, 1.0)
    lit = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return lit, [] if rng.random() < UNTAGGED_FRAMES else [tag]


def _background(rng: np.random.Generator, width: int, height: int, lines: tuple[int, int] = (2, 5),
                style: str = "muted") -> np.ndarray:
    """Muted smooth colour noise with a few grey stripes and grain: texture the objects must be told from (or
    another ``style``: see the module docstring)."""
    if style == "checker":
        return _checker(rng, width, height)
    if style == "foliage":
        return _foliage(rng, width, height)
    coarse = rng.integers(60, 170, size=(4, 5, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
    grey = smooth.mean(axis=2, keepdims=True)
    array = 0.5 * smooth + 0.5 * grey  # desaturated, so object colours stand out without being trivial
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(lines[0], lines[1] + 1))):
        x1, y1, x2, y2 = (int(v) for v in rng.integers(0, [width, height, width, height]))
        tone = int(rng.integers(40, 200))
        draw.line([x1, y1, x2, y2], fill=(tone, tone, tone), width=int(rng.integers(1, 4)))
    grain = rng.normal(0, 6, size=(height, width, 3))
    return np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)


def _outline(rng: np.random.Generator, label: Label, cx: float, cy: float, radius: float, turned: bool = False
             ) -> tuple[list[float], Shape]:
    """A polygon to draw and the CVAT shape that annotates it (mask points are filled in after drawing);
    ``turned``: a long box or disc at any angle."""
    if turned and label.type in ("rectangle", "ellipse"):
        half_long = radius * rng.uniform(0.8, 1.0)
        half_short = half_long * rng.uniform(0.3, 0.55)
        rotation = round(float(rng.uniform(0, 180)), 2)
        if label.type == "rectangle":
            points = [cx - half_long, cy - half_short, cx + half_long, cy + half_short]
            return rectangle_corners(points, rotation), Shape(label.name, "rectangle", points, rotation=rotation)
        points = [cx, cy, cx + half_long, cy - half_short]
        return ellipse_polygon(points, rotation, 48), Shape(label.name, "ellipse", points, rotation=rotation)
    if label.name in _UNSEEN_OUTLINES:
        polygon = _UNSEEN_OUTLINES[label.name](rng, cx, cy, radius)
        return polygon, Shape(label.name, "polygon", [round(v, 2) for v in polygon])
    if label.type == "rectangle":
        half_w, half_h = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
        rotation = float(rng.choice([0.0, 0.0, 0.0, rng.uniform(-30, 30)]))
        points = [cx - half_w, cy - half_h, cx + half_w, cy + half_h]
        return rectangle_corners(points, rotation), Shape(label.name, "rectangle", points, rotation=rotation)
    if label.type == "ellipse":
        rx, ry = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
        points = [cx, cy, cx + rx, cy - ry]
        return ellipse_polygon(points, 0.0, 48), Shape(label.name, "ellipse", points)
    if label.type == "polygon":
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + k * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3) for k in range(3)]
        polygon = [v for a in angles for v in (cx + radius * math.cos(a), cy + radius * math.sin(a))]
        return polygon, Shape(label.name, "polygon", [round(v, 2) for v in polygon])
    corners = int(rng.integers(5, 8))  # a star: alternating outer and inner radii
    start = rng.uniform(0, 2 * math.pi)
    polygon = []
    for k in range(2 * corners):
        r = radius * (rng.uniform(0.85, 1.0) if k % 2 == 0 else rng.uniform(0.45, 0.6))
        a = start + k * math.pi / corners
        polygon += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return polygon, Shape(label.name, "mask", [])


def _turned(rng: np.random.Generator, cx: float, cy: float, radius: float, unit: list[tuple[float, float]],
            angle: float | None = None) -> list[float]:
    """``unit`` (an outline within the unit circle) scaled by ``radius``, turned by ``angle`` (random when None)
    about its centre and moved to ``(cx, cy)``: flat ``[x0, y0, x1, y1, ...]``."""
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    cos, sin = math.cos(angle), math.sin(angle)
    return [v for x, y in unit for v in (cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos))]


def _cross(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[float]:
    """A plus sign, arms a third of its width thick, turned up to 20 degrees."""
    t = rng.uniform(0.14, 0.2)  # half an arm's thickness
    arm = 0.7
    unit = [(-t, -arm), (t, -arm), (t, -t), (arm, -t), (arm, t), (t, t), (t, arm), (-t, arm), (-t, t), (-arm, t),
            (-arm, -t), (-t, -t)]
    return _turned(rng, cx, cy, radius, unit, math.radians(rng.uniform(-20, 20)))


def _crescent(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[float]:
    """A disc with a bite: the outer circle's arc, back along a smaller circle's arc inside it."""
    bite = rng.uniform(0.55, 0.75)  # how far the biting circle's centre sits from the disc's, in radii
    outer = [(0.8 * math.cos(a), 0.8 * math.sin(a)) for a in np.linspace(0.35 * math.pi, 1.65 * math.pi, 24)]
    inner = [(bite * 0.8 + 0.7 * math.cos(a), 0.7 * math.sin(a)) for a in np.linspace(1.3 * math.pi, 0.7 * math.pi, 16)]
    return _turned(rng, cx, cy, radius, outer + inner)


def _arrow(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[float]:
    """An arrow: a shaft and a head, pointing anywhere."""
    shaft = rng.uniform(0.12, 0.18)
    unit = [(-0.8, -shaft), (0.15, -shaft), (0.15, -0.45), (0.8, 0.0), (0.15, 0.45), (0.15, shaft), (-0.8, shaft)]
    return _turned(rng, cx, cy, radius, unit)


def _bar(rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[float]:
    """A long thin bar (a plank, a pole) at any angle."""
    half = rng.uniform(0.08, 0.14)
    return _turned(rng, cx, cy, radius, [(-0.9, -half), (0.9, -half), (0.9, half), (-0.9, half)])


_UNSEEN_OUTLINES = {"cross": _cross, "crescent": _crescent, "arrow": _arrow, "bar": _bar}


def _checker(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A black and white tiled floor, a little turned, with grain."""
    cell = rng.uniform(8, 16)
    angle = rng.uniform(-0.4, 0.4)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
    tiles = (np.floor(u / cell) + np.floor(v / cell)) % 2
    dark, light = rng.uniform(20, 50), rng.uniform(200, 235)
    array = (dark + (light - dark) * tiles)[..., None].repeat(3, axis=2)
    return np.clip(array + rng.normal(0, 6, size=array.shape), 0, 255).astype(np.uint8)


def _foliage(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Saturated leaves: fine green and brown colour noise over a smooth green, with grain."""
    coarse = rng.uniform(0, 1, size=(height // 4 + 1, width // 4 + 1))
    fine = np.asarray(Image.fromarray((255 * coarse).astype(np.uint8)).resize((width, height), Image.BILINEAR),
                      dtype=np.float32)[..., None] / 255
    leaf, earth = np.array([50, 140, 40]), np.array([110, 75, 35])
    array = earth + (leaf - earth) * fine * rng.uniform(0.8, 1.2)
    return np.clip(array + rng.normal(0, 8, size=array.shape), 0, 255).astype(np.uint8)


def _frame(rng: np.random.Generator, width: int, height: int, chosen: list[Label], size: tuple[float, float],
           distractors: tuple[int, int] = (0, 0), lines: tuple[int, int] = (2, 5), colour_jitter: int = 25,
           background: str = "muted", turned: bool = False) -> tuple[Image.Image, list[Shape]]:
    canvas = _background(rng, width, height, lines, background)
    placed: list[tuple[Shape, np.ndarray, tuple[float, float, float, float]]] = []
    side = min(width, height)
    if distractors[1]:
        kinds = [label for label in LABELS if label.type != "mask"]
        for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
            radius = side * rng.uniform(*size) / 2
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            polygon, _ = _outline(rng, kinds[int(rng.integers(len(kinds)))], cx, cy, radius)
            colour = np.array(DISTRACTOR_COLOURS[int(rng.integers(len(DISTRACTOR_COLOURS)))])
            canvas[masks.polygon_to_bitmap([polygon], width, height)] = np.clip(
                colour + rng.integers(-colour_jitter, colour_jitter + 1, 3), 0, 255).astype(np.uint8)
    for label in chosen:
        for _ in range(30):  # find a place that overlaps the objects already there by at most a third
            radius = side * rng.uniform(*size) / 2
            cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            polygon, shape = _outline(rng, label, cx, cy, radius, turned)
            box = (min(polygon[0::2]), min(polygon[1::2]), max(polygon[0::2]), max(polygon[1::2]))
            if all(_overlap(box, other) <= 1 / 3 for _, _, other in placed):
                break
        else:
            continue
        bitmap = masks.polygon_to_bitmap([polygon], width, height)
        colour = np.clip(np.array(COLOURS[label.name]) + rng.integers(-colour_jitter, colour_jitter + 1, 3), 0, 255)
        shading = rng.normal(0, 8, size=(int(bitmap.sum()), 1))
        canvas[bitmap] = np.clip(colour + shading, 0, 255).astype(np.uint8)
        for below, below_bitmap, _ in placed:  # what is drawn later covers what is below
            if (below_bitmap & bitmap).any():
                below.occluded = True
                below_bitmap &= ~bitmap
        placed.append((shape, bitmap, box))
    shapes = []
    for shape, visible, _ in placed:
        if shape.type == "mask":  # a painted mask holds the pixels one sees
            if not visible.any():
                continue
            shape.points = masks.bitmap_to_cvat_rle(visible)
        shapes.append(shape)
    return Image.fromarray(canvas), shapes


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over the smaller box: how much of one box the other hides."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


# ---------------------------------------------------------------------------------------------------------- skeletons

FIGURE_KEYPOINTS = ("head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot")
FIGURE_EDGES = ((0, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6))
# where CVAT's skeleton editor shows the figure's nodes (its 100×100 canvas)
FIGURE_LAYOUT = ((50, 10), (50, 30), (50, 60), (25, 45), (75, 45), (35, 95), (65, 95))
SKELETON_LABELS = (skeleton_label("figure", FIGURE_KEYPOINTS, FIGURE_EDGES, 1, FIGURE_LAYOUT),
                   Label("marker", "points", id=2))
LIMB_COLOURS = {"body": (235, 235, 235), "left": (250, 150, 30), "right": (40, 210, 230), "head": (245, 215, 60)}
MARKER_COLOUR = (40, 200, 70)
BOARD_TONES = (95, 150)  # the grey of the boards hiding parts of figures


def generate_skeletons(num_frames: int = 40, width: int = 160, height: int = 120, seed: int = 0,
                       figures: tuple[int, int] = (1, 2), markers: tuple[int, int] = (0, 2),
                       occluded_fraction: float = 0.5, size: tuple[float, float] = (0.55, 0.9),
                       image_format: str = "JPEG") -> SyntheticTask:
    """``num_frames`` frames of ``figures`` (min, max) stick figures ``size`` (a fraction of the frame's height)
    tall and ``markers`` (min, max) points; ``occluded_fraction`` of the figures have a grey board in front of
    a part of them, the keypoints behind it ``outside`` (see the module docstring)."""
    frames, files = {}, {}
    extension = "png" if image_format.upper() == "PNG" else "jpg"
    for number in range(num_frames):
        rng = np.random.default_rng([seed, number, 23])
        image = Image.fromarray(_background(rng, width, height))
        draw = ImageDraw.Draw(image)
        shapes = []
        for _ in range(int(rng.integers(figures[0], figures[1] + 1))):
            joints = _pose(rng, width, height, size)
            _draw_figure(draw, joints, height)
            hidden = np.zeros(len(joints), bool)
            if rng.random() < occluded_fraction:
                board = _board(rng, joints, width, height)
                tone = int(rng.integers(*BOARD_TONES))
                draw.rectangle(board, fill=(tone, tone, tone), outline=(60, 60, 60))
                x1, y1, x2, y2 = board
                hidden = (joints[:, 0] >= x1) & (joints[:, 0] <= x2) & (joints[:, 1] >= y1) & (joints[:, 1] <= y2)
            for shape in shapes:  # a board or a later figure hides what it covers of the figures drawn before
                shape.occluded = shape.occluded or bool(hidden.any())
            shapes.append(Shape("figure", "skeleton", [], frame=number, elements=[
                Shape(name, "points", [round(float(x), 2), round(float(y), 2)], frame=number, outside=bool(gone))
                for name, (x, y), gone in zip(FIGURE_KEYPOINTS, joints, hidden, strict=True)]))
        for _ in range(int(rng.integers(markers[0], markers[1] + 1))):
            x, y = rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height
            r = max(2.5, 0.03 * height)
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=MARKER_COLOUR, outline=(0, 0, 0))
            shapes.append(Shape("marker", "points", [round(x, 2), round(y, 2)], frame=number))
        frames[number] = FrameAnnotations(number, width, height, name=f"frame_{number:06d}.{extension}",
                                          shapes=shapes)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"quality": 92} if extension == "jpg" else {}))
        files[number] = buffer.getvalue()
    return SyntheticTask(AnnotationSet(frames=frames, labels=list(SKELETON_LABELS)), InMemoryFrames(files))


def _pose(rng: np.random.Generator, width: int, height: int, size: tuple[float, float]) -> np.ndarray:
    """A figure's 7 joints (``FIGURE_KEYPOINTS``), inside the frame: a torso leaning a little, arms and legs at
    random angles."""
    tall = height * rng.uniform(*size)
    torso, head, arm, leg = 0.32 * tall, 0.13 * tall, 0.3 * tall, 0.42 * tall
    lean = rng.uniform(-0.35, 0.35)
    hip = np.array([0.0, 0.0])
    neck = hip + torso * np.array([math.sin(lean), -math.cos(lean)])
    top = neck + head * np.array([math.sin(lean), -math.cos(lean)])
    limb = lambda start, length, angle: start + length * np.array([math.sin(angle), math.cos(angle)])  # noqa: E731
    joints = np.stack([top, neck, hip,
                       limb(neck, arm, rng.uniform(0.4, 2.6)), limb(neck, arm, -rng.uniform(0.4, 2.6)),
                       limb(hip, leg, rng.uniform(0.1, 0.7)), limb(hip, leg, -rng.uniform(0.1, 0.7))])
    low, high = joints.min(0), joints.max(0)
    margin = 0.06 * min(width, height)
    span = np.array([width, height]) - 2 * margin - (high - low)
    offset = margin - low + rng.uniform(0, 1, 2) * np.clip(span, 0, None)
    return joints + offset


def _draw_figure(draw: ImageDraw.ImageDraw, joints: np.ndarray, height: int) -> None:
    thick = max(2, int(0.035 * height))
    head, neck, hip, left_hand, right_hand, left_foot, right_foot = (tuple(float(v) for v in j) for j in joints)
    for (start, end), side in (((neck, hip), "body"), ((neck, left_hand), "left"), ((hip, left_foot), "left"),
                               ((neck, right_hand), "right"), ((hip, right_foot), "right")):
        draw.line([start, end], fill=LIMB_COLOURS[side], width=thick)
    r = max(3.0, float(np.hypot(*(joints[0] - joints[1]))) * 0.55)
    cx, cy = head
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=LIMB_COLOURS["head"], outline=(0, 0, 0))
    for x, y in (left_hand, right_hand, left_foot, right_foot):  # hands and feet: small dark knobs
        draw.ellipse([x - thick, y - thick, x + thick, y + thick], fill=(30, 30, 30))


def _board(rng: np.random.Generator, joints: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A grey board over one or two of the figure's joints (not all: some of it stays to be found)."""
    hidden = rng.choice(len(joints), size=int(rng.integers(1, 3)), replace=False)
    low, high = joints[hidden].min(0), joints[hidden].max(0)
    pad = 0.07 * min(width, height)
    x1, y1 = np.clip(low - pad * rng.uniform(0.5, 1.5, 2), 0, [width, height])
    x2, y2 = np.clip(high + pad * rng.uniform(0.5, 1.5, 2), 0, [width, height])
    return int(x1), int(y1), int(x2), int(y2)


# ---------------------------------------------------------------------------------------------------------- video

OUT_OF_VIEW = 0.1  # an object with less than this share of its area inside the frame is outside (nobody draws it)


@dataclass
class SyntheticVideo:
    """A synthetic clip and its truth. ``annotations``: the objects in view on each frame (``track_id`` the object,
    ``occluded`` where another covers part of it, ``z_order`` its depth); ``tracks``: the same truth as CVAT tracks
    (one per object, a keyframe on every frame it is in view, an ``outside`` keyframe on the first frame after it
    left); ``visibility``: ``(frame, object id)`` → the share of its pixels inside the frame that nothing covers (0:
    hidden behind others)."""

    annotations: AnnotationSet
    images: InMemoryFrames
    tracks: list[Track]
    visibility: dict[tuple[int, int], float]


def generate_video(num_frames: int = 120, width: int = 320, height: int = 240, seed: int = 0,
                   labels: tuple[str, ...] = ("box", "disc", "triangle"), objects: int = 6,
                   size: tuple[float, float] = (0.15, 0.3), speed: tuple[float, float] = (1.5, 3.5),
                   turn: float = 0.03, image_format: str = "JPEG", lines: tuple[int, int] = (2, 5),
                   colour_jitter: int = 25) -> SyntheticVideo:
    """``num_frames`` frames of ``objects`` objects of the named ``labels`` moving over a still textured background.

    Objects move in pairs that meet: both pass one point of the frame's middle at the same moment, on arcs (speed
    drawn from ``speed`` px a frame, heading turning by up to ``turn`` radians a frame), so paths curve and cross;
    the pair's front object (drawn later: the higher ``z_order``) is the larger, so it hides the other for a while.
    The arcs run on before and after the meeting, so objects enter and leave the frame. An odd object out moves on
    its own. Everything is a function of ``seed``."""
    chosen = [label for label in LABELS if label.name in labels]
    if not chosen:
        raise ValueError(f"no known labels among {labels}; known: {', '.join(label.name for label in LABELS)}")
    task_labels = [Label(label.name, label.type, id=i) for i, label in enumerate(chosen, start=1)]
    rng = np.random.default_rng([seed, 22])
    background = _background(rng, width, height, lines).astype(np.float32)
    side = min(width, height)
    movers = []
    for pair in range((objects + 1) // 2):
        meet = (rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height)
        when = rng.uniform(0.3, 0.7) * (num_frames - 1)
        heading = rng.uniform(0, 2 * math.pi)
        radius = side * rng.uniform(*size) / 2
        for member in range(2 if 2 * pair + 1 < objects else 1):
            label = chosen[int(rng.integers(len(chosen)))]
            outline, shape = _outline(rng, label, 0.0, 0.0, radius * (1.4 if member else 1.0))
            colour = np.clip(np.array(COLOURS[label.name]) + rng.integers(-colour_jitter, colour_jitter + 1, 3),
                             0, 255)
            movers.append({"id": len(movers) + 1, "label": label, "outline": outline, "shape": shape,
                           "colour": colour, "meet": meet, "when": when, "depth": 2 * pair + member,
                           "heading": heading + member * rng.uniform(math.pi / 3, 5 * math.pi / 3),
                           "speed": rng.uniform(*speed), "turn": rng.uniform(-turn, turn)})
    frames, files, visibility = {}, {}, {}
    seen: dict[int, list[Shape]] = {mover["id"]: [] for mover in movers}
    extension = "png" if image_format.upper() == "PNG" else "jpg"
    for number in range(num_frames):
        frame_rng = np.random.default_rng([seed, 22, number])
        canvas = np.clip(background + frame_rng.normal(0, 3, size=background.shape), 0, 255).astype(np.uint8)
        drawn: list[tuple[dict, np.ndarray, int]] = []
        for mover in sorted(movers, key=lambda m: m["depth"]):  # back to front
            dx, dy = _along_arc(mover, number)
            polygon = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(mover["outline"])]
            bitmap = masks.polygon_to_bitmap([polygon], width, height)
            in_view = int(bitmap.sum())
            if in_view < OUT_OF_VIEW * _polygon_area(polygon):
                continue
            shading = frame_rng.normal(0, 8, size=(in_view, 1))
            canvas[bitmap] = np.clip(mover["colour"] + shading, 0, 255).astype(np.uint8)
            for _, below, _ in drawn:  # what is drawn later covers what is below
                below &= ~bitmap
            drawn.append((mover, bitmap, in_view))
        shapes = []
        for mover, visible, in_view in drawn:
            share = float(visible.sum()) / in_view
            visibility[(number, mover["id"])] = share
            dx, dy = _along_arc(mover, number)
            shape = mover["shape"]
            points = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(shape.points)]
            if shape.type == "mask":  # a painted mask holds the pixels one sees
                if not visible.any():
                    continue
                points = masks.bitmap_to_cvat_rle(visible)
            shapes.append(Shape(shape.label, shape.type, [round(float(v), 2) for v in points], frame=number,
                                rotation=shape.rotation, occluded=share < 1.0, z_order=mover["depth"],
                                track_id=mover["id"]))
        for shape in shapes:
            seen[shape.track_id].append(shape)
        frames[number] = FrameAnnotations(number, width, height, name=f"frame_{number:06d}.{extension}",
                                          shapes=shapes)
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format=image_format, **({"quality": 92} if extension == "jpg" else {}))
        files[number] = buffer.getvalue()
    tracks = [Track(mover["label"].name, _truth_keyframes(seen[mover["id"]], num_frames), source="manual")
              for mover in movers if seen[mover["id"]]]
    return SyntheticVideo(AnnotationSet(frames=frames, labels=task_labels), InMemoryFrames(files), tracks,
                          visibility)


def _along_arc(mover: dict, frame: int) -> tuple[float, float]:
    """Where ``mover`` is on ``frame``: on its arc, at its meeting point at its meeting time."""
    elapsed, heading, turn = frame - mover["when"], mover["heading"], mover["turn"]
    if abs(turn) < 1e-9:
        step = mover["speed"] * elapsed
        return mover["meet"][0] + step * math.cos(heading), mover["meet"][1] + step * math.sin(heading)
    reach = mover["speed"] / turn
    return (mover["meet"][0] + reach * (math.sin(heading + turn * elapsed) - math.sin(heading)),
            mover["meet"][1] - reach * (math.cos(heading + turn * elapsed) - math.cos(heading)))


def _polygon_area(polygon: list[float]) -> float:
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _truth_keyframes(shapes: list[Shape], num_frames: int) -> list[Shape]:
    """An object's shapes in view, each a keyframe, and an outside keyframe on the first frame of each absence."""
    keyframes: list[Shape] = []
    for shape, after in zip(shapes, [*shapes[1:], None], strict=True):
        keyframes.append(shape)
        gone = shape.frame + 1
        if gone < num_frames and (after is None or after.frame > gone):
            keyframes.append(Shape(shape.label, shape.type, list(shape.points), frame=gone, rotation=shape.rotation,
                                   z_order=shape.z_order, track_id=shape.track_id, outside=True))
    return keyframes


# ----------------------------------------------------------------------------------------------------- attributes

ATTRIBUTE_COLOURS = {"red": (215, 45, 40), "green": (35, 170, 60), "blue": (40, 85, 225)}
ATTRIBUTE_SIZES = {"small": (0.14, 0.22), "large": (0.40, 0.52)}  # diameter, as a share of the frame's shorter side
ATTRIBUTE_SPECS = (
    AttributeSpec("colour", "select", tuple(ATTRIBUTE_COLOURS), default_value="red"),
    AttributeSpec("striped", "checkbox", ("false",), default_value="false"),
    AttributeSpec("size", "radio", tuple(ATTRIBUTE_SIZES), default_value="small"),
    AttributeSpec("note", "text", ()),  # a person's words: never learned, never filled
)
ATTRIBUTE_LABELS = (Label("box", "rectangle", ATTRIBUTE_SPECS, id=1), Label("disc", "ellipse", ATTRIBUTE_SPECS, id=2))


def generate_attributed(num_frames: int = 60, width: int = 160, height: int = 120, seed: int = 0,
                        objects: tuple[int, int] = (1, 3), image_format: str = "JPEG",
                        colour_jitter: int = 25, stripe_shade: float = 0.35) -> SyntheticTask:
    """Frames of boxes and discs whose attributes are what they look like (``ATTRIBUTE_LABELS``): ``colour`` (a
    select: red, green or blue), ``striped`` (a checkbox: dark bands across it), ``size`` (a radio: small or large,
    by the share of the frame it takes), each drawn at random, and ``note`` (a text: never set, as nothing in the
    picture tells it). Stripes darken the colour to ``stripe_shade`` of it (a shade near 1 is hard to see); colours
    vary by ``colour_jitter`` per channel. Everything else is as ``generate`` draws it; a function of ``seed``."""
    frames, files = {}, {}
    extension = "png" if image_format.upper() == "PNG" else "jpg"
    side = min(width, height)
    for number in range(num_frames):
        rng = np.random.default_rng([seed, number, 23])
        canvas = _background(rng, width, height)
        placed: list[tuple[Shape, np.ndarray, tuple[float, float, float, float]]] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            label = ATTRIBUTE_LABELS[int(rng.integers(len(ATTRIBUTE_LABELS)))]
            colour, size = (str(rng.choice(list(ATTRIBUTE_COLOURS))), str(rng.choice(list(ATTRIBUTE_SIZES))))
            striped = bool(rng.random() < 0.5)
            for _ in range(30):  # a place that overlaps the objects already there by at most a fifth
                radius = side * rng.uniform(*ATTRIBUTE_SIZES[size]) / 2
                cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
                polygon, shape = _outline(rng, label, cx, cy, radius)
                box = (min(polygon[0::2]), min(polygon[1::2]), max(polygon[0::2]), max(polygon[1::2]))
                if all(_overlap(box, other) <= 1 / 5 for _, _, other in placed):
                    break
            else:
                continue
            bitmap = masks.polygon_to_bitmap([polygon], width, height)
            paint = np.clip(np.array(ATTRIBUTE_COLOURS[colour]) + rng.integers(-colour_jitter, colour_jitter + 1, 3),
                            0, 255).astype(np.float32)
            pixels = np.broadcast_to(paint, (height, width, 3)).copy()
            if striped:  # dark bands, 3 of every 7 pixels, at any angle
                angle = rng.uniform(0, math.pi)
                y, x = np.mgrid[0:height, 0:width]
                bands = ((x * math.cos(angle) + y * math.sin(angle)) % 7) < 3
                pixels[bands] *= stripe_shade
            canvas[bitmap] = np.clip(pixels[bitmap] + rng.normal(0, 8, size=(int(bitmap.sum()), 1)), 0,
                                     255).astype(np.uint8)
            shape.attributes = {"colour": colour, "striped": "true" if striped else "false", "size": size}
            shape.frame = number
            for below, below_bitmap, _ in placed:
                if (below_bitmap & bitmap).any():
                    below.occluded = True
                    below_bitmap &= ~bitmap
            placed.append((shape, bitmap, box))
        frames[number] = FrameAnnotations(number, width, height, name=f"frame_{number:06d}.{extension}",
                                          shapes=[shape for shape, _, _ in placed])
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, format=image_format, **({"quality": 92} if extension == "jpg" else {}))
        files[number] = buffer.getvalue()
    return SyntheticTask(AnnotationSet(frames=frames, labels=list(ATTRIBUTE_LABELS)), InMemoryFrames(files))
