"""The evaluation harness around the simulated user: benchmarks (CSV manifests, synthetic),
segmentation IoU on the truth's grid, the colour-rule pseudo-truth, the report, and a tiny
ablation end to end with resume."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.ablation import (
    AblationConfig,
    ClassScore,
    RunResult,
    RunSpec,
    run_specs,
)
from simsearch_wsi.eval.benchmark import read_benchmark_csv, synthetic_benchmark
from simsearch_wsi.eval.derived import IHC_CLASSES, ihc_tissue_labels, label_fractions
from simsearch_wsi.eval.report import mean_std, summarize, summary_markdown, write_report
from simsearch_wsi.eval.thresholded import segmentation_iou_on_truth
from simsearch_wsi.eval.truth import GroundTruth

# --- segmentation IoU on the truth's grid ----------------------------------------------------


def test_box_mask_rasterises_boxes_later_classes_win() -> None:
    truth = GroundTruth.from_centres(
        {"a": [(10.0, 10.0)], "b": [(14.0, 10.0)], "p": [(30.0, 30.0)]},
        boxes_l0={"a": [(0.0, 0.0, 20.0, 20.0)], "b": [(8.0, 0.0, 12.0, 20.0)]},
    ).with_box_mask((40, 40), downsample=4)
    assert truth.mask is not None and truth.mask.shape == (10, 10)
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[0:5, 0:2] = 1  # a: pixel centres 2, 6 in [0, 20); b takes x >= 8
    expected[0:5, 2:5] = 2  # b: centres 10, 14, 18 in [8, 20)
    np.testing.assert_array_equal(truth.mask, expected)  # the point-only 'p' is not drawn
    assert truth.mask_classes == ("a", "b", "p")


def test_iou_on_truth_resamples_the_prediction() -> None:
    truth_mask = np.zeros((8, 8), dtype=np.uint8)
    truth_mask[:4, :4] = 1  # 'x' top-left 16 truth pixels
    truth_mask[4:, 4:] = 2  # 'y' bottom-right
    truth = GroundTruth.from_region_mask(truth_mask, classes=("x", "y"), downsample=2.0)
    # prediction at 4 level-0 px per pixel (4x4 covers the same 16x16 level-0 image); its class
    # order is reversed, and it misses a quarter of 'x'
    pred = np.zeros((4, 4), dtype=np.uint8)
    pred[:2, :2] = 2  # 'x' (prediction label 2)
    pred[0, 1] = 0
    pred[2:, 2:] = 1  # 'y'
    iou = segmentation_iou_on_truth(pred, classes=("y", "x"), downsample=(4.0, 4.0), truth=truth)
    assert iou == {"x": pytest.approx(12 / 16), "y": 1.0}
    # a class the prediction does not know is NaN, not 0
    only_y = segmentation_iou_on_truth(pred, classes=("y",), downsample=(4.0, 4.0), truth=truth)
    assert math.isnan(only_y["x"]) and only_y["y"] == 1.0
    # a class neither has is NaN (not a perfect 1.0 that would lift an average over images)
    empty = GroundTruth.from_region_mask(
        np.zeros((8, 8), np.uint8), classes=("x", "y"), downsample=2.0
    )
    nothing = segmentation_iou_on_truth(
        np.zeros((4, 4), np.uint8), classes=("y", "x"), downsample=(4.0, 4.0), truth=empty
    )
    assert all(math.isnan(v) for v in nothing.values())
    with pytest.raises(ConfigError, match="no label mask"):
        segmentation_iou_on_truth(
            pred,
            classes=("y",),
            downsample=(4.0, 4.0),
            truth=GroundTruth.from_centres({"y": [(1.0, 1.0)]}),
        )


# --- the colour rule ---------------------------------------------------------------------------


def test_ihc_rule_on_painted_stains() -> None:
    """Brown (DAB) paint is Epithelium, glass is nothing, blue nuclei on pale tissue Stroma."""
    rgb = np.full((120, 240, 3), 245, dtype=np.uint8)  # glass
    rgb[:, :80] = (140, 90, 50)  # DAB brown
    rng = np.random.default_rng(0)
    stroma = np.full((120, 80, 3), 225, dtype=np.uint8)
    ys, xs = rng.integers(0, 120, 400), rng.integers(0, 80, 400)
    for y, x in zip(ys, xs, strict=True):
        stroma[max(0, y - 2) : y + 2, max(0, x - 2) : x + 2] = (90, 90, 170)  # haematoxylin
    rgb[:, 160:] = stroma
    labels = ihc_tissue_labels(rgb)
    assert np.all(labels[10:-10, 10:60] == 1)
    assert np.all(labels[10:-10, 105:135] == 0)
    assert np.mean(labels[10:-10, 185:230] == 2) > 0.9
    with pytest.raises(ConfigError, match="uint8 RGB"):
        ihc_tissue_labels(rgb[..., 0])


def test_ihc_rule_on_the_scikit_image_sample() -> None:
    from skimage import data

    from simsearch_wsi.eval.derived import ihc_pseudo_truth

    truth = ihc_pseudo_truth(data.immunohistochemistry())
    fractions = label_fractions(truth)
    assert tuple(fractions) == IHC_CLASSES
    # the glands take about half of the image, the stroma about a quarter
    assert 0.4 < fractions["Epithelium"] < 0.6 and 0.15 < fractions["Stroma"] < 0.35
    assert truth.is_region_class("Epithelium")


def test_example_prototypes_sit_on_their_classes(tmp_path: Path) -> None:
    """The demo's shipped prototypes (examples/) still fit the data they were drawn on: the
    synthetic review slide's truth and the colour rule on the IHC sample."""
    from skimage import data

    from simsearch_wsi.demo import EXAMPLES_DIR, HE_PER_CLASS, HE_SIZE
    from simsearch_wsi.eval.derived import ihc_pseudo_truth
    from simsearch_wsi.qupath.geojson import read_annotations

    he = read_annotations(EXAMPLES_DIR / "synthetic_he.prototypes.geojson")
    ihc = read_annotations(EXAMPLES_DIR / "skimage_ihc.prototypes.geojson")
    assert {a.class_name for a in he} == {"ring", "cluster", "stripes"} and len(he) == 9
    assert {a.class_name for a in ihc} == set(IHC_CLASSES) and len(ihc) == 6
    ihc_truth = ihc_pseudo_truth(data.immunohistochemistry())
    for a in ihc:
        assert ihc_truth.mask_fraction(a.box, a.class_name) > 0.85, a
    # the review slide the H&E prototypes were drawn on is the benchmark's review0
    from simsearch_wsi.eval.benchmark import SYNTHETIC_CLASSES, SYNTHETIC_DISTRACTORS
    from simsearch_wsi.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(  # what synthetic_benchmark writes as review0
        tmp_path / "review0.tiff",
        width=HE_SIZE[0],
        height=HE_SIZE[1],
        n_per_class=HE_PER_CLASS,
        classes=SYNTHETIC_CLASSES + SYNTHETIC_DISTRACTORS,
        seed=0,
        stain_jitter=0.15,
        n_levels=1,
    )
    for a in he:
        cx, cy = a.box.center_l0
        assert any(
            math.hypot(o.center_l0[0] - cx, o.center_l0[1] - cy) < 2
            for o in slide.objects_of(a.class_name)
        ), a


# --- benchmarks --------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_benchmark_manifest(tmp_path: Path) -> None:
    for name in ("a.tiff", "b.tiff", "c.tiff"):
        (tmp_path / name).write_bytes(b"")
    _write_csv(tmp_path / "a.csv", [["class", "x", "y"], ["ring", "10", "20"]])
    _write_csv(tmp_path / "c.csv", [["class", "x", "y"], ["ring", "1", "2"], ["disc", "3", "4"]])
    manifest = _write_csv(
        tmp_path / "bench.csv",
        [
            ["image", "role", "truth", "mpp"],
            ["a.tiff", "review", "a.csv", "0.25"],
            ["b.tiff", "unlabelled", "", ""],
            ["c.tiff", "Test", "c.csv", ""],
        ],
    )
    bench = read_benchmark_csv(manifest, patch_size_l0=64)
    assert bench.classes == ("ring",) and bench.patch_size_l0 == 64.0
    assert bench.review[0].mpp == 0.25 and bench.test[0].mpp is None
    assert bench.unlabelled == (tmp_path / "b.tiff",)
    assert bench.test[0].truth.counts() == {"ring": 1, "disc": 1}  # only "ring" is scored
    assert len(bench.digest()) == 16
    # moving an annotation changes the benchmark (finished runs are not reused)
    before = bench.digest()
    _write_csv(tmp_path / "c.csv", [["class", "x", "y"], ["ring", "9", "2"], ["disc", "3", "4"]])
    assert read_benchmark_csv(manifest, patch_size_l0=64).digest() != before


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["image", "truth"], ["a.tiff", "a.csv"]], "header with image and role"),
        ([["image", "role", "truth"], ["a.tiff", "train", "a.csv"]], "role 'train'"),
        ([["image", "role", "truth"], ["missing.tiff", "review", "a.csv"]], "not found"),
        ([["image", "role", "truth"], ["a.tiff", "review", ""]], "needs a truth file"),
        ([["image", "role", "truth", "mpp"], ["a.tiff", "test", "a.csv", "fine"]], "mpp 'fine'"),
        ([["image", "role", "truth"], ["a.tiff", "review", "a.csv"]], "at least one review"),
    ],
)
def test_benchmark_manifest_errors(tmp_path: Path, rows: list[list[str]], message: str) -> None:
    (tmp_path / "a.tiff").write_bytes(b"")
    _write_csv(tmp_path / "a.csv", [["class", "x", "y"], ["ring", "10", "20"]])
    with pytest.raises(ConfigError, match=message):
        read_benchmark_csv(_write_csv(tmp_path / "m.csv", rows), patch_size_l0=48)
    with pytest.raises(ConfigError, match="manifest not found"):
        read_benchmark_csv(tmp_path / "nothing.csv", patch_size_l0=48)


def test_synthetic_benchmark_is_reused(tmp_path: Path) -> None:
    kw = {"n_review": 1, "n_unlabelled": 1, "n_test": 1, "size": (1024, 768), "n_per_class": 3}
    bench = synthetic_benchmark(tmp_path, seed=4, **kw)  # type: ignore[arg-type]
    assert [t.path.name for t in bench.review] == ["review0.tiff"]
    assert [t.path.name for t in bench.test] == ["test0.tiff"]
    assert bench.review[0].truth.counts() == {"ring": 3, "cluster": 3, "stripes": 3}
    assert bench.test[0].truth.mask is not None and bench.review[0].truth.mask is None
    mtime = bench.test[0].path.stat().st_mtime_ns
    again = synthetic_benchmark(tmp_path, seed=4, **kw)  # type: ignore[arg-type]
    assert again.test[0].path.stat().st_mtime_ns == mtime and again.digest() == bench.digest()
    other = synthetic_benchmark(tmp_path, seed=5, **kw)  # type: ignore[arg-type]
    assert other.digest() != bench.digest()


# --- the report ----------------------------------------------------------------------------------


def test_mean_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([0.5, math.nan]) == (0.5, 0.0, 1)
    m, s, n = mean_std([math.nan])
    assert math.isnan(m) and math.isnan(s) and n == 0


def _result(strategy: str, repeat: int, ring: float, disc: float) -> RunResult:
    spec = RunSpec(strategy, 5, 0, repeat, 0)
    scores = [
        ClassScore("ring", ring, 10, 20, 8, math.nan),
        ClassScore("disc", disc, 10, 20, 5, 0.5 if strategy != "search" else math.nan),
    ]
    review = {"approved": {"ring": 3}, "flagged": {"ring": 0}, "thresholds": {"ring": 0.7}}
    return RunResult(spec, scores, review, {"train": 1.0, "score": 2.0})


def test_summary_and_report_files(tmp_path: Path) -> None:
    results = [
        _result("search", 0, 0.6, 0.2),
        _result("search", 1, 0.8, 0.4),
        _result("pos", 0, 0.9, 0.5),
        _result("pos", 1, 0.7, math.nan),
    ]
    rows = summarize(results, ["ring", "disc"])
    assert [(r["strategy"], r["repeats"]) for r in rows] == [("search", 2), ("pos", 2)]
    search, pos = rows
    assert search["map_mean"] == pytest.approx(0.5)  # mean of run means 0.4 and 0.6
    assert search["map_std"] == pytest.approx(math.sqrt(0.02))
    assert search["ap_ring_mean"] == pytest.approx(0.7)
    assert pos["ap_disc_mean"] == 0.5 and pos["ap_disc_std"] == 0.0  # the NaN is left out
    assert math.isnan(search["miou_mean"]) and pos["miou_mean"] == 0.5
    table = summary_markdown(rows, ["ring", "disc"])
    assert "| search | 5 | 0 | 2 | 0.500 ± 0.141 |" in table
    assert table.count("\n") == 4 and "n/a" in table
    files = write_report(results, ["ring", "disc"], out_dir=tmp_path / "report")
    with files["runs"].open() as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 8 and runs[0]["strategy"] == "search" and runs[0]["threshold"] == "0.7"
    assert files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["table"].read_text() == table
    with pytest.raises(ConfigError, match="no finished runs"):
        write_report([], ["ring"], out_dir=tmp_path / "empty")


# --- the ablation ---------------------------------------------------------------------------------


def test_run_specs_and_config_checks() -> None:
    config = AblationConfig(strategies=("search", "pos"), prototypes=(2,), negatives=(0, 1))
    specs = run_specs(config)
    assert len(specs) == 2 * 2 * 3
    assert [s.key for s in specs[:4]] == [
        "search_P2_N0_r0",
        "pos_P2_N0_r0",
        "search_P2_N1_r0",
        "pos_P2_N1_r0",
    ]
    # one review per (P, N, repeat), the same prototypes for every N of a repeat
    assert specs[0].review_key == specs[1].review_key == "P2_N0_r0"
    a = specs[0].user_rng().integers(1 << 30, size=4)
    b = specs[2].user_rng().integers(1 << 30, size=4)
    assert np.array_equal(a, b)
    assert RunSpec("pos+neg+selflearn", 5, 5, 2, 0).key == "pos-neg-selflearn_P5_N5_r2"
    with pytest.raises(ConfigError, match="unknown strategy"):
        AblationConfig(strategies=("magic",))
    twice = AblationConfig(strategies=("pos", "pos"), prototypes=(5, 5), negatives=(0, 0))
    assert (twice.strategies, twice.prototypes, twice.negatives) == (("pos",), (5,), (0,))
    with pytest.raises(ConfigError, match="seed"):
        AblationConfig(seed=-1)
    with pytest.raises(ConfigError, match="repeats"):
        AblationConfig(repeats=0)
    with pytest.raises(ConfigError, match="P values"):
        AblationConfig(prototypes=(0,))


def test_tiny_ablation_end_to_end_and_resume(tmp_path: Path, tiny_training: None) -> None:
    """search and pos on tiny synthetic slides: every run scores every class, the report is
    written, and a second call reuses the finished runs."""
    from simsearch_wsi.eval.ablation import run_ablation
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.io import open_image
    from simsearch_wsi.search.engine import SimSearch

    bench = synthetic_benchmark(
        tmp_path / "data",
        n_review=1,
        n_unlabelled=1,
        n_test=1,
        size=(1024, 768),
        n_per_class=3,
    )
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(tmp_path / "cache"))
    config = AblationConfig(
        strategies=("search", "pos"), prototypes=(2,), negatives=(1,), repeats=1
    )
    out = tmp_path / "out"
    results = list(run_ablation(bench, config, search=search, out_dir=out, open_image=open_image))
    assert [r.spec.key for r in results] == ["search_P2_N1_r0", "pos_P2_N1_r0"]
    for r in results:
        assert [s.class_name for s in r.scores] == list(bench.classes)
        assert all(0.0 <= s.ap <= 1.0 for s in r.scores)
        assert all(s.n_true == 3 for s in r.scores)
        assert not r.reused
    # search alone has no segmentation; the trained model is scored on the box masks
    assert all(math.isnan(s.iou) for s in results[0].scores)
    assert any(not math.isnan(s.iou) for s in results[1].scores)
    assert results[0].review == results[1].review  # one shared review
    record = json.loads((out / "runs" / "pos_P2_N1_r0.json").read_text())
    assert record["settings"]["benchmark"] == bench.digest()
    again = list(run_ablation(bench, config, search=search, out_dir=out, open_image=open_image))
    assert all(r.reused for r in again)
    assert [r.mean_ap for r in again] == pytest.approx([r.mean_ap for r in results])
    files = write_report(again, bench.classes, out_dir=out)
    assert files["summary"].exists()


# --- the command line -----------------------------------------------------------------------------


def test_cli_evaluate_bad_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simsearch_wsi.cli.main import main

    (tmp_path / "a.tiff").write_bytes(b"")
    manifest = _write_csv(tmp_path / "m.csv", [["image", "role", "truth"], ["a.tiff", "x", ""]])
    code = main(["evaluate", "--benchmark", str(manifest), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert "m.csv, line 2: role 'x'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code = main(["evaluate", "--out", str(tmp_path / "o"), "--strategies", "magic"])
    assert code == 1 and "unknown strategy" in capsys.readouterr().err


def test_cli_evaluate_runs_resumes_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_training: None
) -> None:
    """A one-cell grid on a manifest of small synthetic slides: the report files, the record,
    then --report-only reuses the finished run."""
    from simsearch_wsi.cli.main import main
    from simsearch_wsi.synthetic import make_synthetic_slide

    rows = [["image", "role", "truth", "mpp"]]
    for k, role in enumerate(("review", "unlabelled", "test")):
        slide = make_synthetic_slide(
            tmp_path / f"{role}.tiff", width=1024, height=768, n_per_class=3, seed=10 + k
        )
        slide.to_csv(tmp_path / f"{role}.csv")
        rows.append([f"{role}.tiff", role, f"{role}.csv" if role != "unlabelled" else "", "0.5"])
    manifest = _write_csv(tmp_path / "bench.csv", rows)
    out = tmp_path / "out"
    args = ["evaluate", "--benchmark", str(manifest), "--patch-size-px", "48", "--out", str(out)]
    args += ["--strategies", "search,pos", "--prototypes", "2", "--negatives", "1"]
    args += ["--repeats", "1", "--weights", "random", "--preset", "quick"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| search | 2 | 1 | 1 |" in printed and "| pos | 2 | 1 | 1 |" in printed
    record = json.loads((out / "evaluation.json").read_text())
    assert record["runs"] == 2 and record["reused"] == 0
    assert sorted(record["benchmark"]["classes"]) == ["cluster", "ring", "stripes"]
    for name in ("runs.csv", "summary.csv", "summary.md", "pr_auc.png"):
        assert (out / name).is_file(), name
    assert main([*args, "--report-only", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["runs"] == 2 and again["reused"] == 2
