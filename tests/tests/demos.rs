//! The teaching demos are tests too: each runs through `scripts/run-qemu.sh --demo NAME` and its
//! closing table is asserted; the walkthrough in docs/teaching/README.md must match what the
//! demos print and name only files that exist.

use ringzero_tests::{boot, repository_root};
use std::process::Command;

const CLEAN: i32 = 0;

/// The row of a demo table whose first cell is `first` (cells are padded in some tables).
fn row<'a>(serial: &'a str, first: &str) -> &'a str {
    serial
        .lines()
        .find(|line| line.starts_with('|') && line.split('|').nth(1).map(str::trim) == Some(first))
        .unwrap_or_else(|| panic!("no table row for {first:?}\n{serial}"))
}

fn traps_demo(backend: &str) {
    let run = boot(&[backend, "--demo", "traps", "--timeout", "400"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("ringzero demo: traps");
    // Ring 0: each sensitive instruction reaches the hypervisor, and the trace shows it.
    for insn in [
        "cpuid",
        "sti; hlt",
        "out 0x3ff",
        "in 0x3ff",
        "rdmsr 0x1b",
        "wrmsr 0x1b",
        "mov cr3",
        "invlpg",
        "wrmsr 0x10",
    ] {
        let line = run
            .serial
            .lines()
            .find(|line| line.starts_with(&format!("| {insn} | ring 0 |")))
            .unwrap_or_else(|| panic!("no ring-0 row for {insn}\n{}", run.report()));
        assert!(
            line.contains("handled by hypervisor"),
            "{line}\n{}",
            run.report()
        );
    }
    for label in [
        "cpuid",
        "hlt",
        "out 0x3ff",
        "in 0x3ff",
        "rdmsr",
        "wrmsr",
        "mov cr3",
        "invlpg",
        "vmmcall/vmcall",
    ] {
        let line = run
            .serial
            .lines()
            .find(|line| line.trim_start().starts_with(label) && line.ends_with("exit(s)"))
            .unwrap_or_else(|| panic!("no trace count for {label}\n{}", run.report()));
        let count: u64 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("count");
        assert!(
            count >= 1,
            "{label} never reached the hypervisor\n{}",
            run.report()
        );
    }
    // Ring 3: the privileged ones fault inside the guest (#GP), CPUID still traps.
    for insn in ["hlt", "cli", "out 0x3ff", "mov cr3", "wrmsr 0x1b"] {
        let line = run
            .serial
            .lines()
            .find(|line| line.starts_with(&format!("| {insn} | ring 3 |")))
            .unwrap_or_else(|| panic!("no ring-3 row for {insn}\n{}", run.report()));
        assert!(
            line.contains("handled by guest kernel") && line.contains("#GP"),
            "{line}\n{}",
            run.report()
        );
    }
    let ring3_cpuid = run
        .serial
        .lines()
        .find(|line| line.starts_with("| cpuid | ring 3 |"))
        .unwrap_or_else(|| panic!("no ring-3 cpuid row\n{}", run.report()));
    assert!(
        ring3_cpuid.contains("handled by hypervisor"),
        "{}",
        run.report()
    );
    // A hypercall from ring 3 is refused by the hypervisor's CPL check, and reported.
    run.assert_serial_contains("NOT_PERMITTED");
    run.assert_serial_contains("from ring 3 at rip=");
    run.assert_serial_contains("refused (NOT_PERMITTED)");
    run.assert_serial_lacks("UNEXPECTED");
    run.assert_serial_contains("traps: everything happened as documented");
}

#[test]
fn traps_demo_on_qemu_svm() {
    traps_demo("--bios");
}

#[test]
fn traps_demo_on_bochs_vmx() {
    traps_demo("--bochs");
}

#[test]
fn hypercall_errors_are_documented_values() {
    let run = boot(&["--bios", "--demo", "traps", "--timeout", "400"]);
    run.assert_status(CLEAN);
    for needle in [
        "traps: hypercall 99 (no such call) -> UNKNOWN_HYPERCALL (-1)",
        "traps: hypercall CONSOLE_WRITE (length 5000, over the 4096 limit) -> INVALID_ARGUMENT (-2)",
        "traps: hypercall CONSOLE_WRITE (address 0x7fff00000000, not mapped) -> BAD_ADDRESS (-4)",
        "demo-traps | hello through a hypercall",
        "-> SUCCESS (0), rbx=26",
    ] {
        run.assert_serial_contains(needle);
    }
}

#[test]
fn paravirt_demo_shows_fewer_exits_with_hypercalls() {
    let run = boot(&["--bios", "--demo", "paravirt", "--timeout", "300"]);
    run.assert_status(CLEAN);
    let exits = |first: &str| -> (u64, u64) {
        let line = row(&run.serial, first);
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        (
            cells[2].parse().expect("trapped exits"),
            cells[3].parse().expect("hypercall exits"),
        )
    };
    let (trapped, paravirtual) = exits("console line");
    assert!(
        trapped >= 40 && paravirtual == 1,
        "console line: {trapped} vs {paravirtual}\n{}",
        run.report()
    );
    let (trapped, paravirtual) = exits("address-space switches");
    assert_eq!((trapped, paravirtual), (20, 20), "{}", run.report());
    let (trapped, paravirtual) = exits("total");
    assert!(trapped > paravirtual, "{}", run.report());
}

#[test]
fn shadow_demo_shows_the_traps_shadow_paging_costs() {
    let run = boot(&["--bios", "--demo", "shadow", "--timeout", "300"]);
    run.assert_status(CLEAN);
    let counts = |first: &str| -> (u64, u64) {
        let line = row(&run.serial, first);
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        (
            cells[2].parse().expect("nested"),
            cells[3].parse().expect("shadow"),
        )
    };
    for reason in ["page-fault", "cr-access", "invlpg"] {
        let (nested, shadow) = counts(reason);
        assert!(
            nested == 0 && shadow > 0,
            "{reason}: nested {nested}, shadow {shadow}\n{}",
            run.report()
        );
    }
    let (nested, shadow) = counts("all exits the guest caused");
    assert!(shadow > nested, "{}", run.report());
}

#[test]
fn teaching_docs_match_the_demos_and_name_existing_files() {
    let root = repository_root();
    let doc = std::fs::read_to_string(root.join("docs/teaching/README.md"))
        .expect("the walkthrough exists");
    // Every `path/with/slashes` the walkthrough names must exist.
    for (index, piece) in doc.split('`').enumerate() {
        if index % 2 == 1
            && piece.contains('/')
            && !piece.contains(' ')
            && !piece.starts_with("<!--")
        {
            assert!(
                root.join(piece).exists(),
                "docs/teaching/README.md names {piece}, which does not exist"
            );
        }
    }
    let check = Command::new("bash")
        .arg(root.join("scripts/gen-teaching-docs.sh"))
        .arg("--check")
        .current_dir(&root)
        .output()
        .expect("run scripts/gen-teaching-docs.sh");
    assert!(
        check.status.success(),
        "the walkthrough has drifted from the demos (run scripts/gen-teaching-docs.sh):\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
