"""`pip install ./python` gives a working module from anywhere: the package carries
libcowbackup (built by cargo through setuptools-rust), a built wheel installs and runs on a
machine without a Rust toolchain, COWBACKUP_LIB still overrides, and the binding built alone
(COWBACKUP_NO_NATIVE=1) finds an installed libcowbackup.so.0 on the loader's path."""

from __future__ import annotations

import glob
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


def _build_env(native: bool) -> dict:
    """pip's environment: the library's sources are the repository's (the build runs on a copy
    of python/); cargo builds into a target dir of its own under the repository's (kept
    between runs; never the one holding the library the other tests have loaded)."""
    env = dict(os.environ)
    env.pop("COWBACKUP_LIB", None)
    env["COWBACKUP_CAPI_MANIFEST"] = os.path.join(REPO, "capi", "Cargo.toml")
    env["CARGO_TARGET_DIR"] = os.path.join(REPO, "target", "python-wheel")
    if not native:
        env["COWBACKUP_NO_NATIVE"] = "1"
    return env


def _copy_python(cwd: str) -> str:
    """A copy of python/ (setuptools writes build/ and *.egg-info into the directory it
    builds, which must not race other runs in the tree)."""
    src = os.path.join(cwd, "python")
    shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "_libcowbackup*.so"))
    return src


def _pip(venv_python: str, cwd: str, args: list, native: bool = True) -> None:
    """Run pip in the venv (with build isolation: it fetches setuptools and setuptools-rust);
    skips when there is no network to fetch them."""
    cmd = [venv_python, "-m", "pip", "--disable-pip-version-check"] + args
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=_build_env(native))
    if r.returncode != 0 and re.search(
            r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
            r"No matching distribution found for (setuptools|wheel)", r.stdout + r.stderr):
        pytest.skip("pip needs the network to get its build tools, and there is none: " + r.stderr[-300:])
    assert r.returncode == 0, r.stdout + r.stderr


def _venv(root) -> str:
    venv = root / "venv"
    r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"python -m venv does not work here: {r.stderr.strip()[-300:]}")
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with ./python pip-installed into it (library included); its python."""
    root = tmp_path_factory.mktemp("pip")
    py = _venv(root)
    _copy_python(str(root))
    _pip(py, str(root), ["install", "--quiet", "./python"])
    return py


@pytest.fixture(scope="module")
def installed_binding_only(tmp_path_factory):
    """A fresh venv with the binding alone (COWBACKUP_NO_NATIVE=1); its python."""
    root = tmp_path_factory.mktemp("pip-binding")
    py = _venv(root)
    _copy_python(str(root))
    _pip(py, str(root), ["install", "--quiet", "./python"], native=False)
    return py


def _run(py: str, cwd, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COWBACKUP_LIB", "PYTHONPATH")}
    env.update(env_extra)
    return subprocess.run([py, "-c", SMOKE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _module_and_library(out: str):
    module = re.search(r"^module (.*)$", out, re.M).group(1)
    library = re.search(r"^library (.*)$", out, re.M).group(1)
    return module, library


def test_pip_install_carries_the_library(installed, tmp_path):
    """No COWBACKUP_LIB, no LD_LIBRARY_PATH, away from the repository: the package's own
    library is found and a backup runs."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run(installed, work, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout
    module, library = _module_and_library(r.stdout)
    assert "site-packages" in module and not module.startswith(PYTHON_DIR), module
    assert library.startswith(os.path.dirname(module)) and "_libcowbackup" in library, library


def test_pip_installed_module_with_cowbackup_lib(installed, tmp_path):
    """COWBACKUP_LIB still overrides the library the package carries."""
    lib = _library()
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run(installed, work, {"COWBACKUP_LIB": lib})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout
    assert f"library {lib}" in r.stdout


def test_a_built_wheel_installs_and_runs_without_a_toolchain(tmp_path):
    """`pip wheel ./python` makes a platform wheel that holds the library; installed from the
    file alone (no index, no cargo on PATH) into another venv, it runs a backup."""
    build = tmp_path / "build"
    build.mkdir()
    builder = _venv(build)
    _copy_python(str(build))
    _pip(builder, str(build), ["wheel", "--quiet", "--no-deps", "-w", "dist", "./python"])
    wheels = glob.glob(str(build / "dist" / "cowbackup-*.whl"))
    assert len(wheels) == 1, wheels
    assert "linux" in os.path.basename(wheels[0]), "a wheel with a native library is platform-specific"
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", wheels[0]], capture_output=True, text=True).stdout
    assert re.search(r"cowbackup/_libcowbackup[^ ]*\.so", names), names
    target = tmp_path / "target"
    target.mkdir()
    py = _venv(target)
    env = {k: v for k, v in os.environ.items() if k not in ("COWBACKUP_LIB", "PYTHONPATH")}
    env["PATH"] = os.path.dirname(py) + ":/usr/bin:/bin"  # no cargo, no rustc
    r = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", wheels[0]],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([py, "-c", SMOKE], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout


def test_the_binding_alone_finds_an_installed_library(installed_binding_only, tmp_path):
    """Without a library of its own and without COWBACKUP_LIB, the module finds
    libcowbackup.so.0 where the loader looks (here a prefix's lib dir in LD_LIBRARY_PATH, as
    after `meson install` into a prefix)."""
    lib = _library()
    libdir = tmp_path / "prefix" / "lib"
    libdir.mkdir(parents=True)
    os.symlink(lib, libdir / "libcowbackup.so.0")
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = _run(installed_binding_only, work, {"LD_LIBRARY_PATH": str(libdir)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backup ok" in r.stdout
    # Without any library to find, the ImportError says where it looked and what to do.
    r = _run(installed_binding_only, work, {"LD_LIBRARY_PATH": str(tmp_path / "nothing-here")})
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
