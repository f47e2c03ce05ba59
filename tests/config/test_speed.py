"""A big config (1,000 routes, 10,000 keys) loads in about a second at worst, not ten.

The bound is loose on purpose: CI machines vary; what it catches is a return of the quadratic
steps (comparing every alias successor with every path, moving each included key's positions by
a scan of the whole file) and of PyYAML's pure-Python parser, each worth seconds here.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.config.loader import load_config
from tests.config.bigconfig import BIG_KEYS, BIG_ROUTES, big_config


def test_a_big_config_loads_and_validates_in_well_under_two_seconds(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(big_config())
    started = time.process_time()
    config = load_config(path, {})
    elapsed = time.process_time() - started
    assert (len(config.routes), len(config.keys)) == (BIG_ROUTES, BIG_KEYS)
    assert elapsed < 2.0, f"{elapsed:.2f} s of CPU"


def test_a_big_config_split_over_includes_loads_as_fast(tmp_path: Path) -> None:
    text = big_config()
    head, keys = text.split("keys:\n", 1)
    keys, limits = keys.split("limits:\n", 1)
    (tmp_path / "keys.yaml").write_text("keys:\n" + keys)
    path = tmp_path / "gateway.yaml"
    path.write_text("include: [keys.yaml]\n" + head + "limits:\n" + limits)
    started = time.process_time()
    config = load_config(path, {})
    elapsed = time.process_time() - started
    assert len(config.keys) == BIG_KEYS
    assert elapsed < 2.0, f"{elapsed:.2f} s of CPU"
