//! The guest test table, run on both backends: AMD SVM with nested paging under QEMU
//! (`-cpu EPYC`, BIOS image) and Intel VMX with EPT under Bochs (`corei7_skylake_x`). Each
//! test is a function of the backend's `run-qemu.sh` arguments; `on_both_backends!` below
//! instantiates it as `qemu_svm::NAME` and `bochs_vmx::NAME`. Plus the refusal of every bad
//! configuration kind in tests/configs/bad (build time: vendor-neutral, run once).

use ringzero_tests::{boot, field_after, on_both_backends, with};

const CLEAN: i32 = 0;
const GUEST_FAILED: i32 = 6;
const CONFIG_REFUSED: i32 = 121;

fn basic_guest_counts_match_the_hypervisor_statistics(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &["--config", "tests/configs/basic.toml", "--timeout", "300"],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("basic | basic: hello from a flat64 guest");
    run.assert_serial_contains("basic | basic: check cpuid-signature ok");
    run.assert_serial_contains("basic | basic: check cpuid-hypervisor-bit ok");
    run.assert_serial_contains("basic | basic: all checks passed");
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0 exits=");
    run.assert_basic_guest_counts_match();
    // One unowned port (0x510), reported once.
    run.assert_serial_contains("read of port 0x510 (size 1) that no device owns");
}

fn several_vms_run_with_their_output_kept_apart(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &["--config", "tests/configs/several.toml", "--timeout", "400"],
    ));
    // The triple-fault VM fails, so the hypervisor reports a failed guest after running all.
    run.assert_status(GUEST_FAILED);
    // The VMs run at the same time (time-sliced on one CPU here): each ends its own way, and the
    // power-off comes after all of them.
    let poweroff = run.position_of("ringzero: poweroff status=6");
    for needle in [
        "ringzero: vm basic exit=exit-port status=0",
        "ringzero: vm multiboot exit=exit-port status=0",
        "ringzero: vm triple-fault exit=triple-fault status=255",
        "ringzero: vm basic-2 exit=exit-port status=0",
    ] {
        assert!(
            run.position_of(needle) < poweroff,
            "{needle:?} after the power-off\n{}",
            run.report()
        );
    }
    // Each VM's console lines carry its own name and no other VM's text.
    for line in run.serial.lines().filter(|line| line.contains(" | ")) {
        let (name, text) = line.split_once(" | ").expect("prefixed");
        let guest = text.split(':').next().unwrap_or("");
        let expected = if name == "basic-2" { "basic" } else { name };
        assert_eq!(
            guest,
            expected,
            "console line under the wrong VM: {line}\n{}",
            run.report()
        );
    }
}

fn triple_fault_is_reported_with_its_rip_and_the_next_vm_runs(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &["--config", "tests/configs/several.toml", "--timeout", "400"],
    ));
    let announced = run.line_with("executing ud2 at 0x");
    let rip = announced.rsplit("at ").next().expect("address").trim();
    run.assert_serial_contains(&format!("the guest triple-faulted at rip={rip}"));
    // The report of a faulted vCPU: its registers, then its flight recorder's last exits (the
    // port writes that printed the guest's announcement).
    run.assert_serial_contains(&format!(
        "vm triple-fault vcpu 0: triple-fault with rip={rip}"
    ));
    run.assert_serial_contains("vm triple-fault vcpu 0:   earlier exit io at rip=");
    // Then what delivering an event there needed: the empty IDT the guest loaded, and where
    // its code lies (guest-physical, the frame backing it, the nested entry naming that frame).
    run.assert_serial_contains("idt=0x0/0x0");
    run.assert_serial_contains("vm triple-fault vcpu 0:   idt[8]: unreadable");
    run.assert_serial_contains("vm triple-fault vcpu 0:   rip walk: L4 ");
    let tables = run.line_with("vm triple-fault vcpu 0:   nested tables: root ");
    assert!(
        tables.contains(" 0 disagree with the RAM map"),
        "{tables}\n{}",
        run.report()
    );
    let place = run.line_with(&format!("vm triple-fault vcpu 0:   rip {rip}: "));
    assert!(
        place.contains(": gpa 0x") && place.contains(", frame 0x") && !place.contains("ANOTHER"),
        "{place}\n{}",
        run.report()
    );
    run.assert_serial_contains("ringzero: vm basic-2 exit=exit-port status=0");
}

fn guest_cannot_reach_memory_outside_its_ram(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &["--config", "tests/configs/escape.toml", "--timeout", "300"],
    ));
    run.assert_status(GUEST_FAILED);
    run.assert_serial_contains("escape | escape: wrote the marker over 16-24 MiB (own RAM)");
    run.assert_serial_contains("nested page fault: write of guest-physical 0x2000000 at rip=");
    run.assert_serial_contains("is outside the VM's RAM; VM stopped");
    run.assert_serial_contains("ringzero: vm escape exit=nested-page-fault status=255");
    run.assert_serial_lacks("write beyond RAM was NOT stopped");
    // The VMs run at the same time: every VM's end checks the kernel image and the canary, and
    // the last one to end (no guest registers left in the heap) also scans the heap.
    run.assert_serial_contains("memory check after vm escape: ");
    run.assert_serial_contains(
        "hypervisor memory intact (kernel image hash, canary page, no guest marker in the heap)",
    );
    run.assert_serial_lacks("a guest's marker appeared in the hypervisor's heap");
    run.assert_serial_lacks("the hypervisor's kernel image (code or read-only data) changed");
    run.assert_serial_lacks("the canary page changed");
    // The hypervisor goes on with the next VM.
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
}

fn multiboot_guest_sees_its_memory_map_command_line_and_modules(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/multiboot.toml",
            "--timeout",
            "300",
        ],
    ));
    run.assert_status(CLEAN);
    for line in [
        "multiboot | multiboot: magic ok",
        "multiboot | multiboot: cmdline 'console=ttyS0 hello multiboot'",
        "multiboot | multiboot: mmap base=0x0 length=0x9fc00 type=1",
        "multiboot | multiboot: mmap base=0x100000 length=0xf00000 type=1",
        "multiboot | multiboot: mem_lower=639 KiB mem_upper=15360 KiB",
        "first-line 'first module'",
        "first-line 'second module'",
        "multiboot | multiboot: boot loader 'ringzero'",
        "ringzero: vm multiboot exit=exit-port status=0",
    ] {
        run.assert_serial_contains(line);
    }
}

fn trap_trace_logs_every_exit_with_reason_rip_ring_and_instruction(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/basic-trace.toml",
            "--timeout",
            "400",
        ],
    ));
    run.assert_status(CLEAN);
    for needle in [
        "exit=cpuid rip=0x",
        "exit=io rip=0x",
        "exit=msr-read rip=0x",
        "exit=hlt rip=0x",
        "ring=0 insn=\"cpuid\"",
        "insn=\"out dx, al\"",
        "insn=\"in al, dx\"",
        "insn=\"rdmsr\"",
        "insn=\"hlt\"",
    ] {
        run.assert_serial_contains(needle);
    }
    let traced = run
        .serial
        .lines()
        .filter(|line| line.contains("trace: vm=basic exit="))
        .count() as u64;
    let exits = field_after(run.line_with("ringzero: vm basic exit="), "exits=").expect("exits");
    // The host's own exits (its timer tick, the interrupt window, the preemption timer) are not
    // traced: they are not the guest's doing.
    let host_made: u64 = ["interrupt", "interrupt-window", "preemption-timer"]
        .iter()
        .map(|reason| run.exit_count_or_zero(reason))
        .sum();
    assert_eq!(
        traced,
        exits - host_made,
        "every exit the guest caused is traced\n{}",
        run.report()
    );
}

fn entry_failure_is_decoded_and_the_hypervisor_goes_on(backend: &[&str]) {
    // The test hook breaks the first VM's guest state before its first entry.
    let run = boot(&with(
        backend,
        &[
            "--config",
            "config/test-guests.toml",
            "--test-hook",
            "invalid-guest-state",
            "--timeout",
            "300",
        ],
    ));
    run.assert_status(GUEST_FAILED);
    run.assert_serial_contains("test hook: breaking vm basic's guest state before its first entry");
    if backend.contains(&"--bochs") {
        run.assert_serial_contains("VM entry failed: invalid guest state (exit reason 33");
        run.assert_serial_contains("offending field: GUEST_TR_ACCESS_RIGHTS: TR must be usable");
    } else {
        run.assert_serial_contains("VMRUN refused the guest state (VMEXIT_INVALID");
        run.assert_serial_contains("offending field: save.efer: EFER.SVME must be 1");
    }
    run.assert_serial_contains("ringzero: vm basic exit=entry-failed status=255 exits=1");
    run.assert_serial_lacks("basic | ");
    run.assert_serial_contains("ringzero: vm multiboot exit=exit-port status=0");
}

/// (file, expected error substring) from tests/configs/bad/README.md.
const BAD_CONFIGS: &[(&str, &str)] = &[
    ("unknown-key", "vm \"basic\": key \"colour\": unknown key"),
    (
        "unknown-top-level-key",
        "key \"timeout\": unknown top-level key",
    ),
    ("no-vms", "no [[vm]] table: at least one VM is required"),
    (
        "wrong-type",
        "vm \"basic\": key \"memory\": expected an integer, found a string",
    ),
    ("missing-key", "vm \"basic\": key \"format\": missing"),
    (
        "unknown-format",
        "vm \"basic\": key \"format\": unknown format \"elf\"",
    ),
    (
        "zero-memory",
        "vm \"basic\": key \"memory\": 0 MiB is not a valid size",
    ),
    (
        "absurd-memory",
        "vm \"basic\": key \"memory\": 1048576 MiB is not a valid size",
    ),
    (
        "duplicate-names",
        "[[vm]] #2: key \"name\": \"basic\" is already the name of [[vm]] #1",
    ),
    (
        "missing-image",
        "vm \"basic\": key \"kernel\": cannot read \"tests/configs/bad/no-such-image.bin\"",
    ),
    ("missing-module", "vm \"mb\": key \"modules\": cannot read"),
    (
        "image-too-large",
        "vm \"big\": key \"kernel\": the image does not fit the VM's memory",
    ),
    (
        "modules-on-flat64",
        "vm \"basic\": key \"modules\": modules are only for format = \"multiboot\"",
    ),
    (
        "cpus",
        "vm \"basic\": key \"cpus\": 17 is not a valid vCPU count (1..=16)",
    ),
    (
        "smp-shadow",
        "vm \"basic\": key \"cpus\": cpus = 2 with paging = \"shadow\": guest SMP needs paging = \"nested\"",
    ),
    (
        "too-many-vcpus",
        "key \"cpus\": 65 vCPUs over all [[vm]] tables: at most 64",
    ),
    (
        "pin-length",
        "vm \"basic\": key \"pin\": 3 entries for cpus = 2",
    ),
    (
        "pin-cpu",
        "vm \"basic\": key \"pin\": entry 1: 64 is not a valid CPU number (0..=63)",
    ),
    (
        "time-limit",
        "vm \"basic\": key \"time_limit\": 0 seconds is not a valid time limit (1..=86400)",
    ),
    (
        "time-limit-not-integer",
        "vm \"basic\": key \"time_limit\": expected an integer, found a string",
    ),
    ("missing", "cannot read the configuration"),
    (
        "disk-missing-image",
        "vm \"basic\": key \"disk\": disk #1: image: cannot read \"tests/configs/bad/no-such-disk.img\"",
    ),
    (
        "disk-partition-and-image",
        "vm \"basic\": key \"disk\": disk #1: give only one of partition, image (a disk is one partition or one image)",
    ),
    (
        "disk-no-source",
        "vm \"basic\": key \"disk\": disk #1: give one of partition = \"LABEL\", guid = \"GUID\" or image = \"PATH\"",
    ),
    (
        "disk-shared-writable",
        "vm \"other\": key \"disk\": disk #1: partition \"vm1\" is also disk #1 of vm \"basic\"; a partition that is writable for one disk cannot be named by another",
    ),
    (
        "disk-partial-sector",
        "vm \"basic\": key \"disk\": disk #1: image \"tests/configs/bad/partial-sector.img\" is 1000 bytes, not a whole (non-zero) number of 512-byte sectors",
    ),
    (
        "disk-too-many",
        "vm \"basic\": key \"disk\": 5 [[vm.disk]] tables, at most 4 disks per VM are allowed",
    ),
    (
        "nic-malformed-mac",
        "vm \"basic\": key \"nic\": nic #1: key \"mac\": \"02:00:00:00:01\" is not a MAC address",
    ),
    (
        "nic-multicast-mac",
        "vm \"basic\": key \"nic\": nic #1: key \"mac\": 01:00:5e:00:00:01 is a multicast (group) address",
    ),
    (
        "nic-zero-mac",
        "vm \"basic\": key \"nic\": nic #1: key \"mac\": 00:00:00:00:00:00 is all zero",
    ),
    (
        "nic-unknown-key",
        "vm \"basic\": key \"nic\": nic #1: unknown key \"model\" (known: mac)",
    ),
    (
        "nic-too-many",
        "vm \"basic\": key \"nic\": 2 [[vm.nic]] tables, at most 1 NIC per VM",
    ),
    (
        "nic-duplicate-mac",
        "vm \"web\": key \"nic\": nic #1: MAC 02:f1:1e:72:48:19 (derived from the VM's name) is also the MAC of the NIC of vm \"basic\"",
    ),
];

#[test]
fn every_bad_configuration_is_refused_before_boot_naming_file_vm_and_key() {
    for (name, expected) in BAD_CONFIGS {
        let path = format!("tests/configs/bad/{name}.toml");
        let run = boot(&["--config", &path, "--timeout", "30"]);
        run.assert_status(CONFIG_REFUSED);
        assert!(
            run.messages.contains(&format!("{path}: ")) && run.messages.contains(expected),
            "{path}: expected {expected:?}\n{}",
            run.report()
        );
        assert!(
            !run.messages.contains("booting the"),
            "{path} must not boot\n{}",
            run.report()
        );
    }
}

on_both_backends!(
    basic_guest_counts_match_the_hypervisor_statistics,
    several_vms_run_with_their_output_kept_apart,
    triple_fault_is_reported_with_its_rip_and_the_next_vm_runs,
    guest_cannot_reach_memory_outside_its_ram,
    multiboot_guest_sees_its_memory_map_command_line_and_modules,
    trap_trace_logs_every_exit_with_reason_rip_ring_and_instruction,
    entry_failure_is_decoded_and_the_hypervisor_goes_on,
);
