"""An independent computation of ESM-2 embeddings, one sequence at a time, directly with transformers."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer, EsmModel

from helpers import OneProteinAtATime


class DirectReference(OneProteinAtATime):
    """Embeds each sequence alone with the model's own tokenizer and output_hidden_states."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = EsmModel.from_pretrained(model_dir, add_pooling_layer=False).eval().to(dtype)
        self.num_layers = self.model.config.num_hidden_layers

    def hidden(self, seq: str, layer: int) -> np.ndarray:
        enc = self.tokenizer(seq, return_tensors="pt")
        with torch.no_grad():
            states = self.model(**enc, output_hidden_states=True).hidden_states
        return states[layer % (self.num_layers + 1)][0].numpy()


def torch_state() -> str:
    """What of torch's process-wide state can change a float32 result: for the message of a failed comparison."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, default dtype {torch.get_default_dtype()}, "
        f"float32 matmul {torch.get_float32_matmul_precision()}, CPU {torch.backends.cpu.get_cpu_capability()}"
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
