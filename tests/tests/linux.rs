//! A stock Linux guest (Debian's cloud kernel and a busybox initramfs, built by
//! scripts/lib/linux-guest.sh into target/linux/) booted by ringzero to its shell, driven through
//! the hypervisor's console (`run-qemu.sh --input`, tests/linux/session.txt), and powered off by
//! the guest itself through ACPI S5.

use ringzero_tests::{boot, Run};

const CLEAN: i32 = 0;

/// The guest's console lines (without the `linux | ` prefix).
fn guest_lines(run: &Run, vm: &str) -> Vec<String> {
    let prefix = format!("{vm} | ");
    run.serial
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

/// The local APIC timer's interrupt counts (the `LOC:` line of each `/proc/interrupts` reading,
/// summed over CPUs): Linux moves its tick from the PIT (IRQ 0 through the I/O APIC) to the local
/// APIC timer once that is calibrated.
fn timer_counts(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter(|line| line.trim_start().starts_with("LOC:"))
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .map_while(|field| field.parse::<u64>().ok())
                .sum()
        })
        .collect()
}

/// Today's date (UTC) as the host sees it, `YYYY-MM-DD`.
fn today() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .expect("date runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn boots_to_a_shell_runs_commands_and_powers_off(config: &str, smp: &str, cpus: usize) {
    let run = boot(&[
        "--config",
        config,
        "--smp",
        smp,
        "--memory",
        "1024",
        "--input",
        "tests/linux/session.txt",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("linux | ringzero-linux: init started");
    run.assert_serial_contains("built-in shell (ash)");
    let lines = guest_lines(&run, "linux");
    let uname = lines
        .iter()
        .find(|line| line.starts_with("Linux "))
        .unwrap_or_else(|| panic!("no uname -a output\n{}", run.report()));
    assert!(uname.contains("x86_64"), "{uname}\n{}", run.report());
    // The CPUID hypervisor bit, as every vCPU's flags show it.
    assert!(
        lines.iter().any(|line| line.trim() == cpus.to_string()),
        "grep -c hypervisor /proc/cpuinfo did not print {cpus}\n{}",
        run.report()
    );
    // XSAVE and AVX (docs/guest-interface.md, CPUID): in every vCPU's flags, and Linux
    // switched its FPU code to XSAVE with x87, SSE and AVX state.
    run.assert_serial_contains("linux | ringzero-flags: avx xsave");
    run.assert_serial_contains("x86/fpu: Enabled xstate features 0x7,");
    run.assert_serial_lacks("XSAVE consistency problem");
    // `dmesg | grep -i hypervisor`: Linux names the platform it found in the SMBIOS tables
    // the hypervisor built (its `DMI:` line), once on the boot console and once from the grep.
    let dmi = "DMI: ringzero hypervisor VM, BIOS ringzero-0.1.0";
    let named = lines.iter().filter(|line| line.contains(dmi)).count();
    assert!(
        named >= 2,
        "dmesg | grep -i hypervisor did not show '{dmi}' ({named} lines)\n{}",
        run.report()
    );
    let timer = timer_counts(&lines);
    assert!(
        timer.len() == 2 && timer[1] > timer[0],
        "the timer interrupt count did not grow: {timer:?}\n{}",
        run.report()
    );
    run.assert_serial_contains(&format!("ringzero-date={}", today()));
    run.assert_serial_contains("ringzero: vm linux exit=poweroff status=0");
    run.assert_serial_contains("ringzero: poweroff status=0");
    if cpus > 1 {
        run.assert_serial_contains(&format!("smp: Brought up 1 node, {cpus} CPUs"));
    }
}

#[test]
fn linux_one_vcpu_nested_paging() {
    boots_to_a_shell_runs_commands_and_powers_off("tests/configs/linux.toml", "1", 1);
}

#[test]
fn linux_two_vcpus_nested_paging() {
    boots_to_a_shell_runs_commands_and_powers_off("tests/configs/linux-smp.toml", "2", 2);
}

/// Two Linux VMs at once, each reaching its shell; the console's input goes to the first, then
/// Ctrl-A n moves it to the second, and when that one powers off it comes back to the first.
/// (The commands compute their output, `$((40+2))`, so the typed line's echo never matches.)
#[test]
fn two_linux_vms_side_by_side_and_the_console_switch() {
    let run = boot(&[
        "--config",
        "tests/configs/linux-two.toml",
        "--smp",
        "2",
        "--memory",
        "1024",
        "--input",
        "tests/linux/two.txt",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    let a = guest_lines(&run, "a");
    let b = guest_lines(&run, "b");
    for (lines, mine, other) in [
        (&a, "hello-from-42-a", "hello-from-42-b"),
        (&b, "hello-from-42-b", "hello-from-42-a"),
    ] {
        assert!(
            lines.iter().any(|line| line == mine),
            "{mine} missing\n{}",
            run.report()
        );
        assert!(
            !lines.iter().any(|line| line == other),
            "{other} in the wrong VM\n{}",
            run.report()
        );
    }
    assert!(
        a.iter().any(|line| line == "still-2-a"),
        "input did not come back to a\n{}",
        run.report()
    );
    run.assert_serial_contains("ringzero: console input -> vm b");
    run.assert_serial_contains("ringzero: vm a exit=poweroff status=0");
    run.assert_serial_contains("ringzero: vm b exit=poweroff status=0");
    // Both ran at the same time, on the two CPUs.
    let (first, second) = (run.vcpu("a", 0), run.vcpu("b", 0));
    assert!(
        first.overlaps(&second) && first.cpu != second.cpu,
        "{first:?} {second:?}"
    );
}

#[test]
fn linux_one_vcpu_shadow_paging() {
    boots_to_a_shell_runs_commands_and_powers_off("tests/configs/linux-shadow.toml", "1", 1);
}

/// The same kernel under Bochs (Intel VMX, EPT): Bochs gives no console input here, so
/// `ringzero.run=auto` on the command line makes the initramfs run a fixed shell session and power
/// off (scripts/lib/linux-guest.sh).
#[test]
fn linux_under_bochs_vmx() {
    let run = boot(&[
        "--bochs",
        "--config",
        "tests/configs/linux-bochs.toml",
        "--memory",
        "1024",
        "--timeout",
        "900",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("linux | ringzero-linux: automatic session");
    let lines = guest_lines(&run, "linux");
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("Linux ") && line.contains("x86_64")),
        "no uname -a output\n{}",
        run.report()
    );
    assert!(
        lines.iter().any(|line| line.trim() == "1"),
        "{}",
        run.report()
    );
    run.assert_serial_contains(&format!("ringzero-date={}", today()));
    run.assert_serial_contains("linux | ringzero-linux: automatic session done");
    // XSAVE with at least x87, SSE and AVX (Bochs's Skylake-X adds AVX-512: 0xe7).
    run.assert_serial_contains("x86/fpu: Enabled xstate features 0x");
    run.assert_serial_lacks("XSAVE consistency problem");
    run.assert_serial_contains("ringzero: vm linux exit=poweroff status=0");
}

/// A Linux guest that panics (no init) and then reboots (panic=1) is stopped with a report
/// when it writes the reset register its FADT names; the VM beside it and the hypervisor go on.
#[test]
fn a_panicking_linux_guest_is_stopped_and_the_others_go_on() {
    let run = boot(&[
        "--config",
        "tests/configs/linux-panic.toml",
        "--memory",
        "1024",
        "--timeout",
        "600",
    ]);
    run.assert_serial_contains("Kernel panic - not syncing");
    run.assert_serial_contains("ringzero: vm linux exit=reset status=255");
    run.assert_serial_contains("the guest asked for a reset (reset control register, port 0xCF9)");
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
    // One VM failed: the hypervisor says so in its status, after running everything.
    run.assert_status(6);
    run.assert_serial_contains("ringzero: poweroff status=6");
}
