#!/usr/bin/env bash
# Builds ringzero and boots it in an emulator: QEMU (AMD SVM, the default) or Bochs (Intel VMX).
# Serial output goes to stdout. On first use it installs what is missing (Debian packages, the
# pinned Rust toolchain) and says so.
#
# Exit status: the hypervisor's own power-off status (0 clean, 1 panic, 2 CPU exception in the
# hypervisor, 3 this machine cannot virtualize, 4 bad boot manifest, 5 platform setup failed,
# 6 a guest failed), or 120 build/set-up failed, 121 the guest configuration was refused,
# 124 timeout, 125 the emulator failed or the hypervisor stopped without printing its power-off
# line. See README.md.
set -uo pipefail

RZ_PROG=run-qemu
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
    cat <<'USAGE'
usage: scripts/run-qemu.sh [options] [-- QEMU ARGS...]
  --bios            boot the BIOS image (default: UEFI through OVMF)
  --cpu MODEL       QEMU CPU model (default: EPYC; qemu64 has SVM but no NPT: shadow paging only;
                    qemu64,-svm has no SVM)
  --bochs           run under Bochs with an Intel VMX CPU (corei7_skylake_x), BIOS image
  --smp N           number of CPUs of the emulated machine (default 1)
  --memory MIB      memory of the emulated machine in MiB (default 256)
  --config FILE     guest configuration (TOML; default config/default.toml)
  --no-guests       boot without guests (detection and smoke test only)
  --demo NAME       run a teaching demo (traps, paravirt, shadow) and explain it
  --disk FILE       give the hypervisor FILE (raw) as its physical disk: a virtio-blk PCI device
                    (QEMU only; the VMs' disks are partitions of it). Writes persist in FILE
                    (no snapshot). Without it the hypervisor reports "disk: none".
  --net MODE        give the hypervisor a NIC: a virtio-net PCI device (QEMU only; the VMs'
                    NICs share it through the hypervisor's switch). MODE is one of
                      user                QEMU user networking (slirp; no root): gateway and
                                          host 10.0.2.2, DNS 10.0.2.3, DHCP hands out 10.0.2.15,
                                          then .16, ...; outbound TCP/UDP reach the host's network
                      socket-listen PORT  a link to another QEMU: listens on 127.0.0.1:PORT
                      socket-connect PORT connects to 127.0.0.1:PORT (start the listener first)
                    Without it the hypervisor reports "net: none".
  --hostfwd RULE    with --net user: forward a host port to a VM, repeatable. RULE is
                    PROTO:HOSTPORT:GUESTIP:GUESTPORT with PROTO tcp or udp, e.g.
                    tcp:8080:10.0.2.15:80 (GUESTIP is the VM's own address from user-net's DHCP)
  --mac MAC         the NIC's MAC address (default QEMU's 52:54:00:12:34:56); two QEMUs joined
                    by --net socket-* need different ones
  --timeout S       stop the emulator after S seconds, exit 124 (default 600; 0 = never)
  --input FILE      type FILE's bytes on the hypervisor's serial console (QEMU only): they are
                    written to QEMU's stdin, which is COM1's receiver, once the hypervisor has
                    printed its "ringzero: console input ->" line (the VMs exist and input is
                    routed), so none is lost to firmware or to the UART's reset at boot. QEMU
                    paces them (its UART takes bytes as the hypervisor reads them). A line
                    `@wait TEXT` is not typed: it waits until TEXT appears in the output after
                    the last line typed (to script a session: type, wait for its output). Ctrl-A
                    (0x01) in FILE is the hypervisor's escape key (docs/guest-interface.md).
  --test-hook NAME  test-only: boot an image whose manifest asks for NAME (page-fault, invalid-guest-state,
                    disk-write: writes near the end of the --disk file; net-probe: sends an ARP
                    request for 10.0.2.2 on the --net user NIC and waits up to 2 s for the reply;
                    double-free: frees a frame twice, which must stop the hypervisor;
                    triple-fault: the hypervisor triple-faults, which must be reported with
                    each CPU's registers at the reset)
  --no-build        do not compile (the test harness compiles once); images are still packed
  --build-only      compile and pack target/ringzero/images/{uefi,bios}.img, then stop
  -h, --help        this text
USAGE
}

firmware=uefi cpu=EPYC emulator=qemu smp=1 memory=256 config="$RZ_ROOT/config/default.toml" timeout=600 hook=none
build=1 build_only=0 extra=() demo="" input="" disk="" net="" net_port="" hostfwds=() mac=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bios) firmware=bios ;;
        --cpu) cpu=${2:?--cpu needs a model}; shift ;;
        --bochs) emulator=bochs firmware=bios ;;
        --smp) smp=${2:?--smp needs a number}; shift ;;
        --memory) memory=${2:?--memory needs MiB}; shift ;;
        --config) config=${2:?--config needs a file}; shift ;;
        --no-guests) config="" ;;
        --demo) demo=${2:?--demo needs a name}; shift ;;
        --timeout) timeout=${2:?--timeout needs seconds}; shift ;;
        --input) input=${2:?--input needs a file}; shift ;;
        --disk) disk=${2:?--disk needs a file}; shift ;;
        --net)
            net=${2:?--net needs a mode (user, socket-listen PORT, socket-connect PORT)}; shift
            case "$net" in
                user) ;;
                socket-listen|socket-connect) net_port=${2:?--net $net needs a port}; shift ;;
                *) rz_die "--net: unknown mode '$net' (user, socket-listen PORT, socket-connect PORT)" ;;
            esac ;;
        --hostfwd) hostfwds+=("${2:?--hostfwd needs PROTO:HOSTPORT:GUESTIP:GUESTPORT}"); shift ;;
        --mac) mac=${2:?--mac needs an address}; shift ;;
        --test-hook) hook=${2:?--test-hook needs a name}; shift ;;
        --no-build) build=0 ;;
        --build-only) build_only=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; rz_die "unknown option '$1'" ;;
    esac
    shift
done
[[ $smp =~ ^[1-9][0-9]*$ ]] || rz_die "--smp wants a positive number, got '$smp'"
[[ $memory =~ ^[1-9][0-9]*$ ]] || rz_die "--memory wants MiB as a positive number, got '$memory'"
[[ $timeout =~ ^[0-9]+$ ]] || rz_die "--timeout wants seconds, got '$timeout'"
[ "$emulator" = bochs ] && [ ${#extra[@]} -gt 0 ] && rz_die "arguments after -- are for QEMU; not used with --bochs"
[ -n "$input" ] && [ "$emulator" = bochs ] && rz_die "--input works with QEMU only (Bochs' serial port here is a file)"
[ -z "$input" ] || [ -r "$input" ] || rz_die "--input: cannot read '$input'"
[ -n "$disk" ] && [ "$emulator" = bochs ] && rz_die "--disk works with QEMU only (Bochs has no virtio-blk)"
[ -n "$net" ] && [ "$emulator" = bochs ] && rz_die "--net works with QEMU only (Bochs has no virtio-net)"
[ -z "$net_port" ] || { [[ $net_port =~ ^[1-9][0-9]{0,4}$ ]] && [ "$net_port" -le 65535 ]; } || rz_die "--net $net wants a port (1-65535), got '$net_port'"
[ ${#hostfwds[@]} -gt 0 ] && [ "$net" != user ] && rz_die "--hostfwd needs --net user"
[ -n "$mac" ] && [ -z "$net" ] && rz_die "--mac needs --net"
[ -z "$mac" ] || [[ $mac =~ ^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$ ]] || rz_die "--mac wants xx:xx:xx:xx:xx:xx, got '$mac'"
# --hostfwd PROTO:HOSTPORT:GUESTIP:GUESTPORT becomes QEMU's hostfwd=PROTO::HOSTPORT-GUESTIP:GUESTPORT.
netdev_options=""
for rule in "${hostfwds[@]}"; do
    [[ $rule =~ ^(tcp|udp):([0-9]{1,5}):([0-9]{1,3}(\.[0-9]{1,3}){3}):([0-9]{1,5})$ ]] \
        || rz_die "--hostfwd wants PROTO:HOSTPORT:GUESTIP:GUESTPORT (e.g. tcp:8080:10.0.2.15:80), got '$rule'"
    netdev_options+=",hostfwd=${BASH_REMATCH[1]}::${BASH_REMATCH[2]}-${BASH_REMATCH[3]}:${BASH_REMATCH[5]}"
done
[ -z "$disk" ] || { [ -f "$disk" ] && [ -r "$disk" ] && [ -w "$disk" ]; } || rz_die "--disk: '$disk' is not a readable and writable file"

if [ -n "$demo" ]; then
    source "$RZ_ROOT/scripts/lib/demo.sh"
    config=$(rz_demo_config "$demo") || rz_die "unknown demo '$demo' (known: $RZ_DEMOS)"
fi
hook_args=()
[ "$hook" != none ] && hook_args=(--test-hook "$hook")
config_args=()
if [ -n "$config" ]; then
    config_args=(--config "$config")
    # With the physical disk at hand the image tool checks the VMs' partitions against its GPT.
    [ -n "$disk" ] && config_args+=(--disk "$disk")
fi

if [ "$build" = 1 ]; then
    rz_ensure_packages build-essential
    rz_ensure_toolchain
    rz_build_binaries
    rz_build_guests
    # A configuration with a Linux guest (the default one) needs the stock kernel and initramfs.
    if [ -n "$config" ] && grep -q 'target/linux/' "$config"; then
        source "$RZ_ROOT/scripts/lib/linux-guest.sh"
        rz_linux_guest
    fi
fi
if [ "$build_only" = 1 ]; then
    rz_pack_images "$RZ_IMAGES" "${hook_args[@]}" "${config_args[@]}"
    exit 0
fi

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/ringzero-run.XXXXXX")
# RINGZERO_KEEP_RUN=1 keeps the serial log (and Bochs' files) for a look afterwards.
if [ "${RINGZERO_KEEP_RUN:-0}" = 1 ]; then
    trap 'rz_say "run files kept in $run_dir"' EXIT
else
    trap 'rm -rf "$run_dir"' EXIT
fi
serial_log=$run_dir/serial.txt
# Each run packs its own images (a second or two), so parallel runs never share a file.
image_dir=$run_dir/images
rz_pack_images "$image_dir" "${hook_args[@]}" "${config_args[@]}"
timeout_args=()
[ "$timeout" != 0 ] && timeout_args=(timeout --kill-after=5 "$timeout")
# From a terminal, timeout must leave the emulator in the terminal's foreground process group:
# otherwise QEMU's first terminal call (raw mode for the serial console on stdin) stops it with
# SIGTTOU, and nothing typed would reach the console.
[ "$timeout" != 0 ] && [ -t 0 ] && timeout_args=(timeout --foreground --kill-after=5 "$timeout")

# --input: waits for the hypervisor's "ringzero: console input ->" line in the serial log, then
# writes the file. Its output is QEMU's stdin; it gives up when QEMU has ended (run_emulator
# kills it).
# A line `@wait TEXT` in the file is not typed: it waits until TEXT appears in the serial output
# after what was typed last (a prompt, a command's output), so a session can be scripted.
feed_input() {
    until grep -q -a -F 'ringzero: console input ->' "$serial_log" 2>/dev/null; do
        sleep 0.2
    done
    local line mark=0
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            '@wait '*)
                until tail -c "+$((mark + 1))" "$serial_log" 2>/dev/null | grep -q -a -F -- "${line#@wait }"; do
                    sleep 0.2
                done ;;
            *)
                mark=$(stat -c %s "$serial_log")
                printf '%s\n' "$line" ;;
        esac
    done < "$input"
}

# QEMU logs two resets of CPU 0 as it starts; a third is the machine resetting (a triple fault
# of the hypervisor, or a reset it asked for). Then each CPU's state is in the log (QEMU writes
# all of them in the one reset): stop QEMU, so the machine does not boot again, and leave a mark.
watch_for_reset() {
    local log=$run_dir/qemu.log
    while sleep 0.5; do
        if [ "$(grep -c -a 'CPU Reset (CPU 0)' "$log" 2>/dev/null)" -gt 2 ]; then
            sleep 0.5
            touch "$run_dir/machine-reset"
            kill "$(cat "$run_dir/qemu.pid")" 2>/dev/null
            return
        fi
    done
}

# The CPU state blocks QEMU logged at the machine reset: from the third reset of CPU 0, one
# block per CPU.
at_reset() {
    awk -v cpus="$smp" '/CPU Reset \(CPU 0\)/ { zero++ } zero > 2 && /^CPU Reset/ { blocks++ } zero > 2 && blocks <= cpus' "$run_dir/qemu.log"
}

# After a machine reset: why (QEMU says "Triple fault" when it was one), and each CPU's
# registers as the reset found them, the code address named when addr2line knows it.
report_machine_reset() {
    local log=$run_dir/qemu.log
    if grep -q -a 'Triple fault' "$log"; then
        rz_say "the machine reset: QEMU logged a triple fault of the hypervisor itself (an exception it could not deliver, so no panic message); QEMU was stopped before it booted again"
    else
        rz_say "the machine reset (no triple fault logged: a reset the hypervisor asked for?); QEMU was stopped before it booted again"
    fi
    rz_say "each CPU as the reset found it (the whole state: $log):"
    # The reset's CPU states (after QEMU's own two resets of CPU 0 at its start; one block per
    # CPU, not what the firmware did after it), without FPU/SSE/debug registers.
    at_reset \
        | grep -a -v -E '^(FPR|XMM|YMM|ZMM|DR[0-9]|FCW|Opmask|PKRU|MXCSR)' >&2
    # 64-bit CPUs in the hypervisor's code: the function, from the kernel ELF and the load
    # offset the hypervisor printed at its start.
    local rip offset
    offset=$(grep -a -o 'kernel image offset 0x[0-9a-f]*' "$serial_log" | head -n 1 | awk '{print $4}')
    if command -v addr2line >/dev/null && [ -f "$RZ_KERNEL" ] && [ -n "$offset" ]; then
        for rip in $(at_reset | grep -a -o 'RIP=[0-9a-f]*' | cut -d= -f2); do
            [ $((0x$rip)) -ge $((offset)) ] || continue
            rz_say "RIP $rip: $(addr2line -f -C -e "$RZ_KERNEL" "$(printf '%#x' $((0x$rip - offset)))" | head -n 1) (in $RZ_KERNEL)"
        done
    fi
}

# Runs the chosen emulator with the serial console on stdout; returns its exit status.
run_emulator() {
    if [ "$emulator" = qemu ]; then
        local qemu=(qemu-system-x86_64 -machine pc -cpu "$cpu" -smp "$smp" -m "$memory"
            -display none -pidfile "$run_dir/qemu.pid"
            -chardev "stdio,id=console,logfile=$serial_log,signal=on" -serial chardev:console
            -device isa-debug-exit,iobase=0xf4,iosize=0x04
            # QEMU's reset log: each CPU's registers as a reset finds them. A triple fault of
            # the hypervisor resets the machine; watch_for_reset then stops QEMU, and the log
            # holds the state of every CPU at the fault (what -no-reboot would have lost).
            -d cpu_reset -D "$run_dir/qemu.log"
            -drive "format=raw,file=$image_dir/$firmware.img,snapshot=on")
        [ "$firmware" = uefi ] && qemu+=(-bios "$(rz_ovmf_code)")
        # The hypervisor's physical disk: no snapshot, so what VMs write stays in the file.
        [ -n "$disk" ] && qemu+=(-drive "if=none,id=disk0,file=${disk//,/,,},format=raw" -device virtio-blk-pci,drive=disk0)
        # The hypervisor's physical NIC (the only one: -netdev turns off QEMU's default NIC).
        case "$net" in
            user) qemu+=(-netdev "user,id=net0$netdev_options") ;;
            socket-listen) qemu+=(-netdev "socket,id=net0,listen=127.0.0.1:$net_port") ;;
            socket-connect) qemu+=(-netdev "socket,id=net0,connect=127.0.0.1:$net_port") ;;
        esac
        [ -n "$net" ] && qemu+=(-device "virtio-net-pci,netdev=net0${mac:+,mac=$mac}")
        rz_say "booting the $firmware image in QEMU $(rz_qemu_version) (-cpu $cpu -smp $smp -m $memory)"
        local watcher status
        watch_for_reset &
        watcher=$!
        # TCG warns about every CPUID feature of the model it does not emulate; those lines are noise.
        if [ -z "$input" ]; then
            "${timeout_args[@]}" "${qemu[@]}" "${extra[@]}" 2> >(grep -v "TCG doesn't support requested feature" >&2)
            status=$?
            kill "$watcher" 2>/dev/null
            wait "$watcher" 2>/dev/null
            return "$status"
        fi
        # With --input, QEMU's stdin is a FIFO that feed_input writes into.
        local fifo=$run_dir/input.fifo feeder
        mkfifo "$fifo" || rz_die "cannot make $fifo"
        feed_input >"$fifo" &
        feeder=$!
        "${timeout_args[@]}" "${qemu[@]}" "${extra[@]}" <"$fifo" 2> >(grep -v "TCG doesn't support requested feature" >&2)
        status=$?
        kill "$feeder" "$watcher" 2>/dev/null
        wait "$feeder" "$watcher" 2>/dev/null
        return "$status"
    else
        source "$RZ_ROOT/scripts/lib/bochs.sh"
        rz_say "booting the BIOS image in Bochs (corei7_skylake_x, $smp CPU(s), $memory MiB)"
        rz_run_bochs "$image_dir/bios.img" "$run_dir" "$smp" "$memory" "$serial_log" "${timeout_args[@]}"
    fi
}

if [ "$emulator" = qemu ]; then rz_ensure_qemu; else rz_ensure_bochs; fi
if [ -n "$demo" ]; then
    rz_demo_intro "$demo"
    run_emulator | rz_demo_filter "$demo"
    emulator_status=${PIPESTATUS[0]}
    rz_demo_table "$demo" "$serial_log"
else
    run_emulator
    emulator_status=$?
fi

if [ "${#timeout_args[@]}" -gt 0 ] && { [ "$emulator_status" = 124 ] || [ "$emulator_status" = 137 ]; }; then
    rz_say "timeout: the emulator ran for ${timeout}s without the hypervisor powering off"
    exit 124
fi
line=$(grep -a -o 'ringzero: poweroff status=[0-9]*' "$serial_log" 2>/dev/null | tail -n 1)
if [ -z "$line" ]; then
    if [ "$emulator" = qemu ] && [ -e "$run_dir/machine-reset" ]; then
        report_machine_reset
    fi
    rz_say "the emulator ended (status $emulator_status) but the hypervisor printed no power-off line"
    exit 125
fi
status=${line##*=}
if [ "$emulator" = qemu ]; then
    # ACPI S5 ends QEMU with 0; isa-debug-exit with (status << 1) | 1.
    if ! { [ "$emulator_status" = 0 ] && [ "$status" = 0 ]; } && [ "$emulator_status" != $(( (status << 1) | 1 )) ]; then
        rz_say "QEMU's exit status $emulator_status does not match the hypervisor's power-off status $status"
        exit 125
    fi
fi
rz_say "hypervisor powered off with status $status"
exit "$status"
