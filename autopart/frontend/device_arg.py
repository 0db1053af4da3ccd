"""Turn the `devices` argument of `autopart.compile` into a `Cluster`."""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from autopart.cost_models import Cluster, DeviceSpec, get_preset
from autopart.core.errors import InputError

DevicesArg = Union[int, str, os.PathLike, Sequence[Union[str, torch.device]], Cluster]

_GPU_NAMES = {"H200": "H200", "H100": "H100", "A100": "A100-80GB"}


def resolve_devices(devices: DevicesArg) -> Cluster:
    """int: that many CPU devices; "8xH100": a preset cluster; "cluster.json": a saved Cluster
    (`autopart.calibrate().save(path)`); ["cuda:0", ...]: the local devices."""
    if isinstance(devices, Cluster):
        return devices
    if isinstance(devices, os.PathLike) or (isinstance(devices, str) and devices.strip().lower().endswith(".json")):
        return _load_cluster(os.fspath(devices))
    if isinstance(devices, bool) or devices is None:
        raise InputError(f"devices={devices!r} makes no sense; pass a count (4), a cluster string "
                         "('8xH100'), a list of torch devices (['cuda:0', 'cuda:1']) or a Cluster")
    if isinstance(devices, int):
        if devices <= 0:
            raise InputError(f"devices={devices}: need at least one device; pass a positive count")
        return Cluster.cpu(devices)
    if isinstance(devices, str):
        try:
            return Cluster.parse(devices)
        except ValueError as error:
            raise InputError(f"devices={devices!r}: {error}") from error
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise InputError("devices=[] is empty; list at least one torch device, e.g. ['cuda:0']")
        specs = [_spec_of(torch.device(d) if isinstance(d, str) else d) for d in devices]
        names = [str(d) for d in devices]
        if len(set(names)) != len(names):
            raise InputError(f"devices={names} lists a device twice; list each device once")
        return Cluster.from_devices(specs)
    raise InputError(f"devices of type {type(devices).__name__} is not understood; pass an int, a string "
                     "like '8xH100', a list of torch devices or a Cluster")


def _load_cluster(path: str) -> Cluster:
    try:
        return Cluster.load(path)
    except OSError as error:
        raise InputError(f"devices={path!r}: cannot read it ({error.strerror}); pass a file written by "
                         "Cluster.save(), e.g. autopart.calibrate().save('cluster.json')") from None
    except ValueError as error:
        raise InputError(f"devices={path!r}: {error}") from None


def gpu_preset(name: str) -> DeviceSpec | None:
    """The datasheet preset of a GPU called `name` (as torch.cuda.get_device_name prints it), or None."""
    for key, preset in _GPU_NAMES.items():
        if key in name:
            return get_preset(preset)
    return None


def _spec_of(device: torch.device) -> DeviceSpec:
    if device.type == "cpu":
        return get_preset("CPU")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device} named but CUDA is not available here; plan with a "
                             "preset string instead, e.g. devices='2xH100'")
        name = torch.cuda.get_device_name(device)
        preset = gpu_preset(name)
        if preset is not None:
            return preset
        raise InputError(f"no preset for GPU {name!r}; pass a Cluster of DeviceSpecs for it")
    raise InputError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda' devices")
