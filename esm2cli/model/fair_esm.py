"""fair-esm checkpoints (esm2_t33_650M_UR50D.pt and the like): read safely, mapped onto transformers' EsmModel.

fair-esm stores a model as a pickled dict: ``{"model": state dict, "cfg": {"model": Namespace(...)}, ...}``,
with parameter names prefixed ``encoder.sentence_encoder.`` (the LM head under ``encoder.lm_head.``), and
the contact regression in a file of its own beside it (``<name>-contact-regression.pt``). The file is read
with ``torch.load(weights_only=True)``: no pickle code runs, and the only Python object allowed besides
tensors and containers is ``argparse.Namespace``, which is all such a checkpoint holds.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from transformers import EsmConfig, EsmModel

from esm2cli.errors import ModelLoadError

log = logging.getLogger(__name__)

SUFFIX = ".pt"
# What a fair-esm ESM-2 checkpoint needs beyond tensors and plain containers. Nothing else is unpickled.
ALLOWED_GLOBALS = (argparse.Namespace,)
# torch names the global it refused in one of two ways (an unknown class; a function of a blocked module).
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
# Only what a plain weights file holds is unpickled: said in every refusal instead of torch's weights_only advice.
_PLAIN = "only plain weights load (tensors, containers and argparse.Namespace); none of its code was run"
_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
# fair-esm name (prefixes removed) -> transformers EsmModel name.
_RENAMES = [
    (r"^embed_tokens\.", "embeddings.word_embeddings."),
    (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.layer.\1.attention.self.query."),
    (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.layer.\1.attention.self.key."),
    (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.layer.\1.attention.self.value."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layer.\1.attention.LayerNorm."),
    (r"^layers\.(\d+)\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.final_layer_norm\.", r"encoder.layer.\1.LayerNorm."),
    (r"^emb_layer_norm_after\.", "encoder.emb_layer_norm_after."),
    (r"^contact_head\.regression\.", "contact_head.regression."),
]
# fair-esm entries an encoder does not use: the LM head, and rotary frequencies (computed from the config).
_UNUSED = re.compile(r"^(lm_head\.|layers\.\d+\.self_attn\.rot_emb\.inv_freq$)")
# transformers entries that are not weights of the checkpoint: computed buffers, and the optional contact head.
_NOT_IN_CHECKPOINT = re.compile(r"(inv_freq|position_ids)$|^contact_head\.")


def is_checkpoint(model: str) -> bool:
    """True when ``-m`` names a fair-esm checkpoint file (a path or a file name ending in .pt)."""
    return str(model).endswith(SUFFIX)


def torch_hub_checkpoints() -> Path:
    """The folder where fair-esm's downloads land: ``$TORCH_HOME/hub/checkpoints`` (~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_checkpoint(model: str) -> Path:
    """The checkpoint file ``-m`` names: a path, or a bare file name found in the torch hub cache.

    Raises:
        ModelLoadError: No such file.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return path
    cached = torch_hub_checkpoints() / path.name
    if path.name == str(model) and cached.is_file():
        return cached
    if path.exists():
        raise ModelLoadError(f"{model}: not a checkpoint file (a directory?)")
    where = f" (nor in the torch hub cache, {torch_hub_checkpoints()})" if path.name == str(model) else ""
    raise ModelLoadError(f"{model}: no such checkpoint file{where}")


def cached_checkpoint(alias: str) -> Path | None:
    """fair-esm's own download of an ESM-2 size (``esm2_t33_650M_UR50D.pt``) in the torch hub cache, if there."""
    path = torch_hub_checkpoints() / f"{alias}_UR50D{SUFFIX}"
    return path if path.is_file() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _exists(name: str) -> bool:
    """False when a dotted name cannot be a Python global: empty parts, or a module already loaded that lacks
    it (a truncated pickle names half of one, 'argparse.Names'). Nothing is imported: the name is untrusted."""
    module, _, attr = name.rpartition(".")
    if not module or not attr or not all(module.split(".")):
        return False
    loaded = sys.modules.get(module)
    return loaded is None or hasattr(loaded, attr)


def safe_load(path: Path) -> object:
    """Unpickles a checkpoint with ``weights_only=True``, allowing only ALLOWED_GLOBALS beyond tensors.

    Raises:
        ModelLoadError: Unreadable, truncated, or needing any other Python global (refused; nothing of it ran).
    """
    try:
        # A zip checkpoint is memory-mapped: its tensors are read once, into the model, not twice.
        mmap = zipfile.is_zipfile(path)
    except OSError as exc:  # denied, a directory, ...; torch's own OSErrors below mean a damaged file
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or _first_line(exc)}") from exc
    try:
        # torch may warn on its way to an error; the one line below says what matters.
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (
        Exception
    ) as exc:  # torch's advice to load with weights_only=False (running the file's code) is not passed on
        raise _refusal(path, exc) from exc


def _refusal(path: Path, exc: Exception) -> ModelLoadError:
    """One line for a checkpoint torch would not load: the global refused, or why the file is unreadable."""
    text = str(exc)
    found = _UNSUPPORTED_GLOBAL.search(text)
    # A class of the script that saved the file (__main__.X) is a whole name; any other name of a loaded
    # module that does not exist is half of one: the file ends inside its pickle.
    if found and not _exists(found.group(1)) and not found.group(1).startswith("__main__."):
        return ModelLoadError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: it names {found.group(1)!r}, "
            "which is no Python global); download it again"
        )
    if found:
        return ModelLoadError(f"{path}: refused: it needs the Python global {found.group(1)}; {_PLAIN}")
    reason = _reason(text)
    if "Weights only load failed" in text and reason:
        return ModelLoadError(f"{path}: refused: not a plain weights file ({reason}); {_PLAIN}")
    return ModelLoadError(
        f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {reason or type(exc).__name__}"
    )


def _reason(text: str) -> str:
    """The line of a torch error that says what is wrong, without its advice on weights_only."""
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line and not line.startswith(("Weights only load failed", "Check the doc")):
            return line
    return ""


def _model_args(data: object, path: Path) -> object:
    """The Namespace of an ESM-2 checkpoint's sizes (``cfg["model"]``), with a clear error for anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ModelLoadError(f"{path}: not a fair-esm checkpoint (no 'model' state dict)")
    cfg = data.get("cfg")
    args = cfg.get("model") if isinstance(cfg, dict) else None
    if args is None:
        arch = getattr(data.get("args"), "arch", None)
        kind = f"a fair-esm '{arch}' checkpoint (ESM-1, ESM-1b, ESM-MSA or ESM-IF)" if arch else "not ESM-2"
        raise ModelLoadError(f"{path}: {kind}; esm2cli loads ESM-2 checkpoints only")
    return args


def _arg(args: object, name: str, path: Path, default=None):
    value = args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)
    if value is None:
        raise ModelLoadError(f"{path}: the checkpoint's cfg['model'] has no {name}: not an ESM-2 checkpoint")
    return value


def checkpoint_config(data: object, path: Path) -> EsmConfig:
    """The transformers config of a fair-esm ESM-2 checkpoint, read from its ``cfg["model"]``.

    Raises:
        ModelLoadError: The file is not a fair-esm ESM-2 checkpoint.
    """
    from esm2cli.model.architecture import esm2_architecture

    args = _model_args(data, path)
    return esm2_architecture(
        int(_arg(args, "encoder_layers", path)),
        int(_arg(args, "encoder_embed_dim", path)),
        int(_arg(args, "encoder_attention_heads", path)),
        token_dropout=bool(_arg(args, "token_dropout", path, default=True)),
    )


def read_config(path: Path) -> EsmConfig:
    """The transformers config of the fair-esm ESM-2 checkpoint at ``path`` (its weights are not used)."""
    return checkpoint_config(safe_load(path), path)


def _rename(name: str) -> str | None:
    for pattern, repl in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def encoder_state_dict(state: dict, config: EsmConfig, path: Path) -> dict[str, torch.Tensor]:
    """Renames fair-esm parameters to transformers' EsmModel names and checks them against the architecture.

    Raises:
        ModelLoadError: A weight is missing, unknown, or of the wrong shape (another model, or a damaged file).
    """
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        short = _PREFIX.sub("", name)
        if _UNUSED.match(short):
            continue
        if (target := _rename(short)) is None or not isinstance(tensor, torch.Tensor):
            unknown.append(name)
        else:
            mapped[target] = tensor
    with torch.device("meta"):
        expected = {k: v.shape for k, v in EsmModel(config, add_pooling_layer=False).state_dict().items()}
    missing = sorted(k for k in expected if k not in mapped and not _NOT_IN_CHECKPOINT.search(k))
    unknown += sorted(k for k in mapped if k not in expected)
    wrong = sorted(k for k, v in mapped.items() if k in expected and v.shape != expected[k])
    for problem, names in (("missing weights", missing), ("unexpected weights", unknown), ("wrong shapes", wrong)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ModelLoadError(
                f"{path}: {problem} for an ESM-2 of {config.num_hidden_layers} layers x {config.hidden_size}: {shown}"
            )
    return mapped


def regression_file(path: Path) -> Path:
    """Where fair-esm keeps a checkpoint's contact regression: ``<name>-contact-regression.pt`` beside it."""
    return path.with_name(f"{path.stem}-contact-regression{SUFFIX}")


def load_checkpoint(path: str | os.PathLike) -> EsmModel:
    """Loads a fair-esm ESM-2 checkpoint as a transformers EsmModel (no LM head), float32 as stored, on the CPU.

    The contact regression file is optional: it is read when it lies beside the checkpoint (contacts are
    not part of the embeddings).

    Raises:
        ModelLoadError: The file is missing, unreadable, refused, or not an ESM-2 checkpoint.
    """
    path = Path(path)
    if path.name.endswith(f"-contact-regression{SUFFIX}"):
        raise ModelLoadError(f"{path}: a contact regression file; pass the model's checkpoint beside it")
    data = safe_load(path)
    config = checkpoint_config(data, path)
    state = dict(data["model"])
    regression = regression_file(path)
    if regression.is_file():
        try:
            extra = safe_load(regression)
        except ModelLoadError as exc:  # contacts are not part of the embeddings: go on without them
            log.warning("ignoring the contact regression file: %s", exc)
        else:
            if isinstance(extra, dict) and isinstance(extra.get("model"), dict):
                state.update(extra["model"])
    mapped = encoder_state_dict(state, config, path)
    try:
        model = EsmModel.from_pretrained(None, config=config, state_dict=mapped, add_pooling_layer=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot build the model from its weights: {_first_line(exc)}") from exc
    log.info("loaded the fair-esm checkpoint %s (%d layers x %d)", path, config.num_hidden_layers, config.hidden_size)
    return model
