"""esm2cli: ESM-2 protein embeddings from FASTA to Parquet on every device you have."""

__version__ = "0.1.0"
