//! All of the xsave guest's inline assembly: its IDT with #UD and #GP handlers that record the
//! fault and skip the 3-byte XSETBV/XGETBV that raised it, XSETBV/XGETBV, the CR0/CR4 set-up
//! for AVX, and YMM0-15 loads and stores. The guest is built soft-float, so the compiler never
//! touches the XMM/YMM registers: what `load_ymm` puts there stays until `store_ymm` looks,
//! unless something outside the guest changes it.

use core::sync::atomic::{AtomicU64, Ordering};
use guest_lib::hw::DescriptorTablePointer;

/// No fault recorded.
const NONE: u64 = u64::MAX;
/// The vector and error code of the last fault the handlers took (`NONE`: none since reset).
static FAULT_VECTOR: AtomicU64 = AtomicU64::new(NONE);
static FAULT_ERROR: AtomicU64 = AtomicU64::new(0);

// The handlers: the CPU pushed SS, RSP, RFLAGS, CS, RIP (and for #GP an error code); #UD pushes
// a zero in its place. Both push their vector, record vector and error code, step RIP over
// the 3-byte XSETBV/XGETBV (0F 01 D1 / 0F 01 D0) that faulted, and return.
core::arch::global_asm!(
    ".pushsection .text.xsave_guest_faults, \"ax\"",
    ".global xsave_guest_ud_handler",
    "xsave_guest_ud_handler:",
    "    push 0",
    "    push 6",
    "    jmp 2f",
    ".global xsave_guest_gp_handler",
    "xsave_guest_gp_handler:",
    "    push 13",
    "2:",
    "    push rax",
    "    mov rax, [rsp + 8]",
    "    mov [rip + {vector}], rax",
    "    mov rax, [rsp + 16]",
    "    mov [rip + {error}], rax",
    "    add qword ptr [rsp + 24], 3",
    "    pop rax",
    "    add rsp, 16",
    "    iretq",
    ".popsection",
    vector = sym FAULT_VECTOR,
    error = sym FAULT_ERROR,
);

extern "C" {
    fn xsave_guest_ud_handler();
    fn xsave_guest_gp_handler();
}

/// Vectors 0-31; only #UD and #GP have gates (anything else triple-faults: the VM fails).
type Idt = [[u64; 2]; 32];

/// The IDT lives here for the guest's whole life.
static mut IDT: Idt = [[0; 2]; 32];

/// A 64-bit interrupt gate (type 0xE, present, DPL 0) to `handler` through code selector
/// `selector`. See: SDM Vol 3A 6.14.1, Figure 6-8.
fn gate(handler: u64, selector: u16) -> [u64; 2] {
    let low = (handler & 0xFFFF)
        | (u64::from(selector) << 16)
        | (0x8E << 40)
        | ((handler >> 16) & 0xFFFF) << 48;
    [low, handler >> 32]
}

/// Builds and loads the IDT.
pub fn install_idt() {
    let selector: u16;
    // SAFETY: reading CS has no side effect.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) selector, options(nomem, nostack)) };
    let idt = core::ptr::addr_of_mut!(IDT);
    // SAFETY: the guest is single-threaded and this runs once, before any fault can read the
    // table; nothing else references IDT.
    unsafe {
        (*idt)[6] = gate(
            xsave_guest_ud_handler as *const () as usize as u64,
            selector,
        );
        (*idt)[13] = gate(
            xsave_guest_gp_handler as *const () as usize as u64,
            selector,
        );
    }
    let pointer = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the operand describes the static IDT above, whose gates point at the handlers.
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack)) };
}

/// XSETBV(ECX = `index`, EDX:EAX = `value`): the (vector, error code) of the fault it raised,
/// or `None` when it completed.
pub fn xsetbv(index: u32, value: u64) -> Option<(u64, u64)> {
    FAULT_VECTOR.store(NONE, Ordering::SeqCst);
    // SAFETY: XSETBV either completes (the guest's XCR0 changes: no state of ours depends on
    // it) or faults into a handler above that skips it; the asm block is that one 3-byte
    // instruction, so the skip lands right after it.
    unsafe {
        core::arch::asm!(
            "xsetbv",
            in("ecx") index,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack)
        )
    };
    match FAULT_VECTOR.load(Ordering::SeqCst) {
        NONE => None,
        vector => Some((vector, FAULT_ERROR.load(Ordering::SeqCst))),
    }
}

/// XGETBV(0): XCR0 (call only with CR4.OSXSAVE set; otherwise the #UD handler skips it and this
/// reads 0).
pub fn xgetbv() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: XGETBV only reads XCR0; if it faults the handler skips it (outputs then 0).
    unsafe {
        core::arch::asm!(
            "xor eax, eax",
            "xor edx, edx",
            "xgetbv",
            in("ecx") 0u32,
            out("eax") low,
            out("edx") high,
            options(nostack)
        )
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// CR0: MP set, EM and TS clear (no #UD/#NM for SSE/AVX); CR4: OSFXSR, OSXMMEXCPT, OSXSAVE.
/// See: SDM Vol 1 13.3, 14.3 (detecting AVX: OSXSAVE, XCR0[2:1] = 11b).
pub fn enable_extended_state() {
    // SAFETY: only the x87/SSE control bits and OSXSAVE change; paging and protection stay.
    unsafe {
        core::arch::asm!(
            "mov rax, cr0",
            "and rax, ~0xC",
            "or rax, 0x2",
            "mov cr0, rax",
            "mov rax, cr4",
            "or rax, 0x40600",
            "mov cr4, rax",
            out("rax") _,
            options(nostack)
        )
    };
}

/// YMM0-15 from `values` (32 bytes each).
pub fn load_ymm(values: &[[u64; 4]; 16]) {
    // SAFETY: reads 512 bytes from `values`; needs CR4.OSXSAVE and XCR0[2:1] = 11b (else #UD,
    // which would triple-fault: the VM fails visibly). The compiler uses no YMM register.
    unsafe {
        core::arch::asm!(
            "vmovdqu ymm0, [{0}]",
            "vmovdqu ymm1, [{0} + 32]",
            "vmovdqu ymm2, [{0} + 64]",
            "vmovdqu ymm3, [{0} + 96]",
            "vmovdqu ymm4, [{0} + 128]",
            "vmovdqu ymm5, [{0} + 160]",
            "vmovdqu ymm6, [{0} + 192]",
            "vmovdqu ymm7, [{0} + 224]",
            "vmovdqu ymm8, [{0} + 256]",
            "vmovdqu ymm9, [{0} + 288]",
            "vmovdqu ymm10, [{0} + 320]",
            "vmovdqu ymm11, [{0} + 352]",
            "vmovdqu ymm12, [{0} + 384]",
            "vmovdqu ymm13, [{0} + 416]",
            "vmovdqu ymm14, [{0} + 448]",
            "vmovdqu ymm15, [{0} + 480]",
            in(reg) values.as_ptr(),
            options(readonly, nostack)
        )
    };
}

/// YMM0-15 into `values`.
pub fn store_ymm(values: &mut [[u64; 4]; 16]) {
    // SAFETY: writes 512 bytes into `values`; as `load_ymm`.
    unsafe {
        core::arch::asm!(
            "vmovdqu [{0}], ymm0",
            "vmovdqu [{0} + 32], ymm1",
            "vmovdqu [{0} + 64], ymm2",
            "vmovdqu [{0} + 96], ymm3",
            "vmovdqu [{0} + 128], ymm4",
            "vmovdqu [{0} + 160], ymm5",
            "vmovdqu [{0} + 192], ymm6",
            "vmovdqu [{0} + 224], ymm7",
            "vmovdqu [{0} + 256], ymm8",
            "vmovdqu [{0} + 288], ymm9",
            "vmovdqu [{0} + 320], ymm10",
            "vmovdqu [{0} + 352], ymm11",
            "vmovdqu [{0} + 384], ymm12",
            "vmovdqu [{0} + 416], ymm13",
            "vmovdqu [{0} + 448], ymm14",
            "vmovdqu [{0} + 480], ymm15",
            in(reg) values.as_mut_ptr(),
            options(nostack)
        )
    };
}
