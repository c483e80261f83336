"""The one randomness rule of the package.

Every public function that draws random numbers takes `seed: int | None = None`. An int
seeds a private torch.Generator, so the result is reproducible and torch's global RNG state
is left as it was; None draws from torch's global RNG, so `torch.manual_seed` governs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from twa_kernels.errors import InvalidTypeError


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    """`seed` itself, or an InvalidTypeError naming the argument when it is neither an int nor None."""
    # bool is an int subclass, but seed=True is a mistake for progress=True or similar
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidTypeError(f"{name} must be an int or None (None: draw from torch's global RNG), "
                               f"got {type(seed).__name__} {seed!r}")
    return seed


def generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device` (default CPU), or None for seed=None,
    which every torch sampling function reads as "use the global RNG"."""
    if check_seed(seed) is None:
        return None
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body under torch's global CPU RNG seeded with `seed`, restoring the caller's
    state afterwards; with None, under the global RNG as it is. For code that draws from the
    global RNG itself and takes no generator (a module's constructor, say)."""
    if check_seed(seed) is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
