#!/usr/bin/env bash
# Builds the ringzero test guests (tests/guests) for x86_64-unknown-none, release, and puts the
# images in target/guests/: basic.bin, triple-fault.bin, escape.bin, toucher.bin, torture.bin,
# demo-traps.bin, demo-paravirt.bin, smp.bin, worker.bin, spinner.bin, echo.bin, xsave.bin (flat64 raw
# binaries, loaded and entered at 0x100000), multiboot.elf (Multiboot v1 ELF64 with a.out-kludge
# fields) and flat64-shim.elf (test helper: boots a flat64 image given as a Multiboot module under
# plain QEMU). Works from any directory. See tests/guests/README.md.
set -euo pipefail

guests_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root_dir="$(cd "$guests_dir/../.." && pwd)"
build_dir="$root_dir/target/guests-build"
out_dir="$root_dir/target/guests"

# Cargo reads tests/guests/.cargo/config.toml (target, rustflags) only from inside tests/guests.
cd "$guests_dir"
cargo build --release --target x86_64-unknown-none --target-dir "$build_dir" --workspace

objcopy="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/llvm-objcopy"
[ -x "$objcopy" ] || { echo "build.sh: no llvm-objcopy at $objcopy (rustup component add llvm-tools-preview)" >&2; exit 1; }

elf_dir="$build_dir/x86_64-unknown-none/release"
mkdir -p "$out_dir"
for guest in basic triple-fault escape toucher torture demo-traps demo-paravirt smp worker spinner echo disk-abuse xsave; do
    "$objcopy" -O binary "$elf_dir/$guest" "$out_dir/$guest.bin"
    echo "built $out_dir/$guest.bin (flat64, $(stat -c %s "$out_dir/$guest.bin") bytes)"
done
for guest in multiboot flat64-shim; do
    cp "$elf_dir/$guest" "$out_dir/$guest.elf"
    echo "built $out_dir/$guest.elf (Multiboot ELF64, $(stat -c %s "$out_dir/$guest.elf") bytes)"
done
