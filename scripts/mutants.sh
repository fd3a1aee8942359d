#!/usr/bin/env bash
# Mutation check of the job core: each mutation below must make `cargo test --release`
# fail. Applies scripts/mutants/mutants.patch (a `COWBACKUP_MUTANT=<name>` switch at each
# mutation point; never part of the library) to a scratch copy of the work tree, builds
# the tests once, checks the unmutated suite passes, then per mutation runs the test
# binaries expected to catch it (`where` below; the whole suite when they do not) and
# prints a table: mutation -> the tests that caught it. Not run by CI.
#
#   scripts/mutants.sh            every mutation, expected binaries first
#   scripts/mutants.sh --full     the whole `cargo test --release` for every mutation
#                                 (about 5 minutes each on a quiet 2-core machine)
#   scripts/mutants.sh m5 h1      only these
#
# Exits non-zero when a mutation survives or the unmutated suite fails.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
full=0
if [ "${1:-}" = --full ]; then full=1; shift; fi
declare -A what=(
  [m1]="persistent bitmap: a mark returns before its page is durable"
  [m2]="persistent bitmap: pages written without a flush when no header follows"
  [m3]="cow_buffer: a saved run whose target write fails under Stop is released dirty (its old data lost)"
  [m4]="Stop: a failed chunk's claim released clean"
  [m5]="cow_buffer: a hook's saved run released clean while its data is only in memory"
  [m6]="Stop: the resume-epoch rule removed (an I/O begun before the latest resume pauses again)"
  [m7]="Stop: worker errors never pause the job"
  [m8]="view discard not counted (a Full job reports Completed without the discarded clusters)"
  [m9]="the job's final flush of the target dropped"
  [m10]="a copy that ends under an older view read hold clears its bits (the view may read the host's new data)"
  [h1]="hooks skip the wait on in-flight claims (hardening i)"
  [h2]="bits cleared before the copy reaches the target (hardening ii)"
  [h3]="the final flush dropped (hardening iii): same mutation point as m9"
  [h4]="a failed hook copy taken as done (hardening iv)"
  [n1]="Always after a failure: copied clusters leave the bitmap without a target flush"
  [n2]="a group member's cancel after the group committed still cancels it"
)
# The test binaries expected to catch each mutation (run first).
declare -A where=(
  [m1]="--lib --test dirty_crash --test incremental_persistent" [m2]="--lib --test dirty_crash --test incremental_persistent"
  [m3]="--test cow_buffer" [m4]="--test lifecycle --test control" [m5]="--test cow_buffer"
  [m6]="--test lifecycle" [m7]="--test lifecycle --test control" [m8]="--test snapshot"
  [m9]="--test job --test lifecycle --test crash_target" [m10]="--test snapshot"
  [h1]="--test point_in_time --test control --test copy_order" [h2]="--test copy_order --test control"
  [h4]="--test control --test lifecycle" [n1]="--test incremental_persistent" [n2]="--test group"
)
order=(m1 m2 m3 m4 m5 m6 m7 m8 m9 m10 h1 h2 h3 h4 n1 n2)
[ $# -gt 0 ] && order=("$@")
scratch=$(mktemp -d /tmp/cowbackup-mutants.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
# The work tree as it is (committed or not), without build output.
tar -C "$root" --exclude=./target --exclude=./build --exclude=./.venv --exclude=./fuzz/target -cf - . | tar -C "$scratch" -xf -
cd "$scratch" && patch -s -p1 < "$root/scripts/mutants/mutants.patch" || { echo "mutants: the patch does not apply" >&2; exit 1; }
export CARGO_TARGET_DIR=${MUTANTS_TARGET_DIR:-$root/target/mutants}
cargo test --release --no-run -q 2>&1 | tail -3
run() { # name [cargo test selection...] -> failing tests, one per line, in $scratch/out.<name>
    local name=$1 log="$scratch/log.$1"
    shift
    # shellcheck disable=SC2068
    COWBACKUP_MUTANT=$name timeout 1800 cargo test --release --no-fail-fast $@ >"$log" 2>&1
    local rc=$?
    # "binary::test" for each failed test; a binary that crashed without a per-test
    # FAILED line counts by its name.
    awk '/^     Running /{bin=($2=="unittests")?"lib":$2; sub(/.*\//,"",bin); sub(/\.rs$/,"",bin); failed=0}
         /^test .* \.\.\. FAILED$/{print bin "::" $2; failed=1}
         /process didn.t exit successfully/{ if (!failed) print bin " (crashed)" }' "$log" >"$scratch/out.$name"
    [ $rc = 124 ] && echo "(timed out)" >>"$scratch/out.$name"
    return $rc
}
# The baseline: the whole suite (--full), else every binary named in `where`.
baseline=""
if [ $full = 0 ]; then
    baseline=$(printf '%s ' "${where[@]}" | awk '{for (i = 1; i <= NF; i++) if ($i == "--test") print $i " " $(++i); else print $i}' | sort -u | tr '\n' ' ')
fi
echo "--- unmutated: cargo test --release ${baseline:-(all)}"
# shellcheck disable=SC2086
if ! run none $baseline; then
    echo "mutants: the suite fails without any mutation:" >&2; cat "$scratch/out.none" >&2; exit 1
fi
survived=0
printf '\n| mutation | what | caught by |\n|---|---|---|\n' >"$scratch/table"
for m in "${order[@]}"; do
    real=$m; [ "$m" = h3 ] && real=m9
    echo "--- $m: ${what[$m]:-?}"
    if [ $full = 1 ]; then
        run "$real"
    else
        run "$real" ${where[$real]:-}
        [ -s "$scratch/out.$real" ] || run "$real" # not caught there: the whole suite
    fi
    caught=$(sort -u "$scratch/out.$real" | paste -sd, - | sed 's/,/, /g')
    if [ -z "$caught" ]; then caught="**SURVIVED**"; survived=$((survived + 1)); fi
    echo "$caught"
    printf '| %s | %s | %s |\n' "$m" "${what[$m]:-?}" "$caught" >>"$scratch/table"
done
cat "$scratch/table"
[ $survived = 0 ]
