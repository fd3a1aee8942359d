"""The Python API reference (python/API.md) is generated from the package and up to date,
every public name and method is documented, and every feature example runs."""

from __future__ import annotations

import glob
import inspect
import os
import subprocess
import sys

import pytest

from conftest import HERE

import cowbackup

PYTHON_DIR = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(PYTHON_DIR, "tools"))

import api_doc  # noqa: E402

EXAMPLES = sorted(glob.glob(os.path.join(PYTHON_DIR, "examples", "features", "*.py")))


def test_api_reference_is_up_to_date():
    with open(os.path.join(PYTHON_DIR, "API.md")) as f:
        committed = f.read()
    assert committed == api_doc.generate(), (
        "python/API.md is out of date: COWBACKUP_LIB=target/release/libcowbackup.so "
        "python3 python/tools/api_doc.py > python/API.md")


def test_every_public_name_and_method_has_a_docstring():
    missing = []
    for name in cowbackup.__all__:
        obj = getattr(cowbackup, name)
        if not (inspect.isclass(obj) or callable(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for m, v in vars(obj).items():
                if not m.startswith("_") and (callable(v) or isinstance(v, (property, classmethod, staticmethod))):
                    if not inspect.getdoc(getattr(obj, m, v)) and not inspect.getdoc(v):
                        missing.append(f"{name}.{m}")
    assert not missing, f"undocumented: {missing}"


def test_the_readme_points_at_the_reference_and_the_examples():
    with open(os.path.join(PYTHON_DIR, "README.md")) as f:
        readme = f.read()
    assert "API.md" in readme
    for path in EXAMPLES:
        assert os.path.basename(path) in readme, f"python/README.md does not mention {os.path.basename(path)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_feature_example_runs(path, tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    r = subprocess.run([sys.executable, path], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
