"""Builds libcowbackup into the package (see pyproject.toml).

Why setuptools-rust (in its no-binding mode) and not maturin: the binding is plain ctypes
over the C library, not a Python extension; setuptools-rust builds a bare cdylib from an
existing Cargo manifest (the repository's capi/ crate, outside this directory) and places it
in the package like any extension module, keeping setuptools as the build backend the
package already had; maturin's cdylib mode wants its own project layout and generates cffi
glue we do not use.

Environment: COWBACKUP_CAPI_MANIFEST, the capi crate's Cargo.toml (default: ../capi/Cargo.toml,
for builds from a copy of this directory); CARGO_TARGET_DIR is honoured (reuse a build);
COWBACKUP_NO_NATIVE=1 builds the binding alone (it then finds a system-installed library).
"""

import os

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("COWBACKUP_NO_NATIVE") == "1":
    setup()
else:
    from setuptools_rust import Binding, RustExtension

    manifest = os.environ.get("COWBACKUP_CAPI_MANIFEST") or os.path.join(here, "..", "capi", "Cargo.toml")
    if not os.path.exists(manifest):
        raise SystemExit(
            f"cowbackup: the library's sources are not at {manifest}: build from the repository "
            "(pip install ./python), set COWBACKUP_CAPI_MANIFEST to capi/Cargo.toml, or "
            "COWBACKUP_NO_NATIVE=1 to install the binding alone"
        )
    # The Ceph RBD driver when librbd and librados are installed (Debian: librbd-dev), as the
    # meson build does; without it Driver.rbd_open raises ENOTSUP.
    rbd = os.path.exists("/usr/include/rbd/librbd.h") and os.path.exists("/usr/include/rados/librados.h")
    setup(
        rust_extensions=[
            RustExtension(
                "cowbackup._libcowbackup",
                path=manifest,
                binding=Binding.NoBinding,
                features=["rbd"] if rbd else [],
                debug=False,
                py_limited_api=False,
            )
        ],
    )
