//! xsave: the guest's AVX state is its own. Checks that CPUID shows XSAVE and AVX (with
//! OSXSAVE following its own CR4), that XSETBV and XGETBV behave as on hardware (#UD before
//! CR4.OSXSAVE, #GP for XCR0 = 5 and for ECX = 1, XCR0 = 7 accepted and read back), then fills
//! YMM0-15 with a pattern derived from `seed=` and checks, round after round with an exit
//! (CPUID) in between, that every register still holds it while another VM on the same host CPU
//! runs with its own pattern. Command line: `name=TEXT seed=0xHEX [gaps=N] [rounds=N]`.
//!
//! A round that takes far longer than the fastest one means the hypervisor ran something else
//! meanwhile (the other VM): the guest counts those "gaps" and goes on until it has seen `gaps`
//! of them (default 8) or run `rounds` rounds (default 50000).
//!
//! Lines (all start with `xsave: NAME`): `check NAME ok (...)` per check, `ymm pattern loaded
//! seed=0x..`, `FAILED ...` on a mismatch (exit status 1), and at the end
//! `xsave: NAME ok rounds=R gaps=G` (exit status 0).
#![no_std]
#![no_main]

mod cpu;

use guest_lib::boot_info::parameter;
use guest_lib::{exit, hw, println, BootInfo};

guest_lib::flat64_entry!(main);

/// CPUID.1:ECX bits.
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
/// Exception vectors.
const VECTOR_UD: u64 = 6;
const VECTOR_GP: u64 = 13;
/// A round this many times longer than the fastest one counts as a gap.
const GAP_FACTOR: u64 = 10;

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// SplitMix64: a different 64-bit word for every (seed, index).
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fail(name: &str, what: core::fmt::Arguments) -> ! {
    println!("xsave: {name} FAILED {what}");
    exit(1)
}

fn check(name: &str, label: &str, ok: bool, detail: core::fmt::Arguments) {
    if ok {
        println!("xsave: {name} check {label} ok ({detail})");
    } else {
        fail(name, format_args!("check {label}: {detail}"));
    }
}

fn main(boot_info: BootInfo) -> ! {
    let cmdline = core::str::from_utf8(boot_info.cmdline()).unwrap_or("");
    let name = parameter(cmdline, "name").unwrap_or("xsave");
    let Some(seed) = parameter(cmdline, "seed").and_then(parse_number) else {
        fail(
            name,
            format_args!("no seed=NUMBER on the command line '{cmdline}'"),
        );
    };
    let want_gaps = parameter(cmdline, "gaps")
        .and_then(parse_number)
        .unwrap_or(8);
    let max_rounds = parameter(cmdline, "rounds")
        .and_then(parse_number)
        .unwrap_or(50_000);
    cpu::install_idt();

    // 1. CPUID: XSAVE and AVX shown, OSXSAVE clear (our CR4.OSXSAVE is clear).
    let leaf1 = hw::cpuid(1, 0);
    check(
        name,
        "cpuid-xsave",
        leaf1.ecx & LEAF1_ECX_XSAVE != 0
            && leaf1.ecx & LEAF1_ECX_AVX != 0
            && leaf1.ecx & LEAF1_ECX_OSXSAVE == 0,
        format_args!("leaf 1 ecx={:#x}", leaf1.ecx),
    );
    let leaf_d = hw::cpuid(0xD, 0);
    check(
        name,
        "cpuid-xcr0-bits",
        leaf_d.eax & 0x7 == 0x7,
        format_args!("leaf 0xd eax={:#x} edx={:#x}", leaf_d.eax, leaf_d.edx),
    );

    // 2. XSETBV before CR4.OSXSAVE: #UD.
    let fault = cpu::xsetbv(0, 3);
    check(
        name,
        "xsetbv-without-osxsave-ud",
        fault == Some((VECTOR_UD, 0)),
        format_args!("fault {fault:?}"),
    );

    // 3. CR4.OSXSAVE (with OSFXSR/OSXMMEXCPT; CR0.EM and TS clear): CPUID now shows OSXSAVE;
    // XCR0 is at its reset value 1.
    cpu::enable_extended_state();
    let leaf1 = hw::cpuid(1, 0);
    check(
        name,
        "cpuid-osxsave",
        leaf1.ecx & LEAF1_ECX_OSXSAVE != 0,
        format_args!("leaf 1 ecx={:#x}", leaf1.ecx),
    );
    let xcr0 = cpu::xgetbv();
    check(
        name,
        "xcr0-reset",
        xcr0 == 1,
        format_args!("xgetbv={xcr0:#x}"),
    );

    // 4. Bad XSETBVs: AVX without SSE, ECX = 1: #GP(0), XCR0 unchanged.
    let fault = cpu::xsetbv(0, 5);
    check(
        name,
        "xsetbv-avx-without-sse-gp",
        fault == Some((VECTOR_GP, 0)) && cpu::xgetbv() == 1,
        format_args!("fault {fault:?} xgetbv={:#x}", cpu::xgetbv()),
    );
    let fault = cpu::xsetbv(1, 1);
    check(
        name,
        "xsetbv-ecx1-gp",
        fault == Some((VECTOR_GP, 0)),
        format_args!("fault {fault:?}"),
    );

    // 5. XCR0 = x87|SSE|AVX: accepted, read back; CPUID 0xD EBX grows to cover AVX's state.
    let fault = cpu::xsetbv(0, 7);
    let xcr0 = cpu::xgetbv();
    check(
        name,
        "xsetbv-7",
        fault.is_none() && xcr0 == 7,
        format_args!("fault {fault:?} xgetbv={xcr0:#x}"),
    );
    let avx = hw::cpuid(0xD, 2);
    let leaf_d = hw::cpuid(0xD, 0);
    check(
        name,
        "cpuid-xsave-size",
        leaf_d.ebx == avx.ebx + avx.eax && leaf_d.ebx <= leaf_d.ecx,
        format_args!(
            "size for XCR0 {} (AVX at {} size {}), all {}",
            leaf_d.ebx, avx.ebx, avx.eax, leaf_d.ecx
        ),
    );

    // 6. The pattern into YMM0-15, then rounds of (exit, check).
    let mut pattern = [[0u64; 4]; 16];
    for (register, lanes) in pattern.iter_mut().enumerate() {
        for (lane, word) in lanes.iter_mut().enumerate() {
            *word = mix(seed, (register * 4 + lane) as u64);
        }
    }
    cpu::load_ymm(&pattern);
    println!("xsave: {name} ymm pattern loaded seed={seed:#x}");
    let mut fastest = u64::MAX;
    let mut gaps = 0;
    let mut rounds = 0;
    while gaps < want_gaps && rounds < max_rounds {
        let start = hw::rdtsc();
        // An exit: the hypervisor runs, and at a slice's end it runs the other VM.
        let _ = hw::cpuid(0, 0);
        let mut seen = [[0u64; 4]; 16];
        cpu::store_ymm(&mut seen);
        let took = hw::rdtsc().wrapping_sub(start);
        rounds += 1;
        if seen != pattern {
            for register in 0..16 {
                for lane in 0..4 {
                    if seen[register][lane] != pattern[register][lane] {
                        fail(
                            name,
                            format_args!(
                                "ymm{register} qword {lane} = {:#x}, expected {:#x} (round {rounds}, {gaps} gaps so far)",
                                seen[register][lane], pattern[register][lane]
                            ),
                        );
                    }
                }
            }
        }
        if took > fastest.saturating_mul(GAP_FACTOR) {
            gaps += 1;
        }
        fastest = fastest.min(took);
    }
    let xcr0 = cpu::xgetbv();
    check(
        name,
        "xcr0-kept",
        xcr0 == 7,
        format_args!("xgetbv={xcr0:#x}"),
    );
    println!("xsave: {name} ok rounds={rounds} gaps={gaps}");
    exit(0)
}
