#!/usr/bin/env bash
# Benchmarks ringzero's exit handling, side by side in one run: the same guests on AMD SVM
# (QEMU TCG) and Intel VMX (Bochs), with nested and with shadow paging. Prints, per run: exits,
# the average TSC cycles the hypervisor spent per exit of the main reasons (from its own exit
# statistics), the hypervisor's total, and the wall time. Results go to docs/benchmarks.md.
# Under QEMU the TSC runs at the host's rate; under Bochs it counts emulated instructions
# (4 MHz ips), so Bochs figures are the length of the exit path, not time. Compare columns
# within one emulator.
# With --smp it measures the scheduler instead: one CPU-bound worker VM alone, then two of them
# at once, on a 2-CPU QEMU (-cpu EPYC), in one run, and prints the ratio of their times.
# With --linux it measures the stock Linux guest's boot to its shell prompt under ringzero
# (nested and shadow paging) against QEMU booting the same kernel directly, in one run.
# With --disk it measures a Linux guest's sequential disk throughput under ringzero against QEMU
# giving the same kernel its own virtio-blk disk, in one run.
# With --net it measures TCP throughput, guest to guest and guest to host, under ringzero against
# QEMU giving the same kernel its own virtio-net devices, in one run.
# Usage: scripts/bench.sh [--smp | --linux | --disk | --net]   (builds first, like run-qemu.sh)
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

# --smp: the worker's own TSC readings (`worker: tsc start=S end=E`) give how long its work took;
# the hypervisor's `time: TSC N MHz` line converts cycles to seconds.
smp_bench() {
    printf '| %-34s | %4s | %14s | %14s | %8s | %7s |\n' run VMs "work span s" "per VM s" ratio "wall s"
    local base="" config log started wall mhz span per_vm ratio
    for config in bench-one bench-two; do
        log=$(mktemp)
        started=$(date +%s.%N)
        bash scripts/run-qemu.sh --no-build --bios --smp 2 --config "tests/configs/$config.toml" \
            --timeout 900 > "$log" 2>/dev/null || true
        wall=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { print a - b }')
        mhz=$(grep -a -o 'TSC [0-9]* MHz' "$log" | head -n 1 | awk '{ print $2 }')
        # The span from the first worker's start to the last one's end, and each worker's own.
        read -r vms span per_vm < <(grep -a 'worker: tsc start=' "$log" | sed 's/.*start=\([0-9]*\) end=\([0-9]*\).*/\1 \2/' |
            awk -v mhz="${mhz:-0}" '{ if (n == 0 || $1 < lo) lo = $1; if ($2 > hi) hi = $2; sum += $2 - $1; n++ }
                END { if (n == 0 || mhz == 0) print 0, "-", "-"; else printf "%d %.2f %.2f\n", n, (hi - lo) / mhz / 1e6, sum / n / mhz / 1e6 }')
        [ -z "$base" ] && base=$span
        ratio=$(awk -v a="$span" -v b="$base" 'BEGIN { if (b + 0 == 0) print "-"; else printf "%.2f", a / b }')
        printf '| %-34s | %4s | %14s | %14s | %8s | %7.1f |\n' \
            "SVM (QEMU -smp 2) $config" "$vms" "$span" "$per_vm" "$ratio" "$wall"
        rm -f "$log"
    done
}
# --linux: the stock Linux guest booted to its shell prompt by ringzero (nested and shadow paging)
# and by QEMU directly (-kernel, the same kernel, initramfs and emulated CPU): the wall time from
# launch until the shell's banner is printed, and the kernel's own clock at "Run /init".
linux_bench() {
    source "$RZ_ROOT/scripts/lib/linux-guest.sh"
    rz_linux_guest
    printf '| %-32s | %14s | %15s | %16s |\n' run "to shell, wall s" "kernel at init s" "ratio to direct"
    local variant log pid started elapsed kernel direct=""
    for variant in direct nested shadow; do
        log=$(mktemp)
        started=$(date +%s.%N)
        case "$variant" in
            direct)
                qemu-system-x86_64 -machine pc -cpu EPYC -m 256 -display none -no-reboot \
                    -kernel "$RZ_LINUX_VMLINUZ" -initrd "$RZ_LINUX_INITRAMFS" -append console=ttyS0 \
                    -serial stdio < /dev/null > "$log" 2>/dev/null &
                ;;
            nested | shadow)
                local config=tests/configs/linux.toml
                [ "$variant" = shadow ] && config=tests/configs/linux-shadow.toml
                bash scripts/run-qemu.sh --no-build --config "$config" --memory 1024 \
                    --input tests/linux/poweroff.txt --timeout 600 > "$log" 2>/dev/null &
                ;;
        esac
        pid=$!
        elapsed=-
        for _ in $(seq 6000); do
            if grep -q -a 'built-in shell' "$log"; then
                elapsed=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { printf "%.1f", a - b }')
                break
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if [ "$variant" = direct ]; then kill "$pid" 2>/dev/null; fi
        wait "$pid" 2>/dev/null || true
        kernel=$(grep -a -o '\[ *[0-9.]*\] Run /init' "$log" | head -n 1 | tr -d '[]' | awk '{ print $1 }')
        [ "$variant" = direct ] && direct=$elapsed
        printf '| %-32s | %14s | %15s | %16s |\n' "$([ "$variant" = direct ] && echo "QEMU -kernel (no hypervisor)" || echo "ringzero, $variant paging")" \
            "$elapsed" "${kernel:--}" \
            "$(awk -v a="$elapsed" -v b="$direct" 'BEGIN { if (b + 0 == 0 || a == "-") print "-"; else printf "%.2f", a / b }')"
        rm -f "$log"
    done
}
# --disk: sequential throughput of a Linux guest's virtio-blk disk (64 MiB written, then read,
# with direct I/O: tests/linux/scripts/disk-bench.sh) under ringzero (a partition of the
# hypervisor's physical virtio-blk disk) and under QEMU directly (the same kernel and initramfs,
# its own virtio-blk device on a raw file), in one run; the ratio is ringzero's rate over QEMU's.
disk_bench() {
    source "$RZ_ROOT/scripts/lib/linux-guest.sh"
    rz_linux_guest
    local dir variant log
    dir=$(mktemp -d)
    "$RZ_BOOT_TOOL" disk create --out "$dir/ringzero.img" --size 160M --partition bench:128M >/dev/null
    truncate -s 128M "$dir/direct.img"
    printf '| %-34s | %12s | %12s | %12s | %12s |\n' run "write MiB/s" "read MiB/s" "write ratio" "read ratio"
    local direct_write="" direct_read="" write read
    for variant in direct ringzero; do
        log=$dir/$variant.log
        if [ "$variant" = direct ]; then
            timeout 600 qemu-system-x86_64 -machine pc -cpu EPYC -m 256 -display none -no-reboot \
                -kernel "$RZ_LINUX_VMLINUZ" -initrd "$RZ_LINUX_INITRAMFS" \
                -append "console=ttyS0 ringzero.run=disk-bench" \
                -drive "if=none,id=disk0,file=$dir/direct.img,format=raw" -device virtio-blk-pci,drive=disk0 \
                -serial stdio < /dev/null > "$log" 2>/dev/null || true
        else
            bash scripts/run-qemu.sh --no-build --config tests/configs/bench-disk.toml \
                --disk "$dir/ringzero.img" --memory 1024 --timeout 600 > "$log" 2>/dev/null || true
        fi
        write=$(grep -a -o 'disk-bench: write status=0 seconds=[0-9.]* MiB/s=[0-9.]*' "$log" | sed 's/.*MiB\/s=//' | head -n 1)
        read=$(grep -a -o 'disk-bench: read status=0 seconds=[0-9.]* MiB/s=[0-9.]*' "$log" | sed 's/.*MiB\/s=//' | head -n 1)
        [ "$variant" = direct ] && direct_write=$write && direct_read=$read
        printf '| %-34s | %12s | %12s | %12s | %12s |\n' \
            "$([ "$variant" = direct ] && echo "QEMU virtio-blk (no hypervisor)" || echo "ringzero, partition of its disk")" \
            "${write:--}" "${read:--}" \
            "$(awk -v a="$write" -v b="$direct_write" 'BEGIN { if (a == "" || b + 0 == 0) print "-"; else printf "%.3f", a / b }')" \
            "$(awk -v a="$read" -v b="$direct_read" 'BEGIN { if (a == "" || b + 0 == 0) print "-"; else printf "%.3f", a / b }')"
    done
    rm -rf "$dir"
}
# --net: TCP throughput of one nc stream of 16 MiB (tests/linux/scripts/net-bench.sh), guest to
# guest and guest to host, under ringzero (VM NICs on its switch, the physical NIC on QEMU user
# networking) and under QEMU directly (the same kernel and initramfs with their own virtio-net
# devices: two QEMUs on one socket network for guest to guest, user networking for guest to
# host), in one run; the ratio is ringzero's rate over QEMU's. The host's listener is a small
# Python program on 127.0.0.1:5601 (the guests' 10.0.2.2:5601).
net_bench() {
    source "$RZ_ROOT/scripts/lib/linux-guest.sh"
    rz_linux_guest
    local dir listener port=5601 socket_port=5602 rate direct_g2g="" direct_g2h=""
    dir=$(mktemp -d)
    listen_host() {
        python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); s.settimeout(600)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b)
print("host received", n, "bytes")' "$port" > "$dir/listener.log" 2>&1 &
        listener=$!
    }
    direct_guest() { # NAME CMDLINE-WORDS NETDEV [MAC]
        timeout 900 qemu-system-x86_64 -machine pc -cpu EPYC -m 256 -display none -no-reboot \
            -kernel "$RZ_LINUX_VMLINUZ" -initrd "$RZ_LINUX_INITRAMFS" \
            -append "console=ttyS0 ringzero.run=net-bench $2" \
            -netdev "$3" -device "virtio-net-pci,netdev=n0,mac=$4" \
            -serial stdio < /dev/null > "$dir/$1.log" 2>/dev/null
    }
    rate_of() { grep -a -o 'net-bench: send .*status=0 seconds=[0-9.]* MiB/s=[0-9.]*' "$1" | sed 's/.*MiB\/s=//' | head -n 1; }
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b + 0 == 0) print "-"; else printf "%.3f", a / b }'; }
    printf '| %-48s | %8s | %8s |\n' run "MiB/s" ratio
    # QEMU directly, guest to guest: two QEMUs on one socket network, static addresses.
    direct_guest g2g-recv "ringzero.role=recv ringzero.ip=10.0.2.101 ringzero.port=5001 ringzero.wait=300" \
        "socket,id=n0,listen=127.0.0.1:$socket_port" 02:00:00:00:01:01 &
    local recv_pid=$!
    sleep 1
    direct_guest g2g-send "ringzero.role=send ringzero.ip=10.0.2.102 ringzero.peer=10.0.2.101 ringzero.port=5001 ringzero.mib=16 ringzero.wait=300" \
        "socket,id=n0,connect=127.0.0.1:$socket_port" 02:00:00:00:01:02 || true
    wait "$recv_pid" 2>/dev/null || true
    direct_g2g=$(rate_of "$dir/g2g-send.log")
    printf '| %-48s | %8s | %8s |\n' "guest to guest, QEMU directly (socket network)" "${direct_g2g:--}" "1.000"
    # QEMU directly, guest to host.
    listen_host
    direct_guest g2h "ringzero.role=send ringzero.port=$port ringzero.mib=16 ringzero.wait=300" "user,id=n0" 02:00:00:00:01:03 || true
    wait "$listener" 2>/dev/null || true
    direct_g2h=$(rate_of "$dir/g2h.log")
    printf '| %-48s | %8s | %8s |\n' "guest to host, QEMU directly (user network)" "${direct_g2h:--}" "1.000"
    # ringzero: both VMs on its switch; then one VM to the host through the physical NIC.
    bash scripts/run-qemu.sh --no-build --config tests/configs/bench-net-g2g.toml --net user --smp 2 \
        --memory 1024 --timeout 900 > "$dir/rz-g2g.log" 2>/dev/null || true
    rate=$(rate_of "$dir/rz-g2g.log")
    printf '| %-48s | %8s | %8s |\n' "guest to guest, ringzero (its switch)" "${rate:--}" "$(ratio "$rate" "$direct_g2g")"
    listen_host
    bash scripts/run-qemu.sh --no-build --config tests/configs/bench-net-g2h.toml --net user \
        --memory 512 --timeout 900 > "$dir/rz-g2h.log" 2>/dev/null || true
    wait "$listener" 2>/dev/null || true
    rate=$(rate_of "$dir/rz-g2h.log")
    printf '| %-48s | %8s | %8s |\n' "guest to host, ringzero (switch + physical NIC)" "${rate:--}" "$(ratio "$rate" "$direct_g2h")"
    rm -rf "$dir"
}
if [ "${1:-}" = --net ]; then
    net_bench
    exit 0
fi
if [ "${1:-}" = --disk ]; then
    disk_bench
    exit 0
fi
if [ "${1:-}" = --smp ]; then
    smp_bench
    exit 0
fi
if [ "${1:-}" = --linux ]; then
    linux_bench
    exit 0
fi

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
