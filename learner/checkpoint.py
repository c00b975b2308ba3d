"""A learner checkpoint on disk, and how to tell a whole one from a broken one.

    DIR/learner/            every rank's sharded training state (torch.distributed.checkpoint): the trainable
                            weights (under LoRA the adapters and value heads, not the frozen base, which
                            the model path gives again) and their optimizer state
    DIR/policy/             the policy as a loadable model (rank 0), which a resumed run's engines serve
    DIR/learner.pt          KL controller, policy version and the job's state (rank 0), written last
    DIR/manifest.json       every file above with its size and sha256, written once the rest is there

A resume reads the manifest again (`problem`) before it loads anything, so a truncated shard or a
missing file is found in one line, and the run falls back to the checkpoint before. How a checkpoint is
written (staged, then in the background) is `learner/checkpoint_writer.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from contracts.config.base import ConfigError
from contracts.errors import JobFailure
from contracts.files import write_atomically

if TYPE_CHECKING:  # the driver reads this module's names and files without torch
    from learner.models import Trained

STATE_FILE = "learner.pt"
MANIFEST_FILE = "manifest.json"
_HASH_BLOCK = 1 << 20


class CheckpointWriteError(JobFailure, OSError):
    """A checkpoint could not be written (full disk, read-only or failing device); the message names it."""


class NonFiniteError(JobFailure):
    """Losses, gradients or weights hold inf or NaN: such weights are never saved or served."""


def write_failed(directory: Path, error: BaseException) -> CheckpointWriteError:
    """`error` of writing checkpoint `directory`, as the disk tells it. torch's writers report a full disk
    as "unexpected pos ..."; DCP wraps each rank's failure."""
    cause = next(iter(getattr(error, "failures", {}).values()), error)  # DCP: the failure per rank
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return CheckpointWriteError(
        f"writing checkpoint {directory} failed ({first}); {_free_space(Path(directory))} free on its disk"
    )


def load_state_file(directory: Path, lora_settings: dict | None) -> dict:
    """`learner.pt` of checkpoint `directory` (KL controller, version, the job's `extra`), once its training state
    is there and was written with `lora_settings` (None: full fine-tuning)."""
    import torch

    directory = Path(directory)
    if not (directory / "learner").is_dir():
        raise FileNotFoundError(
            f"{directory}: no learner/ training state (a checkpoint from before "
            "sharded checkpoints); start a new run directory"
        )
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    _check_lora(directory, state.get("lora"), lora_settings)
    return state


def load_training_state(trained: list[Trained], directory: Path, *, strict: bool, no_dist: bool) -> None:
    """Every trained network's weights and optimizer state from checkpoint `directory`, in place; `strict`
    unless the state leaves out frozen weights (a LoRA base)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = training_state(trained)
    with single_process_note_quiet():
        dcp.load(state, checkpoint_id=str(Path(directory) / "learner"), no_dist=no_dist)
    options = StateDictOptions(strict=strict)
    for t in trained:
        set_model_state_dict(t.model, state[t.name], options=options)
        set_optimizer_state_dict(t.model, t.optimizer, state[f"{t.name}_opt"])


def training_state(trained: list[Trained]) -> dict:
    """What DCP saves and loads: the trainable weights of each trained network (frozen ones, a LoRA base, come
    from the model path) and its optimizer's state, under its name and its name with `_opt`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    state = {}
    for t in trained:
        state[t.name] = get_model_state_dict(t.model, options=options)
        state[f"{t.name}_opt"] = get_optimizer_state_dict(t.model, t.optimizer)
    return state


def _check_lora(directory: Path, saved: dict | None, wanted: dict | None) -> None:
    """A checkpoint's training state fits only a learner with the same LoRA settings (or none)."""
    if saved != wanted:

        def say(settings):
            return "full fine-tuning" if settings is None else f"learner.lora {settings}"

        raise ConfigError(
            f"checkpoint {directory} was written with {say(saved)}, this run has {say(wanted)}: resume "
            "with the same learner.lora, or start a new run directory (or --no-resume)"
        )


def save_policy(lm, tied_head: bool, directory: Path, weights: list[tuple[str, object]]) -> None:
    """The policy as a loadable model (config, generation config, safetensors) from its exported weights;
    `lm` gives the configs, and a `tied_head` is left out (loading restores it from the embedding)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(directory)
    if lm.generation_config is not None:
        lm.generation_config.save_pretrained(directory)
    tensors = dict(weights)
    if tied_head:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


# -- whole or broken ------------------------------------------------------------------------------


def write_manifest(directory: Path) -> None:
    """List every file of the finished checkpoint with its size and sha256 (written atomically, last)."""
    directory = Path(directory)
    files = {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    write_atomically(directory / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def problem(directory: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it, in a phrase."""
    directory = Path(directory)
    if not directory.is_dir():
        return "its directory is missing"
    manifest = directory / MANIFEST_FILE
    if not manifest.exists():
        # Written before checkpoints carried a manifest: learner.pt, written last, marks it whole.
        return None if (directory / STATE_FILE).exists() else f"no {MANIFEST_FILE} and no {STATE_FILE}"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST_FILE} is unreadable ({e})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, its manifest says {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST_FILE}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _free_space(directory: Path) -> str:
    for path in (directory, *directory.parents):
        if path.exists():
            return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    return "unknown"


@contextlib.contextmanager
def single_process_note_quiet():
    """DCP warns that one process is 'assumed' even when told so (no_dist); one rank is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
