//! Several VMs at once on several cores, time-slicing, and guest SMP: the emulator tests of
//! the scheduler (kernel/ringzero/src/scheduler.rs) and of the guests' local APICs
//! (kernel/vmm/src/smp.rs). They read the fixed lines the hypervisor prints when a VM ends:
//! `ringzero: vm ...`, one `ringzero: vcpu VM/I cpu=C start=T0 end=T1 ...` per vCPU (TSC cycles
//! since boot) and `ringzero: concurrency max_cpus_in_guest=N`.

use ringzero_tests::{boot, field_after, on_both_backends, with, Run, VcpuLine};

const CLEAN: i32 = 0;
const GUEST_FAILED: i32 = 6;

/// The text after `worker: result` in VM `vm`'s console.
fn worker_result(run: &Run, vm: &str) -> String {
    let line = run.line_with(&format!("{vm} | worker: result"));
    line.split("worker: result")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Asserts that every pair of `lines` ran on different CPUs during a common stretch of time.
fn assert_concurrent(run: &Run, lines: &[VcpuLine]) {
    for (position, first) in lines.iter().enumerate() {
        assert!(first.cpu.is_some(), "{first:?} never ran\n{}", run.report());
        for second in &lines[position + 1..] {
            assert_ne!(
                first.cpu,
                second.cpu,
                "{first:?} and {second:?} share a CPU\n{}",
                run.report()
            );
            assert!(
                first.overlaps(second),
                "{first:?} and {second:?} did not run at the same time\n{}",
                run.report()
            );
        }
    }
}

#[test]
fn three_vms_one_with_two_vcpus_run_concurrently_on_four_cpus() {
    let run = boot(&[
        "--bios",
        "--smp",
        "4",
        "--config",
        "tests/configs/concurrent.toml",
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("ringzero: cpus online=4 of=4");
    for vm in ["w1", "w2", "smp"] {
        run.assert_serial_contains(&format!("ringzero: vm {vm} exit=exit-port status=0"));
    }
    run.assert_serial_contains("w1 | worker: done");
    run.assert_serial_contains("w2 | worker: done");
    run.assert_serial_contains("smp | smp: all checks passed");
    // The same work gives the same result in both workers.
    assert_eq!(worker_result(&run, "w1"), worker_result(&run, "w2"));
    // Four vCPUs, four CPUs, all in their guests at the same time.
    let lines = [
        run.vcpu("w1", 0),
        run.vcpu("w2", 0),
        run.vcpu("smp", 0),
        run.vcpu("smp", 1),
    ];
    assert_concurrent(&run, &lines);
    let concurrency = field_after(run.line_with("ringzero: concurrency"), "max_cpus_in_guest=")
        .expect("a number");
    assert!(
        concurrency >= 3,
        "at most {concurrency} CPUs were in guests at once\n{}",
        run.report()
    );
    // Per-CPU statistics, one line per CPU.
    for cpu in 0..4 {
        run.assert_serial_contains(&format!("ringzero: cpu {cpu} vcpus=1 exits="));
    }
}

#[test]
fn a_vm_spinning_with_interrupts_off_does_not_stop_two_others_on_its_cpu() {
    let run = boot(&[
        "--bios",
        "--config",
        "tests/configs/spinner.toml",
        "--timeout",
        "300",
    ]);
    // The spinner never ends by itself: it is stopped, so the run reports a failed guest.
    run.assert_status(GUEST_FAILED);
    run.assert_serial_contains("spinner | spinner: spinning with interrupts off");
    let spinner_end = run.position_of("ringzero: vm spinner exit=time-limit status=255");
    for vm in ["w1", "w2"] {
        run.assert_serial_contains(&format!("{vm} | worker: done"));
        let end = run.position_of(&format!("ringzero: vm {vm} exit=exit-port status=0"));
        assert!(
            end < spinner_end,
            "{vm} finished only after the spinner was stopped\n{}",
            run.report()
        );
    }
    run.assert_serial_contains("the VM was still running after its time limit of 30 s");
    // All three shared CPU 0, and the spinner was taken off it again and again.
    let spinner = run.vcpu("spinner", 0);
    for line in [&spinner, &run.vcpu("w1", 0), &run.vcpu("w2", 0)] {
        assert_eq!(line.cpu, Some(0), "{line:?}\n{}", run.report());
    }
    assert!(
        spinner.preemptions >= 2,
        "the spinner was preempted {} times\n{}",
        spinner.preemptions,
        run.report()
    );
}

#[test]
fn bochs_two_vms_run_concurrently_on_two_cpus() {
    let run = boot(&[
        "--bochs",
        "--smp",
        "2",
        "--config",
        "tests/configs/bochs-two.toml",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("ringzero: cpus online=2 of=2");
    for vm in ["w1", "w2"] {
        run.assert_serial_contains(&format!("{vm} | worker: done"));
        run.assert_serial_contains(&format!("ringzero: vm {vm} exit=exit-port status=0"));
    }
    assert_eq!(worker_result(&run, "w1"), worker_result(&run, "w2"));
    assert_concurrent(&run, &[run.vcpu("w1", 0), run.vcpu("w2", 0)]);
}

/// Guest SMP: vCPU 0 starts vCPU 1 with INIT and startup IPIs through its local APIC, both
/// count, and a fixed IPI from vCPU 0 reaches vCPU 1 (which waits for it in HLT).
fn guest_smp_init_sipi_and_a_fixed_ipi(backend: &[&str]) {
    let config = if backend.contains(&"--bochs") {
        "tests/configs/smp-bochs.toml"
    } else {
        "tests/configs/smp.toml"
    };
    let run = boot(&with(
        backend,
        &["--smp", "2", "--config", config, "--timeout", "600"],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("vm smp: vcpu 1 started by INIT/SIPI at 0x10000 (real mode)");
    run.assert_serial_contains("smp | smp: cpu1 started by INIT/SIPI (apic id 1)");
    run.assert_serial_contains("smp | smp: both cpus counted");
    run.assert_serial_contains("smp | smp: ipi delivered to cpu 1");
    run.assert_serial_contains("smp | smp: all checks passed");
    run.assert_serial_contains("ringzero: vm smp exit=exit-port status=0");
    let application_processor = run.vcpu("smp", 1);
    assert!(
        application_processor.interrupts >= 1,
        "no interrupt was injected into vCPU 1: {application_processor:?}\n{}",
        run.report()
    );
    assert_concurrent(&run, &[run.vcpu("smp", 0), application_processor]);
}

on_both_backends!(guest_smp_init_sipi_and_a_fixed_ipi);
