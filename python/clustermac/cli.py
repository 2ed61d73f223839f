"""The `clustermac` command line.

clustermac demo                      the main job: a small real-photo benchmark, end to end
clustermac extract DIR --out F.npy   descriptors of a folder (resumable, skips bad files)
clustermac extract DIR --out OUT --ray [--ray-address ADDR]   the same on Ray, into a folder of shards
clustermac fit-whitening DIR --out W.npz
clustermac index F.npy --out INDEX   a searchable index from extracted descriptors
clustermac search IMAGE --index INDEX [--box x1 y1 x2 y2] [--html page.html]
clustermac evaluate --dataset oxford5k --data-root DIR ...
clustermac show-clusters IMAGE --out clusters.png
clustermac export vgg16 --out vgg16.onnx [--weights FILE] [--int8 [--calibration DIR]]
clustermac serve --index INDEX [--host 127.0.0.1] [--port 8000]
clustermac datasets download oxford5k --root DIR   (and `datasets list`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backbones.quantize import PRECISIONS
from .descriptors import CLUSTER_POOLINGS, CROP_MODES, DEFAULT_METHOD, METHODS, SIMILARITY_PRECISIONS

#: Exit codes: 0 done, 2 usage error or bad input (one line on stderr), 3 another process is
#: writing the same output, 130 interrupted (Ctrl-C).
EXIT_ERROR = 2
EXIT_LOCKED = 3
EXIT_INTERRUPTED = 130
#: The file of an index folder that records how its descriptors were made (kept for 0.1.0 callers).
INDEX_INFO = "clustermac.json"


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a usage error otherwise, before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default="default",
        help="'default' (embedded EfficientNet-Lite0) or a preset name (vgg16, vgg16-caffe, resnet101, "
        "resnet101-caffe, efficientnet-lite0) together with --onnx, or a path to an .onnx file",
    )
    p.add_argument("--onnx", help="ONNX file of the backbone (made by `clustermac export`)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="backbone precision: float32 (default) or int8 (a float32 model is quantised on first use, "
        "with generated calibration images; int8 descriptors are never mixed with float32 ones)",
    )
    p.add_argument(
        "--max-size", type=_int_at_least(1), default=None, help="longest image side (default 1024; never upsampled)"
    )


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=METHODS,
        help=f"descriptor (default {DEFAULT_METHOD}: R-MAC's grid + the boxes of 20 clusters, ours; "
        "clustermac: the paper's ClusterMAC)",
    )
    p.add_argument(
        "--crop",
        default="image",
        choices=CROP_MODES,
        help="query mode: 'image' = crop I (crop, then extract), 'activations' = crop X",
    )
    p.add_argument(
        "--pca-dim",
        type=_int_at_least(1),
        default=None,
        help="C of the clustering PCA (default: 4 for 512-d maps, 7 otherwise)",
    )
    p.add_argument("--whitening", help="whitening file (.npz) from `clustermac fit-whitening`")
    p.add_argument(
        "--similarity-precision",
        default=None,
        choices=SIMILARITY_PRECISIONS,
        help="ClusterMAC: how the NCut similarity is stored (default: float32 on every CPU; bfloat16 needs "
        "AVX512-BF16, gives other partitions and is recorded in the settings)",
    )
    p.add_argument(
        "--grid-regions",
        action="store_true",
        help="ClusterMAC: add R-MAC's square regions to the clusters (our variant, not the paper's)",
    )
    p.add_argument(
        "--n-clusters",
        type=_int_at_least(1),
        nargs="+",
        default=None,
        metavar="K",
        help="ClusterMAC: cluster counts of the feature partitions (default: 5 20, the paper's)",
    )
    p.add_argument(
        "--cluster-pooling",
        default=None,
        choices=CLUSTER_POOLINGS,
        help="ClusterMAC: max-pool each cluster over its own cells ('mask', the paper's, default) or over "
        "its bounding box ('box', our variant)",
    )
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        metavar="S",
        help="multi-scale extraction, e.g. 1 0.7071 0.5 (every method; first 1, decreasing; default: 1, "
        "single-scale); recorded in the files' settings",
    )


def _backbone_head(method: str) -> str:
    """The embedded backbone's head for ``method`` (see DescriptorMethod.backbone_head)."""
    from .descriptors.registry import method_class

    return method_class(method).backbone_head


def _backbone(args: argparse.Namespace, head: str | None = None):
    from .backbones import Backbone, default_backbone

    spec = args.backbone
    precision = getattr(args, "precision", None)
    if spec in ("default", "efficientnet-lite0") and not args.onnx:
        method = getattr(args, "method", None)
        if head is None:
            head = _backbone_head(method) if method else "relu6"
        return default_backbone(n_threads=args.threads, precision=precision or "float32", head=head)
    if spec.endswith(".onnx"):
        return Backbone(spec, preset=None, n_threads=args.threads, precision=precision)
    if not args.onnx:
        raise SystemExit(
            f"clustermac: --backbone {spec} needs --onnx FILE "
            f"(write one with `clustermac export {spec.split('-')[0]} --out FILE`)"
        )
    return Backbone(args.onnx, preset=spec, n_threads=args.threads, precision=precision)


def _method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The Extractor keywords of the method options (see _add_method_options) for ``method``."""
    options: dict[str, Any] = {
        "add_grid_regions": bool(getattr(args, "grid_regions", False)) and method == "clustermac",
        "cluster_pooling": getattr(args, "cluster_pooling", None) or "mask",
        "n_clusters": tuple(getattr(args, "n_clusters", None) or (5, 20)),
    }
    if getattr(args, "pca_dim", None) is not None:
        options["pca_dim"] = args.pca_dim
    if getattr(args, "scales", None):
        options["scales"] = tuple(args.scales)
    if getattr(args, "similarity_precision", None):
        options["similarity_precision"] = args.similarity_precision
    return options


def _extractor(args: argparse.Namespace, backbone=None):
    from .descriptors import Extractor

    ex = Extractor(
        backbone or _backbone(args),
        args.method,
        crop=getattr(args, "crop", "image"),
        max_size=args.max_size,
        **_method_options(args, args.method),
    )
    if getattr(args, "whitening", None):
        ex.load_whitening(args.whitening)
    return ex


def _input_files(args: argparse.Namespace) -> list[str]:
    """The files a command reads besides its images (whitening, ONNX backbone)."""
    files = [getattr(args, "whitening", None), getattr(args, "onnx", None)]
    backbone = getattr(args, "backbone", "")
    if backbone.endswith(".onnx"):
        files.append(backbone)
    return [f for f in files if f]


def _refuse_collisions(out: str, folder: str, inputs: Sequence[str | None], names: Sequence[str]) -> None:
    """A usage error when the output would overwrite an input (before any work)."""
    out_path = Path(out)
    if out_path.is_dir():
        raise ValueError(f"--out {out}: is a directory")
    taken = {os.path.realpath(folder): f"the image folder {folder}"}
    taken.update({os.path.realpath(Path(folder) / n): f"the input image {Path(folder) / n}" for n in names})
    taken.update({os.path.realpath(p): f"the input file {p}" for p in inputs if p})
    clash = taken.get(os.path.realpath(out_path))
    if clash is not None:
        raise ValueError(f"--out {out}: would overwrite {clash}")


def cmd_extract(args: argparse.Namespace) -> int:
    from .descriptors import extract_folder
    from .descriptors.store import check_output_paths, manifest_path
    from .files import output_lock

    args.folder, names = _images_to_extract(args.folder)
    if args.ray or args.ray_address:
        return _extract_on_ray(args, names)
    check_output_paths(args.out, args.folder, names, inputs=_input_files(args))
    # The manifest's lock too: d.npy and d.npz share d.json.
    with output_lock(args.out, command=args.command_line), output_lock(manifest_path(args.out), args.command_line):
        manifest = extract_folder(
            _extractor(args), args.folder, args.out, progress=not args.quiet, names=names, chunk_size=args.chunk_size
        )
    print(f"{len(manifest['images'])} descriptors of dimension {manifest['settings']['dim']} written to {args.out}")
    for name, reason in manifest["failed"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def _images_to_extract(source: str) -> tuple[str, list[str]]:
    """(folder, names) of `extract`'s input: a folder (its images, recursively) or a text file
    listing one image path per line (relative to the file's folder, or absolute; blank lines and
    lines starting with # are ignored)."""
    from .images import list_images

    if not Path(source).is_file():
        return source, list_images(source)
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: cannot read the list of images ({error})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: lists an image more than once")
    return str(Path(source).parent), names


def _extract_on_ray(args: argparse.Namespace, names: list[str]) -> int:
    from .distributed import extract_folder_ray

    manifest = extract_folder_ray(
        _extractor(args),
        args.folder,
        args.out,
        names=names,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
        shard_size=args.shard_size,
        cpus_per_worker=args.cpus_per_worker,
        progress=not args.quiet,
    )
    print(
        f"{len(manifest['images'])} descriptors of dimension {manifest['settings']['dim']} written to {args.out} "
        f"({len(manifest['shards'])} shards)"
    )
    for name, reason in manifest["failed"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def cmd_fit_whitening(args: argparse.Namespace) -> int:
    from .files import output_lock
    from .images import list_images

    relative = list_images(args.folder)
    _refuse_collisions(args.out, args.folder, _input_files(args), relative)
    names = [str(Path(args.folder) / n) for n in relative]
    if not names:
        raise SystemExit(f"clustermac: no images in {args.folder}")
    with output_lock(args.out, command=args.command_line):
        ex = _extractor(args)
        ex.whitening_dim = args.dim
        ex.fit_whitening(names, progress=not args.quiet)
        ex.save_whitening(args.out)
    print(
        f"whitening {ex.whitening_projection.shape[1]} → {ex.whitening_projection.shape[0]} "
        f"learned on {len(names)} images, saved to {args.out}"
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .descriptors import load_descriptors
    from .files import output_lock
    from .kernels import recorded_kernels
    from .search import Index
    from .search.index_info import record_query_setup

    if args.append or args.remove:
        return _update_index(args)
    if args.descriptors is None:
        raise SystemExit("clustermac index: give the descriptors to index (or --append / --remove with --out INDEX)")
    # One writer per index folder for the whole run; Index.save takes the same lock again.
    with output_lock(args.out, "clustermac index"):
        vectors, manifest = load_descriptors(args.descriptors)  # memory-mapped
        count, dim = vectors.shape
        faiss_info = None
        if args.backend == "faiss":
            index = Index(dim, "faiss", faiss_factory=args.factory, faiss_nprobe=args.nprobe)
            if count == 0:
                raise ValueError(f"{args.descriptors}: no descriptors to train the FAISS index {args.factory!r} on")
            train_size = index.add_trained_on_sample(
                vectors, manifest["images"], args.train_size, args.seed, progress=sys.stderr.isatty()
            )
            faiss_info = {
                "factory": args.factory,
                "nprobe": args.nprobe,
                "train_size": train_size,
                "train_seed": args.seed,
            }
            index.attach_vectors(args.descriptors)  # for `clustermac search --rescore`
        else:
            index = Index(dim)
            index.add(vectors, manifest["images"])
        # The settings the descriptors were made with, so `search` extracts queries the same way;
        # saved inside the index's version folder, published with it.
        info = {
            "settings": manifest["settings"],
            "image_root": str(Path(args.image_root).resolve()) if args.image_root else None,
            "kernels": recorded_kernels(manifest.get("kernels")),  # the code that computed the rows ({}: not recorded)
        }
        if faiss_info is not None:
            info["faiss"] = faiss_info
        # Everything a server needs to describe queries as these images were (whitening, backbone, store).
        info.update(
            record_query_setup(
                manifest["settings"],
                manifest["images"],
                vectors,
                args.image_root,
                whitening=args.whitening,
                onnx=args.onnx,
                store=args.store,
                write_store=args.write_store,
            )
        )
        index.save(args.out, info=info)
    what = f"FAISS {args.factory} " if args.backend == "faiss" else ""
    print(f"{what}index of {len(index)} images written to {args.out}")
    return 0


def _update_index(args: argparse.Namespace) -> int:
    """`clustermac index --remove NAMES_FILE` and/or `clustermac index DESC --append`: change the index at
    --out in place (removals first), then save it (a new version, published atomically)."""
    from .descriptors import load_descriptors
    from .files import output_lock
    from .kernels import distinct_kernels, recorded_kernels, warn_if_mixed
    from .search import Index

    with output_lock(args.out, "clustermac index"):
        index = Index.load(args.out)
        info = dict(index.info)
        removed = added = 0
        if args.remove:
            try:
                gone = [line for line in Path(args.remove).read_text(encoding="utf-8").splitlines() if line]
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"--remove {args.remove}: cannot read it ({error})") from None
            try:
                removed = index.remove(gone)
            except ValueError as error:
                raise ValueError(f"--remove {args.remove}: {error}") from None
        if args.append:
            if args.descriptors is None:
                raise ValueError("--append: give the descriptors to add")
            vectors, manifest = load_descriptors(args.descriptors)  # memory-mapped
            settings = info.get("settings")
            if settings is not None and manifest["settings"] != settings:
                raise ValueError(
                    f"{args.descriptors} was extracted with other settings than the index "
                    f"{args.out}: {_settings_difference(settings, manifest['settings'])}"
                )
            if vectors.shape[1] != index.dim:
                raise ValueError(
                    f"{args.descriptors} holds {vectors.shape[1]}-dimensional descriptors; "
                    f"the index {args.out} has dimension {index.dim}"
                )
            info["kernels"] = distinct_kernels(
                [*recorded_kernels(info.get("kernels")), *recorded_kernels(manifest.get("kernels"))]
            )
            warn_if_mixed(info["kernels"], str(args.out))
            first = len(index)
            for start in range(0, len(vectors), 65536):
                index.add(vectors[start : start + 65536], manifest["images"][start : start + 65536])
            if index.backend == "faiss" and len(vectors):
                index.attach_vectors(args.descriptors, first_row=first)
            added = len(vectors)
        index.save(args.out, info=info)
    print(f"index {args.out}: {removed} images removed, {added} added, {len(index)} now")
    return 0


def _settings_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} in the index, {new.get(k)!r} here" for k in keys[:4])


def cmd_info(args: argparse.Namespace) -> int:
    from .file_info import describe_file, format_description

    description = describe_file(args.path, verify=args.verify)
    print(json.dumps(description, indent=1) if args.json else format_description(description))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import Index

    index = Index.load(args.index, verify=not args.no_verify)
    info = index.info
    settings = info.get("settings") or {}
    if not isinstance(settings, dict):
        settings = {}
    # Queries are extracted with the settings the indexed descriptors were made with, unless given.
    if not args.method_given and settings.get("method"):
        args.method = settings["method"]
    for option in ("max_size", "pca_dim", "cluster_pooling", "n_clusters", "scales", "similarity_precision"):
        if getattr(args, option, None) is None:
            setattr(args, option, settings.get(option))
    args.grid_regions = args.grid_regions or bool(settings.get("add_grid_regions"))
    indexed_precision = settings.get("backbone_precision", "float32") if settings else None
    if args.precision is None:
        args.precision = indexed_precision
    elif indexed_precision is not None and args.precision != indexed_precision:
        raise SystemExit(
            f"clustermac: the index holds {indexed_precision} descriptors; --precision {args.precision} "
            "would mix precisions"
        )
    ex = _extractor(args)
    if settings and list(ex.scales) != list(settings.get("scales", [1.0])):
        raise SystemExit(
            f"clustermac: the index holds descriptors of scales {settings.get('scales', [1.0])}; "
            f"--scales {' '.join(f'{s:g}' for s in ex.scales)} would mix them"
        )
    if not ex.is_whitened and info.get("whitening"):  # the whitening recorded by `clustermac index --whitening`
        from .search.index_info import checked_file

        ex.load_whitening(checked_file(info["whitening"], "whitening"))
    if settings and settings.get("whitened") and not ex.is_whitened:
        raise SystemExit("clustermac: the index was built from whitened descriptors: pass the same --whitening file")
    query = ex.extract(args.query, box=args.box)
    scores, indices = index.search(
        query[None, :], k=args.k, nprobe=args.nprobe, efsearch=args.efsearch, rescore=args.rescore
    )
    results = [(index.names[i], float(s)) for i, s in zip(indices[0], scores[0]) if i >= 0]
    for rank, (name, score) in enumerate(results, 1):
        print(f"{rank:4d}  {score:.4f}  {name}")
    if args.html:
        from .bench.report import write_search_page

        write_search_page(args.html, args.query, args.box, results, info.get("image_root"))
        print(f"wrote {args.html}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .bench.datasets import load_dataset, read_distractor_list
    from .bench.pipeline import MethodSpec, dataset_feature_maps, evaluate_methods
    from .bench.report import format_table
    from .images import list_images

    dataset = load_dataset(args.data_root, name=args.dataset)
    if args.distractors:
        names = read_distractor_list(args.distractors)
        dataset = dataset.with_distractors(names, Path(args.distractors_root or Path(args.distractors).parent))
    if args.whitening_root:
        whitening = [str(Path(args.whitening_root) / n) for n in list_images(args.whitening_root)]
    else:
        raise SystemExit(
            "clustermac: --whitening-root DIR is needed: whitening is learned on a different image set "
            "(the paper learns it on Paris6k to test on Oxford5k and vice versa)"
        )
    scales = {"scales": tuple(args.scales)} if args.scales else {}  # every method, one backbone pass per scale
    methods = [MethodSpec(m, m, _method_options(args, m) if m == "clustermac" else scales) for m in args.methods]
    # With the embedded backbone each method runs on its own head (clustermac-box: uncapped), so
    # the methods are grouped by head, one backbone pass per group.
    embedded = args.backbone in ("default", "efficientnet-lite0") and not args.onnx
    groups: dict[str | None, list] = {}
    for spec in methods:
        groups.setdefault(_backbone_head(spec.method) if embedded else None, []).append(spec)
    result: dict[str, Any] = {"rows": [], "ranks": {}, "timings": {}}
    for head, specs in groups.items():
        backbone = _backbone(args, head)
        maps = dataset_feature_maps(
            dataset,
            backbone,
            whitening,
            crops=args.crops,
            max_size=args.max_size,
            progress=not args.quiet,
            scales=tuple(args.scales or (1.0,)),
        )
        part = evaluate_methods(
            dataset,
            backbone,
            maps,
            specs,
            query_expansion=args.qe,
            rerank=args.rerank,
            rerank_clusters=args.rerank_clusters,
            max_size=args.max_size,
            progress=not args.quiet,
        )
        result["rows"] += part["rows"]
        result["ranks"].update(part["ranks"])
        part["timings"][f"backbone_{head}_s" if head else "backbone_s"] = part["timings"].pop("backbone_s")
        result["timings"].update(part["timings"])
    columns = ["mAP"] + (["Easy", "Medium", "Hard"] if dataset.has_revisited else [])
    print(format_table(["Method", *columns], [[r["label"], *(f"{r[c]:.1f}" for c in columns)] for r in result["rows"]]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.savez(out / "ranks.npz", **{k.replace(" ", "_").replace(",", ""): v for k, v in result["ranks"].items()})
    (out / "results.json").write_text(
        json.dumps({"dataset": dataset.name, "rows": result["rows"], "timings": result["timings"]}, indent=1)
    )
    print(f"wrote {out / 'results.json'} and {out / 'ranks.npz'}")
    return 0


def cmd_show_clusters(args: argparse.Namespace) -> int:
    from .bench.figures import cluster_figure_for_file

    ex = _extractor(args)
    cluster_figure_for_file(ex, args.image, n_clusters=args.clusters, out_png=args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .backbones.export import export_backbone

    export_backbone(
        args.arch,
        args.out,
        weights=args.weights,
        convention=args.convention,
        precision="int8" if args.int8 else "float32",
        calibration=args.calibration,
    )
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench.demo import run_demo

    return run_demo(args.out, seed=args.seed, quick=args.quick, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clustermac", description="Particular-object image retrieval with ClusterMAC."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build a small real-photo benchmark and compare MAC, R-MAC and ClusterMAC on it")
    p.add_argument("--out", default="clustermac-demo", help="output folder (benchmark, report.html, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="an even smaller benchmark (for smoke tests)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("extract", help="descriptors of every image in a folder (or in a list file)")
    p.add_argument("folder", help="a folder of images, or a text file listing image paths (one per line)")
    p.add_argument("--out", required=True, help="output .npy (a .json manifest is written beside it)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--chunk-size",
        type=_int_at_least(1),
        default=None,
        help="images per finished chunk kept for resuming an interrupted run (default 64)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="extract on Ray (a local instance, or RAY_ADDRESS / --ray-address); --out is then a folder of shards",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (HOST:PORT, ray://HOST:PORT, auto)")
    p.add_argument("--shard-size", type=_int_at_least(1), default=256, help="--ray: images per shard (default 256)")
    p.add_argument(
        "--cpus-per-worker",
        type=_int_at_least(1),
        default=1,
        help="--ray: CPUs (ONNX Runtime threads) of each worker, which holds one extractor (default 1)",
    )
    _add_backbone_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("fit-whitening", help="learn PCA-whitening on a folder of images (not the ones you search)")
    p.add_argument("folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--dim",
        type=_int_at_least(1),
        default=None,
        help="output dimension of the whitening, e.g. 256 or 512 for a large index (default: as many as the "
        "features; recorded in the file, and queries and descriptors extracted with it have this dimension)",
    )
    p.add_argument("--quiet", action="store_true")
    _add_backbone_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_fit_whitening)

    p = sub.add_parser("index", help="build a search index from `clustermac extract` output")
    p.add_argument(
        "descriptors", nargs="?", help="the .npy (or, with --ray, the shard folder) written by `clustermac extract`"
    )
    p.add_argument("--out", required=True, help="the index folder (built, or changed with --append / --remove)")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the descriptors to the existing index at --out (same extraction settings) instead of building",
    )
    p.add_argument(
        "--remove",
        metavar="NAMES_FILE",
        help="remove the images named in this UTF-8 file (one name per line) from the index at --out",
    )
    p.add_argument(
        "--image-root", help="folder the image names are relative to (for thumbnails in --html and `clustermac serve`)"
    )
    p.add_argument(
        "--whitening", help="the whitening file the descriptors were extracted with (recorded by path and SHA-256)"
    )
    p.add_argument("--onnx", help="the backbone's ONNX file, when the descriptors were not made with the default one")
    p.add_argument("--store", help="feature-map store (.cmfm) of the indexed images, for AML re-ranking in `serve`")
    p.add_argument(
        "--write-store",
        action="store_true",
        help="compute the feature-map store at --store from the images under --image-root",
    )
    p.add_argument(
        "--backend",
        default="exact",
        choices=("exact", "faiss"),
        help="'exact' (default): float32 vectors, exact search; 'faiss': a compressed FAISS index (needs faiss-cpu)",
    )
    p.add_argument(
        "--factory",
        default="IVF256,PQ32",
        help="FAISS factory string for --backend faiss (default IVF256,PQ32; e.g. SQ8, IVF4096,PQ64, "
        "OPQ64,IVF16384,PQ64, HNSW32)",
    )
    p.add_argument(
        "--train-size",
        type=_int_at_least(1),
        default=100000,
        help="--backend faiss: train on this many randomly drawn descriptors (default 100000; all if fewer)",
    )
    p.add_argument(
        "--nprobe",
        type=_int_at_least(1),
        default=16,
        help="--backend faiss: inverted lists visited per query, stored with the index (default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="--backend faiss: seed of the training sample (default 0)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="rank the indexed images for a query image")
    p.add_argument("query")
    p.add_argument("--index", required=True)
    p.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"))
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--html", help="write a page of thumbnails")
    p.add_argument(
        "--nprobe",
        type=_int_at_least(1),
        default=None,
        help="FAISS IVF index: inverted lists visited (default: the one stored with the index; exact: ignored)",
    )
    p.add_argument(
        "--efsearch",
        type=_int_at_least(1),
        default=None,
        help="FAISS HNSW index: search depth efSearch (default: FAISS's; exact: ignored)",
    )
    p.add_argument(
        "--rescore",
        type=_int_at_least(1),
        default=None,
        metavar="R",
        help="FAISS index: re-score its top R candidates exactly from the indexed descriptor file (exact: ignored)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not read the whole index to check its SHA-256 and finiteness first (sizes and headers are still "
        "checked): for a large index you trust, ~1 s per GB saved",
    )
    _add_backbone_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("evaluate", help="mAP on Oxford5k / Paris6k (classic or revisited) or a folder in that layout")
    p.add_argument("--dataset", default=None, help="oxford5k, paris6k, roxford5k, rparis6k, or a custom name")
    p.add_argument("--data-root", required=True, help="the dataset folder (ground truth + jpg/)")
    p.add_argument("--whitening-root", help="folder of images to learn whitening on (e.g. the other dataset)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: --method")
    p.add_argument("--crops", nargs="+", default=None, choices=CROP_MODES, help="default: --crop")
    p.add_argument("--qe", action="store_true", help="also report average query expansion (top 5)")
    p.add_argument("--rerank", action="store_true", help="also report AML re-ranking + QE (R-MAC, ClusterMAC)")
    p.add_argument(
        "--rerank-clusters",
        choices=["stored", "box"],
        default="stored",
        help="ClusterMAC inside an AML box: the database image's own clusters (default, fast) or "
        "re-clustered inside every box",
    )
    p.add_argument("--distractors", help="list of distractor image names (Flickr100k / R1M)")
    p.add_argument("--distractors-root", help="folder of the distractor images (default: the list's folder)")
    p.add_argument("--out", default="clustermac-eval")
    p.add_argument("--quiet", action="store_true")
    _add_backbone_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "info", help="what a descriptor file, shard or index folder, whitening file or feature-map store holds"
    )
    p.add_argument("path", help="desc.npy (or its .json), a shard or index folder, a whitening .npz, a .cmfm store")
    p.add_argument("--verify", action="store_true", help="also read the data to check its checksums")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("show-clusters", help="the paper's Fig. 7 for one image")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--clusters", type=int, default=10)
    _add_backbone_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_show_clusters, method="clustermac")  # the paper's figure, on its network as trained

    p = sub.add_parser("export", help="write a VGG16 / ResNet101 feature-map ONNX file (needs torch)")
    p.add_argument("arch", choices=("vgg16", "resnet101"))
    p.add_argument("--out", required=True)
    p.add_argument(
        "--weights",
        help="state dict: torchvision ImageNet, cnnimageretrieval's Caffe-converted "
        "(imagenet-caffe-*-features) or retrievalSfM120k networks; default: random weights",
    )
    p.add_argument(
        "--convention",
        default="torchvision",
        choices=("torchvision", "caffe"),
        help="input convention baked into the file: 'torchvision' (RGB, ImageNet mean/std; also right for "
        "cnnimageretrieval's networks) or 'caffe' (BGR, mean subtraction; weights converted straight from Caffe)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="write the int8 (QDQ, per-channel) quantised network instead of the float32 one",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        default=None,
        help="with --int8: folder of calibration images (default: generated images, no data needed)",
    )
    p.set_defaults(func=cmd_export)

    from .bench import download
    from .serve import command as serve_command

    download.add_parser(sub)
    serve_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import OutputLockedError

    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(argv)
    args.command_line = " ".join(["clustermac", *argv])
    if getattr(args, "command", None) == "search":
        args.method_given = "--method" in argv
    if getattr(args, "command", None) == "evaluate":
        args.methods = args.methods or [args.method]
        args.crops = args.crops or [args.crop]
    try:
        return int(args.func(args) or 0)
    except OutputLockedError as error:
        print(f"clustermac: error: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except KeyboardInterrupt:
        print("clustermac: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, RuntimeError) as error:
        print(f"clustermac: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
