//! Memory virtualization on both backends: the page-table torture guest with nested and with
//! shadow paging, the other guest tests with shadow paging, and overcommit (QEMU).

use ringzero_tests::{boot, on_both_backends, with};

const CLEAN: i32 = 0;
const GUEST_FAILED: i32 = 6;

fn torture_passes_with_nested_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &["--config", "tests/configs/torture.toml", "--timeout", "300"],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("paging nested");
    run.assert_serial_contains("torture | torture: all ");
    run.assert_serial_lacks("torture: FAILED");
}

/// The number after `key ` in the shadow-paging statistics line.
fn shadow_counter(line: &str, key: &str) -> u64 {
    let before = line
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {line:?}"));
    let number: String = line[..before]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or("")
        .to_string();
    number
        .parse()
        .unwrap_or_else(|_| panic!("no number before {key:?} in {line:?}"))
}

fn torture_passes_with_shadow_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/torture-shadow.toml",
            "--timeout",
            "300",
        ],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("shadow paging, entry rip=");
    run.assert_serial_contains("torture | torture: all ");
    run.assert_serial_lacks("torture: FAILED");
    let line = run.line_with("vm torture: shadow paging: ").to_string();
    // The guest switched address spaces, invalidated pages and took faults of its own (ring 3,
    // not present, write protect, NX): all must show in the counters.
    for (key, minimum) in [
        ("faults fixed", 10),
        ("injected", 4),
        ("CR3 switches", 10),
        ("cache hits", 1),
        ("INVLPGs", 1),
    ] {
        let value = shadow_counter(&line, key);
        assert!(
            value >= minimum,
            "{key} = {value}, expected at least {minimum}\n{}",
            run.report()
        );
    }
}

fn basic_guest_counts_match_with_shadow_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/basic-shadow.toml",
            "--timeout",
            "400",
        ],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("basic | basic: all checks passed");
    run.assert_basic_guest_counts_match();
    // Shadow paging costs page-fault exits the guest never sees.
    assert!(run.exit_count("page-fault") > 0, "{}", run.report());
}

fn several_vms_with_shadow_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/several-shadow.toml",
            "--timeout",
            "300",
        ],
    ));
    run.assert_status(GUEST_FAILED);
    for needle in [
        "ringzero: vm basic exit=exit-port status=0",
        "ringzero: vm multiboot exit=exit-port status=0",
        "ringzero: vm triple-fault exit=triple-fault status=255",
        "ringzero: vm basic-2 exit=exit-port status=0",
    ] {
        run.assert_serial_contains(needle);
    }
    let announced = run.line_with("executing ud2 at 0x");
    let rip = announced.rsplit("at ").next().expect("address").trim();
    run.assert_serial_contains(&format!("the guest triple-faulted at rip={rip}"));
}

fn escape_is_stopped_with_shadow_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/escape-shadow.toml",
            "--timeout",
            "400",
        ],
    ));
    run.assert_status(GUEST_FAILED);
    run.assert_serial_contains("escape | escape: wrote the marker over 16-24 MiB (own RAM)");
    run.assert_serial_contains("of guest-physical 0x2000000 at rip=");
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
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
}

fn multiboot_with_shadow_paging(backend: &[&str]) {
    let run = boot(&with(
        backend,
        &[
            "--config",
            "tests/configs/multiboot-shadow.toml",
            "--timeout",
            "400",
        ],
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("multiboot | multiboot: cmdline 'console=ttyS0 hello multiboot'");
    run.assert_serial_contains("multiboot | multiboot: mmap base=0x100000 length=0xf00000 type=1");
    run.assert_serial_contains("ringzero: vm multiboot exit=exit-port status=0");
}

on_both_backends!(
    torture_passes_with_nested_paging,
    torture_passes_with_shadow_paging,
    basic_guest_counts_match_with_shadow_paging,
    several_vms_with_shadow_paging,
    escape_is_stopped_with_shadow_paging,
    multiboot_with_shadow_paging,
);

/// 4352 MiB promised to guests on a 1 GiB host: the three that touch 150 MiB finish, the one
/// that touches all of its 2 GiB is stopped when host memory runs out, and the VMs after it
/// still run.
#[test]
fn overcommit_on_qemu_with_one_gib() {
    let run = boot(&[
        "--bios",
        "--memory",
        "1024",
        "--config",
        "tests/configs/overcommit.toml",
        "--timeout",
        "600",
    ]);
    run.assert_status(GUEST_FAILED);
    for name in ["small-1", "small-2", "small-3"] {
        run.assert_serial_contains(&format!(
            "{name} | toucher: touched 150 MiB (38400 pages), all read back"
        ));
        run.assert_serial_contains(&format!("ringzero: vm {name} exit=exit-port status=0"));
        let memory = run.line_with(&format!("vm {name}: memory: "));
        assert!(
            memory.contains("768 MiB promised"),
            "{memory}\n{}",
            run.report()
        );
    }
    run.assert_serial_contains("ringzero: vm hog exit=out-of-host-memory status=255");
    run.assert_serial_contains("out of host memory: no frame for the guest's page at");
    // The VMs run at the same time: the small ones finish their 150 MiB while the hog is still
    // taking frames, and the hog is stopped once the host has none left.
    let hog = run.position_of("ringzero: vm hog ");
    for name in ["small-1", "small-2", "small-3"] {
        assert!(
            run.position_of(&format!("ringzero: vm {name} ")) < hog,
            "{name} ended after the hog\n{}",
            run.report()
        );
    }
}
