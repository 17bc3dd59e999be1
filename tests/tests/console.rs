//! Keyboard input from the hypervisor's serial console to one selected VM at a time
//! (kernel/ringzero/src/console_input.rs, kernel/vmm/src/console_switch.rs), for real: QEMU's
//! stdin is the host COM1's receiver, and `scripts/run-qemu.sh --input FILE` types FILE there
//! once the hypervisor says where input goes. Two echo guests (tests/guests/echo) run at the
//! same time and echo every line they receive as `NAME | echo: LINE`, so the serial output shows
//! which VM got which line. QEMU only: `--input` needs QEMU's stdio serial port; the routing is
//! vendor-neutral code above the backends.

use ringzero_tests::{boot, Run};

const CLEAN: i32 = 0;
/// Ctrl-A, the escape key.
const ESCAPE: char = '\u{1}';

/// Boots `config` under QEMU (SVM, BIOS image, `cpus` CPUs) with `input` typed on the console.
fn boot_with_input(test: &str, cpus: &str, config: &str, input: &str) -> Run {
    let path = std::env::temp_dir().join(format!(
        "ringzero-console-{}-{test}.bin",
        std::process::id()
    ));
    std::fs::write(&path, input).expect("write the input file");
    let run = boot(&[
        "--bios",
        "--smp",
        cpus,
        "--config",
        config,
        "--input",
        path.to_str().expect("temporary paths are UTF-8"),
        "--timeout",
        "300",
    ]);
    let _ = std::fs::remove_file(&path);
    run
}

/// One CPU: the two VMs time-share CPU 0, which also reads the console.
#[test]
fn qemu_svm_input_goes_to_the_selected_vm_and_ctrl_a_switches_it() {
    input_goes_to_the_selected_vm_and_ctrl_a_switches_it("1");
}

/// Two CPUs: each VM on its own CPU; CPU 0 reads the console and feeds the VM on CPU 1 too.
#[test]
fn qemu_svm_input_reaches_vms_on_two_cpus() {
    let run = input_goes_to_the_selected_vm_and_ctrl_a_switches_it("2");
    assert_ne!(
        run.vcpu("e1", 0).cpu,
        run.vcpu("e2", 0).cpu,
        "the two VMs shared a CPU\n{}",
        run.report()
    );
}

fn input_goes_to_the_selected_vm_and_ctrl_a_switches_it(cpus: &str) -> Run {
    // Enter is "\r", as a terminal sends it.
    let input = [
        "hello one\r".to_string(),            // to e1, which has the input at boot
        format!("{ESCAPE}n"),                 // Ctrl-A n: to the next VM, e2
        "hello two\r".to_string(),            // to e2
        format!("lit{ESCAPE}{ESCAPE}eral\r"), // Ctrl-A Ctrl-A: one literal Ctrl-A, to e2
        format!("{ESCAPE}?"),                 // help
        format!("{ESCAPE}x"),                 // not a command: dropped with a hint
        "quit\r".to_string(),                 // e2 ends
        format!("{ESCAPE}1"),                 // Ctrl-A 1: back to e1
        "back to one\rquit\r".to_string(),    // to e1, which ends
    ]
    .concat();
    let run = boot_with_input(
        &format!("switch-{cpus}"),
        cpus,
        "tests/configs/echo-two.toml",
        &input,
    );
    run.assert_status(CLEAN);
    // The boot line says where input goes and how to switch, before any VM has output.
    let boot_line =
        run.position_of("ringzero: console input -> vm e1 (Ctrl-A n: next, Ctrl-A ?: help)");
    assert!(
        boot_line < run.position_of("| echo: ready"),
        "{}",
        run.report()
    );
    // Each switch is announced; help lists the VMs; the unknown command is named.
    run.assert_serial_contains("ringzero: console input -> vm e2 (Ctrl-A n: next, Ctrl-A ?: help)");
    run.assert_serial_contains("ringzero: console input keys: Ctrl-A n next VM");
    run.assert_serial_contains("ringzero: console input vm 1 e1 (running)");
    run.assert_serial_contains("ringzero: console input vm 2 e2 (has the input)");
    run.assert_serial_contains("ringzero: console input: Ctrl-A 'x' is not a command, ignored");
    // Each VM echoed exactly what was meant for it, and nothing else.
    let echoed = |vm: &str| -> Vec<String> {
        let prefix = format!("{vm} | echo: ");
        run.serial
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .filter(|text| !text.starts_with("ready"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        echoed("e1"),
        ["hello one", "back to one", "bye"],
        "{}",
        run.report()
    );
    assert_eq!(
        echoed("e2"),
        ["hello two", "lit\\x01eral", "bye"],
        "{}",
        run.report()
    );
    for vm in ["e1", "e2"] {
        run.assert_serial_contains(&format!("ringzero: vm {vm} exit=exit-port status=0"));
    }
    // Both VMs were running (and polling their UARTs) at the same time.
    let (first, second) = (run.vcpu("e1", 0), run.vcpu("e2", 0));
    assert!(
        first.overlaps(&second),
        "{first:?} and {second:?} did not run at the same time\n{}",
        run.report()
    );
    run
}
