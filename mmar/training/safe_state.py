"""Nested training state (optimizer / scheduler / RNG / EMA state dicts) as safetensors + JSON, never pickle.

:func:`write_state` splits a state dict into its tensors (``NAME.safetensors``) and a JSON skeleton
(``NAME.json``) that keeps the structure and every plain value (int keys of optimizer states, tuples of
RNG states, numpy arrays as tensors + dtype). :func:`read_state` rebuilds it; it only ever parses JSON and
safetensors, so a planted file can hold data, not code. Anything else (an object) is refused when written.
Files are flushed and fsynced before the function returns.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _encode(obj: Any, path: str, tensors: dict, seen: dict) -> Any:
    if isinstance(obj, (torch.Tensor, np.ndarray)) and path in tensors:  # a key with dots met a nested one
        path = f"{path}#{len(tensors)}"
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:  # the same tensor twice (tied weights): stored once
            return {"__alias__": seen[ident]}
        shares = t.numel() and any(k[0] == ident[0] for k in seen)  # a view of a stored tensor's memory
        seen[ident] = path
        tensors[path] = t.clone() if shares else t.contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.astype(np.float64))
        return {"__ndarray__": path, "dtype": obj.dtype.str}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k, path), _encode(v, f"{path}.{k}", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", tensors, seen) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be saved as safetensors + JSON")


def _key(k: Any, path: str) -> Any:
    if k is None or isinstance(k, (bool, int, float, str)):
        return k
    raise TypeError(f"{path}: a dict key of type {type(k).__name__} cannot be saved as JSON")


def _decode(obj: Any, tensors: dict, where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__alias__" in obj:
        name = obj.get("__tensor__", obj.get("__alias__"))
        if name not in tensors:
            raise ValueError(f"{where}: tensor {name!r} is missing")
        return tensors[name]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors, where) for k, v in obj["__dict__"]}
    raise ValueError(f"{where}: unexpected entry {sorted(obj)[:3]}")


def fsync_file(path: str) -> None:
    """Flush ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (new names, renames) to the disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, value: Any) -> None:
    """JSON to ``path``, flushed and fsynced."""
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str, missing: Exception) -> Any:
    """The JSON value in ``path``; ``missing`` is raised when there is no such file, a ``ValueError`` naming
    the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise missing from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def write_state(folder: str, name: str, state: Any) -> list[str]:
    """``state`` as ``folder/NAME.safetensors`` (its tensors) + ``folder/NAME.json`` (the rest).
    Returns the file names written."""
    tensors: dict = {}
    if isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):  # weights: their own names
        seen: dict = {}
        skeleton = {"__dict__": [[k, _encode(v, k, tensors, seen)] for k, v in state.items()]}
    else:
        skeleton = _encode(state, name, tensors, {})
    files = [f"{name}.json"]
    if tensors:
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
        fsync_file(os.path.join(folder, f"{name}.safetensors"))
        files.append(f"{name}.safetensors")
    write_json(os.path.join(folder, f"{name}.json"), {"format": "mmar-state-1", "state": skeleton})
    return files


def read_state(folder: str, name: str) -> Any:
    """What :func:`write_state` wrote; a missing or broken file is a ``ValueError`` naming it."""
    where = os.path.join(folder, f"{name}.json")
    doc = read_json(where, ValueError(f"{where}: missing from the checkpoint"))
    if not isinstance(doc, dict) or doc.get("format") != "mmar-state-1":
        raise ValueError(f"{where}: not an mmar state file")
    blob = os.path.join(folder, f"{name}.safetensors")
    tensors = {}
    if os.path.exists(blob):
        try:
            tensors = load_file(blob)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a broken file
            raise ValueError(f"{blob}: not a readable safetensors file ({e})") from e
    try:
        return _decode(doc.get("state"), tensors, where)
    except (KeyError, TypeError, IndexError, AttributeError) as e:  # a skeleton edited by hand or by a fuzzer
        raise ValueError(f"{where}: broken state ({type(e).__name__}: {e})") from e
