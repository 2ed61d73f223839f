"""`clustermac evaluate` runs the paper's ClusterMAC and ClusterMAC-box side by side, each on its
own head of the embedded backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clustermac.cli import main


@pytest.mark.network
def test_evaluate_runs_both_methods_on_their_heads(tmp_path, capsys, reference_classic_map):
    from clustermac.bench import photo_benchmark

    photo_benchmark.make_benchmark(tmp_path / "bench", preset="quick", seed=5, n_distractors=8, progress=False)
    photo_benchmark.make_whitening_set(tmp_path / "white", n_images=12, preset="quick", seed=6)
    out = tmp_path / "eval"
    args = ["evaluate", "--data-root", str(tmp_path / "bench"), "--whitening-root", str(tmp_path / "white")]
    args += ["--methods", "clustermac", "clustermac-box", "--max-size", "256", "--out", str(out), "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["rows"]] == ["clustermac, crop I", "clustermac-box, crop I"]
    # one backbone pass per head: ReLU6 for the paper's method, the uncapped ReLU for the new one
    assert {"backbone_relu6_s", "backbone_relu_s"} <= set(results["timings"])
    ranks = np.load(out / "ranks.npz")
    gnd_file = tmp_path / "bench" / "gnd_photobench.pkl"
    for row in results["rows"]:
        expected, _ = reference_classic_map(ranks[row["label"].replace(" ", "_").replace(",", "")], gnd_file)
        assert row["mAP"] == pytest.approx(expected, abs=1e-9)
    assert not np.array_equal(ranks["clustermac_crop_I"], ranks["clustermac-box_crop_I"])


@pytest.mark.network
def test_extract_records_the_method_and_its_head(tmp_path, write_photos):
    folder = tmp_path / "photos"
    write_photos(folder, n=3)
    out = tmp_path / "desc.npy"
    assert (
        main(["extract", str(folder), "--out", str(out), "--method", "clustermac-box", "--max-size", "128", "--quiet"])
        == 0
    )
    settings = json.loads((tmp_path / "desc.json").read_text())["settings"]
    assert settings["method"] == "clustermac-box" and settings["backbone"].endswith("-relu")
