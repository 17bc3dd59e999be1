# The teaching demos of `scripts/run-qemu.sh --demo NAME`: what each one shows (printed before
# it runs), which of its output lines to show live, and the table it ends with. Sourced by
# run-qemu.sh; every demo is also a test (tests/tests/demos.rs) that asserts this table.

RZ_DEMOS="traps paravirt shadow"

# rz_demo_config NAME: the guest configuration of a demo.
rz_demo_config() {
    case "$1" in
        traps) echo "$RZ_ROOT/tests/configs/demo-traps.toml" ;;
        paravirt) echo "$RZ_ROOT/tests/configs/demo-paravirt.toml" ;;
        shadow) echo "$RZ_ROOT/tests/configs/demo-shadow.toml" ;;
        *) return 1 ;;
    esac
}

# rz_demo_intro NAME: what the demo shows, printed before it boots.
rz_demo_intro() {
    echo "=============================================================================="
    case "$1" in
        traps) cat <<'TEXT'
ringzero demo: traps (trap-and-emulate, rings, who handles what)
A small guest kernel executes sensitive instructions in ring 0 (CPUID, HLT, OUT/IN, RDMSR,
WRMSR, MOV to CR3, INVLPG, the hypercall instruction, and a WRMSR it may not do). Each one
traps to the hypervisor: watch for its `trace:` line (exit reason, guest RIP, ring,
the instruction disassembled). Then the guest drops to ring 3 and tries privileged
instructions: those fault INSIDE the guest, and its own kernel handles them (#GP),
because the CPU checks privilege before it checks the hypervisor's intercepts. CPUID is the
exception: it always traps. A hypercall from ring 3 reaches the hypervisor, which checks the
caller's privilege level and refuses it: the hypervisor cannot otherwise tell the guest
kernel from its user programs. (The guest's console output and shadow page faults trap
too; those trace lines are left out here.)
TEXT
        ;;
        paravirt) cat <<'TEXT'
ringzero demo: paravirt (trap-and-emulate against hypercalls)
The guest does the same work twice: first as an unmodified kernel would (a line written
byte by byte to the emulated UART's ports, 20 MOV CR3, 5 HLT: every one traps and is
emulated), then paravirtualized (one CONSOLE_WRITE hypercall for the line, 20
SET_ADDRESS_SPACE, 5 YIELD). It asks the hypervisor for its exit statistics around each
part and prints both side by side.
TEXT
        ;;
        shadow) cat <<'TEXT'
ringzero demo: shadow (what shadow paging costs)
The same page-table torture guest runs twice: first on nested paging, where the CPU walks
the guest's tables and the hypervisor's own (NPT/EPT) and the guest's CR3 loads, INVLPGs
and page faults never leave the guest; then on shadow paging, where the hypervisor keeps
the tables the CPU really uses, so each of them traps. The table at the end compares them.
TEXT
        ;;
    esac
    echo "=============================================================================="
}

# rz_demo_filter NAME: a filter for the live output (stdin to stdout).
rz_demo_filter() {
    case "$1" in
        traps)
            # Hide the console's own port I/O (0x3F8-0x3FD) and the shadow page faults.
            grep -a --line-buffered -v -E 'port=0x3f[8-9a-d] |exit=page-fault' ;;
        *) cat ;;
    esac
}

# rz_demo_table NAME SERIAL_LOG: the table a demo ends with (its test asserts it).
rz_demo_table() {
    local name=$1 log=$2
    echo "=============================================================================="
    case "$name" in
        traps)
            echo "demo traps: who handled each instruction"
            grep -a -o 'traps: | .*' "$log" | sed 's/^traps: //'
            echo "trapped to the hypervisor in ring 0 (from the trap trace; console I/O left out):"
            local row count
            while IFS='|' read -r label pattern; do
                count=$(grep -a 'trace: vm=demo-traps' "$log" | grep -a 'ring=0' | grep -a -v 'port=0x3f[8-9a-d] ' \
                    | grep -a -v -E 'exit=(interrupt|interrupt-window|preemption-timer) ' | grep -a -c -E "$pattern")
                printf '  %-14s %s exit(s)\n' "$label" "$count"
            done <<'ROWS'
cpuid|insn="cpuid"
hlt|insn="hlt"
out 0x3ff|insn="out dx, al"
in 0x3ff|insn="in al, dx"
rdmsr|insn="rdmsr"
wrmsr|insn="wrmsr"
mov cr3|insn="mov cr3,
invlpg|insn="invlpg
vmmcall/vmcall|insn="vmm?call"
ROWS
            ;;
        paravirt)
            echo "demo paravirt: exits and hypervisor cycles, trapped against paravirtual"
            grep -a -o 'paravirt: | .*' "$log" | sed 's/^paravirt: //'
            ;;
        shadow)
            echo "demo shadow: the traps shadow paging costs"
            awk '
                /: exit statistics/ { for (i = 1; i <= NF; i++) if ($i == "vm") vm = $(i + 1); sub(":", "", vm); next }
                vm != "" && /\]   [a-z-]+ +[0-9]+ +[0-9]+/ {
                    split($0, parts, "] "); n = split(parts[2], f, " ");
                    if (f[1] == "total") { total[vm] = f[2]; cycles[vm] = f[3]; vm = "" }
                    else {
                        count[vm, f[1]] = f[2]
                        # Exits of the host'"'"'s making (its timer tick, the scheduler) are not the guest'"'"'s cost.
                        if (f[1] == "interrupt" || f[1] == "interrupt-window" || f[1] == "preemption-timer") { host[vm] += f[2]; hostcycles[vm] += f[3] }
                    }
                }
                END {
                    printf "| %-30s | %13s | %13s |\n", "exits", "nested paging", "shadow paging"
                    printf "| %-30s | %13s | %13s |\n", "------------------------------", "-------------", "-------------"
                    split("page-fault cr-access invlpg nested-page-fault", reasons, " ")
                    for (r = 1; r <= 4; r++) printf "| %-30s | %13d | %13d |\n", reasons[r], count["nested", reasons[r]], count["shadow", reasons[r]]
                    printf "| %-30s | %13d | %13d |\n", "all exits the guest caused", total["nested"] - host["nested"], total["shadow"] - host["shadow"]
                    printf "| %-30s | %13d | %13d |\n", "hypervisor cycles, those exits", cycles["nested"] - hostcycles["nested"], cycles["shadow"] - hostcycles["shadow"]
                }' "$log"
            grep -a -o 'vm shadow: shadow paging: .*' "$log" | sed 's/^vm shadow: /shadow engine: /'
            ;;
    esac
    echo "=============================================================================="
}
