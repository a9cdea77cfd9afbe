"""What is done with the vectors of finished runs: the vectors read back from outputs (vectors), the search
database (FAISS indexes, the null model for E-values) and the map.

May import api (to embed FASTA queries and decoys with the database's model), jobs, runtime, io, config and
errors, and FAISS, scikit-learn and umap-learn inside functions; never serve or cli.
"""
