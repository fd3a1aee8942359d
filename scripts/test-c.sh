#!/bin/bash
# Build and test the C API: meson + ninja (when missing, installed with pip into the
# gitignored venv .venv, never into the system's Python), then
#   1. meson test, plain build               (build/plain)
#   2. meson test, ASan + UBSan C side       (build/sanitize, -Dsanitize=address,undefined)
#   3. meson test under valgrind             (build/plain)
#   4. libcowbackup.so.0 exports only cowbackup_* (nm -D), SONAME libcowbackup.so.0
#   5. the sanitized test binaries really link ASan (__asan_init)
#   6. the nbdkit filter (capi/nbdkit/test.sh against build/plain: real nbdkit, qemu-io and
#      qemu-img; skipped with the reason when nbdkit cannot be installed)
#   7. the README's C snippet is capi/examples/quickstart.c's, and that program builds and runs
#      with the README's pkg-config commands, against the build dir (build/plain) and against a
#      `meson install` into a temporary prefix
# Every stage runs; the script exits non-zero when any failed. Works from a clean checkout
# on Debian as root (installs valgrind with apt-get when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
failed=()

stage() { echo; echo "=== $* ==="; }
fail() { echo "test-c: FAILED: $*" >&2; failed+=("$*"); }

stage "tools"
if ! command -v meson >/dev/null || ! command -v ninja >/dev/null; then
    # meson and ninja from PyPI into the repository's venv (.venv, gitignored, shared with
    # scripts/test-python.sh): nothing is installed into the system's Python. Debian ships
    # venv's ensurepip separately (python3-venv); Debian's own meson is the last resort.
    venv="$root/.venv"
    if [ ! -x "$venv/bin/meson" ] || [ ! -x "$venv/bin/ninja" ]; then
        if [ ! -x "$venv/bin/python" ]; then
            python3 -m venv "$venv" 2>/dev/null || {
                rm -rf "$venv"
                [ "$(id -u)" = 0 ] && apt-get update -qq \
                    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
                    && python3 -m venv "$venv"
            } || rm -rf "$venv"
        fi
        [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip install --quiet meson ninja \
            || echo "test-c: cannot install meson and ninja into $venv" >&2
    fi
    if [ -x "$venv/bin/meson" ] && [ -x "$venv/bin/ninja" ]; then
        export PATH="$venv/bin:$PATH"
    elif [ "$(id -u)" = 0 ] && apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq meson ninja-build >/dev/null; then
        :
    else
        echo "test-c: cannot install meson and ninja (venv with pip, or apt-get)" >&2; exit 1
    fi
fi
if ! command -v valgrind >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind) >/dev/null \
            || echo "test-c: cannot install valgrind" >&2
    fi
fi
for tool in meson ninja cargo cc nm valgrind; do
    command -v "$tool" >/dev/null || { echo "test-c: $tool is missing" >&2; exit 1; }
done
echo "meson $(meson --version), ninja $(ninja --version), $(cargo --version), $(cc --version | head -n1), $(valgrind --version)"

# Both build dirs share one cargo target dir: the Rust library is built once, normally.
cargo_dir="$root/build/cargo"
setup() { # dir, extra options...
    local dir=$1; shift
    if [ -f "$dir/build.ninja" ]; then
        meson setup --reconfigure "$dir" -Dcargo_target_dir="$cargo_dir" "$@" >/dev/null
    else
        meson setup "$dir" -Dcargo_target_dir="$cargo_dir" "$@" >/dev/null
    fi
}

stage "build: plain"
setup build/plain && ninja -C build/plain >/dev/null || { fail "plain build"; }

stage "build: sanitize (address,undefined)"
setup build/sanitize -Dsanitize=address,undefined && ninja -C build/sanitize >/dev/null || fail "sanitize build"

stage "meson test: plain"
meson test -C build/plain --print-errorlogs --no-rebuild || fail "meson test (plain)"

stage "meson test: ASan + UBSan"
ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    meson test -C build/sanitize --print-errorlogs --no-rebuild || fail "meson test (ASan+UBSan)"

stage "meson test: valgrind"
meson test -C build/plain --print-errorlogs --no-rebuild --timeout-multiplier 10 \
    --wrapper "valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite --quiet --suppressions=$root/scripts/valgrind.supp" \
    || fail "meson test (valgrind)"

stage "nbdkit filter: capi/nbdkit/test.sh"
timeout 1200 capi/nbdkit/test.sh "$root/build/plain" || fail "nbdkit filter test (capi/nbdkit/test.sh)"

stage "exports of libcowbackup.so.0"
so=$(ls build/plain/libcowbackup.so.0.* 2>/dev/null | head -n1)
if [ -z "$so" ]; then
    fail "no build/plain/libcowbackup.so.0.*"
else
    exports=$(nm -D --defined-only "$so" | awk '{print $NF}')
    # The only non-cowbackup_ symbol allowed is the version node the linker defines.
    others=$(echo "$exports" | grep -v '^cowbackup_' | grep -v '^COWBACKUP_0$' || true)
    echo "$(echo "$exports" | grep -c '^cowbackup_') cowbackup_* functions exported; others: ${others:-none}"
    [ -z "$others" ] || fail "libcowbackup exports more than cowbackup_*: $others"
    soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    echo "SONAME $soname"
    [ "$soname" = libcowbackup.so.0 ] || fail "SONAME is '$soname', not libcowbackup.so.0"
fi

stage "ASan linked into the sanitized tests"
n=0
for exe in build/sanitize/test_* build/sanitize/block_layer; do
    [ -f "$exe" ] && [ -x "$exe" ] || continue
    n=$((n + 1))
    nm "$exe" | grep '__asan_init' >/dev/null || fail "$exe does not link ASan (__asan_init)"
done
[ "$n" -gt 0 ] || fail "no sanitized test binaries"
echo "$n sanitized binaries checked for __asan_init"

stage "pkg-config: the README's commands, against the build dir and an install"
python3 - README.md capi/examples/quickstart.c <<'PY' || fail "README's C snippet is not capi/examples/quickstart.c's"
import sys
readme, example = (open(p).read() for p in sys.argv[1:3])
snippet = readme.split("## C\n", 1)[1].split("```c\n", 1)[1].split("```", 1)[0]
body = example.split("/* README begin */\n", 1)[1].split("/* README end */", 1)[0]
if snippet != body:
    sys.exit("README.md's C snippet differs from capi/examples/quickstart.c between the README markers")
print("README.md's C snippet == capi/examples/quickstart.c (README part)")
PY
pc_tmp=$(mktemp -d /tmp/cowbackup-pkgconfig-XXXXXX)
(   # In a subshell: the exports stay here. The commands are the README's (build dir "build/plain").
    set -e
    cd "$pc_tmp"
    cp "$root/capi/examples/quickstart.c" app.c
    export PKG_CONFIG_PATH=$root/build/plain/meson-uninstalled
    cc -pthread app.c $(pkg-config --cflags --libs cowbackup) -o app
    LD_LIBRARY_PATH=$root/build/plain ./app
) || fail "building and running against the build dir with pkg-config"
(
    set -e
    setup "$root/build/install" --prefix="$pc_tmp/prefix" --libdir=lib -Dtests=false
    meson install -C "$root/build/install" >/dev/null
    cd "$pc_tmp"
    export PKG_CONFIG_PATH=$pc_tmp/prefix/lib/pkgconfig
    cc -pthread app.c $(pkg-config --cflags --libs cowbackup) -Wl,-rpath,$(pkg-config --variable=libdir cowbackup) -o app-installed
    ./app-installed
    # The installed header and library, not the source tree's.
    [ "$(pkg-config --variable=includedir cowbackup)" = "$pc_tmp/prefix/include" ]
    ldd ./app-installed | grep -F "$pc_tmp/prefix/lib/libcowbackup.so.0"
    # The installed nbdkit filter (when built) loads in nbdkit and finds the installed library.
    f="$pc_tmp/prefix/lib/nbdkit/filters/nbdkit-cowbackup-filter.so"
    if [ -f "$root/build/install/capi/nbdkit/nbdkit-cowbackup-filter.so" ]; then
        ldd "$f" | grep -F "$pc_tmp/prefix/lib/libcowbackup.so.0"
        nbdkit --filter="$f" memory --help | grep -q '^backup=PATH'
        echo "installed nbdkit filter loads: $f"
    fi
) || fail "building and running against an install with pkg-config"
rm -rf "$pc_tmp"

end=$(date +%s)
echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-c: ${#failed[@]} stage(s) failed in $((end - start))s:"
    printf '  - %s\n' "${failed[@]}"
    exit 1
fi
echo "test-c: all stages passed in $((end - start))s"
