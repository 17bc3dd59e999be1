//! The hypervisor's physical disk (issue 8): a raw file attached with `run-qemu.sh --disk`
//! appears as a virtio-blk device on the host PCI bus; the hypervisor reports its size, whether
//! it takes flushes and whether LBA 1 holds a GPT header, and never writes it at boot.

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
        "120",
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
        "120",
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
    let run = boot(&["--bios", "--no-guests", "--timeout", "120"]);
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
        "120",
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
