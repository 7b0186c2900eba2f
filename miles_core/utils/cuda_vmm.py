"""Device memory at a fixed virtual address whose physical pages can be given back and taken again.

Why: a colocated engine frees its GPU memory while the trainer trains. Memory freed through the
CUDA caching allocator comes back at other addresses, and the engine's CUDA graphs hold the old
ones, so every resume captured the decode graphs again: seconds per RL step (SGLang avoids the
same cost with its memory saver, which does what this module does). CUDA's virtual memory
management API separates the address range (`cuMemAddressReserve`) from the physical pages
(`cuMemCreate` + `cuMemMap`): `unmap` gives the pages back and keeps the range, `map` puts new
pages under the same addresses, and every tensor and captured graph pointing there stays valid.

The driver API is reached through ctypes (libcuda ships with every driver; no extra package).
`Region.tensor` is a uint8 tensor over the whole range (through `__cuda_array_interface__`, no
copy); tensors placed in it (`Tensor.set_`) keep their objects. Contents do not survive `unmap`:
callers copy what they need to the host first. Touching the range while unmapped is an illegal
address on the device (it ends the CUDA context), so the owner must refuse all work until `map`.
The range and its pages go back to the driver when the last tensor over them is gone (an engine
dropped in a long-lived process leaves no memory behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

from miles_core.errors import MilesError

_PINNED, _DEVICE_LOCATION, _READ_WRITE = 1, 1, 3


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    """`CUmemAllocationProp`: pinned device memory on one GPU, no shareable handle."""
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise MilesError(f"CUDA virtual memory: cannot load the driver library libcuda.so.1 ({err})") from None


def _check(result: int, call: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise MilesError(f"CUDA virtual memory: {call} failed with error {result} "
                         f"({(text.value or b'unknown').decode()})")


def _prop(device_index: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type, prop.requestedHandleTypes = _PINNED, 0
    prop.location = _Location(_DEVICE_LOCATION, device_index)
    return prop


class _Pages:
    """A reserved range and the physical pages under it, exposed as bytes through
    `__cuda_array_interface__`. The zero-copy tensor over the range holds this object (torch
    keeps it as the storage's owner), so the range and its pages are given back when the last
    tensor viewing them is gone, never while one could still read there."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.device, self.nbytes, self.handle = device, nbytes, None
        pointer = ctypes.c_uint64()
        with _bound(device):
            _check(_driver().cuMemAddressReserve(ctypes.byref(pointer), ctypes.c_size_t(nbytes),
                                                 ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_uint64(0)),
                   "cuMemAddressReserve")
        self.pointer = pointer.value
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (self.pointer, False),
                                         "version": 3, "strides": None}

    def map(self) -> None:
        if self.handle is None:
            with _bound(self.device):
                self.handle = _map_pages(self.pointer, self.nbytes, self.device.index)

    def unmap(self) -> None:
        if self.handle is None:
            return
        with _bound(self.device):  # it synchronises: no queued kernel may still read the pages
            _check(_driver().cuMemUnmap(ctypes.c_uint64(self.pointer), ctypes.c_size_t(self.nbytes)), "cuMemUnmap")
            _check(_driver().cuMemRelease(ctypes.c_uint64(self.handle)), "cuMemRelease")
        self.handle = None

    def free(self) -> None:
        """Pages and range back to the driver; only once nothing views the range."""
        if self.pointer is None:
            return
        self.unmap()
        with _bound(self.device):
            _driver().cuMemAddressFree(ctypes.c_uint64(self.pointer), ctypes.c_size_t(self.nbytes))
        self.pointer = None

    def __del__(self) -> None:
        try:
            if torch.cuda.is_current_stream_capturing():  # its synchronize would break a graph capture
                return  # the range is lost to this process instead
            self.free()
        except Exception:  # noqa: BLE001 - at interpreter exit the driver or torch may be gone already
            pass


def _map_pages(pointer: int, nbytes: int, device_index: int) -> int:
    """Create `nbytes` of physical pages, map them at `pointer` and allow access; their handle."""
    handle, prop = ctypes.c_uint64(), _prop(device_index)
    _check(_driver().cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(nbytes), ctypes.byref(prop),
                                 ctypes.c_uint64(0)), f"cuMemCreate of {nbytes / 2**30:.2f} GiB")
    try:
        _check(_driver().cuMemMap(ctypes.c_uint64(pointer), ctypes.c_size_t(nbytes), ctypes.c_size_t(0),
                                  handle, ctypes.c_uint64(0)), "cuMemMap")
    except MilesError:
        _driver().cuMemRelease(handle)
        raise
    access = _AccessDesc(_Location(_DEVICE_LOCATION, device_index), _READ_WRITE)
    result = _driver().cuMemSetAccess(ctypes.c_uint64(pointer), ctypes.c_size_t(nbytes),
                                      ctypes.byref(access), ctypes.c_size_t(1))
    if result != 0:
        _driver().cuMemUnmap(ctypes.c_uint64(pointer), ctypes.c_size_t(nbytes))
        _driver().cuMemRelease(handle)
        _check(result, "cuMemSetAccess")
    return handle.value


@contextlib.contextmanager
def _bound(device: torch.device):
    """Driver calls act on the thread's current context: make the device's primary context
    current (the runtime binds it on its first call in a thread) for the block."""
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        yield


class Region:
    """`nbytes` (rounded up to the driver's granularity) of device memory at a fixed address on
    `device`, mapped on creation. Given back to the driver once neither `tensor` nor any tensor
    placed in it is left (`_Pages`)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise MilesError(f"CUDA virtual memory needs a CUDA device, got {device}")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.nbytes = _granular(nbytes, self.device.index)
        pages = _Pages(self.device, self.nbytes)
        try:
            pages.map()
        except Exception:
            pages.free()
            raise
        self.tensor = torch.as_tensor(pages, device=self.device)
        self._pages = pages

    @property
    def mapped(self) -> bool:
        return self._pages.handle is not None

    def map(self) -> None:
        """Put fresh physical pages (contents undefined) under the range."""
        self._pages.map()

    def unmap(self) -> None:
        """Give the physical pages back to the driver (the range stays reserved)."""
        self._pages.unmap()


def _granular(nbytes: int, device_index: int) -> int:
    """`nbytes` rounded up to the driver's allocation granularity (at least one granule)."""
    prop, granularity = _prop(device_index), ctypes.c_size_t()
    _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop), 0),
           "cuMemGetAllocationGranularity")
    step = granularity.value
    return max(step, -(-nbytes // step) * step)
