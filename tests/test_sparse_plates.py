"""Issue 30: sparse fluorescence (fields of separate cells) and plates as inputs of every command.

A small synthetic plate of separate cells (:func:`make_phenotype_plate`: 2 channels GFP + DNA,
uint8, no pixel size, cells 13-60 px) stands in for the issue's public-style HCS plate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simsearch_wsi.cli.main import main
from simsearch_wsi.features.tissue import detect_foreground
from simsearch_wsi.io import open_image
from simsearch_wsi.synthetic.phenotypes import PHENOTYPES, make_phenotype_plate

COMMON = ["--weights", "random", "--tile-size", "256"]


@pytest.fixture(scope="module")
def cell_plate(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """2 x 2 wells, 2 fields of 256 px, 9 separate cells each (13-60 px), uint8, no mpp."""
    return make_phenotype_plate(
        tmp_path_factory.mktemp("cells") / "screen.ome.zarr",
        columns=("1", "2"),
        field_size=256,
        cells_per_field=9,
        diameter_px=(13.0, 60.0),
        seed=3,
    )


def _prototypes(plate: Any, well: str, field: int, path: Path, size: int = 40) -> Path:
    """One prototype rectangle per phenotype around the first cell of that phenotype."""
    feats = []
    seen: set[str] = set()
    for cell in plate.cells[(well, field)]:
        if cell.phenotype in seen:
            continue
        seen.add(cell.phenotype)
        x0, y0 = cell.x_l0 - size / 2, cell.y_l0 - size / 2
        ring = [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": cell.phenotype},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _one_error_line(err: str, *parts: str) -> None:
    """stderr holds exactly one error line (progress bars aside), and it says ``parts``."""
    lines = [line for line in err.splitlines() if line.startswith("simsearch-wsi: error:")]
    assert len(lines) == 1 and all(p in lines[0] for p in parts), err


# --- foreground ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [None, 0.65])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_sparse_cells_are_all_foreground(tmp_path: Path, mpp: float | None, dtype: str) -> None:
    """Issue 30: the clean-up removed every isolated cell (objects under 0.1 % of the mask, and
    cells blurred at tissue scale); now every cell's centre is foreground, the smallest too, and
    the mask stays a small part of the sparse field."""
    plate = make_phenotype_plate(
        tmp_path / "p.ome.zarr",
        rows=("A",),
        columns=("1",),
        fields_per_well=2,
        cells_per_field=20,
        dtype=dtype,
        seed=5,
    )
    n_small = 0
    for (well, field), cells in plate.cells.items():
        with open_image(plate.field_path(well, field), mpp=mpp) as img:
            mask = detect_foreground(img)
        for cell in cells:
            assert mask.fraction_in_box(cell.x_l0 - 1, cell.y_l0 - 1, 2, 2) > 0, cell
            n_small += cell.diameter_px < 20
        assert 0.01 < mask.area_fraction < 0.25
    assert n_small >= 3  # the case that failed: cells of 13-20 px


def test_noise_between_cells_is_not_foreground(tmp_path: Path) -> None:
    """The full-detail object rule keeps cells, not the background's noise: a dark field with
    one cell gets a mask around that cell only."""
    from simsearch_wsi.io.memory import ArraySource

    rng = np.random.default_rng(0)
    arr = rng.normal(12, 2, (256, 256, 2)).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:256, 0:256]
    arr[(yy - 100) ** 2 + (xx - 60) ** 2 < 8**2, 1] = 120
    mask = detect_foreground(ArraySource(arr, path="one-cell"))
    assert mask.fraction_in_box(59, 99, 2, 2) == 1.0
    assert mask.area_fraction < 0.01


def _dark_field(path: Path) -> Path:
    """A black 2-channel field, no cell: the no-foreground case."""
    from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image

    data = np.zeros((2, 192, 192), np.uint8)
    write_ome_zarr_image(path, data, mpp=0.65, channel_names=("GFP", "DNA"))
    return path


def test_no_foreground_suggest_error_names_all_tiles_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cell_plate: Any
) -> None:
    """A failed suggest says which option embeds every tile, and leaves no session folder and
    no output behind (issue 30); with --all-tiles the same call works."""
    field = _dark_field(tmp_path / "dark.ome.zarr")
    protos = tmp_path / "p.geojson"
    ring = [[20, 20], [60, 20], [60, 60], [20, 60], [20, 20]]
    protos.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [ring]},
                        "properties": {"objectType": "annotation", "classification": "x"},
                    }
                ],
            }
        )
    )
    session, out = tmp_path / "session", tmp_path / "s.geojson"
    args = [str(field), "--annotations", str(protos), "--session", str(session)]
    args += ["--out", str(out), "--cache", str(tmp_path / "cache"), *COMMON]
    assert main(["suggest", *args]) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "no foreground", "--all-tiles")
    assert not session.exists() and not out.exists()
    assert main(["suggest", *args, "--all-tiles"]) == 0
    assert (session / "session.json").is_file() and out.is_file()


def test_predict_without_foreground_fails_like_suggest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cell_plate: Any
) -> None:
    """predict wrote 0 detections and exited 0 on a field without foreground; now it fails
    with suggest's one-line error, leaves no output folder, and runs with --all-tiles."""
    from simsearch_wsi.infer.dense import untrained_bundle
    from simsearch_wsi.train.bundle import save_bundle

    with open_image(cell_plate.field_path("A1", 0)) as image:
        bundle = untrained_bundle([image], classes=(*PHENOTYPES, "background"), seed=0)
    model = save_bundle(tmp_path / "m.zip", bundle)
    field = _dark_field(tmp_path / "dark.ome.zarr")
    out = tmp_path / "pred"
    args = ["predict", str(field), "--model", str(model), "--out", str(out), "--tile-size", "256"]
    assert main(args) == 1
    err = capsys.readouterr().err
    _one_error_line(err, "no foreground", "--all-tiles")
    assert not out.exists()
    assert main([*args, "--all-tiles"]) == 0
    assert (out / "dark.predict.json").is_file()


# --- plate addressing ---------------------------------------------------------------------------
def test_plate_selection_and_field_paths(cell_plate: Any) -> None:
    """A plate with --wells/--fields, or a field by path, is named <plate>_<well>_f<field>
    with plate, well, row, column and field columns, however it was given."""
    from simsearch_wsi.io.selection import expand_images, parse_fields, parse_wells

    plate = str(cell_plate.path)
    every = expand_images([plate])
    assert [i.stem for i in every] == [
        f"screen_{w}_f{f}" for w in ("A1", "A2", "B1", "B2") for f in (0, 1)
    ]
    chosen = expand_images([plate], wells=parse_wells("B2, a01"), fields=parse_fields("1"))
    assert [i.stem for i in chosen] == ["screen_A1_f1", "screen_B2_f1"]
    by_path = expand_images([str(cell_plate.path / "B" / "2" / "1")])
    assert by_path == [chosen[1]]
    assert by_path[0].extra == {
        "plate": "screen",
        "well": "B2",
        "row": "B",
        "column": "2",
        "field": 1,
    }
    assert by_path[0].plate == plate


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wells": ("C7",)}, "no well C7 in this plate; its wells are A1, A2, B1, B2"),
        ({"fields": (4,)}, "well A1 has fields [0, 1], not 4"),
    ],
)
def test_plate_selection_errors_say_what_the_plate_has(
    cell_plate: Any, kwargs: dict[str, Any], message: str
) -> None:
    from simsearch_wsi.core.errors import ConfigError
    from simsearch_wsi.io.selection import expand_images

    with pytest.raises(ConfigError, match=re.escape(message)):
        expand_images([str(cell_plate.path)], **kwargs)


def test_selection_without_a_plate_is_refused(cell_plate: Any) -> None:
    from simsearch_wsi.core.errors import ConfigError
    from simsearch_wsi.io.selection import expand_images, parse_wells

    with pytest.raises(ConfigError, match="select fields of an OME-Zarr plate"):
        expand_images([str(cell_plate.field_path("A1", 0))], wells=parse_wells("A1"))
    with pytest.raises(ConfigError, match="not a well name"):
        parse_wells("A1,xyz")


def test_real_plate_field_paths(shared_data: Path) -> None:
    """The bioformats2raw plate of ome-zarr-py's test data: its fields by path and by
    selection are the same images, named after the plate folder."""
    from simsearch_wsi.io.selection import expand_images

    plate = shared_data / "omezarr/ome-zarr-py-testdata/bf2raw/plate-rows-2.zarr"
    chosen = expand_images([str(plate)], wells=("B1",))
    assert [i.stem for i in chosen] == ["plate-rows-2_B1_f0"]
    assert expand_images([str(plate / "B" / "1" / "0")]) == chosen
    assert chosen[0].extra["well"] == "B1" and chosen[0].extra["field"] == 0


def test_info_tells_how_to_address_a_field(
    cell_plate: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(cell_plate.path)]) == 0
    out = capsys.readouterr().out
    assert str(cell_plate.path / "A" / "1" / "0") in out
    assert "--wells A1 --fields 0" in out


def test_single_image_commands_need_one_field(
    cell_plate: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """suggest on a whole plate says how to give one field; open_image's plate error names
    the field path instead of a Python function."""
    protos = _prototypes(cell_plate, "A1", 0, tmp_path / "p.geojson")
    args = ["suggest", str(cell_plate.path), "--annotations", str(protos)]
    assert main([*args, "--out", str(tmp_path / "s.geojson"), *COMMON]) == 1
    _one_error_line(capsys.readouterr().err, "8 plate fields selected", "--wells A1 --fields 0")
    assert main(["info", str(cell_plate.path / "A")]) == 1
    _one_error_line(capsys.readouterr().err, "a row of a plate: give a field")
    assert main(["background", str(cell_plate.path), "--session", str(tmp_path), "--out", "x"]) == 1
    _one_error_line(capsys.readouterr().err, "background works on one field")


@pytest.mark.slow
def test_plate_loop_through_the_cli(
    cell_plate: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_training: None
) -> None:
    """Issue 30's loop on a plate of separate cells, through the CLI: prototypes on a control
    field (selected with --wells/--fields), review, train on the plate, predict other wells
    into one folder: named outputs and plate columns in quantification.csv."""
    import csv

    cache = ["--cache", str(tmp_path / "cache")]
    session = tmp_path / "session"
    protos = _prototypes(cell_plate, "A1", 0, tmp_path / "p.geojson")
    sug = tmp_path / "s.geojson"
    plate = str(cell_plate.path)
    select = ["--wells", "A1", "--fields", "0"]
    args = ["suggest", plate, *select, "--annotations", str(protos), "--session", str(session)]
    assert main([*args, "--out", str(sug), "--background", "2", *COMMON, *cache]) == 0
    assert (
        main(["review", plate, *select, "--annotations", str(sug), "--session", str(session)]) == 0
    )
    field = str(cell_plate.field_path("A2", 0))
    assert (
        main(
            [
                "suggest",
                field,
                "--session",
                str(session),
                "--out",
                str(tmp_path / "o.geojson"),
                *COMMON,
                *cache,
            ]
        )
        == 0
    )
    model = tmp_path / "m.zip"
    train = ["train", "--session", str(session), "--out", str(model), "--head-input", "search"]
    assert main([*train, "--noisy-images", plate, "--wells", "A2", *COMMON, *cache]) == 0
    out = tmp_path / "pred"
    pred = ["predict", plate, "--wells", "B1,B2", "--fields", "0", "--model", str(model)]
    assert main([*pred, "--out", str(out), "--tile-size", "256", *cache]) == 0
    field_b = str(cell_plate.field_path("A2", 1))
    assert (
        main(
            [
                "predict",
                field_b,
                "--model",
                str(model),
                "--out",
                str(out),
                "--tile-size",
                "256",
                *cache,
            ]
        )
        == 0
    )
    capsys.readouterr()
    stems = sorted(p.name[: -len(".predict.json")] for p in out.glob("*.predict.json"))
    assert stems == ["screen_A2_f1", "screen_B1_f0", "screen_B2_f0"]
    with (out / "quantification.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["plate"], r["well"], r["field"]) for r in rows} == {
        ("screen", "A2", "1"),
        ("screen", "B1", "0"),
        ("screen", "B2", "0"),
    }


@pytest.mark.slow
def test_plate_loop_through_the_server(
    cell_plate: Any, tmp_path: Path, tiny_training: None
) -> None:
    """The same loop over HTTP: suggest and review on a field given by path, a train job that
    mines a plate's selected wells, a predict job on a plate with a well selection."""
    import time
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning

    with warnings.catch_warnings():  # as tests/test_server.py: httpx works the same here
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.search.engine import SearchSettings, SimSearch
    from simsearch_wsi.server import create_app

    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(tmp_path / "cache"),
        settings=SearchSettings(tile_size=256),
    )
    allowed = cell_plate.path.parent.resolve()
    field = cell_plate.field_path("A1", 0)
    protos = json.loads(_prototypes(cell_plate, "A1", 0, tmp_path / "p.geojson").read_text())
    session = allowed / "http-session"

    def wait(client: TestClient, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                return dict(job)
            time.sleep(0.05)
        raise AssertionError(job)

    app = create_app(search, allowed_roots=[allowed])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"image": str(field), "annotations": protos, "session": str(session)}
        r = client.post("/api/v1/suggest", json={**body, "background": 2})
        assert r.status_code == 200, r.text
        r = client.post(
            "/api/v1/review",
            json={"image": str(field), "annotations": r.json(), "session": str(session)},
        )
        assert r.status_code == 200, r.text
        model = allowed / "http-model.zip"
        train = {
            "session": str(session),
            "out": str(model),
            "head_input": "search",
            "noisy_images": [str(cell_plate.path)],
            "wells": ["A2"],
            "fields": [0],
        }
        r = client.post("/api/v1/jobs/train", json=train)
        assert r.status_code == 202, r.text
        job = wait(client, r.json()["job_id"])
        assert job["state"] == "done", job
        out = allowed / "http-pred"
        pred = {"images": [str(cell_plate.path)], "model": str(model), "out": str(out)}
        r = client.post("/api/v1/jobs/predict", json={**pred, "wells": ["B2"], "fields": [1]})
        assert r.status_code == 202, r.text
        job = wait(client, r.json()["job_id"])
        assert job["state"] == "done", job
        assert [i["stem"] for i in job["result"]["images"]] == ["screen_B2_f1"]
        r = client.post("/api/v1/jobs/predict", json={**pred, "wells": ["Z9"]})
        assert r.status_code == 400 and "its wells are A1, A2, B1, B2" in r.text


def test_plate_fields_share_one_foreground_normalisation(cell_plate: Any) -> None:
    """Issue 30: a plate field is scaled like every other field of its plate (the paper's
    two-stage rule over the plate, on each field's foreground), so its cells do not saturate:
    the reporter's high end lies above the sparse field's own 95th percentile (background)."""
    from simsearch_wsi.features.preprocess import fit_normalization, search_normalization

    with (
        open_image(cell_plate.field_path("A1", 0)) as a,
        open_image(cell_plate.field_path("B2", 1)) as b,
    ):
        na, nb = search_normalization(a), search_normalization(b)
        alone = fit_normalization([a])
    assert na.to_dict() == nb.to_dict()
    gfp = na.channel_names.index("GFP")
    assert na.high[gfp] > 2 * alone.high[gfp]


def test_plate_field_through_the_server_routes(cell_plate: Any, tmp_path: Path) -> None:
    """The review loop's routes on a plate field given by path (no training): suggest
    with prototypes and background candidates, review, the session's summary, an embed job on
    a plate's selected wells and fields, and a predict job that names a well the plate does
    not have (refused before any work). The full loop with training:
    :func:`test_plate_loop_through_the_server` (slow)."""
    import time
    import warnings

    from starlette.exceptions import StarletteDeprecationWarning

    with warnings.catch_warnings():  # as tests/test_server.py: httpx works the same here
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from fastapi.testclient import TestClient

    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.search.engine import SearchSettings, SimSearch
    from simsearch_wsi.server import create_app

    trunk, spec, info = build_trunk(weights="random", seed=0)
    search = SimSearch(
        FeatureExtractor(trunk, spec, info, autocast=False),
        FeatureCache(tmp_path / "cache"),
        settings=SearchSettings(tile_size=256),
    )
    allowed = cell_plate.path.parent.resolve()
    field = cell_plate.field_path("A1", 0)
    # 80 px patches: the field is embedded at a third of the analysis size of 40 px ones
    path = _prototypes(cell_plate, "A1", 0, tmp_path / "p.geojson", size=80)
    protos = json.loads(path.read_text())
    session = allowed / "http-routes-session"
    app = create_app(search, allowed_roots=[allowed])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"image": str(field), "annotations": protos, "session": str(session)}
        r = client.post("/api/v1/suggest", json={**body, "background": 2})
        assert r.status_code == 200, r.text
        found = r.json()
        kinds = {f["properties"]["classification"]["name"] for f in found["features"]}
        assert "background" in kinds and kinds - {"background"} <= set(PHENOTYPES)
        r = client.post(
            "/api/v1/review",
            json={"image": str(field), "annotations": found, "session": str(session)},
        )
        assert r.status_code == 200, r.text
        r = client.get("/api/v1/session", params={"dir": str(session)})
        assert r.status_code == 200, r.text
        assert set(r.json()["classes"]) == set(PHENOTYPES)
        assert str(field) in json.dumps(r.json())
        r = client.post(
            "/api/v1/jobs/embed",
            json={"images": [str(cell_plate.path)], "wells": ["B2"], "fields": [0]},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 60
        while (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] not in (
            "done",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] == "done", job
        assert [Path(i["image"]) for i in job["result"]["images"]] == [
            cell_plate.field_path("B2", 0)
        ]
        pred = {"images": [str(cell_plate.path)], "model": str(allowed / "no-model.zip")}
        r = client.post(
            "/api/v1/jobs/predict", json={**pred, "out": str(allowed / "p"), "wells": ["Z9"]}
        )
        assert r.status_code == 400 and "its wells are A1, A2, B1, B2" in r.text
