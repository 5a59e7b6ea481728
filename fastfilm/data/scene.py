"""CLEVR scenes: objects, camera and spatial relationships, sampled the way CLEVR's
render_images.py does it (same properties, placement rules and relationship definition),
with numpy instead of Blender.

A scene is CLEVR's dict: `objects` (shape, color, material, size, 3d_coords, rotation,
pixel_coords), `directions` and `relationships`, where `relationships[rel][i]` lists the
objects that are `rel` of object i ("j in relationships['left'][i]": j is left of i).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

# CLEVR's image_generation/data/properties.json.
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder")
MATERIALS: tuple[str, ...] = ("rubber", "metal")
SIZES: dict[str, float] = {"large": 0.7, "small": 0.35}
RELATIONS: tuple[str, ...] = ("left", "right", "behind", "front")

# CLEVR-CoGenT: condition A restricts cubes and cylinders to complementary palettes,
# condition B swaps them; spheres take any color in both.
_PALETTE_1 = ("gray", "blue", "brown", "yellow")
_PALETTE_2 = ("red", "green", "purple", "cyan")
COGENT: dict[str, dict[str, tuple[str, ...]]] = {
    "A": {"cube": _PALETTE_1, "sphere": tuple(COLORS), "cylinder": _PALETTE_2},
    "B": {"cube": _PALETTE_2, "sphere": tuple(COLORS), "cylinder": _PALETTE_1},
}

# Blender's default camera, which CLEVR's base_scene.blend keeps (35 mm lens, 32 mm sensor).
CAMERA_LOCATION = (7.3589, -6.9258, 4.9583)
CAMERA_EULER_DEG = (63.559, 0.620, 46.692)
LENS_MM, SENSOR_MM = 35.0, 32.0
# render_images.py defaults.
CAMERA_JITTER = 0.5   # each camera coordinate moves by up to this much
LIGHT_JITTER_DEG = 8.0
PLACE_RANGE = 3.0     # object centers are uniform in [-3, 3]^2
MIN_DIST = 0.25       # free space between object footprints
MARGIN = 0.4          # min |offset| along left/right/front/behind between any two objects
RELATION_EPS = 0.2    # compute_all_relationships' threshold (< MARGIN, so never ambiguous)
# Placement candidates per object before the whole layout restarts. CLEVR tries 50, one
# by one; checking them all at once is cheap, and more of them spares most restarts of
# 8-10 object layouts (each object is still uniform over the positions left to it).
MAX_TRIES = 400
TRY_BATCH = 50


@dataclass(frozen=True)
class Camera:
    """Pinhole camera. `rotation` columns are the camera's right, up and back axes in
    world coordinates (the camera looks along -back)."""
    location: np.ndarray  # [3]
    rotation: np.ndarray  # [3, 3]
    width: int
    height: int
    zoom: float = 1.0  # focal length multiplier (1: CLEVR's 35 mm lens)

    @property
    def focal_px(self) -> float:
        # Blender's AUTO sensor fit: the sensor spans the larger image side.
        return max(self.width, self.height) * LENS_MM / SENSOR_MM * self.zoom

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points [N, 3] -> [N, 3] of (x pixel, y pixel from the top, depth along the view)."""
        p = (np.asarray(points, dtype=np.float64) - self.location) @ self.rotation
        depth = -p[:, 2]
        f = self.focal_px
        u = self.width / 2 + f * p[:, 0] / depth
        v = self.height / 2 - f * p[:, 1] / depth
        return np.stack([u, v, depth], axis=1)

    def rays(self) -> np.ndarray:
        """World-space ray directions through pixel centers: [H, W, 3] float32 (read-only),
        scaled so that the ray parameter t equals the depth along the view axis."""
        # The camera only moves (jitter), it never turns: rays are shared by every image.
        return _rays(self.width, self.height, self.focal_px, np.asarray(self.rotation, dtype=np.float64).tobytes())


@functools.lru_cache(maxsize=8)
def _rays(width: int, height: int, focal_px: float, rotation: bytes) -> np.ndarray:
    rot = np.frombuffer(rotation, dtype=np.float64).reshape(3, 3)
    xs = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) / focal_px
    ys = -(np.arange(height, dtype=np.float32) + 0.5 - height / 2) / focal_px
    right, up, back = (rot[:, k].astype(np.float32) for k in range(3))
    rays = xs[None, :, None] * right + (ys[:, None, None] * up - back)  # one [H, W, 3] pass
    rays.setflags(write=False)
    return rays


@dataclass(frozen=True)
class Lights:
    """Unit vectors pointing from the scene towards each light."""
    key: np.ndarray   # [3]
    fill: np.ndarray  # [3]
    back: np.ndarray  # [3]


@dataclass(frozen=True)
class SceneSample:
    """A sampled scene: CLEVR's scene dict (without image fields) plus what renders it."""
    scene: dict
    camera: Camera
    lights: Lights


def camera_rotation() -> np.ndarray:
    """[3, 3] rotation of CLEVR's camera (Blender XYZ Euler: R = Rz @ Ry @ Rx)."""
    a, b, c = (math.radians(v) for v in CAMERA_EULER_DEG)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def directions_of(rotation: np.ndarray) -> dict[str, list[float]]:
    """CLEVR's six directions: the camera's behind/left axes projected on the ground plane
    (z = 0) and the plane's up axis, as 3-lists."""
    def planar(v: np.ndarray) -> np.ndarray:
        v = np.array([v[0], v[1], 0.0])
        return v / np.linalg.norm(v)

    behind = planar(-rotation[:, 2])
    left = planar(-rotation[:, 0])
    up = np.array([0.0, 0.0, 1.0])
    named = {"behind": behind, "front": -behind, "left": left, "right": -left, "above": up, "below": -up}
    return {k: [float(x) + 0.0 for x in v] for k, v in named.items()}  # + 0.0 turns -0.0 into 0.0


def compute_relationships(objects: list[dict], directions: dict, eps: float = RELATION_EPS) -> dict[str, list[list[int]]]:
    """relationships[rel][i] = sorted indices j != i with (coords_j - coords_i) . dir_rel > eps."""
    coords = np.array([o["3d_coords"] for o in objects], dtype=np.float64).reshape(-1, 3)
    out = {}
    for rel in RELATIONS:
        d = np.asarray(directions[rel], dtype=np.float64)
        dots = (coords[None, :, :] - coords[:, None, :]) @ d  # [i, j]
        out[rel] = [[j for j in range(len(objects)) if j != i and dots[i, j] > eps] for i in range(len(objects))]
    return out


def sample_lights(rng: np.random.Generator) -> Lights:
    """Key light from the camera's right, fill from its left, back light behind, each jittered."""
    def toward(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
        az, el = (math.radians(v + rng.uniform(-LIGHT_JITTER_DEG, LIGHT_JITTER_DEG))
                  for v in (azimuth_deg, elevation_deg))
        return np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])

    # World azimuths: the camera sits at ~ -43 degrees seen from the origin and its right
    # axis points to ~ +47, so the key light is front-right, the fill light front-left.
    return Lights(key=toward(-10.0, 50.0), fill=toward(-105.0, 35.0), back=toward(137.0, 55.0))


def _place(rng: np.random.Generator, radii: list[float], directions: dict,
           place_range: float = PLACE_RANGE) -> np.ndarray | None:
    """Centers [N, 2] obeying CLEVR's MIN_DIST and MARGIN rules, or None if a layout got stuck."""
    axes = [directions["left"][:2], directions["behind"][:2]]
    xs, ys = np.empty(len(radii)), np.empty(len(radii))
    for k, r in enumerate(radii):
        for _ in range(MAX_TRIES // TRY_BATCH):
            cx, cy = rng.uniform(-place_range, place_range, size=(2, TRY_BATCH))
            dx, dy = cx[:, None] - xs[None, :k], cy[:, None] - ys[None, :k]  # [T, k]
            ok = (np.sqrt(dx * dx + dy * dy) - r - np.asarray(radii[:k]) >= MIN_DIST).all(axis=1)
            for ax, ay in axes:
                # |margin| < MARGIN (other than exactly 0) makes a relation ambiguous.
                m = np.abs(dx * ax + dy * ay)
                ok &= ((m >= MARGIN) | (m == 0)).all(axis=1)
            good = np.flatnonzero(ok)
            if good.size:
                xs[k], ys[k] = cx[good[0]], cy[good[0]]
                break
        else:
            return None
    return np.stack([xs, ys], axis=1)


def sample_scene(rng: np.random.Generator, num_objects: int, width: int, height: int,
                 cogent: str = "", zoom: float = 1.0) -> SceneSample:
    """A random scene of `num_objects` objects seen by a jittered CLEVR camera.

    zoom > 1 narrows the field of view and the placement area by the same factor, so
    objects appear `zoom` times larger and still fit the frame (small images need it).
    """
    rotation = camera_rotation()
    camera = Camera(np.asarray(CAMERA_LOCATION) + rng.uniform(-CAMERA_JITTER, CAMERA_JITTER, 3),
                    rotation, width, height, zoom)
    lights = sample_lights(rng)
    directions = directions_of(rotation)
    size_names = list(SIZES)
    while True:
        sizes = [size_names[i] for i in rng.integers(0, len(size_names), num_objects)]
        centers = _place(rng, [SIZES[s] for s in sizes], directions, PLACE_RANGE / zoom)
        if centers is not None:
            break
    objects = []
    for (x, y), size in zip(centers, sizes):
        shape = SHAPES[rng.integers(len(SHAPES))]
        palette = COGENT[cogent][shape] if cogent else tuple(COLORS)
        color = palette[rng.integers(len(palette))]
        r = SIZES[size] / math.sqrt(2) if shape == "cube" else SIZES[size]  # CLEVR shrinks cubes
        objects.append({
            "shape": shape, "color": color, "material": MATERIALS[rng.integers(len(MATERIALS))],
            "size": size, "3d_coords": [float(x), float(y), float(r)],
            "rotation": float(rng.uniform(0.0, 360.0)),
        })
    pix = camera.project(np.array([o["3d_coords"] for o in objects]))
    for o, (u, v, depth) in zip(objects, pix):
        o["pixel_coords"] = [int(round(u)), int(round(v)), float(depth)]
    scene = {"objects": objects, "relationships": compute_relationships(objects, directions),
             "directions": directions}
    return SceneSample(scene, camera, lights)
