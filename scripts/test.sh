#!/usr/bin/env bash
# Runs every ringzero test: formatting and lints, the host unit tests, the fuzz targets (a fixed
# number of runs each), then the emulator test table (QEMU for AMD SVM, Bochs for Intel VMX) against freshly built images. On first use it
# installs what is missing (Debian packages, the pinned Rust toolchain) and says so.
# Exits non-zero when anything fails.
set -euo pipefail

RZ_PROG=test
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$RZ_ROOT"

started=$(date +%s)
step() { rz_say "[$(( $(date +%s) - started ))s] $*"; }
passed=0 failed=0
# Runs `cargo test ARGS`, showing its output, and adds its counts to the totals.
cargo_test() {
    local log
    log=$(mktemp)
    set +e
    cargo test "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    set -e
    local counts
    counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$log")
    rm -f "$log"
    while read -r ok bad; do
        [ -n "$ok" ] && passed=$((passed + ok)) && failed=$((failed + bad))
    done <<< "$counts"
    if [ "$status" != 0 ]; then
        echo "tests: $passed passed, $((failed > 0 ? failed : 1)) failed"
        exit "$status"
    fi
}

step "set-up: packages and toolchain"
rz_ensure_packages build-essential
rz_ensure_toolchain
rz_ensure_qemu
rz_ensure_bochs

step "formatting (cargo fmt --check)"
cargo fmt --all --check
(cd tests/guests && cargo fmt --all --check)

step "lints (cargo clippy: host crates, the kernel, the guest payloads)"
cargo clippy --quiet --workspace --exclude ringzero --all-targets -- -D warnings
cargo clippy --quiet -p ringzero --target x86_64-unknown-none -- -D warnings
(cd tests/guests && cargo clippy --quiet --release -- -D warnings)

step "host unit tests (cargo test)"
cargo_test --quiet

step "fuzzing (scripts/fuzz.sh: every cargo-fuzz target, fixed runs and seed)"
fuzz_log=$(mktemp)
set +e
bash scripts/fuzz.sh 2>&1 | tee "$fuzz_log"
fuzz_status=${PIPESTATUS[0]}
set -e
fuzz_clean=$(grep -c '^fuzz: .* runs, 0 crashes$' "$fuzz_log" || true)
rm -f "$fuzz_log"
passed=$((passed + fuzz_clean))
if [ "$fuzz_status" != 0 ] || [ "$fuzz_clean" = 0 ]; then
    echo "tests: $passed passed, $((failed + 1)) failed"
    exit 1
fi

step "building the kernel, the image tool and the guest payloads"
rz_build_binaries
rz_build_guests
# The stock Linux guest (Debian's cloud kernel and a busybox initramfs; fetched once, cached).
source "$RZ_ROOT/scripts/lib/linux-guest.sh"
rz_linux_guest

step "emulator tests (QEMU SVM, Bochs VMX; each run packs its own images)"
cargo_test --quiet -p ringzero-tests -- --test-threads=2

step "all tests passed"
echo "tests: $passed passed, $failed failed"
