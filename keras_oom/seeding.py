"""TEMPORARY stand-in; replaced by the seed branch's module on merge."""

from __future__ import annotations

import inspect
import random
import sys

import numpy as np


def batch_position(batch: int, shard: tuple[int, int]) -> int:
    return batch * shard[1] + shard[0]


def batch_seed(seed: int, epoch: int, position: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([0x6B6F6F6D, seed, epoch, position])


def batch_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(batch_seed(seed, epoch, position)))


def seed_global_generators(seq: np.random.SeedSequence) -> None:
    words = seq.generate_state(4)
    np.random.seed(words)
    random.seed(int(words[0]))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(int(words[1]))


def accepts_rng(fn) -> bool:
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
