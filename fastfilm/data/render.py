"""A numpy ray caster for CLEVR scenes: ground plane, cubes, spheres and cylinders,
a z-buffer for occlusion, soft ground shadows, matte rubber and specular metal.

Every object is intersected analytically, vectorised over its screen bounding box, so the
cost is a few numpy calls per object plus a few per image (no per-pixel Python loops).
Two passes: `rasterize` (depth, object ids, normals; enough to count visible pixels and
reject a scene cheaply) then `shade` (colors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fastfilm.data.scene import COLORS, Camera, SceneSample

GROUND_GRAY = 0.62
AMBIENT = 0.32
SKY_GRAY = 0.82


@dataclass
class Raster:
    """Result of the geometry pass, at the render resolution H x W.

    rays: [H, W, 3] world ray directions (t = view depth); depth: [H, W] (inf where the
    ray misses everything); ids: [H, W] int16 index of the nearest object, -1 for ground
    or sky; normals: [H, W, 3] world unit normals where ids >= 0.
    """
    rays: np.ndarray
    depth: np.ndarray
    ids: np.ndarray
    normals: np.ndarray


def _boxes(cam: Camera, lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """Pixel bounds (y0, y1, x0, x1) of world boxes [N, 3] lo..hi, None where off screen."""
    signs = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.float64)
    corners = lo[:, None, :] + signs[None] * (hi - lo)[:, None, :]           # [N, 8, 3]
    p = cam.project(corners.reshape(-1, 3)).reshape(len(lo), 8, 3)
    out = []
    for q in p:
        if (q[:, 2] <= 0).any():
            out.append(None)
            continue
        x0, x1 = max(int(math.floor(q[:, 0].min())), 0), min(int(math.ceil(q[:, 0].max())) + 1, cam.width)
        y0, y1 = max(int(math.floor(q[:, 1].min())), 0), min(int(math.ceil(q[:, 1].max())) + 1, cam.height)
        out.append((y0, y1, x0, x1) if x0 < x1 and y0 < y1 else None)
    return out


# numpy reduces a trailing axis of length 3 slowly; these spell the three terms out.
def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _max3(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _min3(a: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(a[..., 0], a[..., 1]), a[..., 2])


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt(_dot(a, a))[..., None]


def _pow2k(x: np.ndarray, k: int) -> np.ndarray:
    """x ** (2 ** k) by k squarings (np.power with a large exponent is slow)."""
    for _ in range(k):
        x = x * x
    return x


def _sphere(o: np.ndarray, d: np.ndarray, r: float) -> np.ndarray:
    """Ray parameter t [h, w] (inf: miss) of rays o + t d (o: [3] relative to the center, d: [h, w, 3])."""
    a = _dot(d, d)
    b = 2.0 * (d @ o)
    disc = b * b - 4.0 * a * (float(o @ o) - r * r)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2.0 * a)
    return np.where(disc >= 0, t, np.inf)


def _cube(o: np.ndarray, d: np.ndarray, h: float) -> np.ndarray:
    """t [h, w] for a box of half-side h centered at the origin of the local frame (slab method)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-h - o) * inv
        t2 = (h - o) * inv
    tn = _max3(np.minimum(t1, t2))
    tf = _min3(np.maximum(t1, t2))
    return np.where((tn <= tf) & (tn > 0), tn, np.inf)


def _cube_normals(p: np.ndarray) -> np.ndarray:
    """Local unit normals [..., 3] at points p [..., 3] on the surface of a unit-half-side cube."""
    a = np.abs(p)
    n = np.where(a >= _max3(a)[..., None], np.sign(p), 0.0)
    # CLEVR's cube is bevelled: bend the normal towards the neighbouring face near an
    # edge, which draws the edges and makes the shape readable.
    edge = np.clip((a - 0.86) / 0.14, 0.0, 1.0) * np.sign(p)
    n = n + 0.8 * np.where(n != 0, 0.0, edge)
    return _unit(n)


def _cylinder(o: np.ndarray, d: np.ndarray, r: float) -> np.ndarray:
    """t [h, w] for a vertical cylinder of radius r and height 2r standing on z=0; o relative to its base center."""
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = dx * dx + dy * dy
    b = 2.0 * (o[0] * dx + o[1] * dy)
    disc = b * b - 4.0 * a * (o[0] ** 2 + o[1] ** 2 - r * r)
    with np.errstate(invalid="ignore", divide="ignore"):
        ts = (-b - np.sqrt(disc)) / (2.0 * a)
        zs = o[2] + ts * dz
        ts = np.where((disc >= 0) & (zs >= 0) & (zs <= 2 * r) & (ts > 0), ts, np.inf)
        tt = (2 * r - o[2]) / dz
    px, py = o[0] + tt * dx, o[1] + tt * dy
    tt = np.where((tt > 0) & (px * px + py * py <= r * r), tt, np.inf)
    return np.minimum(ts, tt)


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def rasterize(sample: SceneSample) -> Raster:
    """Depth, object ids and normals for every pixel (first of the two render passes)."""
    cam = sample.camera
    rays = cam.rays()
    origin = cam.location.astype(np.float32)
    with np.errstate(divide="ignore"):
        depth = np.where(rays[..., 2] < 0, -origin[2] / rays[..., 2], np.inf).astype(np.float32)
    ids = np.full(depth.shape, -1, dtype=np.int16)
    normals = np.zeros(rays.shape, dtype=np.float32)
    objects = sample.scene["objects"]
    centers = np.array([o["3d_coords"] for o in objects], dtype=np.float64).reshape(-1, 3)
    # A rotated cube reaches sqrt(2) half-sides from its center; everything stands on z = 0.
    reach = centers[:, 2] * np.array([math.sqrt(2) if o["shape"] == "cube" else 1.0 for o in objects])
    lo = np.stack([centers[:, 0] - reach, centers[:, 1] - reach, np.zeros(len(objects))], axis=1)
    hi = np.stack([centers[:, 0] + reach, centers[:, 1] + reach, 2 * centers[:, 2]], axis=1)
    for k, (obj, box) in enumerate(zip(objects, _boxes(cam, lo, hi))):
        if box is None:
            continue
        y0, y1, x0, x1 = box
        d = rays[y0:y1, x0:x1]
        center = centers[k].astype(np.float32)
        ext = float(center[2])
        if obj["shape"] == "cube":
            rot = _rot_z(obj["rotation"])
            o_local = (origin - center) @ rot  # row vector @ rot = rot.T @ v: world -> object
            d_local = d @ rot
            t = _cube(o_local, d_local, ext)
        elif obj["shape"] == "sphere":
            t = _sphere(origin - center, d, ext)
        else:
            base = center * np.array([1, 1, 0], dtype=np.float32)
            t = _cylinder(origin - base, d, ext)
        closer = t < depth[y0:y1, x0:x1]
        if not closer.any():
            continue
        # Normals over the whole box, then masked copies: cheaper than gathering the closer
        # pixels for the small boxes that dominate (the others get t = 0 and are not copied).
        with np.errstate(invalid="ignore"):
            tc = np.where(closer, t, 0.0)[..., None]
            if obj["shape"] == "cube":
                n = _cube_normals((o_local + tc * d_local) / ext) @ rot.T
            elif obj["shape"] == "sphere":
                n = (origin - center + tc * d) / ext
            else:
                p = origin - base + tc * d
                top = p[..., 2:3] >= 2 * ext * (1 - 1e-4)
                n = np.where(top, np.array([0.0, 0.0, 1.0], dtype=np.float32),
                             p * np.array([1, 1, 0], dtype=np.float32) / ext)
        np.copyto(depth[y0:y1, x0:x1], t, where=closer)
        np.copyto(ids[y0:y1, x0:x1], k, where=closer)
        np.copyto(normals[y0:y1, x0:x1], n, where=closer[..., None])
    return Raster(rays, depth, ids, normals)


def visible_pixels(raster: Raster, num_objects: int) -> np.ndarray:
    """[N] number of pixels where each object is the nearest surface."""
    return np.bincount(raster.ids[raster.ids >= 0].ravel(), minlength=num_objects)[:num_objects]


def _ground(sample: SceneSample, raster: Raster) -> np.ndarray:
    """[H, W] float32 gray level of the ground (and sky), with soft object shadows."""
    cam, lights = sample.camera, sample.lights
    origin = cam.location.astype(np.float32)
    hit = np.isfinite(raster.depth)
    t = np.where(hit, raster.depth, 0.0)
    gx = origin[0] + t * raster.rays[..., 0]
    gy = origin[1] + t * raster.rays[..., 1]
    # Light pools around the objects and fades with distance, as under CLEVR's area lights.
    light = GROUND_GRAY * (AMBIENT + 0.55 * lights.key[2] + 0.15 * lights.fill[2])
    gray = light * (0.72 + 0.38 * np.exp(-(gx * gx + gy * gy) / 60.0))
    objects = sample.scene["objects"]
    if objects:
        key = lights.key.astype(np.float64)
        c = np.array([o["3d_coords"] for o in objects], dtype=np.float64)
        # Ground point g is shadowed by object k when g + key * s_k (at the height of the
        # object's center) falls within ~its radius of the center: a soft disc shadow.
        s = c[:, 2] / key[2]
        shadow = c[:, :2] - key[None, :2] * s[:, None]
        reach = 1.25 * c[:, 2]
        lo = np.minimum(c[:, :2], shadow) - reach[:, None]
        hi = np.maximum(c[:, :2], shadow) + reach[:, None]
        zeros = np.zeros((len(objects), 1))
        dark = np.zeros_like(gray)
        for k, box in enumerate(_boxes(cam, np.hstack([lo, zeros]), np.hstack([hi, zeros]))):
            if box is None:
                continue
            y0, y1, x0, x1 = box
            qx = gx[y0:y1, x0:x1] + np.float32(key[0] * s[k] - c[k, 0])
            qy = gy[y0:y1, x0:x1] + np.float32(key[1] * s[k] - c[k, 1])
            soft = np.clip((reach[k] - np.sqrt(qx * qx + qy * qy)) / (0.45 * c[k, 2]), 0.0, 1.0)
            # Overlapping shadows do not add up (one light): keep the darkest.
            np.maximum(dark[y0:y1, x0:x1], soft, out=dark[y0:y1, x0:x1])
        gray *= 1.0 - 0.45 * dark
    return np.where(hit, gray, np.float32(SKY_GRAY)).astype(np.float32)


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    u = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def _environment(refl: np.ndarray, lights) -> np.ndarray:
    """[K] brightness that a mirror reflects along unit directions refl [K, 3]: a bright sky,
    a darker ground, and tall soft light panels in the key and fill directions (they draw
    the streaks along metal cylinders and the bright faces of metal cubes)."""
    rz = refl[:, 2]
    env = np.where(rz > 0, 1.1 + 0.2 * rz, GROUND_GRAY * (0.2 + 0.4 * (1.0 + rz)))
    flat = refl[:, :2] / np.maximum(np.sqrt(refl[:, 0] ** 2 + refl[:, 1] ** 2), 1e-6)[:, None]
    for light, strength in ((lights.key, 1.1), (lights.fill, 0.6)):
        lh = np.asarray(light[:2], dtype=np.float32) / np.float32(np.linalg.norm(light[:2]))
        panel = _smoothstep(0.88, 0.97, flat @ lh) * np.clip(1.0 - np.abs(rz - 0.15) / 0.75, 0.0, 1.0)
        env = env + strength * panel
    return env


def _shade_objects(objects: list[dict], ids: np.ndarray, n: np.ndarray, d: np.ndarray,
                   lights) -> np.ndarray:
    """Colors [K, 3] in [0, 1] of K object pixels: object ids [K], normals n [K, 3], rays d [K, 3]."""
    palette = np.array([COLORS[o["color"]] for o in objects], dtype=np.float32) / 255.0
    base = palette[ids]
    metal = np.array([o["material"] == "metal" for o in objects])[ids][:, None]
    d = _unit(d)
    key, fill, back = (np.asarray(v, dtype=np.float32) for v in (lights.key, lights.fill, lights.back))
    diffuse = (AMBIENT + 0.7 * np.maximum(n @ key, 0.0) + 0.25 * np.maximum(n @ fill, 0.0)
               + 0.2 * np.maximum(n @ back, 0.0))[:, None]
    refl = d - (2.0 * _dot(d, n))[:, None] * n
    highlight = np.maximum(refl @ key, 0.0)[:, None]
    # Rubber (matte): Lambert plus a faint, broad sheen.
    rubber = base * diffuse + 0.05 * _pow2k(highlight, 3)
    # Metal: little diffuse light, a tinted mirror image of the environment and a tight
    # white highlight from the key light.
    shiny = (base * (0.15 * diffuse) + (0.2 + 0.8 * base) * (0.75 * _environment(refl, lights))[:, None]
             + 1.5 * _pow2k(highlight, 7))
    return np.where(metal, shiny, rubber)


def shade(sample: SceneSample, raster: Raster) -> np.ndarray:
    """Second render pass: an RGBA image [H, W, 4] uint8 (alpha 255, as CLEVR's PNGs)."""
    h, w = raster.ids.shape
    rgba = np.empty((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = _to_uint8(_ground(sample, raster))[..., None]
    rgba[..., 3] = 255
    # Gather by flat index: boolean-mask indexing of [H, W, 3] arrays is several times slower.
    idx = np.flatnonzero(raster.ids >= 0)
    if idx.size:
        color = _shade_objects(sample.scene["objects"], raster.ids.reshape(-1)[idx],
                               np.take(raster.normals.reshape(-1, 3), idx, axis=0),
                               np.take(raster.rays.reshape(-1, 3), idx, axis=0), sample.lights)
        rgba.reshape(-1, 4)[idx, :3] = _to_uint8(color)
    return rgba


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def render(sample: SceneSample, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(RGBA image [H, W, 4] uint8, visible pixels per object [N]) at the camera's size.

    supersample=k renders k*k rays per pixel and averages them (anti-aliased edges, ~k*k
    the cost); visible pixels are then counted in output pixels.
    """
    cam = sample.camera
    if supersample > 1:
        sample = replace(sample, camera=replace(cam, width=cam.width * supersample, height=cam.height * supersample))
    raster = rasterize(sample)
    image = shade(sample, raster)
    visible = visible_pixels(raster, len(sample.scene["objects"]))
    if supersample > 1:
        k = supersample
        image = image.reshape(cam.height, k, cam.width, k, 4).mean(axis=(1, 3)).round().astype(np.uint8)
        visible = visible // (k * k)
    return image, visible
