"""Frozen configuration objects, built once from the command-line options."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

__version__ = "0.1.0"  # the package version (pyproject.toml says the same; a test checks)

DEFAULT_MODEL = "esm2_t33_650M"
DEFAULT_BATCH_SIZE = 64
# Padded tokens per batch, by device kind. On the CPU, small batches keep activations in cache and
# run faster per residue (benchmarks/token_budget.py); GPUs want large batches: on an H100 (650M, bf16)
# 32,768 ran 1.27x faster than 16,384 and 65,536 1.12x faster again; 32,768 leaves room for the larger
# models on smaller cards (a batch that does not fit is split and retried, at a cost).
DEFAULT_MAX_TOKENS = {"cpu": 1024, "cuda": 32768}
# The choices of the options that pick a mode: Click's choices, the API's checks and the docs read these.
POOLINGS = ("mean", "bos")
LONG_SEQUENCES = ("truncate", "window", "error")
SCORE_MODES = ("pll", "mutations", "all-substitutions")
SCORE_METHODS = ("masked-marginal", "wt-marginal")
# A short protein every replica embeds once before it takes work (captures, kernel choices, first-call costs).
WARMUP_SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"
# esm2cli serve: seconds that requests in flight may take after SIGTERM (Kubernetes' grace period is 30 s too).
DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_TRUNCATE = 1022  # ESM-2 was trained on 1024 tokens: 1022 residues plus <cls> and <eos>
DEFAULT_WINDOW_OVERLAP = 256
OUTPUT_DTYPES = ("float32", "float16")  # stored vectors; float16 halves the storage, rounding to ~1e-3 relative
DEFAULT_OUTPUT_DTYPE = "float32"
DEFAULT_CHUNK_SIZE = 4096
# esm2cli serve: recent sequences whose vectors are kept (650M, one layer: 5 kB each, 51 MB for 10,000).
DEFAULT_CACHE_SIZE = 10_000
# A chunk is also committed once this much compute went into it, so that an interruption loses about
# this much work on any device; the first chunk of a run, before its speed is known, holds this many residues.
DEFAULT_COMMIT_SECONDS = 30.0
FIRST_CHUNK_RESIDUES = 4096
# ... and once its embeddings reach this many bytes, so that memory stays bounded with --per-token: at most
# WRITER_DEPTH + 2 chunks are alive (one being computed, WRITER_DEPTH waiting for the writer, one being
# written), ~192 MB of embeddings, plus one row group's Arrow copy (io.schema.ROW_GROUP_BYTES).
CHUNK_BYTES = 64 << 20
# Writing a chunk takes a fraction of the time computing it takes, so one waiting chunk keeps the writer busy.
WRITER_DEPTH = 1


# Modeled GPUs (esm2cli bench --simulate): each card's published dense peak in FLOP/s by dtype (NVIDIA
# datasheets: the tensor-core figure without sparsity for bf16/fp16, the non-tensor FP32 figure for
# float32, as PyTorch runs fp32 matmuls without TF32 by default). A10G: AWS's variant of the A10, 70 TFLOP/s on
# its tensor cores (the A10 has 125). A100 and H100 are the SXM parts; the H200 has the H100's compute.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "a10g": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "l4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}
# The share of that peak a modeled card reaches on ESM-2 (model FLOPs of the padded batch), and the fixed
# time each call adds. Calibration against the first real H100 run is in benchmarks/RESULTS.md.
DEFAULT_MFU = 0.45
DEFAULT_CALL_OVERHEAD_MS = 2.0
# esm2cli bench: seconds each device count runs (1, 2, 4, 8 devices: about a minute in all), and its largest count.
DEFAULT_BENCH_SECONDS = 8.0
MAX_BENCH_DEVICES = 64


@dataclass(frozen=True, kw_only=True)
class ModeledGPU:
    """GPUs that run no model: each batch takes the time the card would take, waiting without the GIL.

    Attributes:
        card: A key of GPU_PEAKS (a10g, l4, a100, h100, h200).
        count: How many of them.
        mfu: The share of the card's peak reached in the run's dtype.
        overhead_ms: Fixed device time per call (copies, synchronisation, the first kernels' ramp).
        launch_ms: Host time per call that holds the GIL (the Python side of launching an eager
            forward's kernels); overlaps the device time, as asynchronous launches do.
    """

    card: str
    count: int = 1
    mfu: float = DEFAULT_MFU
    overhead_ms: float = DEFAULT_CALL_OVERHEAD_MS
    launch_ms: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to load, how, and where.

    Attributes:
        model: A short alias (esm2_t33_650M), a Hugging Face hub id, or a local directory.
        load_format: "auto" loads real weights; "dummy" builds the architecture with random weights.
        dtype: "auto", "float32", "bfloat16" or "float16": the dtype the weights are converted to once
            (auto: bfloat16 where the devices compute it natively, else float32).
        devices: A device spec: "auto", "cpu", a count, "cuda:0,cuda:2", or "sim:N".
        simulate: Modeled GPUs instead of devices (benchmarks): no weights are loaded and the
            embeddings are placeholders.
    """

    model: str = DEFAULT_MODEL
    load_format: str = "auto"
    dtype: str = "auto"
    devices: str = "auto"
    simulate: ModeledGPU | None = None


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """What is computed for each sequence.

    Attributes:
        layers: Layer indices; 0 is the embedding layer, negative counts from the end (-1 is the last).
        pooling: "mean" over residues (no <cls>, <eos> or padding) or "bos" (the <cls> token).
        per_token: Also return the per-residue representations.
        truncate: Residues kept per sequence (W, the window width in window mode).
        long_sequences: Sequences over ``truncate`` residues: "truncate" (flagged), "window" (embedded
            whole in overlapping windows, see esm2cli.runtime.windows) or "error" (invalid records).
        window_overlap: Residues shared by consecutive windows.
        contacts: Also return contact probabilities from the contact head (which is then loaded).
        output_dtype: How stored vectors are kept: "float32", or "float16" (half the bytes, rounded to
            ~3 significant digits); computed in float32 either way.
    """

    layers: tuple[int, ...] = (-1,)
    pooling: str = "mean"
    per_token: bool = False
    truncate: int = DEFAULT_TRUNCATE
    contacts: bool = False
    long_sequences: str = "truncate"
    window_overlap: int = DEFAULT_WINDOW_OVERLAP
    output_dtype: str = DEFAULT_OUTPUT_DTYPE

    @property
    def max_length(self) -> int | None:
        """Longer sequences are invalid records (error mode only)."""
        return self.truncate if self.long_sequences == "error" else None


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How sequences are grouped into batches.

    Attributes:
        batch_size: At most this many sequences a batch.
        max_tokens: At most this many padded tokens a batch, <cls> and <eos> included (None: by device).
        chunk_size: Records read, sorted by length and committed together at most.
        commit_seconds: A chunk is also closed once it holds about this much compute.
        chunk_bytes: ... or this many bytes of embeddings (bounds memory with per-token output).
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    max_tokens: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    chunk_bytes: int = CHUNK_BYTES

    @property
    def token_budget(self) -> int:
        """max_tokens once decided (for_devices, build_engine): asking before is a bug."""
        if self.max_tokens is None:
            raise ValueError("the token budget is asked for before it is decided; this is a bug")
        return self.max_tokens

    def for_devices(self, on_cuda: bool) -> BatchConfig:
        """This config with max_tokens decided: the device kind's default when not set."""
        if self.max_tokens is not None:
            return self
        return replace(self, max_tokens=DEFAULT_MAX_TOKENS["cuda" if on_cuda else "cpu"])


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """How FASTA records are checked.

    Attributes:
        skip_invalid: Embed the valid records and report the others instead of stopping.
        allow_duplicate_ids: Accept records that share an id.
    """

    skip_invalid: bool = False
    allow_duplicate_ids: bool = False


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The HTTP server's bounds, batching and access control.

    Attributes:
        batching: Coalesce concurrent requests into engine batches (dynamic batching).
        max_batch_size: Sequences per engine batch at most.
        max_wait_ms: How long the first request of a batch waits for others.
        max_tokens: Padded tokens per engine batch at most (None: the device kind's default).
        max_client_batch: Sequences per /predict/batch or /v1/embeddings request at most.
        max_queue: Sequences accepted and unanswered at most; past it, 429 with Retry-After.
        request_timeout_s: A request not answered by then gets 503.
        max_body_bytes: Request bodies over this size get 422.
        truncation: Truncate long sequences (else 422).
        api_keys: Bearer keys that are accepted; empty: no authentication (never shown in repr).
        public_metrics: /metrics answers without a key.
        public_docs: /docs, /redoc and /openapi.json answer without a key.
        header_timeout_s: A connection that has not sent a request's complete headers by then is closed (408).
        body_timeout_s: A request body not complete by then gets 408 and the connection is closed.
        max_connections: Open connections at most; past it, new ones get 503 and are closed.
        cache_size: Recent distinct sequences whose vectors are kept and answered again; 0: no cache.
    """

    batching: bool = True
    max_batch_size: int = DEFAULT_BATCH_SIZE
    max_wait_ms: float = 5.0
    max_tokens: int | None = None
    max_client_batch: int = 64
    max_queue: int = 2048
    request_timeout_s: float = 60.0
    max_body_bytes: int = 4 << 20
    truncation: bool = True
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    public_metrics: bool = False
    public_docs: bool = False
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    cache_size: int = DEFAULT_CACHE_SIZE

    def __repr__(self) -> str:
        # The keys are secrets: the resolved config is logged at startup with their count only.
        return f"ServeConfig({describe(self)})"


def describe(config) -> str:
    """A configuration as one readable line for the startup log: ``name=value, ...``; secrets as a count."""
    shown = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "api_keys":
            shown.append(f"api_keys=<{len(value)} redacted>")
        elif f.repr:
            shown.append(f"{f.name}={_readable(value)}")
    return ", ".join(shown)


def _readable(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "-"
    if hasattr(value, "__dataclass_fields__"):
        return f"({describe(value)})"
    return str(value)


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Which contiguous slice of the input records this process embeds.

    Attributes:
        index: 0-based shard number (JOB_COMPLETION_INDEX in a Kubernetes Indexed Job).
        count: How many shards split the input.
        suffix: The parts' format: ".parquet", or ".h5" for HDF5.
    """

    index: int = 0
    count: int = 1
    suffix: str = ".parquet"

    def range(self, records: int) -> tuple[int, int]:
        """The 0-based record positions [start, stop) of this shard: contiguous, complete, disjoint."""
        return self.index * records // self.count, (self.index + 1) * records // self.count

    def part_name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}{self.suffix}"


# ---- esm2cli map -------------------------------------------------------------------------------------------------

MAP_METHODS = ("pca", "umap")
# Points the projection (and --color-by cluster's k-means) is fitted on; the rest are transformed a row group at a
# time. PCA of an input of at most this many points is the PCA of all of them. A sample is also held to
# MAP_SAMPLE_BYTES of float32 vectors (100,000 points of 1,280 dims), so that wide models fit in the same memory.
DEFAULT_MAP_SAMPLE = 100_000
MAP_SAMPLE_BYTES = 512 << 20
# Points drawn on the page: past this, a uniform random sample of them (said on the page and in the summary), so
# that the page stays usable; the PNG and SVG draw every point (as a density past it).
DEFAULT_MAP_POINTS = 200_000
DEFAULT_NEIGHBORS = 15  # umap-learn's own default
DEFAULT_CLUSTERS = 10


@dataclass(frozen=True, kw_only=True)
class MapConfig:
    """What ``esm2cli map`` projects and how it colours the points.

    Attributes:
        method: "pca" (scikit-learn PCA, exact and deterministic) or "umap" (umap-learn, seeded).
        layer: The layer read from inputs of several layers (None: inputs of one layer).
        seed: Seeds the fit sample, UMAP, the k-means and the points drawn on the page.
        neighbors: UMAP's n_neighbors.
        sample: The most points the projection and the k-means are fitted on.
        color_by: "length", "truncated", "windows", "cluster", "description:REGEX", a column of the labels file
            (or "labels:COLUMN"); None: the labels' first column beside the id, else "cluster".
        labels: A TSV or CSV of labels joined by id.
        clusters: k of --color-by cluster.
        max_points: The most points drawn on the page.
    """

    method: str = "pca"
    layer: int | None = None
    seed: int = 0
    neighbors: int = DEFAULT_NEIGHBORS
    sample: int = DEFAULT_MAP_SAMPLE
    color_by: str | None = None
    labels: str | None = None
    clusters: int = DEFAULT_CLUSTERS
    max_points: int = DEFAULT_MAP_POINTS


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """What ``esm2cli score`` computes.

    Attributes:
        mode: "pll" (pseudo-log-likelihood per protein), "mutations" (the mutants of a CSV) or
            "all-substitutions" (every single substitution of every protein).
        method: "masked-marginal" (the position masked) or "wt-marginal" (the wild type unmasked), for
            mutations and all-substitutions; a pseudo-log-likelihood is masked by definition.
        mutations: The id,mutant CSV, in mode "mutations".
        window: Residues per forward pass; a position of a longer protein is scored in the window of
            this many residues that centres it (clamped to the protein's ends).
        skip_invalid: Score the valid records and rows and report the others instead of stopping.
    """

    mode: str = "pll"
    method: str = "masked-marginal"
    mutations: str | None = None
    window: int = DEFAULT_TRUNCATE
    skip_invalid: bool = False


# ---- esm2cli index and search ------------------------------------------------------------------------------------

INDEX_KINDS = ("auto", "flat", "ivf-pq", "hnsw")
# --kind auto: an exact (flat) database below this many vectors, IVF-PQ from it on. benchmarks/search_bench.py
# (RESULTS.md, 2026-12-07, synthetic families 320 wide, 2 shared cores): IVF-PQ at its calibrated nprobe answers
# 0.76x the exact queries/s at 10k vectors, 2.0x at 50k, 15x to 35x at 1M (recall@10 0.97); it overtakes at ~16k,
# but below ~400k (10x, interpolated) it buys less than one order of magnitude for giving up exactness and a
# training step of minutes, so exact stays the default up to there. The one place the threshold is written.
AUTO_FLAT_MAX_VECTORS = 400_000
DEFAULT_DECOYS = 1000  # decoy queries the null model for E-values is fitted on, per shard (0: no E-values)
DEFAULT_TOP_K = 10
# Hits per query at most from POST /search: bounds an answer to --max-client-batch x this many hits (64 x 1,000 hits
# is about 5 MB of JSON); the CLI writes a file and takes any k up to the database's size.
MAX_SERVE_TOP_K = 1000
HIT_FORMATS = ("tsv", "m8", "parquet")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """What ``esm2cli index`` builds.

    Attributes:
        kind: "flat" (exact), "ivf-pq", "hnsw", or "auto" (flat below AUTO_FLAT_MAX_VECTORS vectors).
        layer: The layer read from inputs of several layers (None: inputs of one layer).
        decoys: Decoy queries the null model is fitted on (0: no E-values).
        fasta: The FASTA the inputs were embedded from, whose sequences the decoys shuffle (None: the one named
            in the inputs' metadata, when it is readable).
        seed: Seeds the training sample, the decoys and the quantizer's k-means.
        devices: Where the decoys are embedded (as --devices).
        train_only: Only train the IVF-PQ quantizer every shard shares (DB/trained.faiss).
    """

    kind: str = "auto"
    layer: int | None = None
    decoys: int = DEFAULT_DECOYS
    fasta: str | None = None
    seed: int = 0
    devices: str = "auto"
    train_only: bool = False
