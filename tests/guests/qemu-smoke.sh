#!/usr/bin/env bash
# Smoke test of the guests under plain QEMU (TCG, no hypervisor): checks that each one boots and
# runs its course. multiboot.elf boots directly (-kernel, Multiboot a.out kludge); the flat64
# guests boot through flat64-shim.elf, which QEMU loads with the guest as its first module.
# What differs from a run under ringzero: basic's CPUID and unowned-port checks fail (TCG is not
# ringzero), so it exits with status 1; escape's write beyond RAM is not stopped (status 1); the
# triple fault resets QEMU, which -no-reboot turns into a plain exit; torture runs with -cpu max
# and must pass every step; smp runs with -smp 2 on QEMU's own local APICs and must pass; worker
# must finish with its result checked; spinner must still spin when a 5-second timeout kills it.
# Usage:
#   tests/guests/qemu-smoke.sh [--no-build]
set -euo pipefail

guests_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
images="$(cd "$guests_dir/../.." && pwd)/target/guests"
[ "${1:-}" = --no-build ] || "$guests_dir/build.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0 passes=0

# run NAME EXPECTED_QEMU_STATUS QEMU_ARGS...: runs QEMU, keeps its serial output in $work/NAME.
# Killed after $limit seconds (default 30; timeout's status is then 124).
run() {
    local name=$1 expected=$2 status=0
    shift 2
    timeout "${limit:-30}" qemu-system-x86_64 -display none -no-reboot -serial "file:$work/$name" \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 -d cpu_reset -D "$work/$name.qemu-log" "$@" \
        || status=$?
    sed "s/^/  | /" "$work/$name"
    if [ "$status" -ne "$expected" ]; then
        echo "FAIL $name: QEMU exit status $status, expected $expected"; failures=$((failures + 1)); return 1
    fi
}

# expect NAME EXTENDED_REGEX: the serial output of NAME has a line matching it.
expect() {
    if grep -Eq "$2" "$work/$1"; then return 0; fi
    echo "FAIL $1: no line matching '$2'"; failures=$((failures + 1)); return 1
}

check() { # check NAME: counts a pass when the run and its expectations all held.
    if [ "$1" = 0 ]; then passes=$((passes + 1)); echo "ok $2"; fi
}

# QEMU's isa-debug-exit exits with (status << 1) | 1.
before=$failures
# QEMU names each module by its -initrd text: run from the modules' directory for short names.
cd "$guests_dir/multiboot/modules"
run multiboot 1 -m 16 -kernel "$images/multiboot.elf" -append "console=ttyS0 hello multiboot" \
    -initrd "first.txt,second.txt" || true
cd "$guests_dir"
for line in '^multiboot: magic ok$' "^multiboot: cmdline '.*console=ttyS0 hello multiboot'$" \
    '^multiboot: mmap base=0x100000 length=0x[0-9a-f]+ type=1$' '^multiboot: mem_lower=639 KiB mem_upper=[0-9]+ KiB$' \
    "^multiboot: module 'first.txt' start=0x[0-9a-f]+ end=0x[0-9a-f]+ first-line 'first module'$" \
    "^multiboot: module 'second.txt' start=0x[0-9a-f]+ end=0x[0-9a-f]+ first-line 'second module'$" \
    "^multiboot: boot loader 'qemu'$"; do
    expect multiboot "$line" || true
done
check $((failures - before)) multiboot

before=$failures
run basic 3 -m 16 -kernel "$images/flat64-shim.elf" -initrd "$images/basic.bin from the shim" || true
for line in '^basic: hello from a flat64 guest$' "^basic: boot info memory=0x[0-9a-f]+ cmdline='from the shim'$" \
    '^basic: check uart-scratch ok' '^basic: check msr-efer ok' '^basic: sti; hlt returned 3 times$' \
    '^basic: report cpuid=3 io=[0-9]+ msr=4 hlt=3$'; do
    expect basic "$line" || true
done
check $((failures - before)) basic

before=$failures
run escape 3 -m 32 -kernel "$images/flat64-shim.elf" -initrd "$images/escape.bin" || true
for line in '^escape: wrote the marker over 16-24 MiB \(own RAM\)$' '^escape: now writing beyond RAM at 0x[0-9a-f]+$' \
    '^escape: write beyond RAM was NOT stopped$'; do
    expect escape "$line" || true
done
check $((failures - before)) escape

before=$failures
run triple-fault 0 -m 16 -kernel "$images/flat64-shim.elf" -initrd "$images/triple-fault.bin" || true
expect triple-fault '^triple-fault: loading an empty IDT and executing ud2 at 0x[0-9a-f]+$' || true
grep -q "Triple fault" "$work/triple-fault.qemu-log" || { echo "FAIL triple-fault: QEMU saw no triple fault"; failures=$((failures + 1)); }
check $((failures - before)) triple-fault

# torture needs 1 GiB pages and NX from the CPU model: -cpu max. Every step must pass.
before=$failures
run torture 1 -m 64 -cpu max -kernel "$images/flat64-shim.elf" -initrd "$images/torture.bin plain-qemu" || true
for step in idt spaces remap large-pages accessed-dirty ring3 write-protect nx reserved-bits read-back; do
    expect torture "^torture: $step ok$" || true
done
expect torture '^torture: all [0-9]+ checks passed$' || true
check $((failures - before)) torture

before=$failures
run smp 1 -m 16 -smp 2 -kernel "$images/flat64-shim.elf" -initrd "$images/smp.bin cpus=2" || true
for line in '^smp: cpu1 started by INIT/SIPI \(apic id 1\)$' '^smp: progress bsp=500000 ap=[0-9]+$' \
    '^smp: both cpus counted \(bsp=1000000 ap=1000000\)$' '^smp: ipi delivered to cpu 1$' '^smp: all checks passed$'; do
    expect smp "$line" || true
done
check $((failures - before)) smp

before=$failures
run worker 1 -m 16 -kernel "$images/flat64-shim.elf" -initrd "$images/worker.bin work=10 name=smoke" || true
for line in '^worker: progress 10/10$' '^worker: result 0x[0-9a-f]+$' '^worker: result checked' \
    '^worker: tsc start=[0-9]+ end=[0-9]+$' '^worker: done$'; do
    expect worker "$line" || true
done
check $((failures - before)) worker

before=$failures
limit=5 run spinner 124 -m 16 -kernel "$images/flat64-shim.elf" -initrd "$images/spinner.bin" || true
expect spinner '^spinner: spinning with interrupts off$' || true
check $((failures - before)) spinner

echo "qemu-smoke: $passes passed, $failures failed"
[ "$failures" -eq 0 ]
