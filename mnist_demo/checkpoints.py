"""Checkpoints: one msgpack file per run, verified by its SHA-256, replaced atomically.

The file is a one-line header, ``jbn-mnist-checkpoint 2 sha256=<hex>\\n``, then
the msgpack payload (:mod:`flax.serialization`) whose SHA-256 the header gives.
A truncated or modified file is refused with its name and what to do, never
resumed from; so is one whose arrays do not fit the model (another width, say),
before anything is restored from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
from flax import serialization

from .config import Config
from .files import atomic_write

CHECKPOINT_NAME = "checkpoint.msgpack"
CHECKPOINT_VERSION = 2
_MAGIC = b"jbn-mnist-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: damaged, of another version, or of other settings."""


@dataclasses.dataclass
class Progress:
    """Where a run is, saved with the state in each checkpoint.

    Attributes:
      epoch: The epoch being trained (0-based).
      step_in_epoch: Steps of that epoch already done.
      sums: Running sums of the epoch's training metrics so far.
      history: One dict of metrics per completed epoch.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    sums: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"loss": 0.0, "correct": 0.0, "count": 0.0}
    )
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file: the header with the SHA-256, then the msgpack payload."""
    body = serialization.msgpack_serialize(payload)
    digest = hashlib.sha256(body).hexdigest()
    return _MAGIC + f" {CHECKPOINT_VERSION} sha256={digest}\n".encode() + body


def read_payload(path: str | pathlib.Path, data: bytes | None = None) -> dict[str, Any]:
    """Reads and verifies a checkpoint file.

    Args:
      path: The checkpoint file.
      data: Its content, if already read (``path`` then only names it in errors).

    Returns:
      The payload: ``version``, ``state`` (a state dict), ``progress`` and
      ``config`` (JSON strings).

    Raises:
      CheckpointError: If the file is not a checkpoint of this version, or its
        content does not match its SHA-256 (truncated or modified).
    """
    path = pathlib.Path(path)
    data = path.read_bytes() if data is None else data
    remedy = (
        "move it away (or delete it) to start afresh, or use another --out; "
        "it cannot be resumed from"
    )
    header, sep, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 3 or parts[0] != _MAGIC or not parts[2].startswith(b"sha256="):
        raise CheckpointError(f"{path}: not a checkpoint of this demo (bad header); {remedy}")
    if parts[1] != str(CHECKPOINT_VERSION).encode():
        raise CheckpointError(
            f"{path}: checkpoint version {parts[1].decode(errors='replace')}, this demo reads "
            f"version {CHECKPOINT_VERSION}; {remedy}"
        )
    if hashlib.sha256(body).hexdigest().encode() != parts[2][len(b"sha256=") :]:
        raise CheckpointError(
            f"{path}: damaged checkpoint (its content does not match its SHA-256: truncated "
            f"or modified); {remedy}"
        )
    try:
        payload = serialization.msgpack_restore(body)
    except Exception as e:  # msgpack's errors have no common base
        raise CheckpointError(f"{path}: its content is not a checkpoint ({e}); {remedy}") from e
    keys = {"version", "state", "progress", "config"}
    if not isinstance(payload, dict) or not keys <= set(payload):
        raise CheckpointError(
            f"{path}: not a checkpoint of this demo (it lacks "
            f"{', '.join(sorted(keys - set(payload if isinstance(payload, dict) else ())))}); "
            f"{remedy}"
        )
    return payload


def _shape(x: Any) -> tuple[int, ...] | None:
    """The shape of an array leaf, None for a nested dict (or anything else)."""
    if isinstance(x, dict):
        return None
    return tuple(getattr(x, "shape", ()))


def first_mismatch(saved: Any, model: Any, prefix: str = "") -> str | None:
    """The first array path at which two state dicts differ in keys or shapes, in words.

    Args:
      saved: The checkpoint's state dict (nested dicts of arrays).
      model: The model's state dict, of the structure to restore into.
      prefix: The path of ``saved`` and ``model`` (for the recursion).

    Returns:
      E.g. ``'params/Dense_0/kernel has shape (784, 256) in the checkpoint, (784, 512)
      in the model'``, or None if they agree.
    """
    if isinstance(model, dict) or isinstance(saved, dict):
        if not (isinstance(model, dict) and isinstance(saved, dict)):
            what = "a group of arrays" if isinstance(saved, dict) else "an array"
            return f"{prefix or '/'} is {what} in the checkpoint, not in the model"
        for key in model:
            path = f"{prefix}/{key}" if prefix else str(key)
            if key not in saved:
                return f"{path} is in the model but not in the checkpoint"
            found = first_mismatch(saved[key], model[key], path)
            if found is not None:
                return found
        for key in saved:
            if key not in model:
                path = f"{prefix}/{key}" if prefix else str(key)
                return f"{path} is in the checkpoint but not in the model"
        return None
    a, b = _shape(saved), _shape(model)
    if a != b:
        return f"{prefix} has shape {a} in the checkpoint, {b} in the model"
    return None


def save_checkpoint(
    workdir: pathlib.Path, state: Any, progress: Progress, config: Config
) -> pathlib.Path:
    """Saves the state and progress to ``workdir/checkpoint.msgpack`` atomically."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "state": serialization.to_state_dict(jax.device_get(state)),
        "progress": json.dumps(dataclasses.asdict(progress)),
        "config": json.dumps(dataclasses.asdict(config)),
    }
    path = pathlib.Path(workdir) / CHECKPOINT_NAME
    atomic_write(path, encode(payload))
    return path


def _identity(data: bytes | None) -> bytes | None:
    return data


def restore_checkpoint(
    workdir: pathlib.Path,
    state: Any,
    config: Config,
    *,
    share: Callable[[bytes | None], bytes | None] = _identity,
) -> tuple[Any, Progress] | None:
    """Restores the checkpoint in ``workdir`` into the structure of ``state``.

    Args:
      workdir: The run's directory.
      state: A state of the run's structure.
      config: The run's configuration, checked against the checkpoint's.
      share: Maps the file's content (None when there is none) to the content to
        restore from; in a run across processes, process 0's, so that every process
        restores the same checkpoint (:func:`mnist_demo.distributed.broadcast_bytes`).

    Returns:
      The restored state and progress, or None if there is no checkpoint.

    Raises:
      CheckpointError: If the checkpoint is damaged, was made with settings that
        change the result, or holds arrays that do not fit ``state`` (checked
        before anything is restored: the first mismatching array is named).
    """
    path = pathlib.Path(workdir) / CHECKPOINT_NAME
    data = share(path.read_bytes() if path.exists() else None)
    if data is None:
        return None
    payload = read_payload(path, data)
    remedy = "move it away to start afresh, or use another --out"
    try:
        saved = json.loads(payload["config"])
        progress = Progress(**json.loads(payload["progress"]))
        if not isinstance(saved, dict):
            raise TypeError(f"settings of type {type(saved).__name__}")
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a checkpoint of this demo (its settings or progress are unreadable: "
            f"{e}); {remedy}"
        ) from e
    now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    # A setting the checkpoint lacks was added to the demo after it was written: its
    # default is what that run used.
    defaults = json.loads(json.dumps(dataclasses.asdict(Config())))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    resumable = Config.resumable_fields()
    diff = {
        k: (saved.get(k), v) for k, v in now.items() if k not in resumable and saved.get(k) != v
    }
    if diff:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} was written with different settings ({details}); "
            "use the same options to resume, or another --out to start afresh"
        )
    mismatch = first_mismatch(payload["state"], serialization.to_state_dict(state))
    if mismatch is not None:
        raise CheckpointError(
            f"{path}: its arrays do not fit the model: {mismatch} (written by another model "
            f"or another version of the demo); {remedy}"
        )
    state = serialization.from_state_dict(state, payload["state"])
    return state, progress
