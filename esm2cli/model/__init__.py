"""The ESM-2 and ESM C models: their sizes and configs (architecture), loading once on the CPU from a hub id, a local
directory, a fair-esm .pt or dummy weights (load, hub, fair_esm, esmc_load), and esm2cli's own forwards (forward,
esmc) with their heads.

Owns the weights and the forward. May import io (the residue alphabet), config and errors.
"""
