"""Loading ESM C: its configs by size, its fixed vocabulary, and its weights read strictly from the checkpoint.

A checkpoint is read tensor by tensor (safetensors, single or sharded; else pytorch_model.bin) and checked
against the names the architecture needs before anything is built: a key missing, or one that no part of
ESM C reads, refuses the checkpoint with the keys named (never random weights in their place). transformers'
ESM C modules are never built: only its config class is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.io.fasta import RESIDUES
from esm2cli.model.architecture import ESMC_ARCHITECTURES
from esm2cli.model.esmc import PackedEsmc

log = logging.getLogger(__name__)

# ESM C's vocabulary (transformers' EsmcTokenizer, the same in every checkpoint: the ids are in the weights).
# X, B, U, Z and O have tokens of their own (24-28), as in ESM-2; ids 33-63 are unused padding of the vocabulary.
VOCABULARY = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-|", "<mask>"]
CLS_ID, PAD_ID, EOS_ID, MASK_ID = 0, 1, 2, 32
_SHOWN_KEYS = 8  # keys named in an error at most (then a count)
_IGNORED = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")  # buffers some exports carry


def esmc_config(alias: str):
    """The transformers config of one of the three ESM C sizes, built without a download."""
    from transformers import EsmcConfig

    _, layers, hidden, heads, ffn = ESMC_ARCHITECTURES[alias]
    return EsmcConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, vocab_size=64
    )


def token_lut() -> np.ndarray:
    """Maps an ASCII code to its ESM C token id (only residue letters are used; the rest <unk>)."""
    lut = np.full(256, VOCABULARY.index("<unk>"), dtype=np.int64)
    for ch in RESIDUES:
        lut[ord(ch)] = VOCABULARY.index(ch)
    return lut


def check_config(config, source: str) -> None:
    """Refuses an ESM C config the forward does not compute as written (biases, grouped queries, other rotary).

    Raises:
        ModelLoadError: The config asks for something no released ESM C has.
    """
    rope = getattr(config, "rope_parameters", None) or {}
    problems = [
        what
        for what, bad in (
            ("attention_bias", bool(getattr(config, "attention_bias", False))),
            ("mlp_bias", bool(getattr(config, "mlp_bias", False))),
            ("hidden_act", getattr(config, "hidden_act", "silu") != "silu"),
            ("num_key_value_heads", config.num_key_value_heads != config.num_attention_heads),
            ("head_dim", config.head_dim * config.num_attention_heads != config.hidden_size),
            ("rope_type", rope.get("rope_type", "default") != "default"),
            ("vocab_size", config.vocab_size < len(VOCABULARY)),
        )
        if bad
    ]
    if problems:
        raise ModelLoadError(f"{source}: an ESM C config esm2cli does not run ({', '.join(problems)} differ)")


def expected_keys(layers: int, lm_head: bool) -> set[str]:
    """The tensor names ESM C needs (``EsmcModel`` names), with the LM head's when asked for."""
    keys = {"embed_tokens.weight", "norm.weight"}
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += [f"{n}.{p}" for n in ("input_layernorm", "post_attention_layernorm") for p in ("weight", "bias")]
    keys |= {f"layers.{i}.{name}" for i in range(layers) for name in per_layer}
    if lm_head:
        keys |= {f"lm_head.{m}.{p}" for m in ("dense", "layer_norm", "decoder") for p in ("weight", "bias")}
    return keys


def expected_shapes(config, lm_head: bool) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor ESM C of ``config`` needs (see expected_keys)."""
    h, f, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, h), "norm.weight": (h,)}
    for key in sorted(expected_keys(config.num_hidden_layers, lm_head) - shapes.keys()):
        if key.endswith(("gate_proj.weight", "up_proj.weight")):
            shapes[key] = (f, h)
        elif key.endswith("down_proj.weight"):
            shapes[key] = (h, f)
        elif key.startswith("lm_head.decoder"):
            shapes[key] = (vocab, h) if key.endswith("weight") else (vocab,)
        elif key.endswith(("proj.weight", "dense.weight")):
            shapes[key] = (h, h)
        else:
            shapes[key] = (h,)
    return shapes


def _named(keys: set[str]) -> str:
    shown = sorted(keys)[:_SHOWN_KEYS]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def _weight_files(folder: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):  # fmt: skip
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    raise ModelLoadError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()


def read_checkpoint(folder: Path, config, lm_head: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under ``EsmcModel`` names, checked strictly against the architecture of
    ``config``: names and shapes.

    Both layouts are read: ``EsmcForMaskedLM`` (``esmc.*`` and ``lm_head.*``) and ``EsmcModel`` (no prefix).
    The LM head's keys are expected only when asked for (an encoder-only checkpoint embeds).

    Raises:
        ModelLoadError: Unreadable, keys missing, keys ESM C has no place for, or a tensor of another shape.
    """
    layers = config.num_hidden_layers
    try:
        tensors = {key.removeprefix("esmc."): value for key, value in _read_tensors(_weight_files(folder))}
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot read the weights of {folder}: {str(exc).strip().splitlines()[0]}") from exc
    needed = expected_keys(layers, lm_head)
    known = expected_keys(layers, lm_head=True) | {f"{p}{k}" for p in ("", "esmc.") for k in _IGNORED}
    missing, unexpected = needed - tensors.keys(), tensors.keys() - known
    if lm_head and missing and all(k.startswith("lm_head.") for k in missing):
        raise ModelLoadError(
            f"{folder} has no masked-LM head (missing {_named(missing)}): it was saved as an encoder only"
        )
    if missing or unexpected:
        parts = ([f"missing {_named(missing)}"] if missing else []) + (
            [f"unexpected {_named(unexpected)}"] if unexpected else []
        )
        raise ModelLoadError(f"{folder} does not match an ESM C of {layers} layers: {'; '.join(parts)}")
    _check_shapes(folder, tensors, expected_shapes(config, lm_head))
    return {k: v for k, v in tensors.items() if k in needed}


def _check_shapes(folder: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuses a tensor whose shape is not the config's: it would fail (or broadcast) only inside a batch."""
    wrong = [
        f"{key} is {tuple(tensors[key].shape)}, not {shape}"
        for key, shape in sorted(shapes.items())
        if tuple(tensors[key].shape) != shape
    ]
    if wrong:
        more = f" and {len(wrong) - _SHOWN_KEYS} more" if len(wrong) > _SHOWN_KEYS else ""
        raise ModelLoadError(f"{folder} does not match its config: {'; '.join(wrong[:_SHOWN_KEYS])}{more}")


_POOL = 1_000_003  # random values drawn per dummy model: a prime, so that no weight row repeats another


def random_weights(config, *, lm_head: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Seeded random ESM C tensors: N(0, 0.02) matrices filled from one pool of draws, LayerNorms 1 and 0.

    The same seed gives the same weights in every run and process (as esm2cli.model.load.random_model).
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=generator).mul_(0.02).to(dtype)
    shapes = expected_shapes(config, lm_head)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("bias"):
            weights[key] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1:
            weights[key] = torch.ones(shape, dtype=dtype)
        else:
            weights[key] = _from_pool(pool, shape, int(torch.randint(_POOL, (1,), generator=generator)))
    return weights


def _from_pool(pool: torch.Tensor, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """A tensor of ``shape`` copied from ``pool`` from ``offset`` on, wrapping around."""
    flat = torch.empty(int(np.prod(shape)), dtype=pool.dtype)
    done = 0
    while done < flat.numel():
        take = min(flat.numel() - done, pool.numel() - offset)
        flat[done : done + take].copy_(pool[offset : offset + take])
        done, offset = done + take, 0
    return flat.view(shape)


def build_forward(config, weights: dict, *, dtype: torch.dtype, lm_head: bool) -> PackedEsmc:
    """esm2cli's ESM C forward from checked tensors (see read_checkpoint, random_weights)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return PackedEsmc.from_state_dict(
        weights, num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        max_positions=config.max_position_embeddings, mask_id=MASK_ID,
        rope_theta=float(rope.get("rope_theta", 10000.0)), dtype=dtype, lm_head=lm_head,
    )  # fmt: skip


def refuse_contacts(source: str) -> ConfigError:
    """The one error for --contacts with ESM C."""
    return ConfigError(f"--contacts: {source} is an ESM C model, which has no contact head (ESM-2 models have one)")
