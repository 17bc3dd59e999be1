#!/usr/bin/env bash
# Benchmarks ringzero's exit handling, side by side in one run: the same guests on AMD SVM
# (QEMU TCG) and Intel VMX (Bochs), with nested and with shadow paging. Prints, per run: exits,
# the average TSC cycles the hypervisor spent per exit of the main reasons (from its own exit
# statistics), the hypervisor's total, and the wall time. Results go to docs/benchmarks.md.
# Under QEMU the TSC runs at the host's rate; under Bochs it counts emulated instructions
# (4 MHz ips), so Bochs figures are the length of the exit path, not time. Compare columns
# within one emulator. Usage: scripts/bench.sh   (builds first, like run-qemu.sh)
set -euo pipefail

RZ_PROG=bench
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$RZ_ROOT"
bash scripts/run-qemu.sh --build-only >/dev/null

# The avg column of the first statistics row for REASON in LOG, or "-".
average() {
    awk -v reason="$2" '$0 ~ "\\]   " reason " " { split($0, parts, "] "); n = split(parts[2], f, " "); print f[4]; exit }' "$1" | grep . || echo "-"
}
total_cycles() {
    awk '/\]   total / { split($0, parts, "] "); split(parts[2], f, " "); print f[3]; exit }' "$1" | grep . || echo "-"
}

printf '| %-24s | %-7s | %8s | %9s | %9s | %9s | %10s | %13s | %7s |\n' \
    run guest exits cpuid io msr-read page-fault "hypervisor" "wall s"
printf '| %-24s | %-7s | %8s | %9s | %9s | %9s | %10s | %13s | %7s |\n' \
    "" "" "" "cyc/exit" "cyc/exit" "cyc/exit" "cyc/exit" "cycles" ""
for emulator in --bios --bochs; do
    for paging in nested shadow; do
        for guest in basic torture; do
            config=tests/configs/$guest.toml
            [ "$paging" = shadow ] && config=tests/configs/$guest-shadow.toml
            log=$(mktemp)
            started=$(date +%s.%N)
            bash scripts/run-qemu.sh --no-build "$emulator" --config "$config" --timeout 600 > "$log" 2>/dev/null || true
            wall=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { print a - b }')
            exits=$(grep -a -o 'exits=[0-9]*' "$log" | head -n 1 | cut -d= -f2)
            name="$([ "$emulator" = --bios ] && echo "SVM (QEMU)" || echo "VMX (Bochs)") $paging"
            printf '| %-24s | %-7s | %8s | %9s | %9s | %9s | %10s | %13s | %7.1f |\n' \
                "$name" "$guest" "${exits:--}" "$(average "$log" cpuid)" "$(average "$log" io)" \
                "$(average "$log" msr-read)" "$(average "$log" page-fault)" "$(total_cycles "$log")" "$wall"
            rm -f "$log"
        done
    done
done
