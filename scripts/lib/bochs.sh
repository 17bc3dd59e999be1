# Running a BIOS disk image under Bochs (Intel VMX, corei7_skylake_x), headless, ending by
# itself. Sourced by scripts/run-qemu.sh; see scripts/lib/bochsrc.in for why each setting is
# what it is. Bochs exits with 1 on every ending, so the caller takes the status from the
# serial log (the hypervisor's `ringzero: poweroff status=N` line).

# rz_run_bochs IMAGE RUN_DIR CPUS MIB SERIAL_LOG [TIMEOUT COMMAND...]
# Streams the serial output to stdout while Bochs runs; returns Bochs' (or timeout's) status.
rz_run_bochs() {
    local image=$1 run_dir=$2 cpus=$3 megs=$4 serial_log=$5
    shift 5
    local disk=$run_dir/disk.img size cylinders
    # Bochs wants whole cylinders of 16 heads * 63 sectors * 512 bytes; pad a private copy.
    cp "$image" "$disk"
    size=$(stat -c %s "$disk")
    cylinders=$(( (size + 516095) / 516096 ))
    truncate -s $(( cylinders * 516096 )) "$disk"
    [ "$megs" -le 2048 ] || rz_die "Bochs takes at most 2048 MiB of memory (--memory $megs)"
    sed -e "s|@IMAGE@|$disk|" -e "s|@CYLINDERS@|$cylinders|" -e "s|@MEGS@|$megs|" \
        -e "s|@CPUS@|$cpus|" -e "s|@SERIAL@|$serial_log|" -e "s|@LOG@|$run_dir/bochs.log|" \
        "$RZ_ROOT/scripts/lib/bochsrc.in" > "$run_dir/bochsrc"
    : > "$serial_log"
    # Show the serial output live while Bochs writes it to the file.
    tail -n +1 -f "$serial_log" &
    local tail_pid=$!
    # The debugger stops before the first instruction: 'c' continues it; at any later stop it
    # reads EOF and Bochs exits instead of waiting.
    printf 'c\n' | SDL_VIDEODRIVER=dummy "$@" bochs -q -unlock -f "$run_dir/bochsrc" \
        > "$run_dir/bochs.stdout" 2> "$run_dir/bochs.stderr"
    local status=$?
    sleep 0.3
    kill "$tail_pid" 2>/dev/null
    wait "$tail_pid" 2>/dev/null
    # Say how Bochs ended (its banner), and keep the log where a failing run can show it.
    grep -a -E "soft power off|shutdown requested|3rd \(1[34]\) exception|PANIC|User requested shutdown" \
        "$run_dir/bochs.stderr" | sed 's/^/run-qemu: bochs: /' | tail -n 3 >&2
    if ! grep -a -q "ringzero: poweroff status=" "$serial_log"; then
        rz_say "bochs log tail ($run_dir/bochs.log):"
        tail -n 20 "$run_dir/bochs.log" >&2
    fi
    return "$status"
}
