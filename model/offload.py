"""Activation offloading: what backward needs waits in host memory instead of on the GPU.

With activation checkpointing a training step keeps one tensor per block on the GPU until
backward: the block's input, L x d_model (in fp32 once peft's k-bit preparation has upcast
the embedding: 43 GB at 131072 tokens over 32 blocks). `ActivationOffload.saving()` is a
`saved_tensors_hooks` context around the forward pass. Every tensor autograd saves there
goes to host memory: with non-reentrant checkpointing those are the blocks' inputs (each
checkpoint keeps what its block saves to itself), plus the final norm's input and the
loss's gradient. The copy runs on a side CUDA stream, overlapping the forward's compute,
and the GPU memory is released once it is done. In backward the blocks run in reverse
order, so each unpack also starts bringing back the tensor saved just before it, on the
side stream, while the current block computes; the last ones saved come back as soon as
the forward pass ends.

Host buffers: torch's pinned-memory allocator rounds every allocation up to a power of two
(a 1.34 GB block input takes 2 GiB), which at long rows asks for more host memory than a
machine has. Buffers here are ordinary host memory of the exact size, page-locked with
`cudaHostRegister` (what makes the copies asynchronous), kept in a pool by size and reused
by later steps, whose rows have the same shapes. Once warm the pool holds the offloaded
bytes of the largest step; it is released with the `ActivationOffload` object.

Prior art, read and not copied: torch.autograd.graph.save_on_cpu (synchronous copies to
pinned memory) and torchtune's OffloadActivations (streams, and the same ordering idea).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

# Smaller saved tensors stay where they are: moving them costs more than it frees.
MIN_BYTES = 1 << 20
# Tensors brought back ahead of their use in backward: one block's input (the copy of the
# previous block's input overlaps this block's recompute and backward).
PREFETCH = 1


def _register(buffer: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    if err != 0:
        raise RuntimeError(
            f"page-locking {buffer.numel() / 1e9:.2f} GB of host memory for activation "
            f"offloading failed (cudaError {err}); the machine may be out of host memory: "
            "train shorter rows or turn train.offload_activations off"
        )


def _release(buffers: list[torch.Tensor], pinned: list[bool]) -> None:
    for buffer, pin in zip(buffers, pinned, strict=True):
        if pin:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    buffers.clear()


class _HostPool:
    """Host buffers of exact sizes (uint8), page-locked for CUDA, reused once free."""

    def __init__(self) -> None:
        self._free: dict[int, list[list]] = {}
        self._all: list[torch.Tensor] = []
        self._pinned: list[bool] = []
        self.bytes = 0
        # Unregister before the memory goes back to the heap: the pool's finalizer holds the
        # buffers, so they outlive it.
        weakref.finalize(self, _release, self._all, self._pinned)

    def take(self, nbytes: int, pin: bool) -> torch.Tensor:
        """A free buffer of `nbytes` (waiting for its last copy to finish), or a new one."""
        free = self._free.get(nbytes)
        if free:
            buffer, done = free.pop()
            if done is not None:
                done.synchronize()  # long finished by now in practice: backward came between
            return buffer
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if pin:
            _register(buffer)
        self._all.append(buffer)
        self._pinned.append(pin)
        self.bytes += nbytes
        return buffer

    def give(self, state: list) -> None:
        """`state` = [buffer, event after which nothing reads it (None on CPU)]."""
        self._free.setdefault(state[0].numel(), []).append(state)


class _Saved:
    """One offloaded tensor: its host copy, and its way back to the device."""

    def __init__(self, host: torch.Tensor, device: torch.device, state: list, stored, order: list):
        self.host = host
        self.device = device
        self.state = state  # [buffer, event]: handed back to the pool when this dies
        self.stored = stored  # event: the copy to host is done (None on CPU)
        self.fetched: torch.Tensor | None = None
        self.ready = None  # event: `fetched` has arrived
        self.taken = False
        self.order = order  # weak references to what its forward pass saved, in order
        self.index = len(order)
        order.append(weakref.ref(self))

    def fetch(self, stream: torch.cuda.Stream | None) -> None:
        """Start the copy back, on `stream` (None: the current stream)."""
        cuda = self.device.type == "cuda"
        stream = stream or (torch.cuda.current_stream(self.device) if cuda else None)
        with torch.no_grad(), torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            if cuda:
                stream.wait_event(self.stored)
            self.fetched = self.host.to(self.device, non_blocking=cuda, copy=True)
            if cuda:
                self.ready = stream.record_event()
                self.state[1] = self.ready  # the buffer is free once this copy is done

    def take(self) -> torch.Tensor:
        """The tensor, back on its device, for autograd to use on the current stream."""
        if self.fetched is None:
            self.fetch(None)
        tensor, self.fetched, self.taken = self.fetched, None, True
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        return tensor


class ActivationOffload:
    """Offloads the tensors autograd saves inside `saving()` (see the module docstring).

    `last_bytes` is how much the last forward pass offloaded, `pool.bytes` how much host
    memory the pool holds.
    """

    def __init__(self) -> None:
        self.pool = _HostPool()
        self.last_bytes = 0
        self._saved: list[weakref.ref[_Saved]] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Offload what autograd saves in this block; bring the last of it back at the end."""
        self._saved, self.last_bytes = [], 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self._prefetch(self._saved, len(self._saved))

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < MIN_BYTES or isinstance(tensor, torch.nn.Parameter):
            return tensor
        cuda = tensor.device.type == "cuda"
        buffer = self.pool.take(nbytes, pin=cuda)
        host = buffer.view(tensor.dtype).view(tensor.shape)
        stored = None
        with torch.no_grad():
            if cuda:
                stream = self._stream(tensor.device)
                stream.wait_stream(torch.cuda.current_stream(tensor.device))
                with torch.cuda.stream(stream):
                    host.copy_(tensor, non_blocking=True)
                    stored = stream.record_event()
                tensor.record_stream(stream)  # its memory is reused only after the copy
            else:
                host.copy_(tensor)
        state = [buffer, stored]
        saved = _Saved(host, tensor.device, state, stored, self._saved)
        weakref.finalize(saved, self.pool.give, state)
        self.last_bytes += nbytes
        return saved

    def _unpack(self, saved: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        self._prefetch(saved.order, saved.index)
        return saved.take()

    def _prefetch(self, order: list, index: int) -> None:
        """Start bringing back the PREFETCH tensors saved just before `order[index]`."""
        for ref in order[max(index - PREFETCH, 0) : index]:
            saved = ref()
            if saved is not None and saved.fetched is None and not saved.taken:
                saved.fetch(self._stream(saved.device))
