"""Model loading: hub id, local directory, fair-esm checkpoint or dummy weights, once, on the CPU.

Two families: ESM-2 (read through transformers' EsmModel) and ESM C (read strictly, tensor by tensor, by
esm2cli.model.esmc_load). Either ends as esm2cli's own packed forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, EsmConfig, EsmForMaskedLM, EsmModel, EsmTokenizer
from transformers.models.esm.modeling_esm import EsmLMHead
from transformers.utils import logging as hf_logging

from esm2cli.config import ModelConfig
from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.io.fasta import RESIDUES
from esm2cli.model import esmc_load, fair_esm
from esm2cli.model.architecture import (
    ARCHITECTURES,
    DTYPES,
    bundled_tokenizer,
    context_of,
    esm2_config,
    esmc_alias,
    resolve_source,
)
from esm2cli.model.esmc import PackedEsmc
from esm2cli.model.forward import PackedEsm2

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """An ESM-2 or ESM C model loaded once on the CPU: esm2cli's own forward, and what replicas need to tokenise.

    Attributes:
        name: The model as the user named it.
        source: The hub id or directory it was loaded from.
        config: The transformers config (architecture, special tokens): EsmConfig or EsmcConfig.
        forward: esm2cli's packed forward (esm2cli.model.forward.PackedEsm2, or its ESM C extension
            esm2cli.model.esmc.PackedEsmc), in eval mode, in its final
            dtype, on the CPU, with the LM head and the contact head when asked for; None when built without
            weights (modeled GPUs need only the shape).
        token_lut: Maps an ASCII code to its token id (only residue letters are used).
        cls_id, eos_id, pad_id, mask_id: Special token ids.
        dummy: True when the weights are random.
        reference: The transformers encoder the weights were read from (and ``reference_lm_head``), kept only
            when asked (tests and benchmarks compare against it); else dropped, so the weights are held once.
            ESM-2 only: ESM C is never built as transformers modules.
        family: "esm2" or "esmc".
    """

    name: str
    source: str
    config: Any
    forward: PackedEsm2 | PackedEsmc | None
    token_lut: np.ndarray
    cls_id: int
    eos_id: int
    pad_id: int
    dummy: bool
    mask_id: int = 32
    reference: EsmModel | None = None
    reference_lm_head: EsmLMHead | None = None
    family: str = "esm2"

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def context(self) -> int:
        """Residues a protein may have in one forward: 1,022 for ESM-2, 2,046 for ESM C."""
        return context_of(self.family)

    @property
    def ffn_weights(self) -> int:
        """Weights of one layer's feed-forward (a 4x GELU MLP for ESM-2, SwiGLU's three matrices for ESM C)."""
        h, f = self.config.hidden_size, self.config.intermediate_size
        return 3 * h * f if self.family == "esmc" else 2 * h * f


def architecture_of(model: str) -> str | None:
    """Returns the alias of a named ESM-2 size (alias, hub id or a path ending in it), else None."""
    stem = Path(model.rstrip("/")).name.removesuffix(fair_esm.SUFFIX).removesuffix("_UR50D")
    return stem if stem in ARCHITECTURES else None


def _is_local(source: str) -> bool:
    from esm2cli.model.hub import is_repo_id

    return not is_repo_id(source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _load_config(source: str):
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{source}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # hub, network, JSON and file errors all end the same way
        where = "the directory" if _is_local(source) else "the Hugging Face hub (or its local cache)"
        raise ModelLoadError(f"cannot load {source} from {where}: {_first_line(exc)}") from exc
    if config.model_type not in ("esm", "esmc") or getattr(config, "is_folding_model", False):
        raise ModelLoadError(f"{source} is not an ESM-2 or ESM C encoder (model_type={config.model_type!r})")
    return config


def _load_tokenizer(source: str) -> EsmTokenizer:
    try:
        return cast(EsmTokenizer, AutoTokenizer.from_pretrained(source))
    except Exception as exc:  # a directory saved without its tokenizer still holds a usable model
        log.warning("no tokenizer in %s (%s); using the bundled ESM-2 vocabulary", source, _first_line(exc))
        return bundled_tokenizer()


def _token_lut(tokenizer) -> np.ndarray:
    vocab = tokenizer.get_vocab()
    missing = sorted(ch for ch in RESIDUES if ch not in vocab)
    if missing:
        raise ModelLoadError(f"the tokenizer has no token for residue(s) {', '.join(missing)}: not ESM-2")
    lut = np.full(256, tokenizer.unk_token_id, dtype=np.int64)
    for ch in RESIDUES:
        lut[ord(ch)] = vocab[ch]
    return lut


def _local_weights(source: str, name: str) -> str:
    """Where the weights of ``source`` are on this machine: a local path as it is; a hub id from the
    Hugging Face cache (no request to the hub), else fair-esm's own download of the same size in the
    torch hub cache, else downloaded once into the Hugging Face cache.

    Raises:
        ModelLoadError: Not on this machine, and offline or the hub cannot be reached (at once).
    """
    if _is_local(source) or fair_esm.is_checkpoint(source):
        return source
    from esm2cli.model import hub

    if (folder := hub.cached(source)) is not None:
        return str(folder)
    alias = architecture_of(source)
    if alias and (checkpoint := fair_esm.cached_checkpoint(alias)) is not None:
        log.info("%s: using fair-esm's download %s", source, checkpoint)
        return str(checkpoint)
    return str(hub.model_folder(source, alias=name))


def random_lm_head(encoder: EsmModel, seed: int = 1) -> EsmLMHead:
    """A masked-LM head with random (seeded) weights, its decoder tied to the encoder's token embeddings.

    Its own seed keeps the encoder's random weights the same with or without the head.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EsmLMHead(encoder.config)
    head.decoder.weight = encoder.embeddings.word_embeddings.weight  # tied, as in every ESM-2 checkpoint
    return head


def _missing(info: dict, prefix: str) -> str:
    # The LM head's decoder is tied to the token embeddings, so checkpoints rightly omit it.
    return ", ".join(sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix) and "decoder" not in k))


# Tensors a valid checkpoint may lack: buffers transformers rebuilds (position ids, rotary frequencies), the
# LM head's decoder (tied to the token embeddings) and the heads, which are checked only when asked for.
_MAY_LACK = ("position_ids", "inv_freq", "lm_head.", "contact_head.", "pooler.")
_SHOWN_KEYS = 8  # keys named in an error at most (then a count)


def _check_loading(source: str, info: dict) -> None:
    """Refuses a checkpoint that lacks a tensor the encoder needs or holds one of another shape: transformers
    would fill the first with fresh random numbers (other ones each run) and name neither in one line.

    Raises:
        ModelLoadError: Keys missing, or tensors whose shape is not the config's.
    """
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(part in k for part in _MAY_LACK))
    wrong = sorted(
        f"{key} is {tuple(found)}, not {tuple(wanted)}" for key, found, wanted in info.get("mismatched_keys", ())
    )
    problems = [f"missing {_shown(missing)}"] if missing else []
    problems += [_shown(wrong, sep="; ")] if wrong else []
    if problems:
        raise ModelLoadError(f"{source} does not match its config: {'; '.join(problems)}")


def _shown(items: list[str], sep: str = ", ") -> str:
    more = f" and {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else ""
    return sep.join(items[:_SHOWN_KEYS]) + more


def _load_pretrained(source: str, config: EsmConfig, lm_head: bool, contact_head: bool):
    """Loads the encoder (and, when asked, the LM head) of a checkpoint, strictly: a tensor missing or of
    another shape is refused (see _check_loading), and so is a head asked for that is not in it."""
    # Mismatched sizes are let through transformers so that its loading info names them; _check_loading refuses.
    try:
        if lm_head:
            full, info = cast(
                tuple[EsmForMaskedLM, dict],
                EsmForMaskedLM.from_pretrained(
                    source, config=config, output_loading_info=True, ignore_mismatched_sizes=True
                ),
            )
            if missing := _missing(info, "lm_head."):
                raise ModelLoadError(
                    f"{source} has no masked-LM head (missing {missing}): it was saved as an encoder only"
                )
            model, head = full.esm, full.lm_head
            prefix = "esm.contact_head."
        else:
            model, info = cast(
                tuple[EsmModel, dict],
                EsmModel.from_pretrained(
                    source,
                    config=config,
                    add_pooling_layer=False,
                    output_loading_info=True,
                    ignore_mismatched_sizes=True,
                ),  # fmt: skip
            )
            head, prefix = None, "contact_head."
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {source}: {_first_line(exc)}") from exc
    _check_loading(source, info)
    if contact_head and (missing := _missing(info, prefix)):
        raise ModelLoadError(f"{source} has no contact head (missing {missing})")
    return model, head


_POOL = 1_000_003  # random values drawn per dummy model: a prime, so that no weight row repeats another


def token_ids(loaded: LoadedModel, seqs: Sequence[str], width: int | None = None) -> np.ndarray:
    """Token ids of a batch, padded: <cls> residues <eos> <pad>... (sequences are pre-validated).

    Args:
        loaded: The model whose token ids these are.
        seqs: Upper-case residue strings.
        width: Tokens per row (None: the longest sequence plus <cls> and <eos>); at least that.
    """
    width = width or max(len(s) for s in seqs) + 2
    ids = np.full((len(seqs), width), loaded.pad_id, dtype=np.int64)
    ids[:, 0] = loaded.cls_id
    for row, seq in enumerate(seqs):
        n = len(seq)
        ids[row, 1 : n + 1] = loaded.token_lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
        ids[row, n + 1] = loaded.eos_id
    return ids


def random_model(config: EsmConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> EsmModel:
    """An encoder with random weights: the same seed gives the same weights in every run and process.

    Weights are N(0, 0.02) as transformers initialises them, LayerNorm scales 1 and biases 0. Drawing
    one normal value per weight cost 9-30 s for the 650M model on two cores; instead each weight
    matrix is filled from one pool of a million draws, starting at a random offset, in ``dtype``
    directly (1.5-1.9 s). The compute is the same as with trained weights.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]

    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=generator).mul_(0.02).to(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():  # parameters start uninitialised; buffers are computed as usual
            model = EsmModel(config, add_pooling_layer=False)
    finally:
        torch.set_default_dtype(previous)
    # One thread: the fill is bound by memory, and on a busy machine two threads waiting on each other
    # made it 5-9x slower (1.5-1.9 s against 8.7-17 s for the 650M model, measured side by side).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif "layer_norm" in name.lower() or "layernorm" in name.lower():
                    param.fill_(1.0)
                else:
                    _fill_from(param.view(-1), pool, int(torch.randint(_POOL, (1,), generator=generator)))
    finally:
        torch.set_num_threads(threads)
    return model


def _fill_from(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    """Copies ``pool`` into ``flat`` from ``offset`` on, wrapping around."""
    done = 0
    while done < flat.numel():
        take = min(flat.numel() - done, pool.numel() - offset)
        flat[done : done + take].copy_(pool[offset : offset + take])
        done, offset = done + take, 0


def _shape_only(config: EsmConfig) -> EsmModel:
    """The architecture on the meta device: its shape and config, no memory and no weights."""
    with torch.device("meta"):
        return EsmModel(config, add_pooling_layer=False)


def load_model(
    cfg: ModelConfig,
    *,
    lm_head: bool = False,
    contact_head: bool = False,
    weights: bool = True,
    keep_reference: bool = False,
) -> LoadedModel:
    """Loads the encoder once on the CPU, converts it to cfg.dtype, and prepares tokenisation.

    The heads are loaded only when asked for: the masked-LM head for scoring, the contact head (and
    attention that yields its weights, which the contact head reads) for contact maps. With
    ``load_format="dummy"`` they get random weights too.

    Args:
        cfg: The model name, load format and dtype.
        lm_head: Also load the masked-LM head.
        contact_head: Also load the contact head.
        weights: False builds no weights at all (for modeled GPUs, which need only the shape and the tokenizer).
        keep_reference: Keep the transformers encoder the weights were read from (tests, benchmarks).

    Returns:
        The loaded model, ready to be copied to each device.

    Raises:
        ModelLoadError: The model is missing, unreachable, not an ESM-2 encoder, or lacks a head asked for.
        ConfigError: The load format or dtype is unknown.
    """
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {cfg.dtype!r}; use one of {', '.join(DTYPES)}")
    source = resolve_source(cfg.model)
    hf_logging.set_verbosity_error()  # the unused LM-head weights warning is expected
    hf_logging.disable_progress_bar()
    dtype = DTYPES[cfg.dtype]
    if cfg.load_format not in ("auto", "dummy"):
        raise ConfigError(f"unknown load format {cfg.load_format!r}; use auto or dummy")
    if (esmc := _esmc_config(source, cfg.load_format, weights)) is not None:
        return _load_esmc(cfg, source, esmc, lm_head=lm_head, contact_head=contact_head, weights=weights)
    if cfg.load_format == "dummy":
        alias = architecture_of(source)
        if alias:
            config = esm2_config(alias)
        elif fair_esm.is_checkpoint(source):
            config = fair_esm.read_config(fair_esm.find_checkpoint(source))
        else:
            config = _load_config(source)
        if weights:
            log.warning("--load-format dummy: %s with RANDOM weights; its embeddings are meaningless", source)
        model = random_model(config, dtype=dtype) if weights else _shape_only(config)
        tokenizer, dummy = bundled_tokenizer(), True
        head = random_lm_head(model) if lm_head and weights else None
    elif cfg.load_format == "auto" and not weights:  # modeled GPUs: the shape, never the weights
        alias = architecture_of(source)
        model = _shape_only(esm2_config(alias) if alias else _load_config(source))
        tokenizer, dummy, head = bundled_tokenizer(), True, None
    elif cfg.load_format == "auto":
        folder = _local_weights(source, cfg.model)
        head = None
        if fair_esm.is_checkpoint(folder):
            if lm_head or contact_head:
                raise ConfigError("fair-esm .pt checkpoints give embeddings only here; score and --contacts need "
                                  "a Hugging Face model (a hub id or a save_pretrained directory)")  # fmt: skip
            path = fair_esm.find_checkpoint(folder)
            model, tokenizer, source = fair_esm.load_checkpoint(path), bundled_tokenizer(), str(path)
        else:
            config = _load_config(folder)
            model, head = _load_pretrained(folder, config, lm_head, contact_head)
            tokenizer = _load_tokenizer(folder)
        dummy = False
    if not contact_head:
        model.contact_head = None  # type: ignore[assignment]  # HF builds it into every encoder; unused unless asked
    model = model.to(dtype).eval().requires_grad_(False)  # type: ignore[arg-type]
    if head is not None:
        head = head.to(dtype).eval().requires_grad_(False)
    # esm2cli's forward copies (and fuses) the weights; the transformers modules are only read here.
    forward = PackedEsm2.from_hf(model, head, model.contact_head) if weights else None
    return LoadedModel(
        name=cfg.model,
        source=source,
        config=model.config,
        forward=forward,
        token_lut=_token_lut(tokenizer),
        cls_id=tokenizer.cls_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        dummy=dummy,
        mask_id=tokenizer.mask_token_id,
        reference=model if keep_reference else None,
        reference_lm_head=head if keep_reference else None,
    )


def _esmc_config(source: str, load_format: str, weights: bool) -> Any:
    """The config when ``source`` is an ESM C, else None: an alias (or hub id) of its three sizes, or a local
    directory or hub model whose config says ``model_type: esmc``. None for an alias size's real weights is
    never returned: their config is read from the folder they are fetched into (_FETCH)."""
    if (alias := esmc_alias(source)) is not None:
        return esmc_load.esmc_config(alias) if load_format == "dummy" or not weights else _FETCH
    if architecture_of(source) or fair_esm.is_checkpoint(source):
        return None
    where = _local_weights(source, source) if load_format == "auto" and weights else source
    config = _load_config(where)
    return config if config.model_type == "esmc" else None


_FETCH = "fetch"  # an ESM C size's real weights: the config comes with them


def _load_esmc(cfg: ModelConfig, source: str, config: Any, *, lm_head: bool, contact_head: bool, weights: bool):
    """Loads an ESM C (real or dummy weights, or only its shape) as esm2cli's own forward."""
    if contact_head:
        raise esmc_load.refuse_contacts(cfg.model)
    dtype = DTYPES[cfg.dtype]
    tensors = None
    if cfg.load_format == "dummy" or not weights:
        if weights:
            log.warning("--load-format dummy: %s with RANDOM weights; its embeddings are meaningless", source)
            tensors = esmc_load.random_weights(config, lm_head=lm_head, dtype=dtype)
        dummy = True
    else:
        folder = Path(_local_weights(source, cfg.model))
        if config is _FETCH:
            config = _load_config(str(folder))
        esmc_load.check_config(config, source)
        tensors = esmc_load.read_checkpoint(folder, config, lm_head)
        dummy = False
    forward = esmc_load.build_forward(config, tensors, dtype=dtype, lm_head=lm_head) if tensors is not None else None
    return LoadedModel(
        name=cfg.model, source=source, config=config, forward=forward, token_lut=esmc_load.token_lut(),
        cls_id=esmc_load.CLS_ID, eos_id=esmc_load.EOS_ID, pad_id=esmc_load.PAD_ID, dummy=dummy,
        mask_id=esmc_load.MASK_ID, family="esmc",
    )  # fmt: skip
