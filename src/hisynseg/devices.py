"""Choosing the torch device from a user's ``auto`` / ``cpu`` / ``cuda[:N]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hisynseg.errors import HisynsegError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceError", "resolve_device"]


class DeviceError(HisynsegError, ValueError):
    """A device name torch does not know, or CUDA asked for where there is none."""


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """The device to run on, as torch's canonical name (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    ``"auto"`` (or ``None``) picks CUDA when available, else the CPU.

    Raises:
        DeviceError: Unknown name, or CUDA requested but not available.
    """
    import torch

    name = "auto" if device is None else str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r} ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} requested, but CUDA is not available here")
    return str(resolved)
