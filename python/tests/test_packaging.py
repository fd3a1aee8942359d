"""`pip install ./python` works, and the installed module finds the library from anywhere:
through COWBACKUP_LIB, or as an installed libcowbackup.so.0 on the loader's path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import HERE

PYTHON_DIR = os.path.dirname(HERE)
REPO = os.path.dirname(PYTHON_DIR)

# Run by the installed module, from a directory outside the repository: a small backup of a
# file into a new file, checked byte for byte.
SMOKE = textwrap.dedent("""
    import os, sys
    import cowbackup
    print("module", cowbackup.__file__)
    print("library", cowbackup.library_path())
    size = 4 << 20
    data = os.urandom(size // 2) + bytes(size // 2)
    with open("disk.img", "wb") as f:
        f.write(data)
    with cowbackup.Driver.open("disk.img", write=True) as disk, \\
         cowbackup.Driver.create("backup.img", size) as backup, \\
         cowbackup.backup_start(disk, backup) as job:
        job.cow_before_write(0, 4096)
        disk.write(0, b"x" * 4096)
        job.wait()
    with open("backup.img", "rb") as f:
        assert f.read() == data, "the backup is not the point-in-time image"
    try:
        cowbackup.Driver.create("backup.img", size)
    except cowbackup.CowbackupError as e:
        assert isinstance(e, FileExistsError), e
    print("backup ok")
""")


def _library() -> str:
    lib = os.environ.get("COWBACKUP_LIB") or os.path.join(REPO, "target", "release", "libcowbackup.so")
    if not os.path.exists(lib):
        pytest.skip(f"no built library at {lib} (cargo build --release --lib)")
    return os.path.abspath(lib)


def _pip_install(venv_python: str, cwd: str) -> None:
    """pip install ./python into the venv: offline when the venv can build it by itself
    (setuptools with a wheel builder), else with pip's build isolation (fetches setuptools)."""
    probe = ("import setuptools.build_meta\n"
             "try:\n    import wheel\nexcept ImportError:\n"
             "    import setuptools.command.bdist_wheel\n")
    offline = subprocess.run([venv_python, "-c", probe], capture_output=True).returncode == 0
    cmd = [venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if offline:
        cmd.append("--no-build-isolation")
    # `pip install ./python`, run on a copy of python/: setuptools writes build/ and
    # *.egg-info into the directory it builds, which must not race other runs in the tree.
    src = os.path.join(cwd, "python")
    shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    r = subprocess.run(cmd + ["./python"], cwd=cwd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and not offline and re.search(
            r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
            r"No matching distribution found for setuptools", r.stdout + r.stderr):
        pytest.skip("pip needs the network to get setuptools, and there is none: " + r.stderr[-300:])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with ./python pip-installed into it; its python."""
    root = tmp_path_factory.mktemp("pip")
    venv = root / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"python -m venv does not work here: {r.stderr.strip()[-300:]}")
    py = str(venv / "bin" / "python")
    _pip_install(py, str(root))
    return py


def _run(py: str, cwd, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COWBACKUP_LIB", "PYTHONPATH")}
    env.update(env_extra)
    return subprocess.run([py, "-c", SMOKE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_pip_installed_module_with_cowbackup_lib(installed, tmp_path):
    lib = _library()
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run(installed, work, {"COWBACKUP_LIB": lib})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout
    module = re.search(r"^module (.*)$", r.stdout, re.M).group(1)
    assert "site-packages" in module and not module.startswith(PYTHON_DIR), module
    assert f"library {lib}" in r.stdout


def test_pip_installed_module_finds_an_installed_library(installed, tmp_path):
    """No COWBACKUP_LIB: the module finds libcowbackup.so.0 where the loader looks (here a
    prefix's lib dir in LD_LIBRARY_PATH, as after `meson install` into a prefix)."""
    lib = _library()
    libdir = tmp_path / "prefix" / "lib"
    libdir.mkdir(parents=True)
    os.symlink(lib, libdir / "libcowbackup.so.0")
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run(installed, work, {"LD_LIBRARY_PATH": str(libdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout
    # Without any library to find, the ImportError says where it looked and what to do.
    r = _run(installed, work, {"LD_LIBRARY_PATH": str(tmp_path / "nothing-here")})
    if "backup ok" in r.stdout:
        pytest.skip("a libcowbackup is installed system-wide: cannot check the not-found message")
    assert r.returncode != 0
    assert "libcowbackup not found" in r.stderr and "COWBACKUP_LIB" in r.stderr, r.stderr


def test_versions_agree():
    """pyproject.toml's version is Cargo.toml's (the one place the version is written)."""
    def version(path: str) -> str:
        with open(path) as f:
            return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)

    assert version(os.path.join(PYTHON_DIR, "pyproject.toml")) == version(os.path.join(REPO, "Cargo.toml"))
