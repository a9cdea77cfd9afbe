"""Reading and writing: FASTA records and their checks, shards of an input by byte range (plain and BGZF), storage
(local paths and fsspec URLs), the run's identity, output locks, and the Parquet and HDF5 outputs (schema, chunks of
a resumable run, merge of shards).

Owns every byte that crosses the disk or an object store. May import config and errors only: no torch, no model.
"""
