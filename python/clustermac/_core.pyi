"""
clustermac C++ core: Normalized-Cut clustering of CNN activations, pooling, whitening, search.
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['affinity', 'aggregate_region_groups', 'aggregate_regions', 'aml_localize', 'aml_localize_codes', 'apply_whitening', 'auto_search_paths', 'cluster_feature_map', 'cluster_feature_maps', 'crow_pool', 'dequantize_codes', 'fit_pca_whitening', 'gem_pool', 'grid_mac', 'grid_mac_codes', 'kernel_choices', 'l2_normalize', 'ncut', 'ncut_embedding', 'pca_project', 'preset_auto_search_paths', 'region_boxes', 'region_mac', 'region_mac_codes', 'rmac_regions', 'simd_level', 'spoc_pool', 'topk_search']
def _discretize(embedding: numpy.typing.NDArray[numpy.float32], seed: typing.SupportsInt | typing.SupportsIndex = 0) -> numpy.typing.NDArray[numpy.int32]:
    """
    Yu & Shi 2003 discretisation of an N x K embedding (not public API; used by the tests).
    """
def _ncut_solver_statistics(affinity: numpy.typing.NDArray[numpy.float32], n_vectors: typing.SupportsInt | typing.SupportsIndex, normalization: str = 'sym', block_size: typing.SupportsInt | typing.SupportsIndex = 0, blocks_per_cycle: typing.SupportsInt | typing.SupportsIndex = 0, tolerance: typing.SupportsFloat | typing.SupportsIndex = 0.0, max_cycles: typing.SupportsInt | typing.SupportsIndex = 0, kept_blocks: typing.SupportsInt | typing.SupportsIndex = 0) -> dict:
    """
    NCut eigensolver statistics with overridden settings (not public API; for benchmarks and tests).
    """
def affinity(features: numpy.typing.NDArray[numpy.float32], z_ratio: typing.SupportsFloat | typing.SupportsIndex = 0.05000000074505806, weights: numpy.typing.NDArray[numpy.float32] | None = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    Dense N x N float32 similarity of the paper's Eq. (2)-(3).
    
    d_ij = sqrt(sum_k w_k (f_ik - f_jk)^2) with w_k = var_k / sum_m var_m computed from the columns of
    `features` when `weights` is None (else the given non-negative weights, used as is);
    S_ij = exp(-d_ij / z)^2 with z = z_ratio * max d. When all features are equal (max d = 0) the
    result is all ones. Limits (ValueError): N <= 65,536 locations (the N x N result takes 16 GiB
    there); z_ratio >= 1e-8 (below it exp(-2 d / z) underflows float32 for all but near-identical
    locations).
    """
def aggregate_region_groups(region_vectors: numpy.typing.NDArray[numpy.float32], group_sizes: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], mean: numpy.typing.NDArray[numpy.float32] | None = None, projection: numpy.typing.NDArray[numpy.float32] | None = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    aggregate_regions of G groups at once: region_vectors holds the groups' rows one group after
    the other (group_sizes[g] rows for group g, adding up to K). Returns float32 G×dim (or G×D without
    whitening), row g the descriptor of group g (zero if all its rows are zero). The rows of all groups
    are whitened by one matrix product, faster than one aggregate_regions call per group.
    """
def aggregate_regions(region_vectors: numpy.typing.NDArray[numpy.float32], mean: numpy.typing.NDArray[numpy.float32] | None = None, projection: numpy.typing.NDArray[numpy.float32] | None = None) -> numpy.typing.NDArray[numpy.float32]:
    """
    The R-MAC / ClusterMAC aggregation of K regional vectors (K×D float32).
    
    Each row → l2 → PCA-whiten (if mean and projection are given) → l2; the rows are summed and the
    sum l2-normalised. Zero rows (empty regions) are skipped, not whitened into noise. Returns float32
    of length dim (or D without whitening); a zero vector if every row is zero.
    """
def aml_localize(feature_map: numpy.typing.NDArray[numpy.float32], query_vector: numpy.typing.NDArray[numpy.float32], p: typing.SupportsFloat | typing.SupportsIndex = 10.0, step: typing.SupportsInt | typing.SupportsIndex = 3, aspect_tolerance: typing.SupportsFloat | typing.SupportsIndex = 1.1, refine_iterations: typing.SupportsInt | typing.SupportsIndex = 5, query_aspect: float | None = None) -> tuple[numpy.typing.NDArray[numpy.int32], float]:
    """
    Approximate max-pooling localisation (AML, Tolias et al. ICLR 2016).
    
    Finds the box of a non-negative float32 D×H×W feature map whose generalised-mean vector
    (sum x^p)^(1/p) has the highest cosine with ``query_vector`` (float32 D, e.g. the query's MAC).
    Boxes with corners on a grid of ``step`` cells (plus the far borders) are searched exhaustively,
    restricted, when ``query_aspect`` (query width / height) is given, to aspect ratios within a
    factor ``aspect_tolerance`` of it; the best box is then refined by moving one edge by 1..step
    cells at a time for up to ``refine_iterations`` rounds. Returns (box int32 [x0, y0, x1, y1)
    half-open in cells, score float).
    """
def aml_localize_codes(codes: numpy.typing.NDArray[numpy.uint8], query_vector: numpy.typing.NDArray[numpy.float32], p: typing.SupportsFloat | typing.SupportsIndex = 10.0, step: typing.SupportsInt | typing.SupportsIndex = 3, aspect_tolerance: typing.SupportsFloat | typing.SupportsIndex = 1.1, refine_iterations: typing.SupportsInt | typing.SupportsIndex = 5, query_aspect: float | None = None) -> tuple[numpy.typing.NDArray[numpy.int32], float]:
    """
    aml_localize on an 8-bit quantised feature map stored channel-last (uint8 H×W×D codes, value = code·scale; the scale cancels in the cosine). Used by clustermac.rerank on its compact feature-map store.
    """
def apply_whitening(vectors: numpy.typing.NDArray[numpy.float32], mean: numpy.typing.NDArray[numpy.float32], projection: numpy.typing.NDArray[numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    (vectors − mean)·projectionᵀ → float32 N×dim. No normalisation: l2-normalise the result yourself. NaN or Inf in any argument, or a result that overflows float32, raises ValueError.
    """
def auto_search_paths() -> dict:
    """
    The paths topk_search's "auto" has chosen in this process: {slot: path}, slot "1" .. "16"
    (that many queries in a chunk) or "more", path "float32", "f32scan" or "bf16". Slots not searched
    yet (or searched only with k > N/8, which always takes float32) are absent.
    """
def cluster_feature_map(feature_map: numpy.typing.NDArray[numpy.float32], rgb: numpy.typing.NDArray[numpy.float32] | None = None, n_clusters: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [5, 20], rgb_clusters: typing.SupportsInt | typing.SupportsIndex = 5, pca_dim: typing.SupportsInt | typing.SupportsIndex = 4, z_ratio: typing.SupportsFloat | typing.SupportsIndex = 0.05000000074505806, spatial_weight: typing.SupportsFloat | typing.SupportsIndex = 0.0, seed: typing.SupportsInt | typing.SupportsIndex = 0, normalization: str = 'sym', pca_mean: numpy.typing.NDArray[numpy.float32] | None = None, pca_basis: numpy.typing.NDArray[numpy.float32] | None = None, similarity_precision: str = 'float32') -> list[numpy.typing.NDArray[numpy.int32]]:
    """
    The paper's per-image clustering: list of int32 H x W label maps.
    
    feature_map: float32 D x H x W activations; rgb: float32 H x W x 3 image resized to H x W, or None.
    Steps: PCA of the N = H*W local D-vectors to pca_dim dims (or, when pca_mean (D,) and
    pca_basis (D, C) are given, (x - pca_mean) @ pca_basis; pca_dim is then ignored), similarity of
    Eq. (2)-(3) with w_k from the variances of the projected features, NCut (see `ncut`) into each
    entry of n_clusters, all sharing one eigensolve; then, if rgb is given and rgb_clusters > 0,
    an NCut of the RGB values (plain l2 colour distance, same z_ratio) into rgb_clusters.
    Returns one map per entry of n_clusters, then the RGB map. A K larger than the number of
    distinct locations is lowered to it (a 1 x 1 map, or constant features, give one region);
    labels are compact 0..m-1. spatial_weight > 0 appends the pixel position, scaled so that
    spatial_weight = 1 makes crossing the whole map cost about one weighted feature standard
    deviation (the ablation of the paper's Fig. 6). normalization: "sym" (default) or "shi", see
    ncut_embedding. The N x N similarity workspace is kept per thread between calls when
    N <= 4096, to avoid page-faulting a fresh one for every image.
    similarity_precision: how that similarity is stored for the eigensolver: "float32" (default,
    on every CPU) or "bfloat16" (only when asked for; CPUs with AVX512-BF16, else ValueError: the
    eigensolver's products with VDPBF16PS, 8 significant bits per similarity). The two give
    different partitions, so the choice never depends on the CPU; Extractor records "bfloat16" in
    its settings.
    Limits (ValueError): N = H*W <= 65,536 locations (the N x N float32 similarity takes 16 GiB
    there); z_ratio >= 1e-8 (see affinity).
    """
def cluster_feature_maps(feature_maps: list[numpy.typing.NDArray[numpy.float32]], rgbs: collections.abc.Sequence[numpy.typing.NDArray[numpy.float32] | None] | None = None, n_clusters: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [5, 20], rgb_clusters: typing.SupportsInt | typing.SupportsIndex = 5, pca_dim: typing.SupportsInt | typing.SupportsIndex = 4, z_ratio: typing.SupportsFloat | typing.SupportsIndex = 0.05000000074505806, spatial_weight: typing.SupportsFloat | typing.SupportsIndex = 0.0, seed: typing.SupportsInt | typing.SupportsIndex = 0, normalization: str = 'sym', pca_mean: numpy.typing.NDArray[numpy.float32] | None = None, pca_basis: numpy.typing.NDArray[numpy.float32] | None = None, n_threads: typing.SupportsInt | typing.SupportsIndex = 0, similarity_precision: str = 'float32') -> list[list[numpy.typing.NDArray[numpy.int32]]]:
    """
    cluster_feature_map for a list of feature maps on a thread pool (GIL released).
    
    rgbs: None or a list with one H x W x 3 array (or None) per map. n_threads <= 0 uses all
    hardware threads, and more than the hardware has (os.cpu_count()) are capped at that number;
    the labels do not depend on n_threads. Returns one list of label maps per input, in input order;
    all inputs are checked (including N = H*W <= 65,536 per map) before any work starts. The system
    refusing to start a thread raises RuntimeError (n_threads=1 runs on the calling thread only).
    """
def crow_pool(feature_map: numpy.typing.NDArray[numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    CroW (Kalantidis et al. 2016, a = b = 2): spatial weights (S/||S||_2)^(1/2) from the channel sum S, channel weights log(sum Q / (1e-6 + Q_k)) from the non-zero proportions Q. Returns the raw float32 D vector; a channel whose weighted sum overflows float32 (values too large) raises ValueError.
    """
def dequantize_codes(codes: numpy.typing.NDArray[numpy.uint8], box: collections.abc.Sequence[typing.SupportsInt] | None = None, scale: typing.SupportsFloat | typing.SupportsIndex = 1.0) -> numpy.typing.NDArray[numpy.float32]:
    """
    Dequantise channel-last uint8 codes (H×W×D) inside box [x0, y0, x1, y1) (None: everything) to a float32 D×h×w map, value = code·scale.
    """
def fit_pca_whitening(vectors: numpy.typing.NDArray[numpy.float32], dim: int | None = None, shrinkage: typing.SupportsFloat | typing.SupportsIndex = 0.001) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """
    PCA-whitening as used by R-MAC, learned from float32 N×D vectors.
    
    Centres the vectors, eigen-decomposes their covariance, keeps the top ``dim`` (default
    min(N, D)) eigenvectors and scales each by (λ + shrinkage·λmax)^(-1/2). ``shrinkage`` is a
    regularisation: whitening learned from a few hundred images is badly conditioned, and without
    it the noise directions are amplified (measured here: about −25 mAP for R-MAC); 1e-3…1e-2 fixes
    that. Returns (mean float32 D, projection float32 dim×D). dim must be an integer (or None) with
    1 <= dim <= min(N, D), else ValueError.
    """
def gem_pool(feature_map: numpy.typing.NDArray[numpy.float32], p: typing.SupportsFloat | typing.SupportsIndex = 3.0) -> numpy.typing.NDArray[numpy.float32]:
    """
    GeM pooling: (mean max(x, 1e-6)^p)^(1/p) per channel. Returns the raw float32 D vector.
    """
def grid_mac(feature_map: numpy.typing.NDArray[numpy.float32], regions: numpy.typing.NDArray[numpy.int32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    MAC over each region [x0, y0, x1, y1) of a D×H×W feature map → float32 R×D. A region that is empty or outside the map raises ValueError, and so does an R×D output above 1 GiB (R·D > 2**28).
    """
def grid_mac_codes(codes: numpy.typing.NDArray[numpy.uint8], box: collections.abc.Sequence[typing.SupportsInt] | None, regions: numpy.typing.NDArray[numpy.int32], scale: typing.SupportsFloat | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    R-MAC's regional MAC inside a box, computed on 8-bit codes.
    
    codes: uint8 H×W×D, channel-last, C-contiguous (value = code·scale, as FeatureMapStore keeps
    them). box: [x0, y0, x1, y1) in cells, or None for the whole map. regions: int32 R×4 rows
    [x0, y0, x1, y1) relative to the box, e.g. rmac_regions(box height, box width). scale: finite,
    >= 0. Returns float32 R×D equal bit for bit to
    grid_mac(dequantize_codes(codes, box, scale), regions): the max is taken on the codes (scaling
    by scale >= 0 is monotone) and only the result is converted to float. An R×D output above
    1 GiB (R·D > 2**28) raises ValueError before allocating.
    """
def kernel_choices() -> dict:
    """
    The registers each kernel with an AVX-512 and an AVX2 version uses in this process, by name.
    
    The two versions give the same bits; which one runs is decided by timing both once per process on
    a small piece of work (at the kernel's first use, or here), not from the CPU flag alone.
    "dense_products": the eigensolvers' and whitening's dense products; "affinity": the similarity of
    Eq. (3). Every value is "avx2" under CLUSTERMAC_NO_AVX512; empty below AVX2.
    """
def l2_normalize(vectors: numpy.typing.NDArray[numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    Scale each row (or the one vector) to unit l2 norm; a zero vector stays zero (never NaN). float32 in, float32 out, same shape. NaN or Inf in vectors raises ValueError.
    """
def ncut(affinity: numpy.typing.NDArray[numpy.float32], n_clusters: typing.SupportsInt | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex = 0, normalization: str = 'sym') -> numpy.typing.NDArray[numpy.int32]:
    """
    Normalized-Cut partition (int32 labels of length N) of a similarity matrix into n_clusters.
    
    Embedding as in ncut_embedding, then the discretisation of Yu & Shi 2003 (random initial row
    from `seed`, greedy orthogonal rows, SVD rotation updates, at most 20 iterations). Labels are
    compact: when the discretisation leaves a cluster empty (fewer separable groups than
    n_clusters), the remaining labels are renumbered 0..m-1 with m < n_clusters. n_clusters must be
    in [1, N]; n_clusters = 1 gives all zeros. Same input and seed give the same labels.
    N <= 65,536 (ValueError above).
    """
def ncut_embedding(affinity: numpy.typing.NDArray[numpy.float32], n_vectors: typing.SupportsInt | typing.SupportsIndex, normalization: str = 'sym', similarity_precision: str = 'float32') -> numpy.typing.NDArray[numpy.float32]:
    """
    Top `n_vectors` Normalized-Cut eigenvectors (float32 N x n_vectors) of a similarity matrix.
    
    The affinity must be square, finite, non-negative and symmetric. normalization="sym" (default,
    as scikit-learn's spectral_clustering): self-loops dropped, eigenvectors u of
    P = D^-1/2 (S - diag S) D^-1/2 with D = rowsum(S - diag S), largest eigenvalues first; "shi"
    (Shi's released Ncut code, which the paper used): P = D^-1/2 (S + 0.5 I) D^-1/2 with
    D = rowsum(S) + 1. On real CNN feature maps "sym" reaches a lower NCut objective and needs fewer
    eigensolver iterations; "shi" gives somewhat more balanced partitions.
    The eigensolver (block Krylov, thick restarts) runs on a fixed budget with a loose residual
    tolerance (1e-2): enough for partitions whose NCut objective matches converged eigenvectors',
    not for eigenvectors to many digits when eigenvalues are close. Returned columns are
    D^-1/2 u scaled to unit l2 norm, signed so that each column's largest-magnitude entry is positive.
    similarity_precision="bfloat16" rounds the affinity to bf16 first and runs the eigensolver's
    products with AVX512-BF16 (see cluster_feature_map); "float32" (default) keeps it as given. N <= 65,536 (ValueError above).
    """
def pca_project(features: numpy.typing.NDArray[numpy.float32], n_components: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """
    Projection of N x D float32 features onto their top principal components (paper Sec. 3.1).
    
    Returns (projection float32 N x C, variances float32 C): the centred features projected on the
    top C = n_components principal directions, and the variance of each projected column
    (divisor N - 1; 0 when N = 1), in descending order. Components beyond the rank of the data
    have zero variance and a zero column. The sign of each column is fixed so that its
    largest-magnitude entry is positive. Solved by a block Krylov eigensolver on the implicit
    covariance (or Gram) operator with a fixed budget of passes over the data, so no D x D
    eigendecomposition is formed: accurate for leading components separated by clear variance gaps
    (as in CNN activations); within a flat part of the spectrum the directions are approximate.
    """
def preset_auto_search_paths(choices: collections.abc.Mapping[str, str]) -> list[str]:
    """
    Take "auto" choices timed by an earlier process on this kind of CPU ({slot: path}, as
    auto_search_paths gives them) instead of timing again: every path gives the same results, so this
    changes only how long the first search of each batch size takes. A slot already chosen in this
    process keeps its choice; an unknown slot or path, or one this CPU cannot take there (bf16 without
    AVX512-BF16, f32scan for "more"), is skipped. Returns the slots taken.
    """
def region_boxes(labels: numpy.typing.NDArray[numpy.int32]) -> numpy.typing.NDArray[numpy.int32]:
    """
    Bounding box of each labelled region, for ClusterMAC's "box" pooling (not in the paper).
    
    labels: int32 H×W, region ids 0..K-1; negative labels are ignored. Returns int32 K×4 rows
    [x0, y0, x1, y1) (half-open, cells) with K = labels.max() + 1, the smallest rectangle holding
    every location of region k; a region id that names no location gets [0, 0, 0, 0].
    """
def region_mac(feature_map: numpy.typing.NDArray[numpy.float32], labels: numpy.typing.NDArray[numpy.int32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    Per-region MAC (the paper's Eq. 4): max-pool each channel over each labelled region.
    
    feature_map: float32 D×H×W. labels: int32 H×W, region ids 0..K-1; negative labels are
    ignored (masked out). Returns float32 K×D with K = labels.max() + 1 (0 rows if every label
    is negative). A region id that names no location gives a zero row. Limits (ValueError):
    K <= 2**20, and the K×D float32 output at most 1 GiB (K·D <= 2**28), checked before allocating.
    """
def region_mac_codes(codes: numpy.typing.NDArray[numpy.uint8], labels: numpy.typing.NDArray[numpy.int32], box: collections.abc.Sequence[typing.SupportsInt] | None, scale: typing.SupportsFloat | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    ClusterMAC's per-cluster MAC inside a box, computed on 8-bit codes.
    
    codes: uint8 H×W×D, channel-last, C-contiguous (value = code·scale, as FeatureMapStore keeps
    them). labels: int32 H×W, the WHOLE map's cluster labels 0..K-1 (negative = masked out).
    box: [x0, y0, x1, y1) in cells, or None for the whole map. scale: finite, >= 0. Returns float32
    K×D with K = labels.max() + 1 over the whole map (0 rows if every label is negative): row k is
    the max of code·scale over the box's cells labelled k, a zero row if cluster k has no cell in the
    box. Equal bit for bit to region_mac(dequantize_codes(codes, box, scale), labels[y0:y1, x0:x1])
    padded with zero rows up to K. Limits (ValueError, as region_mac): K <= 2**20 and the K×D
    float32 output at most 1 GiB (K·D <= 2**28), checked before allocating.
    """
def rmac_regions(height: typing.SupportsInt | typing.SupportsIndex, width: typing.SupportsInt | typing.SupportsIndex, levels: typing.SupportsInt | typing.SupportsIndex = 3) -> numpy.typing.NDArray[numpy.int32]:
    """
    The R-MAC grid of Tolias et al. (ICLR 2016) for an H×W feature map.
    
    Returns int32 R×4 rows [x0, y0, x1, y1) (half-open, feature-map cells): square regions of side
    floor(2·min(H, W)/(l+1)) at levels l = 1..levels with ~40 % overlap; the number of regions on
    the long side follows Tolias' rule. No extra global region. Limits (ValueError):
    1 <= height, width <= 2**31 - 1 (coordinates are int32) and 1 <= levels <= 64.
    """
def simd_level() -> str:
    """
    The instruction set the vectorised kernels use in this process: "avx512", "avx2" or "scalar".
    
    Chosen once from the CPU's features, capped by the environment variables CLUSTERMAC_NO_AVX512
    (at most "avx2") and CLUSTERMAC_NO_AVX2 ("scalar"); "scalar" also when the module was built
    with CLUSTERMAC_NO_SIMD_DISPATCH or for a CPU other than x86-64.
    """
def spoc_pool(feature_map: numpy.typing.NDArray[numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """
    SPoC (Babenko & Lempitsky 2015): sum pooling with a Gaussian centre prior (sigma = min(H, W)/6, one third of the centre-to-closest-border distance). Returns the raw float32 D vector; a channel whose sum overflows float32 (values too large) raises ValueError.
    """
def topk_search(database: numpy.typing.NDArray[numpy.float32], queries: numpy.typing.NDArray[numpy.float32], k: typing.SupportsInt | typing.SupportsIndex, n_threads: typing.SupportsInt | typing.SupportsIndex = 0, path: str = 'auto', return_details: bool = False) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.int64]] | tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.int64], dict]:
    """
    Exact top-k dot-product search (cosine similarity for l2-normalised vectors).
    
    database: float32 N×D, C-contiguous (a np.memmap works and is streamed block by block);
    queries: float32 Q×D; 1 <= k <= N; n_threads <= 0 uses every core, and more threads than the
    hardware has (os.cpu_count()) are capped at that number; the result does not depend on
    n_threads. Returns (scores float32 Q×k sorted descending, indices int64 Q×k), ties broken by the
    smaller database index. Memory beyond the inputs is O(threads·Q·256) floats. The GIL is released.
    path: "float32" scores every row in float32 (a register-tiled kernel over transposed blocks);
    "f32scan" scans the rows in place in float32, up to 16 queries at a time, with a rigorous bound on
    the gap to the float32 kernel's score; "bf16" (CPUs with AVX512-BF16 only, else ValueError) scans
    in bfloat16 with a rigorous error bound; both scans re-score their candidates with the float32
    kernel, so every path returns the same bits as "float32". "auto" (default) picks, when k <= N/8,
    the path that a one-off timing in this process (tens of ms of thread CPU time, at the first
    search of each batch size up to 16 and at the first larger one) found fastest; else float32.
    clustermac.Index.search keeps those choices on disk per kind of CPU (clustermac.search.path_cache),
    so that later processes take them without timing (preset_auto_search_paths).
    return_details=True adds a third item: {"path": the path used ("float32", "bf16", "f32scan", or
    several joined by "+" when query chunks used different ones), "candidates_rescored": rows the scan
    paths re-scored in float32, summed over queries}.
    Errors: NaN or Inf in database or queries → ValueError naming the row; a returned score that
    overflows float32 (vectors far from unit norm) → ValueError (only the k returned scores of each
    query are checked, so a NaN score outside them is skipped silently); the system refusing to
    start a thread → RuntimeError (n_threads=1 runs on the calling thread only).
    """
