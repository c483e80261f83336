"""The one randomness rule of the package.

Every public function that draws random numbers takes `seed: int | None = None`. An int
seeds a private torch.Generator, so the result is reproducible and torch's global RNG state
is left as it was; None draws from torch's global RNG, so `torch.manual_seed` governs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from twa_kernels.errors import InvalidArgumentError, InvalidTypeError, warn_at_caller


# the seeds torch.Generator.manual_seed takes
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    """`seed` itself, or an InvalidTypeError naming the argument when it is neither an int nor
    None, or an InvalidArgumentError when torch cannot seed a generator with it."""
    # bool is an int subclass, but seed=True is a mistake for progress=True or similar
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidTypeError(f"{name} must be an int or None (None: draw from torch's global RNG), "
                               f"got {type(seed).__name__} {seed!r}")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidArgumentError(f"{name}={seed} is outside the seeds torch takes, {SEED_RANGE[0]} to "
                                   f"{SEED_RANGE[1]}")
    return seed


def derived_seed(seed: int, *salt: int) -> int:
    """A seed for one of several streams drawn from `seed` (one per iteration, say), inside
    torch's range whatever `seed` is."""
    value = seed
    for s in salt:
        value = value * 1_000_003 + s
    return value % (1 << 63)


def generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator | None:
    """A torch.Generator seeded with `seed` on `device` (default CPU), or None for seed=None,
    which every torch sampling function reads as "use the global RNG"."""
    if check_seed(seed) is None:
        return None
    return torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body under torch's global CPU RNG seeded with `seed` (and the CUDA ones, where
    CUDA is initialised), restoring the caller's states afterwards; with None, under the
    global RNG as it is. For code that draws from the global RNG itself and takes no
    generator (a module's constructor, say). torch.manual_seed is not used: before CUDA is
    initialised it queues the seed for the CUDA generators, which no restore can take back."""
    if check_seed(seed) is None:
        yield
        return
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed_all(seed)
        yield


def generator_or_seed(seed: int | torch.Generator | None, deprecated_generator: torch.Generator | None,
                      where: str) -> torch.Generator | None:
    """The generator to draw from for a function that took `generator=` before `seed=`: a
    torch.Generator passed as `generator=` (or positionally where `seed` now stands) still
    works for one release, with a DeprecationWarning; an int seed gives a fresh generator."""
    if isinstance(seed, torch.Generator):  # the old positional form
        seed, deprecated_generator = None, seed
    if deprecated_generator is not None:
        if seed is not None:
            raise InvalidArgumentError(f"{where}: pass seed= or the deprecated generator=, not both")
        if not isinstance(deprecated_generator, torch.Generator):
            raise InvalidTypeError(f"{where}: generator= must be a torch.Generator, got "
                                   f"{type(deprecated_generator).__name__}; pass seed=<int> instead")
        warn_at_caller(f"{where}(generator=...) is deprecated: pass seed=<int> (a private generator, the global RNG "
                       "untouched) or seed=None (torch's global RNG)", DeprecationWarning)
        return deprecated_generator
    return generator(seed)
