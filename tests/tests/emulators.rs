//! The emulator test table: each test boots a real image under QEMU (AMD SVM) or Bochs
//! (Intel VMX) and checks what the hypervisor printed and its power-off status.
//! Run by `scripts/test.sh`, which builds the images first.

use ringzero_tests::boot;

const CLEAN: i32 = 0;
const PANIC: i32 = 1;
const HYPERVISOR_EXCEPTION: i32 = 2;
const CANNOT_VIRTUALIZE: i32 = 3;
const GUEST_FAILED: i32 = 6;
/// `run-qemu.sh`: the emulator ended without the hypervisor's power-off line.
const EMULATOR_FAILED: i32 = 125;

#[test]
fn qemu_uefi_epyc_detects_svm_with_nested_paging() {
    // The plain run: the default configuration's Linux guest reaches its shell prompt, and
    // `poweroff -f` typed there ends it (tests/linux/poweroff.txt).
    let run = boot(&["--input", "tests/linux/poweroff.txt", "--timeout", "300"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("linux | ~ #");
    run.assert_serial_contains("ringzero: vm linux exit=poweroff status=0");
    run.assert_serial_contains(
        "ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=1 unrestricted=0 vpid=0 asids=16 cpus=1",
    );
    run.assert_serial_contains("svm:   nested paging: yes");
    run.assert_serial_contains("SVM works on this CPU");
    run.assert_serial_contains("ringzero: poweroff status=0");
}

#[test]
fn qemu_bios_epyc_detects_svm_with_nested_paging() {
    let run = boot(&[
        "--bios",
        "--config",
        "config/test-guests.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=1");
    run.assert_serial_contains("SVM works on this CPU");
}

#[test]
fn qemu_smp_counts_cpus_from_the_madt() {
    let run = boot(&[
        "--bios",
        "--smp",
        "2",
        "--config",
        "config/test-guests.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains(
        "ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=1 unrestricted=0 vpid=0 asids=16 cpus=2",
    );
    // Two CPUs, two VMs: one on each.
    run.assert_serial_contains("ringzero: cpus online=2 of=2");
}

/// Every CPU of the machine comes up: INIT-SIPI-SIPI through the real-mode start-up page, its
/// own tables and local APIC, virtualization prepared, and a kick from the boot CPU taken.
fn assert_all_cpus_online(run: &ringzero_tests::Run, cpus: usize) {
    run.assert_status(CLEAN);
    run.assert_serial_contains(&format!("ringzero: cpus online={cpus} of={cpus}"));
    run.assert_serial_contains("time: TSC ");
    run.assert_serial_contains(" works: 10 ticks in ");
    for cpu in 1..cpus {
        run.assert_serial_contains(&format!(
            " cpu{cpu} INFO ] smp: cpu{cpu} online (APIC ID {cpu}"
        ));
    }
    run.assert_serial_contains("smp: every other CPU woke for a kick");
    run.assert_serial_contains(&format!("virt: {cpus} of {cpus} CPUs can virtualize"));
    run.assert_serial_lacks("did not start");
    run.assert_serial_contains("ringzero: poweroff status=0");
}

#[test]
fn qemu_uefi_smp_4_starts_every_cpu() {
    let run = boot(&["--smp", "4", "--no-guests", "--timeout", "300"]);
    assert_all_cpus_online(&run, 4);
}

#[test]
fn qemu_bios_smp_4_starts_every_cpu() {
    let run = boot(&["--bios", "--smp", "4", "--no-guests", "--timeout", "300"]);
    assert_all_cpus_online(&run, 4);
}

#[test]
fn bochs_smp_2_starts_every_cpu() {
    let run = boot(&["--bochs", "--smp", "2", "--no-guests", "--timeout", "400"]);
    assert_all_cpus_online(&run, 2);
    run.assert_serial_contains("ringzero: virt vendor=intel vmx=1");
}

#[test]
fn qemu64_without_svm_is_refused() {
    let run = boot(&["--bios", "--cpu", "qemu64,-svm", "--timeout", "300"]);
    run.assert_status(CANNOT_VIRTUALIZE);
    run.assert_serial_contains("ringzero: virt vendor=amd vmx=0 svm=0");
    run.assert_serial_contains("CPUID.80000001h:ECX.SVM[bit 2] is 0");
    run.assert_serial_contains("-cpu EPYC or -cpu max");
    run.assert_serial_lacks("SVM works on this CPU");
}

#[test]
fn qemu64_without_nested_paging_refuses_nested_vms_and_runs_shadow_ones() {
    // QEMU 7.2's qemu64 model has SVM but no NPT: the machine can virtualize, but only with
    // shadow paging. The default configuration asks for nested paging: each VM is refused with
    // the missing bit and the fix named, and the hypervisor reports failed guests.
    let run = boot(&[
        "--cpu",
        "qemu64",
        "--config",
        "config/test-guests.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(GUEST_FAILED);
    run.assert_serial_contains("ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=0");
    run.assert_serial_contains("CPUID.8000000Ah:EDX.NP[bit 0] is 0");
    run.assert_serial_contains("paging = \"shadow\"");
    run.assert_serial_contains("ringzero: vm basic exit=unsupported-paging-mode status=255");
    // The same guest with shadow paging runs on it.
    let run = boot(&[
        "--bios",
        "--cpu",
        "qemu64",
        "--config",
        "tests/configs/basic-shadow.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
}

#[test]
fn page_fault_in_the_hypervisor_is_reported_and_powers_off() {
    let run = boot(&[
        "--bios",
        "--test-hook",
        "page-fault",
        "--config",
        "config/test-guests.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(HYPERVISOR_EXCEPTION);
    run.assert_serial_contains("CPU exception 14 (#PF page fault) error_code=0x0");
    run.assert_serial_contains("cr2=0x00007eadbeef0000");
    run.assert_serial_contains("stack[rsp+0x00] = ");
    run.assert_serial_contains("ringzero: poweroff status=2");
    run.assert_serial_lacks("ringzero: virt");
}

/// The frame allocator knows which frames are handed out: a second free of one (a frame with
/// two owners in the making) stops the hypervisor with a message naming it.
#[test]
fn a_frame_freed_twice_stops_the_hypervisor() {
    let run = boot(&[
        "--bios",
        "--test-hook",
        "double-free",
        "--config",
        "config/test-guests.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(PANIC);
    let hook = run.line_with("test hook: freeing frame ");
    let frame = hook
        .rsplit("frame ")
        .next()
        .expect("a frame")
        .split(' ')
        .next()
        .expect("address");
    run.assert_serial_contains("PANIC: panicked at kernel/ringzero/src/memory.rs");
    run.assert_serial_contains(&format!(
        "memory: frame {frame} freed while it is not in use (a double free)"
    ));
    run.assert_serial_lacks("was NOT refused");
}

/// A triple fault of the hypervisor itself runs no handler of its own, so nothing on the
/// serial console says what happened. QEMU resets the machine; `run-qemu.sh` stops it before
/// it boots again, says it was a triple fault, and shows each CPU's registers as the reset
/// found them, the code address named from the kernel ELF. The IDT line proves the state is
/// the one at the fault (the hook loaded an empty IDT), not a fresh CPU's.
#[test]
fn a_triple_fault_of_the_hypervisor_shows_each_cpu_at_the_fault() {
    let run = boot(&[
        "--test-hook",
        "triple-fault",
        "--no-guests",
        "--smp",
        "2",
        "--timeout",
        "300",
    ]);
    run.assert_status(EMULATOR_FAILED);
    run.assert_serial_contains("test hook: loading an empty IDT and raising #UD");
    run.assert_serial_lacks("ringzero: poweroff");
    for expected in [
        "QEMU logged a triple fault of the hypervisor itself",
        "QEMU was stopped before it booted again",
        "CPU Reset (CPU 0)",
        "CPU Reset (CPU 1)",
        "IDT=     0000000000000000 00000000",
        ": ringzero::triple_fault_for_test (in ",
    ] {
        assert!(
            run.messages.contains(expected),
            "run-qemu.sh did not say \"{expected}\"\n{}",
            run.report()
        );
    }
    // The machine did not boot a second time.
    assert_eq!(
        run.serial.matches("starting (kernel image offset").count(),
        1,
        "{}",
        run.report()
    );
}

#[test]
fn bochs_corei7_skylake_x_detects_vmx_with_ept() {
    let run = boot(&["--bochs", "--no-guests", "--timeout", "300"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains(
        "ringzero: virt vendor=intel vmx=1 svm=0 ept=1 npt=0 unrestricted=1 vpid=1",
    );
    run.assert_serial_contains("vmx: VMXON succeeded");
    run.assert_serial_contains("VT-x works on this CPU");
    run.assert_serial_contains("ringzero: poweroff status=0");
}
