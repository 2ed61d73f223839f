"""`clustermac demo --quick`, run once: the table and the report it writes."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest

from clustermac.cli import main

METHODS = ["MAC", "R-MAC", "ClusterMAC", "ClusterMAC-box (ours)"]
LABELS = [f"{method}, crop {crop}{qe}" for method in METHODS for crop in ("I", "X") for qe in ("", " + QE")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0", "--threads", "2"]) == 0
    return out


@pytest.mark.network
def test_demo_results_have_every_method_with_sane_values(demo, reference_classic_map):
    results = json.loads((demo / "results.json").read_text())
    assert results["dataset"] == "photobench"
    rows = results["rows"]
    assert [row["label"] for row in rows] == LABELS
    for row in rows:
        assert row["qe"] == row["label"].endswith("+ QE") and row["rerank"] is False
        assert row["crop"] == ("image" if "crop I" in row["label"] else "activations")
        for column in ("mAP", "Easy", "Medium", "Hard"):
            assert 0.0 <= row[column] <= 100.0
        assert row["Medium"] == pytest.approx(row["mAP"], abs=1e-9)  # the classic protocol is Medium
    values = [row["mAP"] for row in rows]
    assert len({round(v, 6) for v in values}) >= len(values) // 2  # not one constant
    # Better than a random ranking of the demo's own benchmark (its ground truth, written to disk).
    gnd_file = demo / "benchmark" / "gnd_photobench.pkl"
    with open(gnd_file, "rb") as f:
        ground_truth = pickle.load(f)
    n_images, n_queries = len(ground_truth["imlist"]), len(ground_truth["qimlist"])
    assert (n_images, n_queries) == (56, 8)  # the "quick" preset
    rng = np.random.default_rng(0)
    chance = np.mean(
        [
            reference_classic_map(np.stack([rng.permutation(n_images) for _ in range(n_queries)], axis=1), gnd_file)[0]
            for _ in range(20)
        ]
    )
    by_label = {row["label"]: row for row in rows}
    for label in LABELS:
        if "QE" not in label:
            assert by_label[label]["mAP"] > 2 * chance, (label, by_label[label]["mAP"], chance)
    # Regional methods beat global MAC on pasted objects in clutter (by ~35 points at seed 0).
    assert by_label["R-MAC, crop I"]["mAP"] > by_label["MAC, crop I"]["mAP"] + 10
    assert by_label["ClusterMAC, crop I"]["mAP"] > by_label["MAC, crop I"]["mAP"] + 10
    assert by_label["ClusterMAC-box (ours), crop I"]["mAP"] > by_label["MAC, crop I"]["mAP"] + 10
    assert set(results["timings"]) >= {"backbone_s", "MAC_s", "R-MAC_s", "ClusterMAC_s", "ClusterMAC-box (ours)_s"}


@pytest.mark.network
def test_demo_compares_the_paper_rmac_and_ours_side_by_side(demo):
    results = json.loads((demo / "results.json").read_text())
    comparison = {entry["method"]: entry for entry in results["comparison"]}
    assert list(comparison) == ["R-MAC", "ClusterMAC", "ClusterMAC-box (ours)"]
    by_label = {row["label"]: row for row in results["rows"]}
    for method, entry in comparison.items():
        for crop in ("I", "X"):
            assert entry[f"mAP crop {crop}"] == pytest.approx(by_label[f"{method}, crop {crop}"]["mAP"])
            assert entry[f"Hard crop {crop}"] == pytest.approx(by_label[f"{method}, crop {crop}"]["Hard"])
            if method == "R-MAC":
                assert f"ΔmAP crop {crop}" not in entry
                continue
            # The mean per-query difference is the difference of the means (every query has positives).
            delta = entry[f"mAP crop {crop}"] - comparison["R-MAC"][f"mAP crop {crop}"]
            assert entry[f"ΔmAP crop {crop}"] == pytest.approx(delta, abs=1e-9)
            low, high = entry[f"ΔmAP crop {crop} 95% CI"]
            assert low <= entry[f"ΔmAP crop {crop}"] <= high
    report = (demo / "report.html").read_text()
    assert "side by side" in report and "clustermac-box" in report and "clustermac evaluate" in report
    assert isinstance(results["missing_photo_packages"], list)


@pytest.mark.network
def test_demo_report_holds_the_table_and_the_figures(demo):
    results = json.loads((demo / "results.json").read_text())
    report = (demo / "report.html").read_text()
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", report, re.S)]
    for row in results["rows"]:
        # Each row of the table: the label, then mAP, Easy, Medium, Hard to one decimal.
        i = cells.index(row["label"].replace("&", "&amp;"))
        assert cells[i + 1 : i + 5] == [f"{row[c]:.1f}" for c in ("mAP", "Easy", "Medium", "Hard")]
    for figure in ("Results gallery", "Fig. 7", "Fig. 6", "Fig. 5", "Fig. 4", "Fig. 3"):
        assert figure in report
    assert report.count("data:image/png;base64,") >= 5  # Figs. 7 (three), 6, 5 as embedded PNGs
    assert report.count("<svg") >= 2  # Figs. 4 and 3 as inline SVG
    assert 'src="http' not in report and 'href="http' not in report  # self-contained
