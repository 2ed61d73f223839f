"""Tests of the real-photo benchmark generator: ground truth checked against the pixels."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from clustermac.bench import datasets, evaluate
from clustermac.bench import photo_benchmark as pb

SMALL = dict(n_queries=8, n_positives=3, n_junk=1, n_distractors=8, size=192)


def _build(out_dir: Path, seed: int = 3, **overrides) -> pb.PhotoBenchmark:
    arguments = {**SMALL, **overrides}
    return pb.make_benchmark(out_dir, seed=seed, progress=False, **arguments)


@pytest.fixture(scope="module")
def sources() -> dict:
    return pb.find_photo_sources()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, sources) -> pb.PhotoBenchmark:
    return _build(tmp_path_factory.mktemp("bench"), sources=sources)


@pytest.fixture(scope="module")
def records(bench) -> dict[str, dict]:
    metadata = json.loads(Path(bench.metadata_path).read_text())
    return {record["name"]: record for record in metadata["images"]}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _source_by_name(sources: dict) -> dict[str, pb.PhotoSource]:
    return {s.name: s for role in ("object", "background", "training") for s in sources[role]}


def _rewarp_grey(record: dict, source: pb.PhotoSource, width: int, height: int) -> np.ndarray:
    """Re-draw the instance from its source photo with the recorded corners (independently of
    the generator's paste code: only the source pixels and the recorded geometry)."""
    image = pb._load_rgb(source.path, pb.SOURCE_MAX_SIDE)
    x0, y0, x1, y1 = record["cutout_rect"]
    patch = Image.fromarray(image[y0:y1, x0:x1]).convert("L")
    w, h = patch.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=float)
    dst = np.asarray(record["image_corners"], dtype=float)
    # Solve the homography dst -> src with NumPy least squares (not the module's solver).
    a = []
    b = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    coefficients = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)[0]
    return np.asarray(
        patch.transform((width, height), Image.PERSPECTIVE, tuple(coefficients), Image.BILINEAR), dtype=float
    )


# --- sources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("include_debian", [True, False])
def test_sources_have_one_role_each_and_exist(include_debian):
    found = pb.find_photo_sources(include_debian=include_debian)
    paths = [s.path for role in ("object", "background", "training") for s in found[role]]
    for group in found["multiview"]:
        paths.append(group.query_path)
        paths.extend(path for path, _ in group.views)
    assert len(paths) == len(set(paths)), "a photograph has two roles"
    assert all(Path(p).is_file() for p in paths)
    names = [s.name for role in ("object", "background", "training") for s in found[role]]
    assert len(names) == len(set(names))
    # The pip photos alone give every role and the motorcycle stereo pair.
    assert found["object"] and found["background"] and found["training"]
    assert any(g.name == "motorcycle" for g in found["multiview"])
    if not include_debian:
        assert {s.collection for role in ("object", "background", "training") for s in found[role]} <= {
            "skimage",
            "sklearn",
        }
    for group in found["multiview"]:
        x1, y1, x2, y2 = group.query_box_fraction
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert all(label in ("easy", "hard") for _, label in group.views)


# --- ground truth against the pixels -------------------------------------------------------------


def test_layout_and_counts(bench, records):
    out = Path(bench.out_dir)
    assert (out / "gt" / "photobench_imlist.txt").is_file()
    assert (out / "gnd_photobench.pkl").is_file()
    jpgs = {p.stem for p in (out / "jpg").glob("*.jpg")}
    assert jpgs == set(bench.images) | set(bench.queries)
    assert not set(bench.images) & set(bench.queries), "query images must not be database images"
    assert len(bench.queries) == SMALL["n_queries"]
    assert set(bench.query_tiers) <= {"multiview", "pasted"} and "pasted" in bench.query_tiers
    n_distractors = sum(r["role"] == "distractor" for r in records.values())
    assert n_distractors == SMALL["n_distractors"]
    for entry in bench.gnd:
        assert len(entry["easy"]) + len(entry["hard"]) >= 1
    labels = [r["label"] for r in records.values() if r["role"] == "view"]
    assert {"easy", "hard"} <= set(labels)
    # No leftovers of the staging folder.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_every_positive_shows_its_instance(bench, records, sources):
    by_name = _source_by_name(sources)
    checked = 0
    for query, entry in zip(bench.queries, bench.gnd):
        instance = records[query]["instance"]
        for index in entry["easy"] + entry["hard"]:
            name = bench.images[index]
            record = records[name]
            assert record["instance"] == instance and record["role"] == "view"
            assert record["label"] in ("easy", "hard")
            if record["tier"] == "multiview" and record["visible_fraction"] is None:
                continue  # another real photo of the group: its relevance is the group's.
            mask_path = Path(bench.out_dir) / "masks" / f"{name}.png"
            mask = np.asarray(Image.open(mask_path)) > 0
            image = np.asarray(Image.open(Path(bench.image_dir) / f"{name}.jpg").convert("L"), dtype=float)
            assert mask.shape == image.shape
            assert int(mask.sum()) == record["visible_area"]
            visible_fraction = mask.sum() / record["full_area"]
            assert visible_fraction >= pb.JUNK_VISIBLE_FRACTION
            assert np.sqrt(mask.sum()) / min(mask.shape) >= pb.JUNK_RELATIVE_SIZE
            if record["label"] == "easy":
                assert visible_fraction >= pb.EASY_VISIBLE_FRACTION
            if record["tier"] == "pasted":
                # The pixels under the mask are the instance: they correlate with the source
                # photo re-warped with the recorded corners (lighting is monotone, blur mild).
                inner = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 0
                if inner.sum() < 30:
                    continue
                expected = _rewarp_grey(record, by_name[record["source"]], image.shape[1], image.shape[0])
                correlation = np.corrcoef(expected[inner], image[inner])[0, 1]
                assert correlation > 0.3, (name, correlation)
                # The control (distractors under the same mask) is test_rewarp_check_can_fail.
                checked += 1
    assert checked >= SMALL["n_queries"] // 2


def test_rewarp_check_can_fail(bench, records, sources):
    """The correlation test above distinguishes the instance from other content."""
    by_name = _source_by_name(sources)
    distractors = sorted(n for n, r in records.items() if r["role"] == "distractor")
    views = [r for r in records.values() if r["tier"] == "pasted" and r["label"] == "easy"]
    compared, below = 0, []
    for record in views:
        mask = np.asarray(Image.open(Path(bench.out_dir) / "masks" / f"{record['name']}.png")) > 0
        image = np.asarray(Image.open(Path(bench.image_dir) / f"{record['name']}.jpg").convert("L"), dtype=float)
        expected = _rewarp_grey(record, by_name[record["source"]], image.shape[1], image.shape[0])
        own = np.corrcoef(expected[mask], image[mask])[0, 1]
        others = []
        for distractor in distractors:
            other = np.asarray(Image.open(Path(bench.image_dir) / f"{distractor}.jpg").convert("L"), dtype=float)
            if other.shape == mask.shape:
                others.append(abs(np.corrcoef(expected[mask], other[mask])[0, 1]))
        # The view's own pixels correlate with the re-warped source better than any distractor's
        # pixels under the same mask do, and the distractors mostly stay below the 0.3 threshold
        # the positives must exceed.
        if not others:
            continue  # no distractor of this view's size
        assert own > max(others), (record["name"], own, others)
        below.extend(np.array(others) < 0.3)
        compared += 1
    assert compared >= max(2, len(views) // 2), (compared, len(views))
    assert np.mean(below) >= 0.75, below


def test_junk_views_are_junk(bench, records):
    for query, entry in zip(bench.queries, bench.gnd):
        for index in entry["junk"]:
            record = records[bench.images[index]]
            assert record["instance"] == records[query]["instance"]
            assert record["visible_area"] > 0, "a junk view still shows part of its instance"
            assert (
                record["visible_fraction"] < pb.JUNK_VISIBLE_FRACTION or record["relative_size"] < pb.JUNK_RELATIVE_SIZE
            )


def test_no_distractor_contains_an_instance(bench, records):
    instance_cutouts = {r["cutout"] for r in records.values() if r.get("cutout")}
    instance_sources = {r["source"] for r in records.values() if r.get("source")}
    relevant = {i for entry in bench.gnd for key in ("easy", "hard", "junk") for i in entry[key]}
    for name, record in records.items():
        if record["role"] != "distractor":
            continue
        assert record["instance"] is None and record["label"] is None
        assert not (Path(bench.out_dir) / "masks" / f"{name}.png").exists()
        assert not set(record["clutter"]) & instance_cutouts
        assert record["background"] not in instance_sources
        assert bench.images.index(name) not in relevant
    # Clutter pasted anywhere is never an instance, and backgrounds are never object sources.
    for record in records.values():
        assert not set(record.get("clutter", [])) & instance_cutouts
        if record.get("background"):
            assert record["background"] not in instance_sources


def test_every_image_is_relevant_to_at_most_its_own_query(bench, records):
    owner: dict[int, int] = {}
    for query, entry in enumerate(bench.gnd):
        for key in ("easy", "hard", "junk"):
            for index in entry[key]:
                assert index not in owner, "an image is listed for two queries"
                owner[index] = query
    for index, name in enumerate(bench.images):
        record = records[name]
        if record["instance"] is None:
            assert index not in owner
        else:
            assert index in owner and records[bench.queries[owner[index]]]["instance"] == record["instance"]


def test_query_boxes_inside_query_images(bench, records):
    for query, box in zip(bench.queries, bench.query_boxes):
        with Image.open(Path(bench.image_dir) / f"{query}.jpg") as image:
            width, height = image.size
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        record = records[query]
        assert record["role"] == "query"
        if record["tier"] == "pasted":
            assert record["visible_fraction"] >= 0.9
            assert (x2 - x1) * (y2 - y1) >= 0.04 * width * height


# --- both formats -------------------------------------------------------------------------------


def test_both_formats_give_the_same_relevance_and_map(bench):
    out = Path(bench.out_dir)
    classic = datasets.load_classic(out / "gt", out / "jpg", "photobench")
    revisited = datasets.load_revisited(out / "gnd_photobench.pkl", out / "jpg")
    detected = datasets.load_dataset(out)
    assert classic.images == revisited.images == detected.images == bench.images
    assert classic.queries == revisited.queries == bench.queries
    for box_c, box_r, box in zip(classic.query_boxes, revisited.query_boxes, bench.query_boxes):
        assert np.allclose(box_c, box, atol=0.051) and np.allclose(box_r, box)
    for entry_c, entry_r in zip(classic.gnd, revisited.gnd):
        assert entry_c["ok"] == sorted(entry_r["easy"] + entry_r["hard"])
        assert entry_c["junk"] == entry_r["junk"]
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(len(bench.images)) for _ in bench.queries], axis=1)
    map_classic = evaluate.compute_map(ranks, classic.gnd)[0]
    map_medium = evaluate.revisited_map(ranks, revisited.gnd)["medium"]["map"]
    assert map_classic == pytest.approx(map_medium, abs=1e-12)
    # The pickle holds plain Python types only.
    content = pickle.loads((out / "gnd_photobench.pkl").read_bytes())
    assert type(content) is dict and all(type(i) is int for e in content["gnd"] for i in e["easy"])
    assert all(type(v) is float for e in content["gnd"] for v in e["bbx"])


# --- determinism and options ----------------------------------------------------------------------


def test_same_seed_same_files_different_seed_different(tmp_path, bench, sources):
    again = _build(tmp_path / "again", sources=sources)
    assert _tree_digest(Path(again.out_dir)) == _tree_digest(Path(bench.out_dir))
    other = _build(tmp_path / "other", seed=4, sources=sources)
    assert _tree_digest(Path(other.out_dir)) != _tree_digest(Path(bench.out_dir))
    # Rebuilding into an existing folder replaces it.
    rebuilt = _build(tmp_path / "other", sources=sources)
    assert _tree_digest(Path(rebuilt.out_dir)) == _tree_digest(Path(bench.out_dir))


def test_pip_photos_only(tmp_path):
    pip_sources = pb.find_photo_sources(include_debian=False)
    result = _build(tmp_path / "pip", sources=pip_sources, n_queries=6, n_distractors=4)
    metadata = json.loads(Path(result.metadata_path).read_text())
    used = {r.get("source") for r in metadata["images"]} | {r.get("background") for r in metadata["images"]}
    used.discard(None)
    assert used and all(name.split("/")[0] in ("skimage", "sklearn") for name in used)
    assert len(result.queries) == 6
    assert datasets.load_dataset(result.out_dir).queries == result.queries


def test_a_preset_the_photos_cannot_meet_is_refused_or_reduced_loudly(tmp_path):
    # A fresh machine: the pip photographs only, every Debian photo package missing.
    pip_sources = pb.find_photo_sources(include_debian=False)
    assert pb.missing_photo_packages(pip_sources) == list(pb.PHOTO_PACKAGES)
    assert pb.INSTALL_PHOTOS_COMMAND.startswith("apt-get install -y opencv-doc ")
    small = {"preset": "large", "n_positives": 1, "n_junk": 0, "n_distractors": 1, "size": 128, "progress": False}
    with pytest.raises(ValueError, match=re.escape(pb.INSTALL_PHOTOS_COMMAND)) as error:
        pb.make_benchmark(tmp_path / "strict", sources=pip_sources, allow_smaller=False, **small)
    assert "'large' preset asks for 60 queries" in str(error.value) and "--allow-smaller" in str(error.value)
    assert not (tmp_path / "strict" / "jpg").exists()  # refused before writing anything
    with pytest.warns(UserWarning, match=re.escape(pb.INSTALL_PHOTOS_COMMAND)):
        smaller = pb.make_benchmark(tmp_path / "loose", sources=pip_sources, **small)
    assert 0 < len(smaller.queries) < pb.PRESETS["large"]["n_queries"]
    # A script reusing such a benchmark is told so (benchmarks/retrieval.py and quality.py stop on it).
    message = pb.preset_shortfall(len(smaller.queries), "large")
    assert message is not None and f"{len(smaller.queries)} queries" in message and "NOT reproduced" in message
    assert pb.preset_shortfall(60, "large") is None and pb.preset_shortfall(30, "demo") is None


def test_the_install_script_installs_the_photo_packages():
    script = Path(__file__).parents[2] / "benchmarks" / "install-photos.sh"
    assert pb.INSTALL_PHOTOS_COMMAND in script.read_text()  # the command the errors print, as the script runs it


@pytest.mark.parametrize("tiers", [("pasted",), ("multiview",)])
def test_single_tier_and_shapes(tmp_path, sources, tiers):
    # A machine with only the pip photos has a single multi-view group (the motorcycle pair).
    n_queries = min(2, len(sources["multiview"])) if tiers == ("multiview",) else 2
    result = _build(
        tmp_path / "t", sources=sources, tiers=tiers, shapes=("shaped",), n_queries=n_queries, n_distractors=2
    )
    assert set(result.query_tiers) == {tiers[0]}
    metadata = json.loads(Path(result.metadata_path).read_text())
    if tiers == ("pasted",):
        shapes = {r["shape"] for r in metadata["images"] if r["tier"] == "pasted"}
        assert shapes and "rect" not in shapes


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"preset": "huge"}, "preset"),
        ({"n_queries": 0}, "n_queries"),
        ({"n_positives": 2.5}, "n_positives"),
        ({"size": 10}, "size"),
        ({"seed": -1}, "seed"),
        ({"tiers": ("pasted", "nonsense")}, "tiers"),
        ({"tiers": ()}, "tiers"),
        ({"shapes": ("circle",)}, "shapes"),
        ({"name": "a b"}, "name"),
        ({"n_queries": 10_000}, "n_queries"),
    ],
)
def test_bad_arguments(tmp_path, sources, arguments, message):
    with pytest.raises(ValueError, match=message):
        pb.make_benchmark(
            tmp_path / "bad", sources=sources, progress=False, **{"n_distractors": 1, "size": 128, **arguments}
        )


def test_presets_meet_their_sizes():
    demo, large, quick = pb.PRESETS["demo"], pb.PRESETS["large"], pb.PRESETS["quick"]
    assert quick["n_queries"] < demo["n_queries"] and quick["n_distractors"] < demo["n_distractors"]
    assert 24 <= demo["n_queries"] <= 40
    assert 200 <= demo["n_queries"] * (demo["n_positives"] + demo["n_junk"]) + demo["n_distractors"] <= 300
    assert large["n_queries"] >= 50 and large["n_positives"] >= 6
    assert large["n_queries"] * (large["n_positives"] + large["n_junk"]) + large["n_distractors"] >= 1000


# --- whitening set ------------------------------------------------------------------------------------


def test_whitening_set(tmp_path, sources):
    first = pb.make_whitening_set(tmp_path / "a", 4, seed=1, size=128, sources=sources)
    again = pb.make_whitening_set(tmp_path / "b", 4, seed=1, size=128, sources=sources)
    other = pb.make_whitening_set(tmp_path / "c", 4, seed=2, size=128, sources=sources)
    assert len(first) == 4 and all(Path(p).is_file() for p in first)
    read = [Path(p).read_bytes() for p in first]
    assert read == [Path(p).read_bytes() for p in again]
    assert read != [Path(p).read_bytes() for p in other]
    with Image.open(first[0]) as image:
        assert max(image.size) == 128
    training = {s.name for s in sources["training"]}
    assert training and not training & {s.name for s in sources["object"] + sources["background"]}
    with pytest.raises(ValueError, match="n_images"):
        pb.make_whitening_set(tmp_path / "d", 0)
    with pytest.raises(ValueError, match="preset"):
        pb.make_whitening_set(tmp_path / "d", preset="nope")
    quick = pb.make_whitening_set(tmp_path / "e", preset="quick", seed=1, sources=sources)
    assert len(quick) == pb.WHITENING_PRESET_IMAGES["quick"]
