//! Host tests of the bzImage parser and the Linux boot plan: a synthetic bzImage is built by
//! hand (only the header fields the protocol defines), every refusal is provoked, and the plan
//! is applied to a simulated guest RAM where `boot_params` is read back field by field.

use super::*;
use crate::boot_plan::plan;
use crate::manifest::{GuestFormat, Module, Paging, VmManifest};
use alloc::string::String;
use alloc::vec;

const MIB: u64 = 1 << 20;
/// The synthetic image's setup sectors: the protected-mode kernel starts at 0x400.
const SETUP_SECTORS: u8 = 1;
const KERNEL_OFFSET: usize = 0x400;
const KERNEL_LEN: usize = 0x1000;
const INIT_SIZE_VALUE: u32 = 0x10_0000;
const PREF: u64 = 0x100_0000;

fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// A minimal bzImage: boot protocol 2.15, relocatable, 64-bit entry, a setup header ending at
/// 0x26C (jump 0xEB 0x6A), one setup sector, a 4 KiB protected-mode "kernel" of a pattern.
fn synthetic_bzimage() -> Vec<u8> {
    let mut image = vec![0u8; KERNEL_OFFSET + KERNEL_LEN];
    put(&mut image, 0x1F1, &[SETUP_SECTORS]);
    put(&mut image, 0x1F4, &((KERNEL_LEN / 16) as u32).to_le_bytes());
    put(&mut image, 0x1FA, &0xFFFFu16.to_le_bytes()); // vid_mode "normal"
    put(&mut image, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut image, 0x200, &[0xEB, 0x6A]);
    put(&mut image, 0x202, b"HdrS");
    put(&mut image, 0x206, &0x020Fu16.to_le_bytes());
    put(&mut image, 0x211, &[0x01]); // LOADED_HIGH
    put(&mut image, 0x22C, &0x7FFF_FFFFu32.to_le_bytes());
    put(&mut image, 0x230, &0x20_0000u32.to_le_bytes());
    put(&mut image, 0x234, &[1, 21]); // relocatable_kernel, min_alignment
    put(&mut image, 0x236, &0x0003u16.to_le_bytes()); // XLF_KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
    put(&mut image, 0x238, &2047u32.to_le_bytes());
    put(&mut image, 0x250, &0xDEAD_BEEFu64.to_le_bytes()); // setup_data: must be cleared
    put(&mut image, 0x258, &PREF.to_le_bytes());
    put(&mut image, 0x260, &INIT_SIZE_VALUE.to_le_bytes());
    for (index, byte) in image[KERNEL_OFFSET..].iter_mut().enumerate() {
        *byte = (index % 251) as u8;
    }
    image
}

/// Copies the plan into a zeroed RAM, checking that every placement lies in RAM, fits its
/// size and overlaps no other.
fn apply(plan: &BootPlan<'_>, memory: u64) -> Vec<u8> {
    let mut ram = vec![0u8; memory as usize];
    for (index, placement) in plan.placements.iter().enumerate() {
        assert!(
            placement.data.len() as u64 <= placement.size,
            "placement {index}"
        );
        let end = placement.guest_physical + placement.size;
        assert!(end <= memory, "placement {index} ends at {end:#x}");
        for other in &plan.placements[index + 1..] {
            let other_end = other.guest_physical + other.size;
            assert!(
                end <= other.guest_physical || other_end <= placement.guest_physical,
                "placements at {:#x} and {:#x} overlap",
                placement.guest_physical,
                other.guest_physical
            );
        }
        let start = placement.guest_physical as usize;
        ram[start..start + placement.data.len()].copy_from_slice(&placement.data);
    }
    ram
}

fn u8_at(ram: &[u8], address: u64) -> u8 {
    ram[address as usize]
}

fn u16_at(ram: &[u8], address: u64) -> u16 {
    let start = address as usize;
    u16::from_le_bytes(ram[start..start + 2].try_into().unwrap())
}

fn u32_at(ram: &[u8], address: u64) -> u32 {
    let start = address as usize;
    u32::from_le_bytes(ram[start..start + 4].try_into().unwrap())
}

fn u64_at(ram: &[u8], address: u64) -> u64 {
    let start = address as usize;
    u64::from_le_bytes(ram[start..start + 8].try_into().unwrap())
}

fn c_string_at(ram: &[u8], address: u64) -> String {
    let start = address as usize;
    let length = ram[start..].iter().position(|byte| *byte == 0).unwrap();
    String::from_utf8(ram[start..start + length].to_vec()).unwrap()
}

/// A zero-page field: `boot_params` + offset.
fn zp(offset: u64) -> u64 {
    ZERO_PAGE_ADDRESS + offset
}

#[test]
fn parses_the_synthetic_image() {
    let image = synthetic_bzimage();
    let bzimage = parse_bzimage(&image).unwrap();
    assert_eq!(bzimage.version, 0x020F);
    assert_eq!(bzimage.setup_sects, 1);
    assert_eq!(bzimage.setup_header, &image[0x1F1..0x26C]);
    assert_eq!(bzimage.kernel, &image[KERNEL_OFFSET..]);
    assert_eq!(bzimage.loadflags, LOADED_HIGH);
    assert_eq!(bzimage.xloadflags, 3);
    assert!(bzimage.relocatable);
    assert_eq!(bzimage.kernel_alignment, 0x20_0000);
    assert_eq!(bzimage.pref_address, PREF);
    assert_eq!(bzimage.init_size, INIT_SIZE_VALUE);
    assert_eq!(bzimage.cmdline_size, 2047);
    assert_eq!(bzimage.initrd_addr_max, 0x7FFF_FFFF);
    // Loaded at 1 MiB, a relocatable kernel runs at max(align_up(1 MiB, 2 MiB), 16 MiB).
    assert_eq!(bzimage.runtime_start(0x10_0000), PREF);
    assert_eq!(bzimage.runtime_start(0x210_0000), 0x220_0000);
    let mut fixed = image.clone();
    fixed[0x234] = 0;
    assert_eq!(
        parse_bzimage(&fixed).unwrap().runtime_start(0x10_0000),
        PREF
    );
}

#[test]
fn setup_sects_zero_means_four() {
    let mut image = vec![0u8; 5 * 512];
    image.extend_from_slice(&synthetic_bzimage()[KERNEL_OFFSET..]);
    image[..KERNEL_OFFSET].copy_from_slice(&synthetic_bzimage()[..KERNEL_OFFSET]);
    image[0x1F1] = 0;
    let bzimage = parse_bzimage(&image).unwrap();
    assert_eq!(bzimage.setup_sects, 4);
    assert_eq!(bzimage.kernel.len(), KERNEL_LEN);
    assert_eq!(bzimage.kernel, &image[5 * 512..]);
}

#[test]
fn refuses_truncated_images() {
    let image = synthetic_bzimage();
    let have = |length: usize| length as u64;
    for length in [0usize, 1, 0x100, 0x1F1, 0x1FF, 0x200, 0x205, 0x263] {
        assert_eq!(
            parse_bzimage(&image[..length]),
            Err(LoadError::Truncated {
                needed: 0x264,
                have: have(length)
            }),
            "length {length:#x}"
        );
    }
    // The header is complete but the protected-mode kernel is missing, cut before the 64-bit
    // entry, or shorter than syssize says.
    let full = (KERNEL_OFFSET + KERNEL_LEN) as u64;
    // The header itself ends at 0x26C (0x202 + the jump's 0x6A).
    for length in [0x264usize, 0x26B] {
        assert_eq!(
            parse_bzimage(&image[..length]),
            Err(LoadError::Truncated {
                needed: 0x26C,
                have: have(length)
            }),
            "length {length:#x}"
        );
    }
    for length in [
        0x26C,
        0x3FF,
        KERNEL_OFFSET,
        KERNEL_OFFSET + 0x200,
        image.len() - 16,
    ] {
        assert_eq!(
            parse_bzimage(&image[..length]),
            Err(LoadError::Truncated {
                needed: full,
                have: have(length)
            }),
            "length {length:#x}"
        );
    }
    // Without syssize, the kernel must still hold its 64-bit entry point (0x200).
    let mut no_syssize = image.clone();
    put(&mut no_syssize, 0x1F4, &0u32.to_le_bytes());
    assert!(parse_bzimage(&no_syssize[..KERNEL_OFFSET + 0x201]).is_ok());
    assert_eq!(
        parse_bzimage(&no_syssize[..KERNEL_OFFSET + 0x200]),
        Err(LoadError::Truncated {
            needed: (KERNEL_OFFSET + 0x201) as u64,
            have: (KERNEL_OFFSET + 0x200) as u64
        })
    );
    // Trailing bytes after syssize (a signature) are fine and loaded.
    let mut signed = image.clone();
    signed.extend_from_slice(&[0x55; 0x5C0]);
    assert_eq!(
        parse_bzimage(&signed).unwrap().kernel.len(),
        KERNEL_LEN + 0x5C0
    );
    // A header longer than boot_params' header area is copied only up to 0x290.
    let mut long_header = image.clone();
    long_header[0x201] = 0xFF;
    assert_eq!(
        parse_bzimage(&long_header).unwrap().setup_header.len(),
        0x290 - 0x1F1
    );
}

#[test]
fn refuses_what_is_not_a_64_bit_bzimage() {
    let image = synthetic_bzimage();
    let refused = |offset: usize, bytes: &[u8]| {
        let mut bad = image.clone();
        put(&mut bad, offset, bytes);
        parse_bzimage(&bad).unwrap_err()
    };
    assert_eq!(
        refused(0x1FE, &[0x55, 0xAB]),
        LoadError::NotBzImage("no boot sector signature 0xAA55 at offset 0x1FE")
    );
    assert_eq!(
        refused(0x202, b"HdrZ"),
        LoadError::NotBzImage("no setup header magic \"HdrS\" at offset 0x202")
    );
    assert_eq!(
        refused(0x206, &0x020Bu16.to_le_bytes()),
        LoadError::BootProtocolTooOld { version: 0x020B }
    );
    assert_eq!(
        refused(0x206, &0x0200u16.to_le_bytes()),
        LoadError::BootProtocolTooOld { version: 0x0200 }
    );
    assert_eq!(
        refused(0x236, &0x0002u16.to_le_bytes()),
        LoadError::No64BitEntry
    );
    assert!(
        matches!(refused(0x211, &[0x80]), LoadError::NotBzImage(reason) if reason.contains("zImage"))
    );
    assert!(
        matches!(refused(0x201, &[0x10]), LoadError::MalformedBzImage(reason) if reason.contains("ends before"))
    );
    assert!(matches!(
        refused(0x230, &0x30_0000u32.to_le_bytes()),
        LoadError::MalformedBzImage(reason) if reason.contains("power of two")
    ));
    assert_eq!(
        refused(0x260, &0u32.to_le_bytes()),
        LoadError::MalformedBzImage("init_size is 0")
    );
    // A short file with the wrong signatures is named for them, not for its length.
    let mut short = image[..0x210].to_vec();
    short[0x1FE] = 0;
    assert!(matches!(
        parse_bzimage(&short),
        Err(LoadError::NotBzImage(_))
    ));
    let mut short = image[..0x210].to_vec();
    short[0x203] = b'x';
    assert!(matches!(
        parse_bzimage(&short),
        Err(LoadError::NotBzImage(_))
    ));
    // A flat binary or an ELF file is not a bzImage.
    let mut elf = vec![0u8; 0x2000];
    elf[..4].copy_from_slice(b"\x7fELF");
    assert!(matches!(parse_bzimage(&elf), Err(LoadError::NotBzImage(_))));
    assert_eq!(
        plan_linux(&[], 32 * MIB, "", None, None),
        Err(LoadError::EmptyImage)
    );
}

#[test]
fn truncations_and_flips_never_panic() {
    let image = synthetic_bzimage();
    let initrd = [7u8; 100];
    for length in 0..image.len() {
        let _ = plan_linux(&image[..length], 32 * MIB, "x", Some(&initrd), None);
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut bytes = image.clone();
        for _ in 0..(next() % 4 + 1) {
            // Mostly the header.
            let position = (next() % 0x300) as usize;
            bytes[position] = next() as u8;
        }
        let _ = plan_linux(
            &bytes,
            32 * MIB,
            "console=ttyS0",
            Some(&initrd),
            Some(0xE0000),
        );
    }
    for position in 0x1F1..0x270 {
        for value in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
            let mut bytes = image.clone();
            bytes[position] = value;
            let _ = plan_linux(&bytes, 32 * MIB, "", Some(&initrd), None);
        }
    }
}

#[test]
fn boot_params_and_entry_state() {
    let image = synthetic_bzimage();
    let memory = 32 * MIB;
    let initrd: Vec<u8> = (0..5000u32).map(|index| (index * 7) as u8).collect();
    let cmdline = "console=ttyS0 earlyprintk=serial";
    let plan = plan_linux(&image, memory, cmdline, Some(&initrd), Some(0xE_0000)).unwrap();
    assert_eq!(
        plan.entry,
        EntryState {
            mode: CpuMode::Long64,
            rip: 0x10_0200,
            rsp: 0x8_0000,
            rflags: 0x2,
            rax: 0,
            rbx: 0,
            rdi: 0,
            rsi: 0x8000,
            cr0: 0x8005_0033,
            cr3: 0x2000,
            cr4: 0x20,
            efer: 0xD00,
            gdt_base: 0x1000,
            gdt_limit: 31,
            code_selector: 0x10,
            data_selector: 0x18,
        }
    );
    let ram = apply(&plan, memory);

    // GDT: __BOOT_CS at 0x10 is 64-bit code, __BOOT_DS at 0x18 flat data.
    assert_eq!(u64_at(&ram, 0x1000), 0);
    assert_eq!(u64_at(&ram, 0x1008), 0);
    assert_eq!(u64_at(&ram, 0x1010), 0x00AF_9A00_0000_FFFF);
    assert_eq!(u64_at(&ram, 0x1018), 0x00CF_9200_0000_FFFF);
    // Identity map: PML4 -> PDPT -> PD, the first 2 MiB page and the one holding the initrd.
    assert_eq!(u64_at(&ram, 0x2000), 0x3003);
    assert_eq!(u64_at(&ram, 0x3000), 0x4003);
    assert_eq!(u64_at(&ram, 0x4000), 0x83);
    assert_eq!(u64_at(&ram, 0x4000 + 15 * 8), (15 << 21) | 0x83);

    // The setup header is the image's, except for the loader's fields.
    let header = &ram[zp(0x1F1) as usize..zp(0x26C) as usize];
    for (index, (got, want)) in header.iter().zip(&image[0x1F1..0x26C]).enumerate() {
        let offset = 0x1F1 + index;
        // type_of_loader, loadflags, ramdisk_image/size, heap_end_ptr, cmd_line_ptr, setup_data.
        let written = [
            0x210..0x212,
            0x218..0x220,
            0x224..0x226,
            0x228..0x22C,
            0x250..0x258,
        ];
        if !written.iter().any(|range| range.contains(&offset)) {
            assert_eq!(got, want, "setup header byte {offset:#x}");
        }
    }
    assert_eq!(&ram[zp(0x202) as usize..zp(0x206) as usize], b"HdrS");
    assert_eq!(u16_at(&ram, zp(0x206)), 0x020F);
    assert_eq!(u16_at(&ram, zp(0x236)), 3);
    assert_eq!(u64_at(&ram, zp(0x258)), PREF);
    assert_eq!(u32_at(&ram, zp(0x260)), INIT_SIZE_VALUE);
    assert_eq!(u8_at(&ram, zp(0x210)), 0xFF, "type_of_loader");
    assert_eq!(
        u8_at(&ram, zp(0x211)),
        0x81,
        "loadflags: LOADED_HIGH | CAN_USE_HEAP"
    );
    assert_eq!(u16_at(&ram, zp(0x224)), 0xFE00, "heap_end_ptr");
    assert_eq!(u64_at(&ram, zp(0x250)), 0, "setup_data cleared");
    // Nothing past the header in the zero page comes from the image.
    assert!(ram[zp(0x26C) as usize..zp(0x2D0) as usize]
        .iter()
        .all(|byte| *byte == 0));

    // Command line.
    assert_eq!(u32_at(&ram, zp(0x228)), 0x9000, "cmd_line_ptr");
    assert_eq!(u32_at(&ram, zp(0x0C8)), 0, "ext_cmd_line_ptr");
    assert_eq!(c_string_at(&ram, 0x9000), cmdline);

    // Initrd: page-aligned, ending within the last page of RAM.
    let initrd_start = (memory - initrd.len() as u64) & !0xFFF;
    assert_eq!(initrd_start, 0x1FF_E000);
    assert_eq!(
        u32_at(&ram, zp(0x218)),
        initrd_start as u32,
        "ramdisk_image"
    );
    assert_eq!(u32_at(&ram, zp(0x21C)), 5000, "ramdisk_size");
    assert_eq!(u32_at(&ram, zp(0x0C0)), 0, "ext_ramdisk_image");
    assert_eq!(u32_at(&ram, zp(0x0C4)), 0, "ext_ramdisk_size");
    assert_eq!(
        &ram[initrd_start as usize..initrd_start as usize + initrd.len()],
        &initrd[..]
    );

    // ACPI RSDP.
    assert_eq!(u64_at(&ram, zp(0x070)), 0xE_0000);

    // e820.
    assert_eq!(u8_at(&ram, zp(0x1E8)), 4, "e820_entries");
    let expected: [(u64, u64, u32); 4] = [
        (0, 0x9_FC00, 1),
        (0x9_FC00, 0x400, 2),
        (0xE_0000, 0x2_0000, 2),
        (0x10_0000, memory - 0x10_0000, 1),
    ];
    for (index, (base, length, kind)) in expected.into_iter().enumerate() {
        let entry = zp(0x2D0) + index as u64 * 20;
        assert_eq!(u64_at(&ram, entry), base, "e820 #{index} base");
        assert_eq!(u64_at(&ram, entry + 8), length, "e820 #{index} length");
        assert_eq!(u32_at(&ram, entry + 16), kind, "e820 #{index} type");
    }
    assert!(
        ram[zp(0x2D0 + 4 * 20) as usize..zp(0x2D0 + 5 * 20) as usize]
            .iter()
            .all(|byte| *byte == 0)
    );

    // The protected-mode kernel at 1 MiB, its 64-bit entry 0x200 bytes in.
    assert_eq!(
        &ram[0x10_0000..0x10_0000 + KERNEL_LEN],
        &image[KERNEL_OFFSET..]
    );
}

#[test]
fn without_initrd_or_acpi() {
    let image = synthetic_bzimage();
    for initrd in [None, Some(&[][..])] {
        let plan = plan_linux(&image, 24 * MIB, "", initrd, None).unwrap();
        assert_eq!(
            plan.placements.len(),
            5,
            "GDT, tables, zero page, cmdline, kernel"
        );
        let ram = apply(&plan, 24 * MIB);
        assert_eq!(u32_at(&ram, zp(0x218)), 0);
        assert_eq!(u32_at(&ram, zp(0x21C)), 0);
        assert_eq!(u64_at(&ram, zp(0x070)), 0);
        assert_eq!(u8_at(&ram, 0x9000), 0, "empty command line");
        assert_eq!(u64_at(&ram, zp(0x2D0) + 3 * 20 + 8), 23 * MIB);
    }
}

#[test]
fn initrd_placement_and_limits() {
    let image = synthetic_bzimage();
    let initrd = vec![0xA5u8; 0x3000];
    let initrd_start = |plan: &BootPlan<'_>| plan.placements[5].guest_physical;
    // Exactly page-sized: ends at the end of RAM.
    let plan = plan_linux(&image, 64 * MIB, "", Some(&initrd), None).unwrap();
    assert_eq!(initrd_start(&plan), 64 * MIB - 0x3000);
    // Below initrd_addr_max when that is lower than RAM.
    let mut low_max = image.clone();
    put(&mut low_max, 0x22C, &0x27F_FFFFu32.to_le_bytes());
    let plan = plan_linux(&low_max, 64 * MIB, "", Some(&initrd), None).unwrap();
    assert_eq!(initrd_start(&plan), 0x280_0000 - 0x3000);
    let ram = apply(&plan, 64 * MIB);
    assert_eq!(u32_at(&ram, zp(0x218)), 0x27F_D000);
    // The kernel's memory (run-time start 16 MiB + init_size 1 MiB = 17 MiB) comes first.
    let exact = vec![1u8; MIB as usize];
    let plan = plan_linux(&image, 18 * MIB, "", Some(&exact), None).unwrap();
    assert_eq!(initrd_start(&plan), 17 * MIB);
    let too_big = vec![1u8; (MIB + 1) as usize];
    assert_eq!(
        plan_linux(&image, 18 * MIB, "", Some(&too_big), None),
        Err(LoadError::InitrdDoesNotFit {
            size: MIB + 1,
            lowest: 17 * MIB,
            limit: 18 * MIB
        })
    );
    let mut tiny_max = image.clone();
    put(&mut tiny_max, 0x22C, &0xFFFFu32.to_le_bytes());
    assert_eq!(
        plan_linux(&tiny_max, 18 * MIB, "", Some(&initrd), None),
        Err(LoadError::InitrdDoesNotFit {
            size: 0x3000,
            lowest: 17 * MIB,
            limit: 0x1_0000
        })
    );
}

#[test]
fn kernel_must_fit_its_memory() {
    let image = synthetic_bzimage();
    // Run-time range [16 MiB, 17 MiB): 17 MiB of RAM is just enough.
    assert!(plan_linux(&image, 17 * MIB, "", None, None).is_ok());
    assert_eq!(
        plan_linux(&image, 16 * MIB, "", None, None),
        Err(LoadError::ImageTooLarge {
            needed_end: 17 * MIB,
            memory: 16 * MIB
        })
    );
    assert_eq!(
        plan_linux(&image, MIB, "", None, None),
        Err(LoadError::MemoryTooSmall {
            memory: MIB,
            minimum: 2 * MIB
        })
    );
}

#[test]
fn command_line_limits() {
    let image = synthetic_bzimage();
    let longest = "c".repeat(2047);
    let plan = plan_linux(&image, 32 * MIB, &longest, None, None).unwrap();
    assert_eq!(c_string_at(&apply(&plan, 32 * MIB), 0x9000), longest);
    assert_eq!(
        plan_linux(&image, 32 * MIB, &"c".repeat(2048), None, None),
        Err(LoadError::CommandLineTooLong {
            length: 2048,
            maximum: 2047
        })
    );
    // A kernel claiming a longer cmdline_size is held to the manifest's 3072.
    let mut generous = image.clone();
    put(&mut generous, 0x238, &0x10_0000u32.to_le_bytes());
    assert!(plan_linux(&generous, 32 * MIB, &"c".repeat(3072), None, None).is_ok());
    assert_eq!(
        plan_linux(&generous, 32 * MIB, &"c".repeat(3073), None, None),
        Err(LoadError::CommandLineTooLong {
            length: 3073,
            maximum: 3072
        })
    );
    assert_eq!(
        plan_linux(&image, 32 * MIB, "a\0b", None, None),
        Err(LoadError::CommandLineHasNul)
    );
}

#[test]
fn plan_dispatches_linux_and_refuses_misplaced_initrds() {
    let image = synthetic_bzimage();
    let initrd = [9u8; 64];
    let mut vm = VmManifest {
        name: "linux",
        format: GuestFormat::Linux,
        memory_bytes: 32 * MIB,
        cmdline: "console=ttyS0",
        cpus: 1,
        pin: &[],
        time_limit_seconds: None,
        paging: Paging::Nested,
        trace: false,
        kernel: &image,
        modules: Vec::new(),
        initrd: Some(&initrd),
        disks: Vec::new(),
        nic: None,
    };
    let planned = plan(&vm).unwrap();
    assert_eq!(planned.entry.rsi, ZERO_PAGE_ADDRESS);
    assert_eq!(planned.entry.code_selector, BOOT_CS);
    assert_eq!(planned.placements[5].data.as_ref(), &initrd[..]);
    assert_eq!(
        planned,
        plan_linux(&image, 32 * MIB, "console=ttyS0", Some(&initrd), None).unwrap()
    );
    let with_acpi = crate::boot_plan::plan_with_acpi(&vm, Some(0xE_0000)).unwrap();
    assert_eq!(u64_at(&with_acpi.placements[2].data, 0x70), 0xE_0000);

    vm.modules.push(Module {
        name: "m",
        bytes: b"m",
    });
    assert_eq!(
        plan(&vm),
        Err(LoadError::ModulesNotSupported {
            format: GuestFormat::Linux
        })
    );
    vm.modules.clear();
    let flat = [0x90u8; 8];
    vm.format = GuestFormat::Flat64;
    vm.kernel = &flat;
    assert_eq!(
        plan(&vm),
        Err(LoadError::InitrdNotSupported {
            format: GuestFormat::Flat64
        })
    );
    vm.format = GuestFormat::Multiboot;
    assert_eq!(
        plan(&vm),
        Err(LoadError::InitrdNotSupported {
            format: GuestFormat::Multiboot
        })
    );
    // A flat image is not a bzImage.
    vm.format = GuestFormat::Linux;
    assert_eq!(
        plan(&vm),
        Err(LoadError::Truncated {
            needed: 0x264,
            have: 8
        })
    );
}

#[test]
fn errors_display() {
    let cases = [
        (
            LoadError::Truncated {
                needed: 0x264,
                have: 0x10,
            },
            "the bzImage is truncated: the Linux boot protocol needs 0x264 bytes but the file has 0x10",
        ),
        (
            LoadError::BootProtocolTooOld { version: 0x020B },
            "the bzImage speaks Linux boot protocol 2.11, at least 2.12 is needed (a 64-bit kernel from Linux 3.8 or later)",
        ),
        (
            LoadError::No64BitEntry,
            "the bzImage has no 64-bit entry point (xloadflags bit 0, XLF_KERNEL_64, is clear): a 32-bit kernel",
        ),
        (
            LoadError::NotBzImage("no setup header magic \"HdrS\" at offset 0x202"),
            "not a Linux bzImage: no setup header magic \"HdrS\" at offset 0x202",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(alloc::format!("{error}"), message);
    }
}

/// Debian's cloud kernel, when scripts/lib/linux-guest.sh has fetched it: it parses, and plans
/// in 256 MiB with the busybox initramfs at the top of RAM.
#[test]
fn the_debian_cloud_kernel_when_fetched() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (Ok(image), Ok(initrd)) = (
        std::fs::read(root.join("target/linux/vmlinuz")),
        std::fs::read(root.join("target/linux/initramfs.cpio.gz")),
    ) else {
        std::eprintln!("skipped: target/linux is not built (scripts/lib/linux-guest.sh)");
        return;
    };
    let bzimage = parse_bzimage(&image).unwrap();
    assert!(bzimage.version >= 0x020C);
    assert!(bzimage.xloadflags & XLF_KERNEL_64 != 0);
    assert!(bzimage.relocatable);
    let memory = 256 * MIB;
    let plan = plan_linux(&image, memory, "console=ttyS0", Some(&initrd), None).unwrap();
    let ram = apply(&plan, memory);
    let start = u64::from(u32_at(&ram, zp(0x218)));
    assert_eq!(start % 0x1000, 0);
    assert!(start + initrd.len() as u64 <= memory && memory - start < initrd.len() as u64 + 0x1000);
    assert_eq!(u32_at(&ram, zp(0x21C)) as usize, initrd.len());
}
