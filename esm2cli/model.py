"""Model loading (hub id, local directory, alias or dummy weights) and one replica's embed_batch and lm_log_probs."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, EsmConfig, EsmForMaskedLM, EsmModel, EsmTokenizer
from transformers.models.esm.modeling_esm import EsmLMHead
from transformers.utils import logging as hf_logging

from esm2cli import fair_esm
from esm2cli.config import EmbedConfig, ModelConfig
from esm2cli.contacts import ContactCollector, install_contact_hooks
from esm2cli.devices import Device
from esm2cli.errors import ConfigError, ModelLoadError
from esm2cli.fasta import RESIDUES
from esm2cli.fused import fuse_gelu

log = logging.getLogger(__name__)

# The six ESM-2 sizes: alias -> (layers, hidden size, attention heads). The feed-forward is 4x hidden.
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M": (6, 320, 20),
    "esm2_t12_35M": (12, 480, 20),
    "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_THREADS = torch.get_num_threads()  # torch's default (the cores), before any replica changes it


@dataclass
class LoadedModel:
    """An ESM-2 encoder loaded once on the CPU, with what replicas need to tokenise.

    Attributes:
        name: The model as the user named it.
        source: The hub id or directory it was loaded from.
        model: The encoder, in eval mode, in its final dtype, on the CPU. It carries its contact head
            (``model.contact_head``) only when asked for; else that attribute is None.
        token_lut: Maps an ASCII code to its token id (only residue letters are used).
        cls_id, eos_id, pad_id, mask_id: Special token ids.
        dummy: True when the weights are random.
        lm_head: The masked-LM head (its decoder tied to the token embeddings), only when asked for.
    """

    name: str
    source: str
    model: EsmModel
    token_lut: np.ndarray
    cls_id: int
    eos_id: int
    pad_id: int
    dummy: bool
    mask_id: int = 32
    lm_head: EsmLMHead | None = None

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


@dataclass
class BatchEmbeddings:
    """What one batch gives back, always on the CPU in float32.

    Attributes:
        pooled: Layer -> array of shape (batch, hidden).
        per_token: Layer -> one (residues, hidden) array per sequence; empty unless asked.
        contacts: One (residues, residues) array of contact probabilities per sequence; empty unless asked.
    """

    pooled: dict[int, np.ndarray]
    per_token: dict[int, list[np.ndarray]]
    contacts: list[np.ndarray] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[BatchEmbeddings]) -> BatchEmbeddings:
        """Joins the results of consecutive sub-batches, in order."""
        pooled = {layer: np.concatenate([p.pooled[layer] for p in parts]) for layer in parts[0].pooled}
        per_token = {layer: [a for p in parts for a in p.per_token[layer]] for layer in parts[0].per_token}
        return BatchEmbeddings(pooled, per_token, [a for p in parts for a in p.contacts])


def resolve_source(model: str) -> str:
    """Maps a short alias (esm2_t33_650M or esm2_t33_650M_UR50D) to its hub id; returns others as given."""
    name = model.removesuffix("_UR50D")
    if name in ARCHITECTURES:
        return f"facebook/{name}_UR50D"
    return model


def architecture_of(model: str) -> str | None:
    """Returns the alias of a named ESM-2 size (alias, hub id or a path ending in it), else None."""
    stem = Path(model.rstrip("/")).name.removesuffix(fair_esm.SUFFIX).removesuffix("_UR50D")
    return stem if stem in ARCHITECTURES else None


def esm2_architecture(layers: int, hidden: int, heads: int, **overrides) -> EsmConfig:
    """An ESM-2 config of any size: rotary positions, token dropout, a 4x feed-forward, the 33-token vocabulary."""
    params = dict(
        vocab_size=33,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        mask_token_id=32,
        pad_token_id=1,
    )
    params.update(overrides)
    return EsmConfig(**params)


def esm2_config(alias: str) -> EsmConfig:
    """The Hugging Face config of one of the six ESM-2 sizes, built without a download."""
    return esm2_architecture(*ARCHITECTURES[alias])


def bundled_tokenizer() -> EsmTokenizer:
    """The ESM-2 tokenizer from the vocabulary shipped with esm2cli (the same 33 tokens as the hub's)."""
    vocab = resources.files("esm2cli").joinpath("esm_vocab.txt")
    with resources.as_file(vocab) as path:
        return EsmTokenizer(vocab_file=str(path))


def _is_local(source: str) -> bool:
    from esm2cli.hub import is_repo_id

    return not is_repo_id(source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _load_config(source: str) -> EsmConfig:
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(f"{source}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # hub, network, JSON and file errors all end the same way
        where = "the directory" if _is_local(source) else "the Hugging Face hub (or its local cache)"
        raise ModelLoadError(f"cannot load {source} from {where}: {_first_line(exc)}") from exc
    if config.model_type != "esm" or getattr(config, "is_folding_model", False):
        raise ModelLoadError(f"{source} is not an ESM-2 encoder (model_type={config.model_type!r})")
    return config


def _load_tokenizer(source: str) -> EsmTokenizer:
    try:
        return AutoTokenizer.from_pretrained(source)
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
    from esm2cli import hub

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


def _load_pretrained(source: str, config: EsmConfig, lm_head: bool, contact_head: bool):
    """Loads the encoder (and, when asked, the LM head) of a checkpoint; checks the heads asked for are in it."""
    try:
        if lm_head:
            full, info = EsmForMaskedLM.from_pretrained(source, config=config, output_loading_info=True)
            if missing := _missing(info, "lm_head."):
                raise ModelLoadError(
                    f"{source} has no masked-LM head (missing {missing}): it was saved as an encoder only"
                )
            model, head = full.esm, full.lm_head
            prefix = "esm.contact_head."
        else:
            model, info = EsmModel.from_pretrained(
                source, config=config, add_pooling_layer=False, output_loading_info=True
            )
            head, prefix = None, "contact_head."
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {source}: {_first_line(exc)}") from exc
    if contact_head and (missing := _missing(info, prefix)):
        raise ModelLoadError(f"{source} has no contact head (missing {missing})")
    return model, head


_POOL = 1_000_003  # random values drawn per dummy model: a prime, so that no weight row repeats another


def token_ids(loaded: LoadedModel, seqs: Sequence[str]) -> np.ndarray:
    """Token ids of a batch, padded: <cls> residues <eos> <pad>... (sequences are pre-validated)."""
    width = max(len(s) for s in seqs) + 2
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
        from transformers.modeling_utils import no_init_weights

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
    cfg: ModelConfig, *, lm_head: bool = False, contact_head: bool = False, weights: bool = True
) -> LoadedModel:
    """Loads the encoder once on the CPU, converts it to cfg.dtype, and prepares tokenisation.

    The heads are loaded only when asked for: the masked-LM head for scoring, the contact head (and
    attention that yields its weights, which the contact head reads) for contact maps. With
    ``load_format="dummy"`` they get random weights too.

    Args:
        cfg: The model name, load format and dtype.
        lm_head: Also load the masked-LM head.
        contact_head: Keep the contact head and switch attention to the eager kernel.
        weights: False builds the architecture on the meta device, without any weights (for modeled
            GPUs, which need only its shape and the tokenizer).

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
    else:
        raise ConfigError(f"unknown load format {cfg.load_format!r}; use auto or dummy")
    if contact_head:
        # The contact head reads every layer's attention probabilities, which SDPA never materialises.
        model.set_attn_implementation("eager")
        install_contact_hooks(model)
    else:
        model.contact_head = None  # HF builds it into every encoder; it is unused unless asked for
    model = fuse_gelu(model).to(dtype).eval().requires_grad_(False)
    if head is not None:
        head = head.to(dtype).eval().requires_grad_(False)
    return LoadedModel(
        name=cfg.model,
        source=source,
        model=model,
        token_lut=_token_lut(tokenizer),
        cls_id=tokenizer.cls_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        dummy=dummy,
        mask_id=tokenizer.mask_token_id,
        lm_head=head,
    )


def resolve_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Maps layer indices to 0..num_layers (negative counts from the end), keeping order, once each.

    Raises:
        ConfigError: A layer is out of range.
    """
    out: list[int] = []
    for layer in layers:
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ConfigError(
                f"layer {layer} is out of range for a model with {num_layers} layers "
                f"(use 0..{num_layers}, or -{num_layers + 1}..-1 from the end)"
            )
        norm = layer % (num_layers + 1)
        if norm not in out:
            out.append(norm)
    return tuple(out)


class Replica:
    """One copy of the model on one device: embed_batch, and lm_log_probs when the LM head is loaded.

    Attributes:
        oom_splits: How many times a batch was split in two after a CUDA out-of-memory error.
        cpu_threads: Intra-op threads this replica's worker uses (CPU replicas only; None: torch's default).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: Device,
        embed: EmbedConfig,
        model: EsmModel,
        cpu_threads: int | None = None,
        lm_head: nn.Module | None = None,
    ):
        self.device = device
        self.cpu_threads = cpu_threads
        self.oom_splits = 0
        self._threads_set = False
        self.loaded = loaded
        self.model = model
        self.lm_head = lm_head
        self.layers = resolve_layers(embed.layers, loaded.num_layers)
        self.pooling = embed.pooling
        self.per_token = embed.per_token
        self.contacts = embed.contacts
        if self.contacts and model.contact_head is None:
            raise RuntimeError("contacts asked of a model loaded without its contact head; this is a bug")
        self._torch_device = torch.device(device.torch_device)
        # The last layer is last_hidden_state (after the final LayerNorm, as in fair-esm);
        # any other layer needs every hidden state.
        self._need_hidden_states = any(layer != loaded.num_layers for layer in self.layers)

    def tokenize(self, seqs: Sequence[str]) -> torch.Tensor:
        """Token ids of a batch, padded: <cls> residues <eos> <pad>... (sequences are pre-validated)."""
        return torch.from_numpy(token_ids(self.loaded, seqs))

    def embed_batch(self, seqs: Sequence[str], per_token: bool | None = None) -> BatchEmbeddings:
        """Embeds a batch of validated, already truncated sequences.

        A CUDA out-of-memory error splits the batch in two and retries each half (recursively),
        so a batch too large for the device costs time, not the run.

        Args:
            seqs: Upper-case residue strings.
            per_token: Also return per-residue vectors (None: as the replica's EmbedConfig says);
                windows of long proteins need them to be stitched.

        Returns:
            Pooled (and optionally per-residue) float32 CPU arrays, one row per sequence, in order.

        Raises:
            torch.cuda.OutOfMemoryError: A single sequence does not fit on the device.
        """
        self._set_threads()
        per_token = self.per_token if per_token is None else per_token
        return self._split_on_oom(lambda part: self._forward(part, per_token), seqs, BatchEmbeddings.concat)

    def lm_log_probs(self, items: Sequence[tuple[str, int | None, Sequence[int]]]) -> list[np.ndarray]:
        """The masked-LM head's log-probabilities for a batch of (optionally masked) sequences.

        Args:
            items: (sequence, masked, read) triples: the residue at 0-based position ``masked`` is replaced
                by <mask> (None: nothing is masked), and the positions in ``read`` (0-based) are returned.
                Sequences are validated and fit the model.

        Returns:
            Per item, a float32 array of log-softmax values over the whole vocabulary (columns are token
            ids), one row per position read, in the order given.

        Raises:
            torch.cuda.OutOfMemoryError: A single sequence does not fit on the device.
        """
        if self.lm_head is None:
            raise RuntimeError("lm_log_probs on a replica without its LM head; this is a bug")
        self._set_threads()
        return self._split_on_oom(self._lm_forward, items, lambda parts: [a for p in parts for a in p])

    def _split_on_oom(self, forward, items, join):
        """Runs forward(items); a CUDA out-of-memory error splits the batch in two and retries each half."""
        try:
            return forward(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
        # Outside the except block, so that the failed attempt's tensors can be freed first.
        self.oom_splits += 1
        if self.device.is_cuda:
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("out of memory on %s with %d sequences; splitting the batch", self.device.name, len(items))
        return join([self._split_on_oom(forward, items[:half], join), self._split_on_oom(forward, items[half:], join)])

    def _set_threads(self) -> None:
        # Set from the worker thread, whose OpenMP team it sizes (MKL's count is process-wide, but every
        # CPU replica asks for the same share), so that replicas sharing the cores do not oversubscribe them.
        if self.cpu_threads and not self._threads_set:
            torch.set_num_threads(self.cpu_threads)
            self._threads_set = True

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.is_cuda:
            tensor = tensor.pin_memory()
        return tensor.to(self._torch_device, non_blocking=True)

    def _forward(self, seqs: Sequence[str], per_token: bool) -> BatchEmbeddings:
        ids = self._to_device(self.tokenize(seqs))
        lengths = self._to_device(torch.tensor([len(s) for s in seqs]))
        collector = ContactCollector(self.model.contact_head, ids, self.loaded) if self.contacts else None
        with torch.inference_mode(), collector or contextlib.nullcontext():
            out = self.model(
                input_ids=ids,
                attention_mask=(ids != self.loaded.pad_id).long(),
                output_hidden_states=self._need_hidden_states,
            )
            states = {
                layer: out.hidden_states[layer] if self._need_hidden_states else out.last_hidden_state
                for layer in self.layers
            }
            result = self._pool(states, lengths, per_token)
            if collector is not None:
                result.contacts = collector.contacts([len(s) for s in seqs])
            return result

    def _lm_forward(self, items: Sequence[tuple[str, int | None, Sequence[int]]]) -> list[np.ndarray]:
        ids = self.tokenize([seq for seq, _, _ in items])
        rows, cols, counts = [], [], []
        for row, (_, masked, read) in enumerate(items):
            if masked is not None:
                ids[row, masked + 1] = self.loaded.mask_id
            cols.append(np.asarray(read, dtype=np.int64) + 1)  # position 0 is <cls>
            rows.append(np.full(len(read), row))
            counts.append(len(read))
        ids = self._to_device(ids)
        rows_t = self._to_device(torch.from_numpy(np.concatenate(rows)))
        cols_t = self._to_device(torch.from_numpy(np.concatenate(cols)))
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=(ids != self.loaded.pad_id).long()).last_hidden_state
            # Only the positions read go through the head: one per masked copy, not one per token.
            logits = self.lm_head(hidden[rows_t, cols_t]).float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu().numpy()
        return np.split(log_probs, np.cumsum(counts)[:-1])

    def _pool(self, states: dict[int, torch.Tensor], lengths: torch.Tensor, want_tokens: bool) -> BatchEmbeddings:
        """Pools each layer over residue positions 1..L (mean) or takes position 0 (bos)."""
        width = next(iter(states.values())).shape[1]
        pos = torch.arange(width, device=lengths.device)
        residues = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
        pooled: dict[int, np.ndarray] = {}
        per_token: dict[int, list[np.ndarray]] = {}
        for layer, hidden in states.items():
            h = hidden.float()
            if self.pooling == "mean":
                vec = (h * residues[..., None]).sum(dim=1) / lengths[:, None]
            else:
                vec = h[:, 0]
            pooled[layer] = vec.cpu().numpy().copy()
            if want_tokens:
                host = h.cpu()
                per_token[layer] = [host[i, 1 : n + 1].numpy().copy() for i, n in enumerate(lengths.tolist())]
        return BatchEmbeddings(pooled, per_token)


def build_replicas(loaded: LoadedModel, devices: Sequence[Device], embed: EmbedConfig) -> list[Replica]:
    """Places one replica on each device, copying the weights loaded once.

    Replicas on the CPU (the CPU itself or simulated devices) share one set of weights:
    inference only reads them, and N copies would cost N times the memory for nothing.

    Raises:
        ConfigError: A layer index is out of range.
    """
    replicas = []
    cpu_replicas = sum(not d.is_cuda for d in devices)
    threads = max(1, _CPU_THREADS // cpu_replicas) if cpu_replicas else None
    for device in devices:
        if device.is_cuda:
            # One deepcopy of both keeps the LM head's decoder tied to the copy's token embeddings.
            model, head = copy.deepcopy((loaded.model, loaded.lm_head))
            model = model.to(device.torch_device)
            head = head.to(device.torch_device) if head is not None else None
            replicas.append(Replica(loaded, device, embed, model, lm_head=head))
        else:
            replicas.append(Replica(loaded, device, embed, loaded.model, cpu_threads=threads, lm_head=loaded.lm_head))
    return replicas
