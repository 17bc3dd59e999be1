#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a fixed number of iterations from a fixed seed, starting from
# the committed seed inputs (<crate>/fuzz/seeds/<target>/), and prints one countable line per
# target:
#   fuzz: virtqueue 100000 runs, 0 crashes
#   fuzz: virtio-net 100000 runs, 0 crashes
#   fuzz: vswitch 100000 runs, 0 crashes
# Targets: virtqueue (kernel/virtio: virtqueue walker + virtio-blk), virtio-net (kernel/virtio:
# the net device's TX and RX paths), vswitch (kernel/vswitch:
# frame parser + switch). All of them by default; --target NAME (repeatable) picks some.
# Exit status 0 when no target crashed. A crashing input is kept in target/fuzz-artifacts/.
# Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when it is missing.
# Usage: scripts/fuzz.sh [--runs N] [--seed S] [--target NAME]...
#        (defaults: 100000 runs, seed 1, every target)
# Takes ~70 s per target to build the first time (libFuzzer + ASan), then per 100000 runs
# ~10 s for virtqueue and ~50 s for vswitch (each input is up to 4096 switch operations).
set -euo pipefail

RZ_PROG=fuzz
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$RZ_ROOT"

# crate directory (holding fuzz/) and target name, for every target
all_targets="kernel/virtio:virtqueue kernel/virtio:virtio-net kernel/vswitch:vswitch"

usage="usage: scripts/fuzz.sh [--runs N] [--seed S] [--target NAME]..."
runs=100000
seed=1
selected=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --seed) seed=${2:?--seed needs a number}; shift 2 ;;
        --target)
            name=${2:?--target needs a name}
            found=""
            for entry in $all_targets; do
                if [ "${entry##*:}" = "$name" ]; then found=$entry; fi
            done
            [ -n "$found" ] || rz_die "unknown fuzz target $name (targets:$(for entry in $all_targets; do printf ' %s' "${entry##*:}"; done))"
            selected="$selected $found"
            shift 2 ;;
        *) rz_die "unknown argument $1 ($usage)" ;;
    esac
done
case "$runs$seed" in *[!0-9]*) rz_die "--runs and --seed take numbers" ;; esac
targets=${selected:-$all_targets}

rz_ensure_toolchain
if ! cargo fuzz --version >/dev/null 2>&1; then
    rz_say "cargo-fuzz is missing: installing it with cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked >&2 || rz_die "cannot install cargo-fuzz"
fi

failed=0
for entry in $targets; do
    crate=${entry%%:*}
    target=${entry##*:}
    rz_say "building fuzz target $target"
    (cd "$crate" && cargo fuzz build "$target" >&2) || rz_die "building fuzz target $target failed"
    corpus=$(mktemp -d)
    artifacts=$RZ_ROOT/target/fuzz-artifacts/$target
    mkdir -p "$artifacts"
    log=$(mktemp)
    rz_say "running $target: $runs runs, seed $seed"
    status=0
    (cd "$crate" && cargo fuzz run "$target" "$corpus" "fuzz/seeds/$target" -- \
        -runs="$runs" -seed="$seed" -max_total_time=600 -artifact_prefix="$artifacts/") \
        >"$log" 2>&1 || status=$?
    done_runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
    crashes=0
    if [ "$status" != 0 ]; then
        crashes=1
        failed=1
        tail -n 40 "$log" >&2
        rz_say "$target crashed; the input is in $artifacts/"
        done_runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    fi
    echo "fuzz: $target ${done_runs:-0} runs, $crashes crashes"
    rm -rf "$corpus" "$log"
done
exit "$failed"
