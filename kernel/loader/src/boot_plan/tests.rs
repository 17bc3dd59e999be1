//! Host tests of the boot planners: every plan is applied to a simulated guest RAM and the
//! structures are read back from it at the addresses docs/specs/guest-boot.md gives.

use super::*;
use crate::manifest::{Paging, VmManifest};
use alloc::string::String;
use alloc::vec;

const MIB: u64 = 1 << 20;

/// Copies the plan into a zeroed RAM of `memory` bytes, checking that every placement lies
/// in RAM, fits its size and overlaps no other.
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

fn gdt_bytes(code: u64) -> Vec<u8> {
    [0u64, code, 0x00CF_9200_0000_FFFF]
        .iter()
        .flat_map(|descriptor| descriptor.to_le_bytes())
        .collect()
}

#[test]
fn flat64_small_image() {
    let image: &[u8] = &[0xF4, 0xEB, 0xFD, 0x90];
    let memory = 4 * MIB;
    let plan = plan_flat64(image, memory, "hello=1").unwrap();
    assert_eq!(
        plan.entry,
        EntryState {
            mode: CpuMode::Long64,
            rip: 0x10_0000,
            rsp: 0x8_0000,
            rflags: 0x2,
            rax: 0,
            rbx: 0,
            rdi: 0x8000,
            rsi: 0,
            cr0: 0x8005_0033,
            cr3: 0x2000,
            cr4: 0x20,
            efer: 0xD00,
            gdt_base: 0x1000,
            gdt_limit: 23,
            code_selector: 0x08,
            data_selector: 0x10,
        }
    );
    let ram = apply(&plan, memory);
    assert_eq!(
        &ram[0x1000..0x1018],
        gdt_bytes(0x00AF_9A00_0000_FFFF).as_slice()
    );
    assert_eq!(u64_at(&ram, 0x1018), 0);
    // PML4 -> PDPT -> four page directories, 2 MiB pages.
    assert_eq!(u64_at(&ram, 0x2000), 0x3003);
    assert_eq!(u64_at(&ram, 0x2008), 0);
    for gib in 0..4u64 {
        assert_eq!(
            u64_at(&ram, 0x3000 + gib * 8),
            (0x4000 + gib * 0x1000) | 0x3
        );
    }
    assert_eq!(u64_at(&ram, 0x3020), 0);
    assert_eq!(u64_at(&ram, 0x4000), 0x83);
    assert_eq!(u64_at(&ram, 0x4008), 0x20_0083);
    assert_eq!(u64_at(&ram, 0x5000), 0x4000_0083);
    assert_eq!(u64_at(&ram, 0x7FF8), 0xFFE0_0083);
    for entry in 0..2048u64 {
        assert_eq!(u64_at(&ram, 0x4000 + entry * 8), (entry << 21) | 0x83);
    }
    // Boot info.
    assert_eq!(&ram[0x8000..0x8008], b"OREZGNIR");
    assert_eq!(u64_at(&ram, 0x8000), 0x5249_4E47_5A45_524F);
    assert_eq!(u64_at(&ram, 0x8008), memory);
    assert_eq!(u64_at(&ram, 0x8010), 7);
    assert_eq!(&ram[0x8018..0x801F], b"hello=1");
    assert_eq!(ram[0x801F], 0);
    // The image, borrowed.
    assert_eq!(&ram[0x10_0000..0x10_0004], image);
    let image_placement = plan.placements.last().unwrap();
    assert!(matches!(image_placement.data, Cow::Borrowed(_)));
    assert_eq!(image_placement.guest_physical, 0x10_0000);
}

#[test]
fn flat64_refusals() {
    let fits = vec![0x90u8; MIB as usize];
    assert!(plan_flat64(&fits, 2 * MIB, "").is_ok());
    let too_large = vec![0x90u8; MIB as usize + 1];
    let error = plan_flat64(&too_large, 2 * MIB, "").unwrap_err();
    assert_eq!(
        error,
        LoadError::ImageTooLarge {
            needed_end: 0x20_0001,
            memory: 0x20_0000
        }
    );
    assert!(alloc::format!("{error}").contains("does not fit the VM's memory"));
    assert_eq!(
        plan_flat64(&[1], MIB, ""),
        Err(LoadError::MemoryTooSmall {
            memory: MIB,
            minimum: 2 * MIB
        })
    );
    assert_eq!(
        plan_flat64(&[1], 5 << 30, ""),
        Err(LoadError::MemoryTooLarge {
            memory: 5 << 30,
            maximum: 4 << 30
        })
    );
    assert_eq!(plan_flat64(&[], 2 * MIB, ""), Err(LoadError::EmptyImage));
    let long = "x".repeat(3073);
    assert_eq!(
        plan_flat64(&[1], 2 * MIB, &long),
        Err(LoadError::CommandLineTooLong {
            length: 3073,
            maximum: 3072
        })
    );
    assert!(plan_flat64(&[1], 2 * MIB, &long[..3072]).is_ok());
    assert!(plan_flat64(&[1], 4 << 30, "").is_ok());
}

/// A Multiboot header: magic, flags, checksum, and the address fields when given.
fn multiboot_header(flags: u32, address_fields: Option<[u32; 5]>) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&MULTIBOOT_HEADER_MAGIC.to_le_bytes());
    header.extend_from_slice(&flags.to_le_bytes());
    let checksum = 0u32
        .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
        .wrapping_sub(flags);
    header.extend_from_slice(&checksum.to_le_bytes());
    for field in address_fields.into_iter().flatten() {
        header.extend_from_slice(&field.to_le_bytes());
    }
    header
}

struct ElfSegment {
    p_type: u32,
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn load(paddr: u64, data: &[u8], memsz: u64) -> ElfSegment {
    ElfSegment {
        p_type: 1,
        paddr,
        data: data.to_vec(),
        memsz,
    }
}

/// Builds an ELF executable (ELF32 EM_386 or ELF64 EM_X86_64): header, program headers,
/// `header` (e.g. a Multiboot header, 4-byte aligned), then each segment's bytes.
fn elf(is_64: bool, entry: u64, segments: &[ElfSegment], header: &[u8]) -> Vec<u8> {
    let (header_len, phentsize) = if is_64 { (64usize, 56usize) } else { (52, 32) };
    let extra_offset = (header_len + segments.len() * phentsize + 3) & !3;
    let mut data_offset = extra_offset + header.len();
    let mut bytes = vec![0u8; data_offset];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = if is_64 { 2 } else { 1 };
    bytes[5] = 1;
    bytes[6] = 1;
    let put16 = |bytes: &mut Vec<u8>, at: usize, value: u16| {
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes())
    };
    let put32 = |bytes: &mut Vec<u8>, at: usize, value: u32| {
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes())
    };
    let put64 = |bytes: &mut Vec<u8>, at: usize, value: u64| {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes())
    };
    put16(&mut bytes, 16, 2);
    put16(&mut bytes, 18, if is_64 { 62 } else { 3 });
    put32(&mut bytes, 20, 1);
    if is_64 {
        put64(&mut bytes, 24, entry);
        put64(&mut bytes, 32, header_len as u64);
        put16(&mut bytes, 52, 64);
        put16(&mut bytes, 54, 56);
        put16(&mut bytes, 56, segments.len() as u16);
    } else {
        put32(&mut bytes, 24, entry as u32);
        put32(&mut bytes, 28, header_len as u32);
        put16(&mut bytes, 40, 52);
        put16(&mut bytes, 42, 32);
        put16(&mut bytes, 44, segments.len() as u16);
    }
    bytes[extra_offset..extra_offset + header.len()].copy_from_slice(header);
    for (index, segment) in segments.iter().enumerate() {
        let at = header_len + index * phentsize;
        let filesz = segment.data.len() as u64;
        if is_64 {
            put32(&mut bytes, at, segment.p_type);
            put64(&mut bytes, at + 8, data_offset as u64);
            put64(
                &mut bytes,
                at + 16,
                segment.paddr.wrapping_add(0xFFFF_8000_0000_0000),
            );
            put64(&mut bytes, at + 24, segment.paddr);
            put64(&mut bytes, at + 32, filesz);
            put64(&mut bytes, at + 40, segment.memsz);
        } else {
            put32(&mut bytes, at, segment.p_type);
            put32(&mut bytes, at + 4, data_offset as u32);
            put32(
                &mut bytes,
                at + 8,
                (segment.paddr as u32).wrapping_add(0xC000_0000),
            );
            put32(&mut bytes, at + 12, segment.paddr as u32);
            put32(&mut bytes, at + 16, filesz as u32);
            put32(&mut bytes, at + 20, segment.memsz as u32);
        }
        bytes.extend_from_slice(&segment.data);
        data_offset += segment.data.len();
    }
    bytes
}

fn sample_elf(is_64: bool) -> Vec<u8> {
    elf(
        is_64,
        0x10_0010,
        &[
            load(0x10_0000, &[0xAA; 0x40], 0x1800),
            ElfSegment {
                p_type: 4, // PT_NOTE: ignored
                paddr: 0,
                data: vec![1, 2, 3],
                memsz: 3,
            },
            load(0x20_0000, &[0xBB; 0x10], 0x10),
        ],
        &multiboot_header(0x3, None),
    )
}

/// Reads back and checks the whole Multiboot info structure for `modules` placed as
/// expected.
fn check_multiboot_info(
    ram: &[u8],
    memory: u64,
    cmdline: &str,
    modules: &[Module<'_>],
    first_module: u64,
) {
    let info = 0x8000;
    assert_eq!(u32_at(ram, info), 0x24D);
    assert_eq!(u32_at(ram, info + 4), 639);
    assert_eq!(u32_at(ram, info + 8), ((memory - MIB) / 1024) as u32);
    assert_eq!(c_string_at(ram, u32_at(ram, info + 16).into()), cmdline);
    assert_eq!(u32_at(ram, info + 20), modules.len() as u32);
    let list = u64::from(u32_at(ram, info + 24));
    let mut expected_start = first_module;
    for (index, module) in modules.iter().enumerate() {
        let entry = list + index as u64 * 16;
        let start = u64::from(u32_at(ram, entry));
        let end = u64::from(u32_at(ram, entry + 4));
        assert_eq!(start, expected_start);
        assert_eq!(start % 4096, 0);
        assert_eq!(end - start, module.bytes.len() as u64);
        assert_eq!(&ram[start as usize..end as usize], module.bytes);
        assert_eq!(c_string_at(ram, u32_at(ram, entry + 8).into()), module.name);
        assert_eq!(u32_at(ram, entry + 12), 0);
        expected_start = (end + 4095) & !4095;
    }
    // Memory map: size field first, then base, length, type.
    assert_eq!(u32_at(ram, info + 44), 96);
    let map = u64::from(u32_at(ram, info + 48));
    let expected = [
        (0u64, 0x9_FC00u64, 1u32),
        (0x9_FC00, 0x400, 2),
        (0xF_0000, 0x1_0000, 2),
        (0x10_0000, memory - 0x10_0000, 1),
    ];
    for (index, (base, length, kind)) in expected.into_iter().enumerate() {
        let entry = map + index as u64 * 24;
        assert_eq!(u32_at(ram, entry), 20);
        assert_eq!(u64_at(ram, entry + 4), base);
        assert_eq!(u64_at(ram, entry + 12), length);
        assert_eq!(u32_at(ram, entry + 20), kind);
    }
    assert_eq!(c_string_at(ram, u32_at(ram, info + 64).into()), "ringzero");
    // Everything the info points at stays inside the info page.
    for pointer in [16, 24, 48, 64] {
        let address = u32_at(ram, info + pointer);
        assert!((0x8000..0x9000).contains(&address));
    }
}

fn multiboot_entry(entry: u64) -> EntryState {
    EntryState {
        mode: CpuMode::Protected32,
        rip: entry,
        rsp: 0,
        rflags: 0x2,
        rax: 0x2BAD_B002,
        rbx: 0x8000,
        rdi: 0,
        rsi: 0,
        cr0: 0x11,
        cr3: 0,
        cr4: 0,
        efer: 0,
        gdt_base: 0x1000,
        gdt_limit: 23,
        code_selector: 0x08,
        data_selector: 0x10,
    }
}

#[test]
fn multiboot_elf32_and_elf64() {
    for is_64 in [false, true] {
        let image = sample_elf(is_64);
        let memory = 8 * MIB;
        let modules = [
            Module {
                name: "initrd.img",
                bytes: &[0x11; 5000],
            },
            Module {
                name: "empty",
                bytes: &[],
            },
            Module {
                name: "last",
                bytes: b"tail",
            },
        ];
        let cmdline = "root=/dev/ram0 console=ttyS0";
        let plan = plan_multiboot(&image, memory, cmdline, &modules).unwrap();
        assert_eq!(plan.entry, multiboot_entry(0x10_0010));
        let ram = apply(&plan, memory);
        assert_eq!(
            &ram[0x1000..0x1018],
            gdt_bytes(0x00CF_9A00_0000_FFFF).as_slice()
        );
        // Segments at their physical addresses, bss zeroed; the note is not loaded.
        assert_eq!(&ram[0x10_0000..0x10_0040], &[0xAA; 0x40]);
        assert!(ram[0x10_0040..0x10_1800].iter().all(|byte| *byte == 0));
        assert_eq!(&ram[0x20_0000..0x20_0010], &[0xBB; 0x10]);
        // Modules start at the page after the highest loaded byte (0x200010).
        check_multiboot_info(&ram, memory, cmdline, &modules, 0x20_1000);
        // No page tables for Multiboot.
        assert!(ram[0x2000..0x8000].iter().all(|byte| *byte == 0));
    }
}

#[test]
fn multiboot_aout_kludge() {
    // File: the header at offset 0 (with address fields), then code.
    let load_addr = 0x10_0000u32;
    let code = [0x90u8; 28];
    let file_len = 32 + code.len() as u32;
    let header = multiboot_header(
        0x1_0003,
        Some([
            load_addr,                     // header_addr
            load_addr,                     // load_addr
            load_addr + file_len,          // load_end_addr
            load_addr + file_len + 0x2000, // bss_end_addr
            load_addr + 32,                // entry_addr
        ]),
    );
    let mut image = header.clone();
    image.extend_from_slice(&code);
    let memory = 2 * MIB;
    let plan = plan_multiboot(&image, memory, "", &[]).unwrap();
    assert_eq!(plan.entry, multiboot_entry(0x10_0020));
    let ram = apply(&plan, memory);
    assert_eq!(&ram[0x10_0000..0x10_0000 + image.len()], image.as_slice());
    let segment = &plan.placements[2];
    assert_eq!(segment.size, u64::from(file_len) + 0x2000);
    check_multiboot_info(&ram, memory, "", &[], 0);

    // load_end_addr = 0 loads to the end of the file; bss_end_addr = 0 means no bss; the
    // header may sit after some bytes that are loaded too.
    let mut shifted = vec![0xCCu8; 16];
    shifted.extend_from_slice(&multiboot_header(
        0x1_0000,
        Some([load_addr + 16, load_addr, 0, 0, load_addr]),
    ));
    let plan = plan_multiboot(&shifted, memory, "", &[]).unwrap();
    assert_eq!(plan.placements[2].size, shifted.len() as u64);
    assert_eq!(plan.placements[2].data.as_ref(), shifted.as_slice());

    let bad = |fields: [u32; 5]| {
        let image = multiboot_header(0x1_0000, Some(fields));
        plan_multiboot(&image, memory, "", &[]).unwrap_err()
    };
    assert!(matches!(
        bad([load_addr, load_addr + 4, 0, 0, load_addr]),
        LoadError::BadAoutKludge(_)
    ));
    assert!(matches!(
        bad([load_addr + 4, load_addr, 0, 0, load_addr]),
        LoadError::BadAoutKludge(_)
    ));
    assert!(matches!(
        bad([load_addr, load_addr, load_addr + 64, 0, load_addr]),
        LoadError::BadAoutKludge(_)
    ));
    assert!(matches!(
        bad([
            load_addr,
            load_addr,
            load_addr + 32,
            load_addr + 16,
            load_addr
        ]),
        LoadError::BadAoutKludge(_)
    ));
    assert_eq!(
        bad([load_addr, load_addr, 0, 3 * MIB as u32, load_addr]),
        LoadError::SegmentOutsideRam {
            start: 0x10_0000,
            size: 2 * MIB,
            memory
        }
    );
    assert_eq!(
        bad([0x1000, 0x1000, 0, 0, 0x1000]),
        LoadError::SegmentOverlapsLowMemory {
            start: 0x1000,
            end: 0x1020
        }
    );
    assert_eq!(
        bad([load_addr, load_addr, 0, 0, load_addr + 32]),
        LoadError::EntryNotLoaded {
            entry: u64::from(load_addr) + 32
        }
    );
    // Header fields cut off by the end of the file.
    let cut = multiboot_header(0x1_0000, None);
    assert!(matches!(
        plan_multiboot(&cut, memory, "", &[]),
        Err(LoadError::BadAoutKludge(_))
    ));
}

#[test]
fn multiboot_header_search() {
    let memory = 4 * MIB;
    let no_header = elf(false, 0x10_0000, &[load(0x10_0000, &[1; 16], 16)], &[]);
    assert_eq!(
        plan_multiboot(&no_header, memory, "", &[]),
        Err(LoadError::NoMultibootHeader)
    );
    // A header past the first 8 KiB is not found.
    let mut late = vec![0u8; 8192];
    late.extend_from_slice(&multiboot_header(0, None));
    assert_eq!(
        plan_multiboot(&late, memory, "", &[]),
        Err(LoadError::NoMultibootHeader)
    );
    // Nor one that is not 4-byte aligned.
    let mut unaligned = vec![0u8; 2];
    unaligned.extend_from_slice(&multiboot_header(0, None));
    assert_eq!(
        plan_multiboot(&unaligned, memory, "", &[]),
        Err(LoadError::NoMultibootHeader)
    );
    let mut bad_checksum = multiboot_header(0x3, None);
    bad_checksum[8] ^= 1;
    let image = elf(
        false,
        0x10_0000,
        &[load(0x10_0000, &[1; 16], 16)],
        &bad_checksum,
    );
    let error = plan_multiboot(&image, memory, "", &[]).unwrap_err();
    assert!(matches!(error, LoadError::BadMultibootChecksum { .. }));
    assert!(alloc::format!("{error}").contains("checksum"));
    // Required-feature bits this loader does not know (here bit 3).
    let image = elf(
        false,
        0x10_0000,
        &[load(0x10_0000, &[1; 16], 16)],
        &multiboot_header(0x8, None),
    );
    assert_eq!(
        plan_multiboot(&image, memory, "", &[]),
        Err(LoadError::UnsupportedMultibootFlags { flags: 0x8 })
    );
    // Video mode (bit 2) is ignored, not refused.
    let image = elf(
        false,
        0x10_0000,
        &[load(0x10_0000, &[1; 16], 16)],
        &multiboot_header(0x7, None),
    );
    assert!(plan_multiboot(&image, memory, "", &[]).is_ok());
    // A header but no ELF and no address fields.
    let mut not_elf = multiboot_header(0, None);
    not_elf.extend_from_slice(&[0; 64]);
    assert_eq!(
        plan_multiboot(&not_elf, memory, "", &[]),
        Err(LoadError::NotElf)
    );
}

#[test]
fn multiboot_segment_refusals() {
    let memory = 4 * MIB;
    let header = multiboot_header(0x3, None);
    let plan_with = |entry: u64, segments: &[ElfSegment]| {
        let image = elf(false, entry, segments, &header);
        plan_multiboot(&image, memory, "", &[]).map(|plan| plan.entry)
    };
    assert_eq!(
        plan_with(0x30_0000, &[load(0x30_0000, &[1; 16], 2 * MIB)]),
        Err(LoadError::SegmentOutsideRam {
            start: 0x30_0000,
            size: 2 * MIB,
            memory
        })
    );
    assert_eq!(
        plan_with(0x9000, &[load(0x9000, &[1; 16], 16)]),
        Err(LoadError::SegmentOverlapsLowMemory {
            start: 0x9000,
            end: 0x9010
        })
    );
    assert_eq!(
        plan_with(
            0x10_0000,
            &[
                load(0x10_0000, &[1; 16], 0x2000),
                load(0x10_1000, &[2; 16], 16)
            ]
        ),
        Err(LoadError::SegmentsOverlap {
            first: 0x10_0000,
            second: 0x10_1000
        })
    );
    assert_eq!(
        plan_with(0x50_0000, &[load(0x10_0000, &[1; 16], 16)]),
        Err(LoadError::EntryNotLoaded { entry: 0x50_0000 })
    );
    assert_eq!(
        plan_with(0x10_0000, &[]),
        Err(LoadError::NoLoadableSegments)
    );
    assert_eq!(
        plan_with(0x10_0000, &[load(0x10_0000, &[1; 16], 8)]),
        Err(LoadError::MalformedElf(
            "a segment's file size is larger than its memory size"
        ))
    );
    // An ELF64 segment near the top of the address space does not overflow.
    let image = elf(
        true,
        0x10_0000,
        &[load(u64::MAX - 4, &[1; 16], 16)],
        &header,
    );
    assert!(matches!(
        plan_multiboot(&image, memory, "", &[]),
        Err(LoadError::SegmentOutsideRam { .. })
    ));
    // Wrong machine, wrong type, big-endian.
    let mut wrong_machine = sample_elf(false);
    wrong_machine[18] = 62;
    assert!(matches!(
        plan_multiboot(&wrong_machine, memory, "", &[]),
        Err(LoadError::UnsupportedElf(_))
    ));
    let mut shared_object = sample_elf(true);
    shared_object[16] = 3;
    assert!(matches!(
        plan_multiboot(&shared_object, memory, "", &[]),
        Err(LoadError::UnsupportedElf(_))
    ));
    let mut big_endian = sample_elf(true);
    big_endian[5] = 2;
    assert_eq!(
        plan_multiboot(&big_endian, memory, "", &[]),
        Err(LoadError::UnsupportedElf("not little-endian"))
    );
}

#[test]
fn multiboot_module_refusals() {
    let image = sample_elf(false);
    // Modules that run past memory: the image plus modules does not fit.
    let big = vec![0u8; 2 * MIB as usize];
    let modules = [Module {
        name: "big",
        bytes: &big,
    }];
    assert_eq!(
        plan_multiboot(&image, 4 * MIB, "", &modules),
        Err(LoadError::ImageTooLarge {
            needed_end: 0x20_1000 + 2 * MIB,
            memory: 4 * MIB
        })
    );
    assert!(plan_multiboot(&image, 5 * MIB, "", &modules).is_ok());
    let many: Vec<Module<'_>> = (0..65)
        .map(|_| Module {
            name: "m",
            bytes: &[],
        })
        .collect();
    assert_eq!(
        plan_multiboot(&image, 4 * MIB, "", &many),
        Err(LoadError::TooManyModules {
            count: 65,
            maximum: 64
        })
    );
    assert!(plan_multiboot(&image, 4 * MIB, "", &many[..64]).is_ok());
    // A full command line and 64 named modules do not fit the info page.
    let cmdline = "c".repeat(3072);
    let error = plan_multiboot(&image, 4 * MIB, &cmdline, &many[..64]).unwrap_err();
    assert!(matches!(error, LoadError::BootInfoTooLarge { .. }));
    assert!(plan_multiboot(&image, 4 * MIB, &cmdline, &many[..10]).is_ok());
    assert_eq!(
        plan_multiboot(&image, 4 * MIB, "a\0b", &[]),
        Err(LoadError::CommandLineHasNul)
    );
}

#[test]
fn plan_dispatches_on_format() {
    let flat = [0x90u8; 8];
    let mut vm = VmManifest {
        name: "guest",
        format: GuestFormat::Flat64,
        memory_bytes: 2 * MIB,
        cmdline: "x",
        cpus: 1,
        pin: &[],
        time_limit_seconds: None,
        paging: Paging::Nested,
        trace: false,
        kernel: &flat,
        modules: Vec::new(),
        initrd: None,
        disks: Vec::new(),
        nic: None,
    };
    assert_eq!(plan(&vm).unwrap().entry.mode, CpuMode::Long64);
    vm.modules.push(Module {
        name: "m",
        bytes: b"m",
    });
    assert_eq!(
        plan(&vm),
        Err(LoadError::ModulesNotSupported {
            format: GuestFormat::Flat64
        })
    );
    let image = sample_elf(true);
    vm.format = GuestFormat::Multiboot;
    vm.kernel = &image;
    vm.memory_bytes = 4 * MIB;
    let plan = plan(&vm).unwrap();
    assert_eq!(plan.entry.mode, CpuMode::Protected32);
    let ram = apply(&plan, 4 * MIB);
    check_multiboot_info(&ram, 4 * MIB, "x", &vm.modules, 0x20_1000);
}

#[test]
fn errors_display() {
    let message = alloc::format!(
        "{}",
        LoadError::SegmentOutsideRam {
            start: 0x30_0000,
            size: 0x1000,
            memory: 0x20_0000
        }
    );
    assert_eq!(
        message,
        "a segment at 0x300000 of 0x1000 bytes reaches past the VM's memory (0x200000 bytes)"
    );
}

#[test]
fn truncated_and_garbage_images_never_panic() {
    let load_addr = 0x10_0000u32;
    let mut aout = multiboot_header(
        0x1_0003,
        Some([load_addr, load_addr, 0, load_addr + 0x100, load_addr + 32]),
    );
    aout.extend_from_slice(&[0x90; 32]);
    let images = [sample_elf(false), sample_elf(true), aout];
    let modules = [Module {
        name: "m",
        bytes: b"module",
    }];
    for image in &images {
        assert!(plan_multiboot(image, 4 * MIB, "x", &modules).is_ok());
        for length in 0..image.len() {
            let _ = plan_multiboot(&image[..length], 4 * MIB, "x", &modules);
            let _ = plan_flat64(&image[..length], 2 * MIB, "x");
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let mut bytes = image.clone();
            for _ in 0..(next() % 3 + 1) {
                let position = (next() % bytes.len() as u64) as usize;
                bytes[position] = next() as u8;
            }
            if let Ok(plan) = plan_multiboot(&bytes, 4 * MIB, "x", &modules) {
                apply(&plan, 4 * MIB);
            }
        }
        // Every byte of the headers set to a few interesting values.
        for position in 0..image.len().min(256) {
            for value in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
                let mut bytes = image.clone();
                bytes[position] = value;
                if let Ok(plan) = plan_multiboot(&bytes, 4 * MIB, "x", &modules) {
                    apply(&plan, 4 * MIB);
                }
            }
        }
    }
}
