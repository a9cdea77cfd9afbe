"""esm2cli: ESM-2 protein embeddings from FASTA to Parquet on every device you have.

``from esm2cli import Embedder`` is the Python API (esm2cli.api); it is imported on first use, so that
the command line starts without loading torch.
"""

from esm2cli.config import __version__

__all__ = ["Embedder", "__version__"]


def __getattr__(name: str):
    if name == "Embedder":
        from esm2cli.api import Embedder

        return Embedder
    raise AttributeError(f"module 'esm2cli' has no attribute {name!r}")
