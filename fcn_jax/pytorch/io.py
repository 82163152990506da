"""PyTorch files and tensors: the only place fcn-jax calls ``torch.load`` and ``torch.save``."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fcn_jax.atomic_files import atomic_target
from fcn_jax.errors import WeightsError, first_line


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values on the host; bfloat16 becomes float32, which holds every bfloat16 value exactly
    (numpy has no bfloat16)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def from_numpy(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors holding copies of ``arrays`` (writable, sharing no memory with them)."""
    return {k: torch.tensor(v) for k, v in arrays.items()}


def load_file(path: Path) -> Mapping:
    """What a ``.pth``/``.pt``/``.bin`` file holds, read with ``torch.load(weights_only=True)``: plain
    tensors and containers only, so a malicious pickle cannot run code."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): its download or save did not finish; download or save it "
                           f"again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):
            raise WeightsError(
                f"{path} holds Python objects beyond tensors (a whole pickled model?), which "
                f"torch.load(weights_only=True) refuses to run; re-save the weights in PyTorch with "
                f"torch.save(model.state_dict(), path)") from e
        raise WeightsError(f"{path} is not a PyTorch checkpoint or is corrupt; download or save it again") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint ({first_line(e)}); the "
                           f"file is truncated or corrupt: download or save it again") from e


def save_file(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    """``state_dict`` as a ``.pth`` of tensors, written atomically (a temporary file renamed into place)."""
    with atomic_target(path) as tmp:
        torch.save(from_numpy(state_dict), tmp)
