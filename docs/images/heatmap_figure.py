"""Makes docs/images/heatmap_overlay.png: `suggest --heatmap` on a synthetic slide, each class's
heat map drawn over the slide the way the QuPath panel draws it (scaled by the heat map's
downsample from the level-0 origin; blue to red from the floor to 1, transparent below it), with
the class's true objects outlined (white) and its prototype (black).

    PYTHONPATH=. python docs/images/heatmap_figure.py [OUT_DIR]

Random trunk weights (no download), so the maps show alignment, not the trained model's quality.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from simsearch_wsi.cli.main import main
from simsearch_wsi.io import open_image
from simsearch_wsi.synthetic import make_synthetic_slide

torch.set_num_threads(1)

FLOOR = 0.2


def colour(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8: the panel's colours (blue, cyan, yellow, red; alpha 160)."""
    s = grey / 255.0
    t = np.clip((s - FLOOR) / (1 - FLOOR), 0, 1) * 3
    stops = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], dtype=float)
    i = np.minimum(np.floor(t).astype(int), 2)
    f = (t - i)[..., None]
    rgb = stops[i] + f * (stops[i + 1] - stops[i])
    a = np.where((alpha > 0) & (s >= FLOOR), 160, 0)
    return np.dstack([np.rint(rgb), a]).astype(np.uint8)


def run(out_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slide = make_synthetic_slide(root / "s.tiff", width=1024, height=768, n_per_class=3)
        features, seen = [], set()
        for f in slide.to_geojson()["features"]:
            name = f["properties"]["classification"]["name"]
            if name not in seen:
                seen.add(name)
                features.append(f)
        protos = root / "protos.geojson"
        protos.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        summary_file = root / "summary.json"
        args = ["suggest", str(slide.path), "--annotations", str(protos), "--out"]
        args += [str(root / "s.geojson"), "--heatmap", str(root / "heat.png"), "--json"]
        args += ["--weights", "random", "--cache", str(root / "cache"), "--tile-size", "512"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(args) == 0
        summary = json.loads(buf.getvalue())
        summary_file.write_text(json.dumps(summary))
        meta = summary["heatmap"]
        d = meta["downsample"]
        with open_image(slide.path) as img:
            rgb = img.read_region((0, 0), 0, (slide.width, slide.height))
        panels = []
        for name, path in meta["files"].items():
            la = np.asarray(Image.open(path))
            over = Image.fromarray(colour(la[..., 0].astype(float), la[..., 1]), "RGBA")
            over = over.resize((round(over.width * d), round(over.height * d)), Image.NEAREST)
            base = Image.fromarray(np.asarray(rgb)[..., :3]).convert("RGBA")
            base.alpha_composite(over.crop((0, 0, slide.width, slide.height)))
            draw = ImageDraw.Draw(base)
            for o in slide.objects_of(name):
                draw.rectangle(
                    [o.x_l0, o.y_l0, o.x_l0 + o.width_l0, o.y_l0 + o.height_l0],
                    outline="white",
                    width=3,
                )
            ring = next(f for f in features if f["properties"]["classification"]["name"] == name)
            xs = [p[0] for p in ring["geometry"]["coordinates"][0]]
            ys = [p[1] for p in ring["geometry"]["coordinates"][0]]
            draw.rectangle([min(xs), min(ys), max(xs), max(ys)], outline="black", width=4)
            draw.text(
                (10, 10),
                f"{name}  (heat map {la.shape[1]}x{la.shape[0]} px, D = {d:g})",
                fill="black",
            )
            panels.append(base.convert("RGB").resize((slide.width // 2, slide.height // 2)))
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width
    out = out_dir / "heatmap_overlay.png"
    sheet.save(out)
    return out


if __name__ == "__main__":
    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent))
