//! Disks (issue 8). The hypervisor's physical disk: a raw file attached with `run-qemu.sh
//! --disk` appears as a virtio-blk device on the host PCI bus; the hypervisor reports its size,
//! whether it takes flushes and whether LBA 1 holds a GPT header, and never writes it at boot.
//! The VMs' disks: partitions of that disk (by GPT label) or images packed into the boot bundle,
//! each a virtio-blk PCI device of its VM, driven by stock Linux or by a hostile test guest.
//! A physical disk that stops answering (QEMU's throttling) is given up after the hypervisor's
//! request deadline: its VMs get I/O errors, the others run on.

use ringzero_tests::{boot, ScratchDisk};

const CLEAN: i32 = 0;
const SECTOR: u64 = 512;

#[test]
fn qemu_uefi_finds_the_disk_and_its_gpt_header() {
    // UEFI: OVMF places the device's 64-bit BAR itself (often above 4 GiB, outside the
    // bootloader's physical window), so this checks the hypervisor's own register mapping.
    let disk = ScratchDisk::new(8 << 20, &[(SECTOR, b"EFI PART")]);
    let before = disk.contents();
    let run = boot(&[
        "--config",
        "tests/configs/basic.toml",
        "--disk",
        disk.path(),
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    let line = run.line_with("disk: virtio-blk at ");
    assert!(
        line.contains(", 16384 sectors (8 MiB), flush=yes"),
        "unexpected disk line {line:?}\n{}",
        run.report()
    );
    run.assert_serial_contains("disk: LBA 1 holds a GPT header (\"EFI PART\")");
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
    assert!(
        disk.contents() == before,
        "the boot changed the disk\n{}",
        run.report()
    );
}

#[test]
fn qemu_bios_counts_sectors_of_a_disk_without_gpt() {
    // An odd size: 3 MiB and one sector.
    let disk = ScratchDisk::new((3 << 20) + SECTOR, &[(0, b"not a partition table")]);
    let run = boot(&[
        "--bios",
        "--no-guests",
        "--disk",
        disk.path(),
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    let line = run.line_with("disk: virtio-blk at ");
    assert!(
        line.contains(", 6145 sectors (3 MiB), flush=yes"),
        "unexpected disk line {line:?}\n{}",
        run.report()
    );
    run.assert_serial_contains("disk: LBA 1 holds no GPT header");
}

#[test]
fn qemu_bios_without_a_disk_says_none() {
    let run = boot(&["--bios", "--no-guests", "--timeout", "300"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("disk: none (no virtio-blk on the host PCI bus");
    run.assert_serial_lacks("disk: virtio-blk");
}

#[test]
fn qemu_bios_test_hook_writes_flushes_and_reads_back() {
    // The hook writes 130 sectors (more than one 64 KiB request) ending one sector before the
    // end, each starting with "ringzero-disk-w:" and its LBA (little-endian u64).
    const SECTORS: u64 = 16384;
    const WRITTEN: u64 = 130;
    let disk = ScratchDisk::new(SECTORS * SECTOR, &[]);
    let run = boot(&[
        "--bios",
        "--no-guests",
        "--test-hook",
        "disk-write",
        "--disk",
        disk.path(),
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    let first = SECTORS - 1 - WRITTEN;
    run.assert_serial_contains(&format!(
        "disk: test hook: wrote, flushed and read back {WRITTEN} sectors at LBA {first}: equal"
    ));
    run.assert_serial_contains("disk: test hook: requests past the end are refused");
    run.assert_serial_contains(&format!("disk: test hook: read all {SECTORS} sectors in "));
    let contents = disk.contents();
    assert_eq!(contents.len() as u64, SECTORS * SECTOR);
    for lba in 0..SECTORS {
        let sector = &contents[(lba * SECTOR) as usize..((lba + 1) * SECTOR) as usize];
        if (first..first + WRITTEN).contains(&lba) {
            assert_eq!(&sector[..16], b"ringzero-disk-w:", "sector {lba}");
            assert_eq!(&sector[16..24], &lba.to_le_bytes(), "sector {lba}");
            assert!(sector[24..].iter().all(|&byte| byte == 0), "sector {lba}");
        } else {
            assert!(
                sector.iter().all(|&byte| byte == 0),
                "sector {lba} was written"
            );
        }
    }
}

#[test]
fn bochs_without_a_disk_says_none() {
    // Bochs' PCI bus (i440FX) has no virtio device: the hypervisor walks it and goes on.
    let run = boot(&["--bochs", "--no-guests", "--timeout", "300"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("disk: none (no virtio-blk on the host PCI bus");
}

/// The pattern tests/linux/scripts/disk-write.sh writes at the start of a VM's /dev/vda.
fn linux_pattern(vm: &str) -> Vec<u8> {
    format!("ringzero-pattern-{vm}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(1 << 20)
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Two Linux VMs, each with its own partition of one physical disk as /dev/vda: the first run
/// writes a pattern naming the VM and flushes (dd conv=fsync, sync) before powering off; a
/// second run (a new QEMU process on the same file) reads both back intact; the host then reads
/// each partition out of the file and finds each VM's pattern in its own partition only.
#[test]
fn two_linux_vms_write_their_partitions_and_a_second_run_reads_them_back() {
    let disk = ScratchDisk::partitioned(160, &[("vm1", 64), ("vm2", 64)]);
    let run_with = |config: &str| {
        let run = boot(&[
            "--config",
            config,
            "--disk",
            disk.path(),
            "--smp",
            "2",
            "--memory",
            "1024",
            "--timeout",
            "600",
        ]);
        run.assert_status(CLEAN);
        for vm in ["vm1", "vm2"] {
            run.assert_serial_contains(&format!(
                "{vm} | disk-test: vm={vm} vda sectors=131072 ro=0"
            ));
            run.assert_serial_contains(&format!("ringzero: vm {vm} exit=poweroff status=0"));
        }
        run
    };
    let first = run_with("tests/configs/disk-linux-write.toml");
    for vm in ["vm1", "vm2"] {
        first.assert_serial_contains(&format!("{vm} | disk-test: dd status 0"));
        // The guest's sync reached the device as a flush.
        let stats = first.line_with(&format!("vm {vm}: 00:01.0 virtio-blk reads="));
        assert!(
            !stats.contains("flushes=0") && stats.contains("bytes_written=1048576"),
            "{stats}\n{}",
            first.report()
        );
    }
    let second = run_with("tests/configs/disk-linux-check.toml");
    for vm in ["vm1", "vm2"] {
        second.assert_serial_contains(&format!("{vm} | disk-test: pattern intact"));
    }
    let (one, two) = (disk.partition("vm1"), disk.partition("vm2"));
    assert!(
        one.starts_with(&linux_pattern("vm1")),
        "vm1's partition lacks its pattern"
    );
    assert!(
        two.starts_with(&linux_pattern("vm2")),
        "vm2's partition lacks its pattern"
    );
    assert!(
        !contains(&one, b"ringzero-pattern-vm2"),
        "vm2's pattern in vm1's partition"
    );
    assert!(
        !contains(&two, b"ringzero-pattern-vm1"),
        "vm1's pattern in vm2's partition"
    );
}

/// A hostile driver (tests/guests/disk-abuse) sends requests past the end and malformed chains
/// between good requests: each is refused and the device keeps serving; the partition of the
/// VM beside it is byte-for-byte unchanged, and its own changed only where its good writes went.
#[test]
fn malformed_requests_are_refused_and_the_other_partition_is_untouched() {
    let disk = ScratchDisk::partitioned(48, &[("abuse", 16), ("victim", 16)]);
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    disk.write_partition("victim", 0, &noise);
    disk.write_partition("abuse", 0, &noise);
    let victim_before = disk.partition("victim");
    let abuse_before = disk.partition("abuse");
    let run = boot(&[
        "--config",
        "tests/configs/disk-abuse.toml",
        "--disk",
        disk.path(),
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("abuse | disk-abuse: virtio-blk at 00:01.0, 32768 sectors");
    run.assert_serial_contains(
        "abuse | disk-abuse: 13 malformed requests refused, 28 good requests served, 0 failures",
    );
    run.assert_serial_lacks("FAILED");
    run.assert_serial_contains("ringzero: vm abuse exit=exit-port status=0");
    run.assert_serial_contains("ringzero: vm victim exit=exit-port status=0");
    assert!(
        disk.partition("victim") == victim_before,
        "the victim's partition changed"
    );
    // The good writes: 4 KiB of the 251-cycle pattern from 0x5A at sector 8.
    let mut expected = abuse_before;
    for (index, byte) in expected[8 * 512..8 * 512 + 4096].iter_mut().enumerate() {
        *byte = 0x5Au8.wrapping_add((index % 251) as u8);
    }
    assert!(
        disk.partition("abuse") == expected,
        "the abuser's partition changed outside its good writes"
    );
}

/// A read-only image disk (tests/disks/readonly.img, packed into the boot bundle): Linux sees a
/// read-only /dev/vda of the image's size, reads it back equal to the file, and a write fails.
#[test]
fn a_read_only_image_disk_reads_back_and_refuses_writes() {
    let image = std::fs::read(ringzero_tests::repository_root().join("tests/disks/readonly.img"))
        .expect("the fixture");
    let md5 = std::process::Command::new("md5sum")
        .arg(ringzero_tests::repository_root().join("tests/disks/readonly.img"))
        .output()
        .expect("md5sum runs");
    let md5 = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let run = boot(&[
        "--config",
        "tests/configs/disk-readonly.toml",
        "--memory",
        "512",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains(&format!(
        "linux | disk-test: vda sectors={} ro=1",
        image.len() / 512
    ));
    run.assert_serial_contains(&format!("linux | disk-test: image md5 {md5}"));
    run.assert_serial_contains(&format!("linux | disk-test: image md5 after {md5}"));
    let status = run.line_with("linux | disk-test: write status ");
    assert!(
        !status.contains("write status 0 "),
        "{status}\n{}",
        run.report()
    );
    run.assert_serial_contains("ringzero: vm linux exit=poweroff status=0");
}

/// How long the hypervisor waits for one request of its physical disk
/// (`disk::REQUEST_TIMEOUT_MILLIS` in kernel/ringzero/src/disk.rs).
const REQUEST_TIMEOUT_MILLIS: u64 = 10_000;

/// A physical disk that stops answering: QEMU throttles it to 512 bytes/s after a 1 MiB burst
/// (the hypervisor's boot and Linux's partition scan fit in it), so once Linux's direct reads
/// have used the burst, the next request would take over a minute. The hypervisor gives up on
/// it after its deadline, says so once, and fails every later request at once: Linux gets I/O
/// errors, the echo VM beside it still answers a line typed only after the failure, both end
/// normally and the hypervisor powers off. Without the deadline the CPU that sent the request
/// spins for good (the run ends by the time limit).
#[test]
fn a_dead_disk_fails_its_requests_and_the_other_vms_run_on() {
    let disk = ScratchDisk::partitioned(32, &[("dead", 16)]);
    let input = std::env::temp_dir().join(format!("ringzero-disk-dead-{}.txt", std::process::id()));
    std::fs::write(
        &input,
        "@wait not completed within\nstill here after the disk failed\nquit\n",
    )
    .expect("write the input file");
    let drive = format!(
        "if=none,id=disk0,file={},format=raw,throttling.bps-total=512,\
         throttling.bps-total-max=1048576",
        disk.path().replace(',', ",,")
    );
    let run = boot(&[
        "--bios",
        "--config",
        "tests/configs/disk-dead.toml",
        "--smp",
        "2",
        "--memory",
        "512",
        "--input",
        input.to_str().expect("temporary paths are UTF-8"),
        "--timeout",
        "300",
        "--",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=disk0",
    ]);
    let _ = std::fs::remove_file(&input);
    run.assert_status(CLEAN);
    // The hypervisor gave the disk up once, on a read, naming the LBA and the wait.
    let failures: Vec<(usize, &str)> = run
        .serial
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains("not completed within"))
        .collect();
    assert_eq!(failures.len(), 1, "one failure line\n{}", run.report());
    let (failed_at, failure) = failures[0];
    assert!(
        failure.contains("disk: read of 128 sectors at LBA ")
            && failure.contains(&format!(
                "not completed within {REQUEST_TIMEOUT_MILLIS} ms: the disk is taken as failed"
            )),
        "unexpected failure line {failure:?}\n{}",
        run.report()
    );
    // Linux saw I/O errors, at the timeout and at once afterwards.
    run.assert_serial_contains("linux | disk-test: vda sectors=32768");
    run.assert_serial_contains("I/O error, dev vda");
    for which in ["first", "second"] {
        let status = run.line_with(&format!("linux | disk-test: {which} read status "));
        assert!(!status.ends_with("status 0"), "{status}\n{}", run.report());
    }
    let stats = run.line_with("vm linux: 00:01.0 virtio-blk reads=");
    assert!(
        !stats.contains(" backend=0 "),
        "no backend errors counted: {stats}\n{}",
        run.report()
    );
    // The other VM ran on: it echoed a line typed only after the failure.
    let echoed = run
        .serial
        .lines()
        .position(|line| line.contains("alive | echo: still here after the disk failed"))
        .unwrap_or_else(|| panic!("the echo VM did not answer\n{}", run.report()));
    assert!(
        echoed > failed_at,
        "echoed before the failure\n{}",
        run.report()
    );
    run.assert_serial_contains("ringzero: vm alive exit=exit-port status=0");
    run.assert_serial_contains("ringzero: vm linux exit=poweroff status=0");
}
