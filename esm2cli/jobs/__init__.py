"""Whole jobs over a FASTA: the embed pipeline (check pass, chunks, resume, shards), scoring and mutants (masked-LM
head), the bench, and the synthetic workloads it draws.

May import runtime, model, io, config and errors; never serve or cli.
"""
