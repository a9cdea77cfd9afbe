"""The ESM-2 model: its sizes and configs (architecture), loading once on the CPU from a hub id, a local directory,
a fair-esm .pt or dummy weights (load, hub, fair_esm), and the pieces of its forward (contact head, fused GELU).

Owns the weights and the forward. May import io (the residue alphabet), config and errors.
"""
