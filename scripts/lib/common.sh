# Shared by scripts/run-qemu.sh and scripts/test.sh: installing what is missing, building.
# Sourced, not run. Every function prints what it does on stderr, prefixed with $RZ_PROG.

RZ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RZ_PROG=${RZ_PROG:-ringzero}
RZ_IMAGES=$RZ_ROOT/target/ringzero/images
RZ_KERNEL=$RZ_ROOT/target/x86_64-unknown-none/release/ringzero
RZ_BOOT_TOOL=$RZ_ROOT/target/release/ringzero-boot

rz_say() { echo "$RZ_PROG: $*" >&2; }
rz_die() { echo "$RZ_PROG: error: $*" >&2; exit "${RZ_DIE_STATUS:-120}"; }

# Installs the Debian packages given that are not installed yet, saying which.
rz_ensure_packages() {
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    rz_say "installing Debian packages: ${missing[*]}"
    rz_apt_install "${missing[@]}"
}

# apt-get update, then apt-get install ARGS (options and packages), as root (sudo if needed).
rz_apt_install() {
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2 || rz_die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || rz_die "apt-get install $* failed"
}

# Installs the toolchain rust-toolchain.toml pins (rustup does not do it by itself here).
rz_ensure_toolchain() {
    if ! command -v rustup >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/rustup" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v rustup >/dev/null 2>&1; then
        rz_say "installing rustup"
        rz_ensure_packages curl ca-certificates
        curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none >&2 \
            || rz_die "cannot install rustup"
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    local toolchain
    toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$RZ_ROOT/rust-toolchain.toml")
    if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
        rz_say "installing Rust toolchain $toolchain"
    fi
    # Idempotent and quick when everything is there; also adds components and targets that
    # were added to rust-toolchain.toml after the toolchain was installed.
    (cd "$RZ_ROOT" && rustup toolchain install "$toolchain" --profile minimal \
        -c rust-src -c llvm-tools-preview -c rustfmt -c clippy -t x86_64-unknown-none >/dev/null 2>&1) \
        || rz_die "cannot install the Rust toolchain $toolchain"
    (cd "$RZ_ROOT" && rustup component add --toolchain "$toolchain" rust-src llvm-tools-preview rustfmt clippy >/dev/null 2>&1 \
        && rustup target add --toolchain "$toolchain" x86_64-unknown-none >/dev/null 2>&1) \
        || rz_die "cannot add the components/targets of $toolchain"
}

# The oldest QEMU the tests are run with: the suite and the teaching walkthrough are checked with
# QEMU 10, whose SVM emulation differs from 7.2's (docs/architecture.md, "Emulator facts").
RZ_QEMU_MIN_MAJOR=10

# The version (10.0.2) of the qemu-system-x86_64 on PATH, or of the one given ("" if none).
rz_qemu_version() {
    "${1:-qemu-system-x86_64}" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p'
}
# Its major version (10).
rz_qemu_major() {
    local version
    version=$(rz_qemu_version "$@")
    echo "${version%%.*}"
}

# What running under QEMU needs: OVMF and a QEMU of at least RZ_QEMU_MIN_MAJOR. On Debian 12,
# whose own QEMU is 7.2, that is QEMU 10 from bookworm-backports (a source added for it).
# RINGZERO_ANY_QEMU=1 takes whatever qemu-system-x86_64 is first on PATH, with a warning if it
# is older (to compare QEMU versions, say).
rz_ensure_qemu() {
    rz_ensure_packages ovmf
    local major
    major=$(rz_qemu_major)
    [ -n "$major" ] && [ "$major" -ge "$RZ_QEMU_MIN_MAJOR" ] && return 0
    if [ "${RINGZERO_ANY_QEMU:-0}" = 1 ] && [ -n "$major" ]; then
        rz_say "warning: using QEMU $major (RINGZERO_ANY_QEMU=1); the tests are checked with $RZ_QEMU_MIN_MAJOR"
        return 0
    fi
    local installed
    installed=$(rz_qemu_major /usr/bin/qemu-system-x86_64)
    if [ -n "$installed" ] && [ "$installed" -ge "$RZ_QEMU_MIN_MAJOR" ]; then
        : # Debian's package is new enough; the one first on PATH is another (warned below).
    elif grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release; then
        rz_say "QEMU ${major:-(none)} found; installing QEMU $RZ_QEMU_MIN_MAJOR from bookworm-backports (the tests are checked with it; Debian 12's own is 7.2)"
        local sudo="" list=/etc/apt/sources.list.d/ringzero-bookworm-backports.list
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee "$list" >/dev/null \
                || rz_die "cannot write $list"
        fi
        rz_apt_install -t bookworm-backports qemu-system-x86
    else
        rz_ensure_packages qemu-system-x86
    fi
    major=$(rz_qemu_major)
    [ -n "$major" ] || rz_die "qemu-system-x86_64 is not on PATH after installing qemu-system-x86"
    [ "$major" -ge "$RZ_QEMU_MIN_MAJOR" ] || rz_say "warning: QEMU $major is older than $RZ_QEMU_MIN_MAJOR, the version the tests are checked with (docs/architecture.md, \"Emulator facts\")"
}
# What running under Bochs needs.
rz_ensure_bochs() { rz_ensure_packages bochs bochsbios vgabios bochs-sdl; }

rz_ovmf_code() {
    local candidate
    for candidate in /usr/share/OVMF/OVMF_CODE.fd /usr/share/OVMF/OVMF_CODE_4M.fd /usr/share/ovmf/OVMF.fd /usr/share/qemu/OVMF.fd; do
        [ -f "$candidate" ] && { echo "$candidate"; return 0; }
    done
    rz_die "no OVMF firmware found (package ovmf)"
}

# Builds the kernel and the host tool (cargo caches both).
rz_build_binaries() {
    rz_say "building the hypervisor kernel and the image tool"
    (cd "$RZ_ROOT" && cargo build --quiet --release -p ringzero --target x86_64-unknown-none) \
        || rz_die "kernel build failed"
    (cd "$RZ_ROOT" && cargo build --quiet --release -p ringzero-boot) || rz_die "ringzero-boot build failed"
}

# Builds the test guest payloads (tests/guests) into target/guests/.
rz_build_guests() {
    rz_say "building the guest payloads"
    bash "$RZ_ROOT/tests/guests/build.sh" >/dev/null || rz_die "building the guests failed"
}

# rz_pack_images DIR [ringzero-boot args...]: writes DIR/{uefi,bios}.img with the manifest
# (and the guests of --config) in the ramdisk. A refused configuration exits with 121.
rz_pack_images() {
    local out_dir=$1
    shift
    [ -x "$RZ_BOOT_TOOL" ] || rz_die "the image tool is not built (run without --no-build first)"
    "$RZ_BOOT_TOOL" --kernel "$RZ_KERNEL" --out-dir "$out_dir" "$@" >&2
    local status=$?
    if [ "$status" = 2 ]; then
        RZ_DIE_STATUS=121 rz_die "the guest configuration was refused (see above)"
    elif [ "$status" != 0 ]; then
        rz_die "packing the images failed"
    fi
}
