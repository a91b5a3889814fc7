"""Label masks to polygons (with holes) in level-0 pixels, and polygons to QuPath features.

Frames
------
A label mask lives on a grid: mask pixel ``(i, j)`` is the square ``[j, j + 1] x [i, i + 1]`` in
mask coordinates (x right, y down), and covers level-0 ``x_l0 = origin_x + x * downsample_x``,
``y_l0 = origin_y + y * downsample_y``. Regions are traced exactly along pixel edges, so
touching regions of different labels share their boundary (no gaps, no overlaps) until they are
simplified.

How the tracing works (all vectorised with numpy, no per-pixel Python):

1. Boundary edges between pixels of different values are merged into maximal horizontal and
   vertical runs, directed so that the region lies on the right-hand side (y down).
2. Each run is linked to the run that starts where it ends (same label). Horizontal and vertical
   runs alternate along a ring. Where two pixels of a label touch only at a corner, the ring
   turns towards its own pixel, so regions are 4-connected (diagonal neighbours are separate
   polygons that touch at a point).
3. Pointer doubling over the horizontal runs (each followed by its vertical run) labels the
   rings and orders their runs; the shoelace sum gives each ring's area, positive for outer
   boundaries, negative for holes.
4. Holes are attached to their region via a 4-connected component labelling of the mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray
from shapely.geometry import MultiPolygon, Polygon

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.qupath.geojson import OBJECT_TYPES, geometry_feature

__all__ = ["clip_to_image", "mask_to_polygons", "polygons_to_features"]

_I64 = NDArray[np.int64]
_Geoms = NDArray[np.object_]


def _finite_pair(value: Any, name: str, *, positive: bool) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a pair of numbers (x, y), got {value!r}") from exc
    if not (math.isfinite(x) and math.isfinite(y)) or (positive and min(x, y) <= 0):
        kind = "positive finite" if positive else "finite"
        raise ConfigError(f"{name} must be two {kind} numbers (x, y), got {value!r}")
    return x, y


def _padded_labels(labels: Any) -> NDArray[np.integer[Any]]:
    """The mask with a ring of 0 around it, in the smallest unsigned dtype that holds it."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or arr.size == 0:
        raise ConfigError(f"labels must be a non-empty 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise ConfigError(f"labels must hold integers, got dtype {arr.dtype}; cast them first")
    top = int(arr.max())
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ConfigError("labels must be >= 0 (0 = nothing); found negative label values")
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)
    pad = np.zeros((arr.shape[0] + 2, arr.shape[1] + 2), dtype=dtype)
    pad[1:-1, 1:-1] = arr
    return pad


def _runs(
    before: NDArray[np.integer[Any]], after: NDArray[np.integer[Any]]
) -> tuple[tuple[_I64, _I64, _I64, _I64], tuple[_I64, _I64, _I64, _I64]]:
    """Maximal runs of boundary edges between consecutive lines of the padded mask.

    An edge at ``(line, pos)`` separates ``before[line, pos]`` from ``after[line, pos]``
    (arrays of shape (n_lines, n_pos)). Returns ``(line, first, last, label)`` (inclusive
    positions) for the runs owned by the pixels of ``after``, then for those of ``before``;
    a run is a maximal stretch of edges owned by pixels of one label.
    """
    diff = before != after
    out = []
    for which in (after, before):
        edge = np.where(diff, which, 0)
        nz = edge != 0
        start = nz.copy()
        start[:, 1:] &= edge[:, 1:] != edge[:, :-1]
        end = nz
        end[:, :-1] &= edge[:, :-1] != edge[:, 1:]
        line, first = np.nonzero(start)
        _, last = np.nonzero(end)
        lab = edge[line, first].astype(np.int64)
        out.append((line.astype(np.int64), first.astype(np.int64), last.astype(np.int64), lab))
    return out[0], out[1]


def _fill_starts(table: NDArray[np.int32], vertex: _I64, bit: _I64) -> None:
    """Set ``table[b, v]`` to the index of the run of direction ``b`` starting at vertex ``v``."""
    table[bit, vertex] = np.arange(vertex.size, dtype=np.int32)


def _link(end_vertex: _I64, prefer: _I64, table: NDArray[np.int32]) -> tuple[_I64, _I64]:
    """Index of the run that starts at each ``end_vertex``, and of the one not taken (or -1).

    ``table[bit]`` maps a vertex to the run of direction ``bit`` that starts there. Two
    candidates exist only at a saddle (pixels of one label touching at a corner); the preferred
    one, ``prefer``, a right turn around the incoming run's own pixel, keeps regions
    4-connected. That run is owned by the same pixel as the incoming run, and the only candidate
    elsewhere by a pixel of the same label, so labels need no check.
    """
    t0, t1 = table[0, end_vertex], table[1, end_vertex]
    first = np.where(prefer == 0, t0, t1)
    other = np.where(prefer == 0, t1, t0)
    out = np.where(first >= 0, first, other).astype(np.int64)
    if (out < 0).any():  # pragma: no cover - impossible for a closed boundary
        raise RuntimeError("internal error: an open boundary while tracing the label mask")
    return out, np.where(first >= 0, other, -1).astype(np.int64)


def _cycles(nxt: _I64) -> tuple[_I64, _I64]:
    """Ring (smallest member) and steps from each member forward to it, for a permutation.

    Pointer doubling: after ``k`` rounds ``root[i]`` is the smallest of the ``2**k`` members
    from ``i`` on and ``ahead[i]`` its distance from ``i``. When a member finds itself as the
    smallest of the next window while being the smallest of its own, the windows have wrapped
    around its ring, which is then complete: its members leave the active set, so short rings
    cost little.
    """
    n = nxt.size
    dtype = np.int32 if n < 2**30 else np.int64  # halves the memory traffic of the gathers
    root = np.arange(n, dtype=dtype)
    ahead = np.zeros(n, dtype=dtype)
    jump = nxt.astype(dtype)
    done = np.zeros(n, dtype=bool)
    active = np.arange(n, dtype=dtype)
    step = 1
    while active.size:
        j = jump[active]
        r_old, r_new = root[active], root[j]
        better = r_new < r_old
        done[active[(r_new == active) & (r_old == active)]] = True
        if not better.any():
            break
        new_r = np.where(better, r_new, r_old)
        new_ahead = np.where(better, ahead[j] + step, ahead[active])
        new_jump = jump[j]
        root[active] = new_r
        ahead[active] = new_ahead
        jump[active] = new_jump
        step *= 2
        active = active[~done[new_r]]
    return root.astype(np.int64), ahead.astype(np.int64)


def _polygonal_parts(geoms: _Geoms) -> tuple[_Geoms, _I64]:
    """Non-empty polygon parts of each geometry, with the index of the geometry each came from."""
    parts, index = shapely.get_parts(geoms, return_index=True)
    keep = (shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)
    return parts[keep], index[keep].astype(np.int64)


def _repair(geoms: _Geoms) -> _Geoms:
    """``geoms`` with invalid members replaced by ``shapely.make_valid`` (structure method)."""
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms = geoms.copy()
        geoms[bad] = shapely.make_valid(geoms[bad], method="structure", keep_collapsed=False)
    return geoms


def _clashes(polys: _Geoms, lab: _I64) -> tuple[_I64, _I64]:
    """Pairs ``i < j`` of same-label polygons whose interiors meet or that share a line."""
    i, j = shapely.STRtree(polys).query(polys)  # bounding boxes only
    keep = (i < j) & (lab[i] == lab[j])
    i, j = i[keep], j[keep]
    if i.size:
        a, b = polys[i], polys[j]
        bad = shapely.relate_pattern(a, b, "T********") | shapely.relate_pattern(a, b, "****1****")
        i, j = i[bad], j[bad]
    return i.astype(np.int64), j.astype(np.int64)


def _simplify(polys: _Geoms, lab: _I64, tolerance: float) -> _Geoms:
    """Simplify each polygon, preserving its topology and keeping same-label polygons apart.

    Plain Douglas-Peucker is an order of magnitude faster than GEOS' topology-preserving
    simplifier, so it is tried first, polygon by polygon. A polygon it makes invalid or whose
    holes it changes is simplified with the topology-preserving simplifier instead. Polygons
    of one label (``lab``) that would then overlap or share a line (near a corner where their
    pixels touch, or across a 1-pixel gap) are simplified again together, as one multipolygon,
    with the topology-preserving simplifier, which keeps them apart.
    """
    out: _Geoms = shapely.simplify(polys, tolerance, preserve_topology=False)
    same = (
        shapely.is_valid(out)
        & ~shapely.is_empty(out)
        & (shapely.get_type_id(out) == 3)
        & (shapely.get_num_interior_rings(out) == shapely.get_num_interior_rings(polys))
    )
    if not same.all():
        out[~same] = shapely.simplify(polys[~same], tolerance, preserve_topology=True)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = polys.size
    group = np.arange(n, dtype=np.int64)
    for _ in range(8):
        i, j = _clashes(out, lab)
        if i.size == 0:
            return out
        graph = coo_matrix((np.ones(i.size), (group[i], group[j])), shape=(n, n))
        _, merged = connected_components(graph, directed=False)
        group = merged[group].astype(np.int64)
        size = np.bincount(group, minlength=n)
        members = np.flatnonzero(size[group] > 1)
        members = members[np.argsort(group[members], kind="stable")]
        g = group[members]
        starts = np.r_[True, g[1:] != g[:-1]]
        joint = shapely.multipolygons(polys[members], indices=np.cumsum(starts) - 1)
        joint = shapely.simplify(joint, tolerance, preserve_topology=True)
        parts = shapely.get_parts(joint)
        if parts.size == members.size and (shapely.get_type_id(parts) == 3).all():
            out[members] = parts
        else:  # pragma: no cover - the simplifier keeps every part
            out[members] = polys[members]
    return _repair(out)  # pragma: no cover - reached only if the clashes never settle


def _trace(pad: NDArray[np.integer[Any]]) -> dict[str, Any]:
    """Directed boundary runs of every label of a padded mask, linked into rings.

    Returns arrays over runs (horizontal runs first): start ``x0, y0`` and end ``x1, y1``
    (padded mask coordinates), ``lab`` (label value), ``bit`` (direction: horizontal
    0 = +x, 1 = -x; vertical 0 = +y, 1 = -y), ``is_h``, ``ring`` (dense ring index), ``place``
    (0 at the ring's first run, then in order); and over rings: ``first`` (the ring's first
    run), ``length`` (runs), ``area`` (mask pixels^2; > 0 outer boundary, < 0 hole), ``touch``
    (the ring passes twice through a corner where its label's pixels touch diagonally, so it
    touches itself: such polygons need repair).
    """
    nx = pad.shape[1] + 1  # vertex grid is (H + 3) x (W + 3); vertex id = y * nx + x
    n_vertices = (pad.shape[0] + 1) * nx
    # horizontal runs on the line y = r + 1 between padded rows r and r + 1: the top edges of
    # the pixels below head +x, the bottom edges of the pixels above head -x
    (r, a, b, lab_px), (r2, a2, b2, lab_mx) = _runs(pad[:-1], pad[1:])
    # vertical runs on the line x = c + 1 (on the transposed mask): the left edges of the
    # pixels to the right head -y (up), the right edges of the pixels to the left head +y
    padt = np.ascontiguousarray(pad.T)
    (c, a3, b3, lab_up), (c2, a4, b4, lab_dn) = _runs(padt[:-1], padt[1:])
    del padt
    hx0 = np.concatenate([a, b2 + 1])
    hx1 = np.concatenate([b + 1, a2])
    hy = np.concatenate([r, r2]) + 1
    hbit = np.repeat(np.array([0, 1], dtype=np.int64), [a.size, a2.size])
    vx = np.concatenate([c2, c]) + 1
    vy0 = np.concatenate([a4, b3 + 1])
    vy1 = np.concatenate([b4 + 1, a3])
    vbit = np.repeat(np.array([0, 1], dtype=np.int64), [a4.size, a3.size])
    nh = hx0.size

    # H end -> V start, turning right (+x -> down, -x -> up); V end -> H start (down -> -x,
    # up -> +x)
    table = np.full((2, n_vertices), -1, dtype=np.int32)  # one allocation, used twice
    v_start = vy0 * nx + vx
    _fill_starts(table, v_start, vbit)
    h_next, h_other = _link(hy * nx + hx1, hbit, table)
    table[vbit, v_start] = -1
    _fill_starts(table, hy * nx + hx0, hbit)
    v_next, v_other = _link(vy1 * nx + vx, 1 - vbit, table)
    del table
    # horizontal and vertical runs alternate along a ring: find the rings of the horizontal
    # runs (h -> next h), then put each vertical run right after its horizontal predecessor
    root, ahead = _cycles(v_next[h_next])
    is_first = root == np.arange(nh)
    first = np.flatnonzero(is_first)
    h_ring = (np.cumsum(is_first) - 1)[root]
    h_len = np.bincount(h_ring)
    h_place = 2 * ((h_len[h_ring] - ahead) % h_len[h_ring])
    v_ring = np.empty_like(h_ring)
    v_ring[h_next] = h_ring
    v_place = np.empty_like(h_place)
    v_place[h_next] = h_place + 1
    ring = np.concatenate([h_ring, v_ring])
    place = np.concatenate([h_place, v_place])
    length = 2 * h_len
    # a ring that passes a saddle corner twice touches itself there
    h_touch = (h_other >= 0) & (v_ring[np.maximum(h_other, 0)] == h_ring)
    v_touch = (v_other >= 0) & (h_ring[np.maximum(v_other, 0)] == v_ring)
    touch = np.bincount(ring, weights=np.concatenate([h_touch, v_touch]), minlength=h_len.size) > 0
    n = ring.size
    x0 = np.concatenate([hx0, vx])
    y0 = np.concatenate([hy, vy0])
    x1 = np.concatenate([hx1, vx])
    y1 = np.concatenate([hy, vy1])
    area = np.bincount(ring, weights=(x0 * y1 - x1 * y0).astype(np.float64)) / 2.0
    return {
        "x0": x0,
        "y0": y0,
        "lab": np.concatenate([lab_px, lab_mx, lab_dn, lab_up]),
        "bit": np.concatenate([hbit, vbit]),
        "is_h": np.arange(n) < nh,
        "ring": ring,
        "place": place,
        "touch": touch,
        "first": first,
        "length": length,
        "area": area,
    }


def _ring_components(pad: NDArray[np.integer[Any]], t: Mapping[str, Any]) -> _I64:
    """4-connected component (of equal labels) that each ring bounds, as a pixel-label id.

    The component is looked up at the pixel on the right-hand side of the ring's first run.
    """
    from skimage.measure import label

    f = t["first"]
    x0, y0, bit, is_h = t["x0"][f], t["y0"][f], t["bit"][f], t["is_h"][f]
    pix_i = np.where(bit == 0, y0, y0 - 1)
    pix_j = np.where(is_h, np.where(bit == 0, x0, x0 - 1), np.where(bit == 0, x0 - 1, x0))
    comp = label(pad, background=0, connectivity=1)
    return np.asarray(comp[pix_i, pix_j], dtype=np.int64)


def clip_to_image(
    regions: Mapping[int, MultiPolygon], width_l0: float, height_l0: float
) -> dict[int, MultiPolygon]:
    """``regions`` cut to the image ``[0, width_l0] x [0, height_l0]``: a mask grid whose last
    pixels reach past the image's edge gives polygons that do too, which QuPath objects must
    not. Labels left with no area are dropped."""
    frame = shapely.box(0.0, 0.0, float(width_l0), float(height_l0))
    out: dict[int, MultiPolygon] = {}
    for label, mp in regions.items():
        if frame.contains(mp):
            out[label] = mp
            continue
        cut = mp.intersection(frame)
        parts = [g for g in getattr(cut, "geoms", [cut]) if isinstance(g, Polygon) and g.area > 0]
        if parts:
            out[label] = MultiPolygon(parts)
    return out


def mask_to_polygons(
    labels: NDArray[np.integer[Any]],
    *,
    downsample: tuple[float, float],
    origin_l0: tuple[float, float] = (0.0, 0.0),
    simplify_px: float = 1.0,
    min_area_um2: float = 0.0,
    mpp: float | None = None,
) -> dict[int, MultiPolygon]:
    """Trace every label of a mask into polygons with holes, in level-0 pixels.

    Parameters
    ----------
    labels
        (H, W) integer label mask on a grid; 0 = nothing. Pixel ``(i, j)`` is the square
        ``[j, j + 1] x [i, i + 1]`` in mask coordinates.
    downsample
        ``(x, y)`` level-0 pixels per mask pixel.
    origin_l0
        Level-0 ``(x, y)`` of the mask's top-left corner: ``x_l0 = origin_x + x * downsample_x``.
    simplify_px
        Douglas-Peucker tolerance in *mask* pixels, topology preserving: each polygon keeps its
        holes and stays valid, and a label's polygons do not overlap. 0 keeps the exact
        pixel-edge boundary (shared exactly by touching regions of different labels).
    min_area_um2
        Holes smaller than this are filled, then regions smaller than this (after filling) are
        dropped; areas are exact pixel areas, measured before simplification. A region of
        another label inside a filled hole is itself smaller than the hole, so it is dropped too.
    mpp
        Level-0 micrometres per pixel; required when ``min_area_um2 > 0``.

    Returns
    -------
    dict of int to MultiPolygon
        Label value -> its valid region in level-0 pixels (x_l0, y_l0), one polygon per
        4-connected component (pixels touching only at a corner are separate polygons that
        touch at a point), ordered by their first pixel in raster order. Labels with no
        remaining region are omitted.

    Raises
    ------
    ConfigError
        A non-2-D, non-integer or negative mask, a non-positive downsample, a negative tolerance
        or minimum area, or ``min_area_um2 > 0`` without ``mpp``.

    Notes
    -----
    Memory is about 10 bytes per mask pixel plus about 100 bytes per boundary corner. A
    4000 x 4000 mask of 10 labels with about 6,000 components traces in 2-3 s on one CPU core.
    """
    pad = _padded_labels(labels)
    dsx, dsy = _finite_pair(downsample, "downsample", positive=True)
    ox, oy = _finite_pair(origin_l0, "origin_l0", positive=False)
    simplify = float(simplify_px)
    if not math.isfinite(simplify) or simplify < 0:
        raise ConfigError(f"simplify_px must be a finite number >= 0, got {simplify_px!r}")
    min_area = float(min_area_um2)
    if not math.isfinite(min_area) or min_area < 0:
        raise ConfigError(f"min_area_um2 must be a finite number >= 0, got {min_area_um2!r}")
    if min_area > 0 and mpp is None:
        raise ConfigError("min_area_um2 > 0 needs the pixel size: pass mpp (um/px at level 0)")
    min_area_px = 0.0
    if mpp is not None:
        mpp_v = validate_mpp(mpp, source="mask_to_polygons")
        min_area_px = min_area / (mpp_v * mpp_v * dsx * dsy)
    if not pad.any():
        return {}

    t = _trace(pad)
    ring_area = t["area"]
    is_hole = ring_area < 0
    keep = ~is_hole | (-ring_area >= min_area_px)
    if (is_hole & keep).any():
        comp = _ring_components(pad, t)
    else:  # every ring is the outer boundary of its own component
        comp = np.arange(ring_area.size, dtype=np.int64)
    del pad
    # a component's area once its small holes are filled
    _, comp_of_ring = np.unique(comp, return_inverse=True)
    comp_area = np.bincount(comp_of_ring, weights=np.where(keep, ring_area, 0.0))
    keep &= comp_area[comp_of_ring] >= max(min_area_px, 0.5)
    if not keep.any():
        return {}

    # rings ordered by label, component, outer boundary first; runs by their place on the ring
    ring_lab = t["lab"][t["first"]]
    kept = np.flatnonzero(keep)
    order = kept[np.lexsort((is_hole[kept], comp_of_ring[kept], ring_lab[kept]))]
    length = t["length"][order]
    offset = np.full(ring_area.size, -1, dtype=np.int64)
    offset[order] = np.cumsum(length) - length
    seg_offset = offset[t["ring"]]
    seg = np.flatnonzero(seg_offset >= 0)
    coords = np.empty((int(length.sum()), 2), dtype=np.float64)
    pos = seg_offset[seg] + t["place"][seg]
    coords[pos, 0] = t["x0"][seg] - 1.0  # padded -> mask coordinates
    coords[pos, 1] = t["y0"][seg] - 1.0
    scale = np.array([dsx, dsy])
    shift = np.array([ox, oy])
    if simplify == 0:  # to level 0 now; else after simplifying in mask pixels
        coords = coords * scale + shift
    rings = shapely.linearrings(coords, indices=np.repeat(np.arange(order.size), length))

    comp_sorted = comp_of_ring[order]
    new_poly = np.r_[True, comp_sorted[1:] != comp_sorted[:-1]]
    polys = shapely.polygons(rings, indices=np.cumsum(new_poly) - 1)
    poly_lab = ring_lab[order][new_poly]
    # a ring that passes a corner twice (its pixels touch diagonally) touches itself: repair
    poly_saddle = np.bincount(np.cumsum(new_poly) - 1, weights=t["touch"][order]) > 0
    if poly_saddle.any():
        polys[poly_saddle] = _repair(polys[poly_saddle])
        polys, src = _polygonal_parts(polys)
        poly_lab = poly_lab[src]
    if simplify > 0:
        polys = _simplify(polys, poly_lab, simplify)
        polys = shapely.transform(polys, lambda xy: xy * scale + shift)
    new_lab = np.r_[True, poly_lab[1:] != poly_lab[:-1]]
    regions = shapely.multipolygons(polys, indices=np.cumsum(new_lab) - 1)
    return {
        int(value): geom
        for value, geom in zip(poly_lab[new_lab].tolist(), regions.tolist(), strict=True)
    }


def polygons_to_features(
    regions: Mapping[int, MultiPolygon],
    *,
    classes: Sequence[str],
    colors: Mapping[str, tuple[int, int, int]],
    object_type: str = "annotation",
    measurements: Mapping[int, Mapping[str, float]] | None = None,
    mpp: float | None = None,
) -> list[dict[str, Any]]:
    """One QuPath GeoJSON Feature per connected polygon of each labelled region.

    Parameters
    ----------
    regions
        Label value ``k`` -> its region in level-0 pixels (as :func:`mask_to_polygons` returns).
    classes
        Class names; label ``k`` is ``classes[k - 1]``.
    colors
        Class name -> ``(r, g, b)``; a class missing here gets
        :func:`simsearch_wsi.qupath.geojson.class_color`.
    object_type
        QuPath object type of every feature (``"annotation"``, ``"detection"``, ...).
    measurements
        Label value -> extra measurements copied onto every polygon of that label.
    mpp
        Level-0 micrometres per pixel; when given, each feature gets ``area_um2``.

    Returns
    -------
    list of dict
        Features (built with :func:`simsearch_wsi.qupath.geojson.geometry_feature`, each with a
        new UUID) with measurements ``area_px`` (level-0 pixels^2), ``area_um2`` (with ``mpp``)
        and the given per-label ones; ordered by label, then polygon. Wrap them with
        :func:`~simsearch_wsi.qupath.geojson.feature_collection`; the collection passes
        :func:`~simsearch_wsi.qupath.geojson.validate_feature_collection`.

    Raises
    ------
    ConfigError
        A label without a class, an empty class name, an unknown object type, a bad colour or
        measurement, or an implausible ``mpp``.
    """
    if object_type not in OBJECT_TYPES:
        raise ConfigError(
            f"object_type {object_type!r} is not one QuPath imports; use one of "
            f"{', '.join(OBJECT_TYPES)}"
        )
    mpp_v = None if mpp is None else validate_mpp(mpp, source="polygons_to_features")
    names = list(classes)
    features: list[dict[str, Any]] = []
    for value in sorted(regions):
        if not 1 <= int(value) <= len(names):
            raise ConfigError(
                f"label {value} has no class: {len(names)} class names cover labels 1..{len(names)}"
            )
        name = names[int(value) - 1]
        extra = dict((measurements or {}).get(value, {}))
        for poly in _feature_polygons(regions[value]):
            meas: dict[str, float] = {"area_px": float(poly.area)}
            if mpp_v is not None:
                meas["area_um2"] = float(poly.area) * mpp_v * mpp_v
            meas.update(extra)
            features.append(
                geometry_feature(
                    poly,
                    class_name=name,
                    object_type=object_type,
                    measurements=meas,
                    color=colors.get(name),
                )
            )
    return features


def _feature_polygons(region: Any) -> list[Polygon]:
    """Polygons of a region, rounded to the 0.01 px QuPath files keep and repaired if needed."""
    parts, _ = _polygonal_parts(np.array([region], dtype=object))
    rounded = shapely.transform(parts, lambda xy: np.round(xy, 2))
    rounded = _repair(rounded)
    out, _ = _polygonal_parts(rounded)
    return [p for p in out.tolist() if p.area > 0]
