"""esm2cli: ESM-2 protein embeddings from FASTA to Parquet on every device you have.

``from esm2cli import Embedder`` is the Python API (esm2cli.api), and ``from esm2cli import Index`` opens a search
database of ``esm2cli index`` (esm2cli.search.index); both are imported on first use, so that the command line
starts without loading torch or FAISS.
"""

from esm2cli.config import __version__

__all__ = ["Embedder", "Index", "__version__"]


def __getattr__(name: str):
    if name == "Embedder":
        from esm2cli.api import Embedder

        return Embedder
    if name == "Index":
        from esm2cli.search.index import Index

        return Index
    raise AttributeError(f"module 'esm2cli' has no attribute {name!r}")
