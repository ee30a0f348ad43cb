"""``name=value`` command-line items as `EngineConfig` keyword arguments, for the benchmark scripts."""

from __future__ import annotations

from dataclasses import fields

import hf_cb


def parse_grid(items: list[str]) -> dict[str, list]:
    """``name=v1,v2`` pairs into lists of EngineConfig values (ints, booleans, None or strings)."""
    names = {f.name for f in fields(hf_cb.EngineConfig)}
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in names:
            raise SystemExit(f"unknown EngineConfig field {name!r}")
        grid[name] = [_parse_value(v) for v in values.split(",")]
    return grid


def parse_config(items: list[str]) -> dict:
    """``name=value`` pairs into EngineConfig keyword arguments."""
    return {name: values[0] for name, values in parse_grid(items).items()}


def _parse_value(text: str):
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):  # memory_utilization=0.5 is a float, page_size=64 an int
        try:
            return kind(text)
        except ValueError:
            pass
    return text
