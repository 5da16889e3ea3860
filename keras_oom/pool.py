"""Kept for compatibility: the local pool's pieces moved.

`default_start_method` and `START_METHODS` now live in `launch.py` (how
workers start); the pool itself is `process_pool.ProcessPool`.
"""

from __future__ import annotations

from keras_oom.launch import START_METHODS, default_start_method

__all__ = ["START_METHODS", "default_start_method"]
