"""CLI paths beyond the basic flow: `export`, `--backbone FILE.onnx`, `search --box`,
`evaluate --rerank / --distractors / --crops activations`, and the error messages."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import clustermac
from clustermac.cli import main

try:
    import torch
except ImportError:
    torch = None


def search_lines(out: str) -> list[tuple[int, float, str]]:
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    return [(int(rank), float(score), name) for rank, score, name in rows]


# --- clustermac export ------------------------------------------------------------------------


@pytest.mark.network
@pytest.mark.skipif(torch is None, reason="torch is not installed (pip install clustermac[export])")
def test_export_command_writes_the_backbone_export_backbone_writes(tmp_path, capsys):
    from clustermac.backbones.export import export_backbone

    out = tmp_path / "cli" / "vgg16.onnx"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert main(["export", "vgg16", "--out", str(out), "--convention", "caffe"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="RANDOM weights"):
        api = export_backbone("vgg16", tmp_path / "api.onnx", convention="caffe")
    cli_backbone, api_backbone = clustermac.Backbone(out), clustermac.Backbone(api)
    # The options reached the file: a Caffe-convention VGG16 (BGR input), 512 channels at stride 16.
    assert cli_backbone.preset.name == "vgg16-caffe" and cli_backbone.preset.channel_order == "BGR"
    assert (cli_backbone.dim, cli_backbone.stride) == (512, 16)
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    features = cli_backbone.features(rgb)
    assert features.shape == (512, 4, 6) and features.std() > 0
    np.testing.assert_allclose(features, api_backbone.features(rgb), rtol=1e-5, atol=1e-6)


def test_export_command_reports_a_directory_as_out(tmp_path, capsys):
    assert main(["export", "vgg16", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_export_command_refuses_an_unknown_architecture(capsys):
    with pytest.raises(SystemExit):
        main(["export", "alexnet", "--out", "x.onnx"])
    assert "invalid choice: 'alexnet'" in capsys.readouterr().err


# --- --backbone FILE.onnx and --backbone PRESET --onnx FILE ------------------------------------


def small_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    names = []
    for i in range(n):
        coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
        names.append(f"img{i}.png")
        Image.fromarray(coarse).resize((96, 64), Image.BILINEAR).save(folder / names[-1])
    return names


def test_extract_with_an_onnx_file_as_backbone(tmp_path, capsys, pooling_model):
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16", weights_id="tiny")
    names = small_images(tmp_path / "images")
    out = tmp_path / "desc.npy"
    assert (
        main(
            [
                "extract",
                str(tmp_path / "images"),
                "--out",
                str(out),
                "--quiet",
                "--backbone",
                str(model),
                "--method",
                "mac",
            ]
        )
        == 0
    )
    assert "4 descriptors of dimension 512" in capsys.readouterr().out
    vectors, manifest = clustermac.load_descriptors(out, mmap=False)
    backbone = clustermac.Backbone(model)
    # The file's network made these descriptors (not the embedded one): its name and dimension,
    # and the values the API gives with it.
    assert manifest["settings"]["backbone"] == backbone.name and manifest["settings"]["feature_dim"] == 512
    expected = clustermac.Extractor(backbone, "mac").extract_many(
        [str(tmp_path / "images" / n) for n in names], progress=False
    )
    np.testing.assert_allclose(vectors, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_backbone_preset_needs_an_onnx_file_and_uses_it(tmp_path, capsys, pooling_model):
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16)  # no preset in the file
    small_images(tmp_path / "images", n=2)
    with pytest.raises(SystemExit, match="--backbone vgg16 needs --onnx FILE.*clustermac export vgg16"):
        main(["extract", str(tmp_path / "images"), "--out", str(tmp_path / "d.npy"), "--backbone", "vgg16"])
    assert (
        main(
            [
                "extract",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "d.npy"),
                "--quiet",
                "--backbone",
                "vgg16-caffe",
                "--onnx",
                str(model),
                "--method",
                "gem",
            ]
        )
        == 0
    )
    vectors, manifest = clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)
    expected = clustermac.Extractor(clustermac.Backbone(model, preset="vgg16-caffe"), "gem").extract(
        str(tmp_path / "images" / "img1.png")
    )
    np.testing.assert_allclose(vectors[1], expected, rtol=1e-6, atol=1e-7)


def test_fit_whitening_on_an_empty_folder_is_refused(tmp_path, pooling_model):
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images in"):
        main(["fit-whitening", str(tmp_path / "empty"), "--out", str(tmp_path / "w.npz"), "--backbone", str(model)])


def test_errors_become_a_message_and_exit_code_2(tmp_path, capsys, pooling_model):
    model, _, _ = pooling_model(tmp_path / "tiny.onnx", 512, 16, preset="vgg16")
    (tmp_path / "bad.npz").write_bytes(b"not a whitening file")
    small_images(tmp_path / "images", n=1)
    code = main(
        [
            "extract",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "d.npy"),
            "--backbone",
            str(model),
            "--whitening",
            str(tmp_path / "bad.npz"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("clustermac: error:") and "bad.npz" in err and "not a clustermac whitening file" in err


# --- search --box ------------------------------------------------------------------------------


@pytest.mark.network
def test_search_with_a_box_describes_the_box(tmp_path, capsys, write_photos):
    photos = tmp_path / "photos"
    names = write_photos(photos, n=4, size=176)
    common = ["--max-size", "256", "--method", "rmac"]
    assert main(["extract", str(photos), "--out", str(tmp_path / "d.npy"), "--quiet", *common]) == 0
    assert main(["index", str(tmp_path / "d.npy"), "--out", str(tmp_path / "idx"), "--image-root", str(photos)]) == 0
    # The query: a box of photo0 pasted at the same size into photo2's corner.
    with Image.open(photos / names[0]) as source:
        box = (20, 16, 140, 116)
        patch = source.convert("RGB").crop(box)
    with Image.open(photos / names[2]) as scene:
        query = scene.convert("RGB")
    query.paste(patch, (0, 0))
    query.save(tmp_path / "query.png")
    pasted_box = [0, 0, box[2] - box[0], box[3] - box[1]]
    capsys.readouterr()
    html = tmp_path / "page.html"
    assert (
        main(
            [
                "search",
                str(tmp_path / "query.png"),
                "--index",
                str(tmp_path / "idx"),
                "-k",
                "4",
                "--box",
                *map(str, pasted_box),
                "--html",
                str(html),
            ]
        )
        == 0
    )
    with_box = search_lines(capsys.readouterr().out)
    assert main(["search", str(tmp_path / "query.png"), "--index", str(tmp_path / "idx"), "-k", "4"]) == 0
    without_box = search_lines(capsys.readouterr().out)
    # The scores are those of the box's descriptor (crop I, the index's settings) against the index.
    extractor = clustermac.Extractor(clustermac.default_backbone(), "rmac", max_size=256)
    query_vector = extractor.extract(str(tmp_path / "query.png"), box=pasted_box)
    vectors, manifest = clustermac.load_descriptors(tmp_path / "d.npy", mmap=False)
    scores = vectors @ query_vector
    order = np.argsort(-scores, kind="stable")
    assert [name for _, _, name in with_box] == [manifest["images"][i] for i in order]
    np.testing.assert_allclose([s for _, s, _ in with_box], scores[order], atol=1e-4)
    # The box picks the pasted object: the photo it came from comes first, and the whole query
    # image (mostly photo2) scores otherwise.
    assert with_box[0][2] == names[0]
    assert dict((n, s) for _, s, n in without_box)[names[2]] > dict((n, s) for _, s, n in with_box)[names[2]] + 0.05
    page = html.read_text()
    assert page.count("<img") == 5  # the query (box drawn) + 4 results


# --- evaluate --rerank --distractors --crops ---------------------------------------------------


@pytest.mark.network
def test_evaluate_with_rerank_distractors_and_both_crops(tmp_path, capsys, reference_classic_map):
    from clustermac.bench import datasets, photo_benchmark

    bench = tmp_path / "bench"
    photo_benchmark.make_benchmark(bench, preset="quick", seed=3, n_distractors=8, size=256, progress=False)
    photo_benchmark.make_whitening_set(tmp_path / "white", n_images=12, preset="quick", seed=4)
    dataset = datasets.load_dataset(bench)
    # Distractors: exact copies of the first positive of each query, under other names. They are
    # not in the ground truth, so they count as negatives ranked right beside the positives.
    distractor_dir = tmp_path / "flickr"
    distractor_dir.mkdir()
    copies = []
    for q, entry in enumerate(dataset.classic_gnd()):
        positive = dataset.image_path(entry["ok"][0])
        copies.append(f"copy{q}.jpg")
        shutil.copy(positive, distractor_dir / copies[-1])
    (distractor_dir / "list.txt").write_text("\n".join(copies) + "\n")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--data-root",
                str(bench),
                "--whitening-root",
                str(tmp_path / "white"),
                "--methods",
                "rmac",
                "--crops",
                "image",
                "activations",
                "--rerank",
                "--distractors",
                str(distractor_dir / "list.txt"),
                "--max-size",
                "256",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["rmac, crop I", "rmac, crop I + R + QE", "rmac, crop X", "rmac, crop X + R + QE"]
    ranks = {
        row["label"]: np.load(out / "ranks.npz")[row["label"].replace(" ", "_").replace(",", "")]
        for row in results["rows"]
    }
    n_database = len(dataset.images)
    gnd_file = bench / "gnd_photobench.pkl"
    for row in results["rows"]:
        r = ranks[row["label"]]
        # Every database image and every distractor is ranked, once per query.
        assert r.shape == (n_database + len(copies), len(dataset.queries))
        assert all(sorted(column) == list(range(n_database + len(copies))) for column in r.T)
        expected, _ = reference_classic_map(r, gnd_file)
        assert row["mAP"] == pytest.approx(expected, abs=1e-9) and f"{row['mAP']:.1f}" in table
        assert row["rerank"] == ("+ R" in row["label"])
        # The distractors were ranked as negatives: without them the same ranking scores higher.
        without = np.stack([[i for i in column if i < n_database] for column in r.T], axis=1)
        assert reference_classic_map(without, gnd_file)[0] > row["mAP"] + 1.0
    # Re-ranking and the crop mode each change the ranking.
    assert not np.array_equal(ranks["rmac, crop I"], ranks["rmac, crop I + R + QE"])
    assert not np.array_equal(ranks["rmac, crop I"], ranks["rmac, crop X"])
