"""Generates python/API.md, the reference of every public name of the `cowbackup` package,
from the package's own docstrings and signatures (so the reference cannot drift from the
code: python/tests/test_api_doc.py regenerates it and compares).

    COWBACKUP_LIB=target/release/libcowbackup.so python3 python/tools/api_doc.py > python/API.md
"""

from __future__ import annotations

import enum
import inspect
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cowbackup  # noqa: E402


def _doc(obj) -> str:
    d = inspect.getdoc(obj) or ""
    return d.strip()


def _sig(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _members(cls):
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        yield name, value


def generate() -> str:
    out = [
        "# cowbackup Python API reference",
        "",
        "Generated from the package's docstrings by `python/tools/api_doc.py` (a test checks that",
        "this file is up to date). Runnable examples of each feature: `python/examples/features/`.",
        "",
    ]
    for name in cowbackup.__all__:
        obj = getattr(cowbackup, name)
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else ("enum" if issubclass(obj, enum.Enum) else "class")
            out += [f"## {kind} `{name}`", ""]
            if _doc(obj):
                out += [_doc(obj), ""]
            if issubclass(obj, enum.Enum):
                out += ["Members: " + ", ".join(f"`{m.name}`" for m in obj), ""]
            for mname, value in _members(obj):
                if issubclass(obj, enum.Enum) and mname in obj.__members__:
                    continue
                # Bound through the class: a classmethod's signature without `cls`.
                raw = getattr(obj, mname) if isinstance(value, (staticmethod, classmethod)) else value
                if isinstance(raw, property):
                    out += [f"### `{name}.{mname}` (property)", ""]
                    if _doc(raw):
                        out += [_doc(raw), ""]
                elif callable(raw):
                    out += [f"### `{name}.{_sig(mname, raw)}`", ""]
                    if _doc(raw):
                        out += [_doc(raw), ""]
        elif callable(obj):
            out += [f"## `{_sig(name, obj)}`", ""]
            if _doc(obj):
                out += [_doc(obj), ""]
        else:
            out += [f"## constant `{name}` = `{obj!r}`", ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
