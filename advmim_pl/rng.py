"""Random draws from explicit generators on any device, XLA included.

Where a device has no generator of its own (XLA), ``generator_for`` returns a CPU generator and the draws
are made on the CPU and moved; elsewhere the draw happens on the device itself and ``.to`` is a no-op.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def generator_for(device: torch.device | str) -> torch.Generator:
    """A generator on ``device``, or on the CPU where the device has none (XLA)."""
    try:
        return torch.Generator(device=torch.device(device))
    except RuntimeError:
        return torch.Generator()


def made_for(generator: torch.Generator | None, device: torch.device | str) -> bool:
    """Whether ``generator`` is the one ``generator_for(device)`` would make (same device, or CPU for XLA)."""
    return generator is not None and generator.device == generator_for(device).device


def rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Uniform [0, 1) float32 of ``shape`` on ``device``, drawn from ``generator`` (global RNG if None)."""
    source = device if generator is None else generator.device
    return torch.rand(shape, device=source, generator=generator).to(device)


def randn(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal float32 of ``shape`` on ``device``, drawn from ``generator`` (global RNG if None)."""
    source = device if generator is None else generator.device
    return torch.randn(shape, device=source, generator=generator).to(device)


@contextmanager
def preserved(generator: torch.Generator | None) -> Iterator[None]:
    """Draws made from ``generator`` inside the block leave its state as it was (for side computations such
    as logging, which must not shift a training stream)."""
    state = None if generator is None else generator.get_state()
    try:
        yield
    finally:
        if generator is not None:
            generator.set_state(state)


class SeededStream:
    """A random stream that is made at its first draw, on the draw's device: seeded, or restored from a saved state.

    Lightning restores checkpoint state before it moves the model to its device, so a saved state waits here until
    the first draw, which knows the device.
    """

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None
        self._pending: Tensor | None = None

    def get(self, device: torch.device | str, seed: int, rank: int = 0) -> torch.Generator:
        """The generator for ``device`` (made and seeded with ``seed`` if there is none for it yet), with any
        waiting state applied: a state saved per rank (``rank_states``) gives this ``rank`` its own row, and a
        rank the saved run did not have starts from ``seed``."""
        if not made_for(self.generator, device):
            self.generator = generator_for(device).manual_seed(seed)
        if self._pending is not None:
            state = self._pending
            if state.dim() == 2:  # a copy: set_state misreads a row view that starts past its storage's start
                fresh = rank >= state.shape[0]
                state = generator_for(device).manual_seed(seed).get_state() if fresh else state[rank].clone()
            self.generator.set_state(state)
            self._pending = None
        return self.generator

    def state(self) -> Tensor | None:
        """The state to save: the waiting one, else the generator's (None before the first draw)."""
        if self._pending is not None or self.generator is None:
            return self._pending
        return self.generator.get_state()

    def restore(self, state: Tensor | None) -> None:
        """Apply ``state`` (one generator state, or one row per rank) at the next draw."""
        self._pending = state


def rank_states(strategy, state: Tensor) -> Tensor:
    """Every rank's generator state ``state`` (n,) uint8, gathered into (world_size, n) on the CPU, so that a
    checkpoint, which rank 0 writes, resumes each rank's own random stream. All ranks must call it."""
    if strategy.world_size == 1:
        return state.unsqueeze(0)
    return strategy.all_gather(state.to(strategy.root_device)).cpu()
