"""Checkpoints without pickle, written as one atomic unit and verified when read.

A run's ``checkpoints/`` folder holds ``last/`` (what `--resume` continues) and ``best/`` (what
eval, predict and export use). Each is a folder of:

* ``model.safetensors``: the weights (the epoch is also stored in the file's own metadata);
* ``optimizer.safetensors``: optimizer moments (``last/`` only);
* the strategy's extra files (LoRA: ``adapter.safetensors``);
* ``state.json``: epoch, best score, history, strategy and optimizer hyper-parameters;
* ``manifest.json``: the size and SHA-256 of every file above plus the epoch, written last.

Every epoch the whole ``checkpoints/`` folder is rebuilt in a temporary sibling folder (the
unchanged ``best/`` as hard links, so nothing is copied), flushed to disk, then switched in by
renaming: the old folder to ``.checkpoints.previous``, the new one to ``checkpoints``, and the old
one deleted. A crash at any moment therefore leaves either the complete old unit or the complete
new one: `recover_checkpoints` puts ``.checkpoints.previous`` back when the crash fell between the
two renames, and deletes half-written temporary folders. Nothing here depends on how a
particular safetensors release writes its files.

`verify_checkpoint` checks a folder against its manifest (truncated, zero-byte or edited files,
weights and state from different epochs) and turns every failure into a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vision_ft.errors import VisionFTError
from vision_ft.run_folder import CHECKPOINTS, PREVIOUS, checkpoint_folder  # noqa: F401 - re-exported

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
TEMP_PREFIX = ".checkpoints.tmp-"
EPOCH_KEY = "vision_ft.epoch"  # in the safetensors header of every weights file
_HASH_CHUNK = 1 << 20


# ---------------------------------------------------------------- optimizer state as tensors + JSON


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------- writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the renames and new entries of a folder durable; not possible (nor needed) on Windows.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _seal(folder: Path, epoch: int) -> None:
    """Flush every file of `folder` and write its manifest last: a folder with a manifest is complete."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.name != MANIFEST_FILE):
        _fsync_file(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": 1, "epoch": epoch, "files": files}, indent=1))
    _fsync_file(manifest)
    _fsync_dir(folder)


def _write_folder(folder: Path, weights: dict[str, torch.Tensor], extra_files: dict[str, dict[str, torch.Tensor]],
                  state: dict[str, Any], optimizer_tensors: dict[str, torch.Tensor] | None) -> None:
    folder.mkdir(parents=True)
    tag = {EPOCH_KEY: str(state["epoch"])}
    save_file(weights, str(folder / MODEL_FILE), metadata=tag)
    for filename, tensors in extra_files.items():
        save_file(_cpu_tensors(tensors), str(folder / filename), metadata=tag)
    if optimizer_tensors is not None:
        save_file(optimizer_tensors, str(folder / OPTIMIZER_FILE), metadata=tag)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    _seal(folder, state["epoch"])


def _link_or_copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)  # files are never modified in place, so sharing is safe
        except OSError:  # file systems without hard links (some network shares, FAT)
            shutil.copy2(path, target / path.name)
    _fsync_dir(target)


def _switch_in(new: Path, checkpoints: Path) -> None:
    """Replace `checkpoints` by `new`; a crash in between leaves PREVIOUS for `recover_checkpoints`."""
    previous = checkpoints.parent / PREVIOUS
    if previous.exists():  # only after a crash that `recover_checkpoints` has not seen yet
        if checkpoints.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, checkpoints)
    if checkpoints.exists():
        os.replace(checkpoints, previous)
    os.replace(new, checkpoints)
    _fsync_dir(checkpoints.parent)
    shutil.rmtree(previous, ignore_errors=True)


def save_checkpoints(
    checkpoints: Path,
    model: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    improved: bool,
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
    best_model: nn.Module | None = None,
    best_extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write `last/` (weights, optimizer, `state`) and, when `improved`, `best/` as one atomic unit.

    `state` must be JSON-serialisable and hold "epoch". When the epoch did not improve, `best/`
    keeps the previous best. `best_model` (default `model`) gives best/ other weights, e.g. a
    weight average chosen on validation. Returns once everything is on disk: only then may the caller log
    the epoch as done.
    """
    extra_files = extra_files or {}
    weights = _cpu_tensors(model.state_dict())
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    # Our own name rather than mkdtemp: mkdtemp's folder is private (0700), the run folder is not.
    temp = checkpoints.parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temp.mkdir()
        _write_folder(temp / "last", weights, extra_files, {**state, "optimizer": optimizer_meta}, optimizer_tensors)
        if improved:
            best_weights = weights if best_model is None or best_model is model else _cpu_tensors(best_model.state_dict())
            _write_folder(temp / "best", best_weights, best_extra_files if best_extra_files is not None else extra_files,
                          dict(state), None)
        elif (checkpoints / "best").is_dir():
            _link_or_copy(checkpoints / "best", temp / "best")
        _fsync_dir(temp)
        _switch_in(temp, checkpoints)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # a Ctrl-C mid-write leaves nothing half-written behind
        raise


def save_checkpoint(folder: Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """One stand-alone checkpoint folder (outside a training run), sealed with a manifest."""
    if folder.exists():
        shutil.rmtree(folder)
    optimizer_tensors, payload = None, dict(state)
    if optimizer is not None:
        optimizer_tensors, payload["optimizer"] = _flatten_optimizer(optimizer.state_dict())
    _write_folder(folder, _cpu_tensors(model.state_dict()), {}, payload, optimizer_tensors)


# ---------------------------------------------------------------- recovery


def recover_checkpoints(checkpoints: Path) -> list[str]:
    """Undo what a crash mid-save left behind; returns what was done, for the log.

    Call only while holding the run's lock: a live save looks exactly like a crashed one.
    """
    done = []
    parent = checkpoints.parent
    previous = parent / PREVIOUS
    if previous.exists():
        if checkpoints.exists():
            shutil.rmtree(previous)  # the crash came after the switch, before the clean-up
            done.append(f"removed {previous.name} left by an interrupted save")
        else:
            os.replace(previous, checkpoints)
            done.append(f"restored {CHECKPOINTS}/ from {previous.name} (a save was interrupted mid-switch)")
    for temp in sorted(parent.glob(TEMP_PREFIX + "*")):
        shutil.rmtree(temp, ignore_errors=True)
        done.append(f"removed the half-written {temp.name}")
    # Checkpoint folders of older vision-ft versions wrote state.json through a .tmp file.
    for leftover in sorted(checkpoints.glob("*/*.tmp*")):
        leftover.unlink(missing_ok=True)
        done.append(f"removed {leftover.relative_to(parent)}")
    return done


# ---------------------------------------------------------------- reading and verification


def _damaged(folder: Path, what: str) -> VisionFTError:
    return VisionFTError(
        f"checkpoint {folder} is damaged ({what}); it was changed after vision-ft wrote it: restore the run "
        "folder from a copy, or train again with --force"
    )


def _weights_epoch(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get(EPOCH_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path.parent, f"{path.name} is not a readable safetensors file: {str(exc)[:80]}") from None
    return int(value) if value is not None and value.isdigit() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise _damaged(path.parent, f"{path.name} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _damaged(path.parent, f"{path.name} does not hold a JSON object")
    return value


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint's state after checking every file against the manifest; one-line errors.

    Checks: each file listed exists with its size and SHA-256; no listed file is missing; the
    epoch in the weights' header, in state.json and in the manifest agree. Folders written by
    vision-ft before manifests existed get the checks their files allow (readable, same epoch).
    """
    if not folder.is_dir():
        raise VisionFTError(f"checkpoint {folder} does not exist; was the run interrupted before its first epoch ended?")
    manifest_path = folder / MANIFEST_FILE
    manifest = _read_json(manifest_path) if manifest_path.exists() else None
    if manifest is not None:
        files = manifest.get("files")
        if not isinstance(files, dict) or not isinstance(manifest.get("epoch"), int):
            raise _damaged(folder, f"{MANIFEST_FILE} lacks its file list or epoch")
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                raise _damaged(folder, f"{name} is missing")
            size = path.stat().st_size
            if size != expected.get("bytes"):
                raise _damaged(folder, f"{name} has {size} bytes, {expected.get('bytes')} were written")
            if _sha256(path) != expected.get("sha256"):
                raise _damaged(folder, f"{name} does not match its checksum")
    if not (folder / STATE_FILE).is_file():
        raise VisionFTError(f"checkpoint {folder} has no {STATE_FILE}; the run was interrupted before its first save")
    state = _read_json(folder / STATE_FILE)
    if not isinstance(state.get("epoch"), int):
        raise _damaged(folder, f"{STATE_FILE} has no epoch")
    if not (folder / MODEL_FILE).is_file():
        raise VisionFTError(f"checkpoint {folder} has no {MODEL_FILE}; was the run folder copied completely?")
    weights_epoch = _weights_epoch(folder / MODEL_FILE)
    epochs = {"state.json": state["epoch"]}
    if manifest is not None:
        epochs[MANIFEST_FILE] = manifest["epoch"]
    if weights_epoch is not None:
        epochs[MODEL_FILE] = weights_epoch
    if len(set(epochs.values())) > 1:
        raise _damaged(folder, "files from different epochs: " + ", ".join(f"{k} {v}" for k, v in epochs.items()))
    return state


def verify_resume_point(checkpoints: Path) -> dict[str, Any]:
    """The state of `last/` after verifying `last/` and `best/`, and that `best/` is the epoch
    `last/` names as best (they are written as one unit, so only an edit can split them)."""
    state = verify_checkpoint(checkpoint_folder(checkpoints, "last"))
    best = checkpoint_folder(checkpoints, "best")
    if best.is_dir():
        best_epoch = verify_checkpoint(best)["epoch"]
        if best_epoch != state.get("best_epoch"):
            raise _damaged(best, f"it holds epoch {best_epoch}, the last checkpoint names epoch "
                                 f"{state.get('best_epoch')} as best")
    return state


def load_state(folder: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint folder, verified (see `verify_checkpoint`)."""
    return verify_checkpoint(folder)


def load_model_weights(folder: Path, model: nn.Module, verify: bool = True) -> None:
    """Load a checkpoint's weights into `model`, which must have the same architecture."""
    if verify:
        verify_checkpoint(folder)
    path = folder / MODEL_FILE
    if not path.is_file():
        raise VisionFTError(f"checkpoint {folder} has no {MODEL_FILE}; was the run folder copied completely?")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(folder, f"{MODEL_FILE} is not a readable safetensors file: {str(exc)[:80]}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise VisionFTError(
            f"checkpoint {path} does not fit the model built from the run's config ('{first}' "
            f"{'missing' if missing else 'unexpected'}); was config.yaml edited after training?"
        )


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore the optimizer saved next to `state` (moments, step counts, group hyper-parameters)."""
    path = folder / OPTIMIZER_FILE
    if not path.is_file() or "optimizer" not in state:
        raise VisionFTError(f"checkpoint {folder} has no optimizer state to resume from; train again with --force")
    try:
        tensors = load_file(str(path))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise _damaged(folder, f"the optimizer state does not load: {str(exc)[:80]}") from None
    _match_parameter_layouts(optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment its parameter's memory layout: the files hold contiguous tensors, and the
    fused AdamW kernels pair elements by memory position, so a channels-last weight updated with
    contiguous moments would be updated with the wrong elements' moments."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            moments = optimizer.state.get(param, {})
            for key, value in moments.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ---------------------------------------------------------------- the metrics log beside the checkpoints


def append_metrics_line(log: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row to metrics.jsonl and flush it to disk (after its checkpoint is saved)."""
    with log.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def reconcile_metrics_log(log: Path, state: dict[str, Any]) -> str | None:
    """Make metrics.jsonl end at the checkpoint's epoch before a resume; what was repaired, or None.

    The log is appended only after the checkpoint is on disk, so a crash can leave it one line
    short (that line is restored from the checkpoint's history) or with a torn last line (cut
    off). Anything else means the log and the checkpoint disagree, and resuming would log epochs
    twice or skip them: a one-line error.
    """
    text = log.read_text() if log.exists() else ""
    lines = text.splitlines(keepends=True)
    repaired = []
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
        repaired.append("cut off its torn last line")
    try:
        logged = [json.loads(line)["epoch"] for line in lines if line.strip()]
    except (ValueError, KeyError, TypeError):
        raise VisionFTError(f"{log} holds a line that is not an epoch's JSON row; restore it from a copy or "
                            "train again with --force") from None
    history = state.get("history", [])
    expected = [row["epoch"] for row in history]
    if logged == expected[:-1] and history:
        lines.append(json.dumps(history[-1]) + "\n")
        repaired.append(f"restored the line of epoch {expected[-1]} from the checkpoint")
    elif logged != expected:
        last = logged[-1] if logged else "none"
        raise VisionFTError(
            f"{log} ends at epoch {last} but the last checkpoint is of epoch {state.get('epoch')}; the run folder "
            "was changed by hand or by another program: restore it from a copy, or train again with --force"
        )
    if not repaired:
        return None
    temp = log.with_name(log.name + ".tmp")
    temp.write_text("".join(lines))
    os.replace(temp, log)
    return f"{log.name}: " + "; ".join(repaired)
