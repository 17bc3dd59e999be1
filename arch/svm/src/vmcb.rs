//! The Virtual Machine Control Block: a 4 KiB page, control area at 0x000, state save area at
//! 0x400. See: APM Vol 2 Appendix B, Tables B-1 (control area) and B-2 (state save area).
//! Every field the hypervisor touches is named; the rest is reserved padding. The offsets are
//! asserted at compile time below, so a typo here fails the build.

use core::mem::{offset_of, size_of};

/// A segment register as the VMCB stores it. See: APM Vol 2 Table B-2 ("segment" fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    /// Descriptor bits 40-47 in 7:0 (type, S, DPL, P) and 52-55 in 11:8 (AVL, L, D/B, G).
    pub attributes: u16,
    pub limit: u32,
    pub base: u64,
}

/// Segment attribute bit: L (64-bit code).
pub const ATTRIBUTE_LONG: u16 = 1 << 9;
/// Segment attribute bit: D/B (32-bit default size).
pub const ATTRIBUTE_DEFAULT_32: u16 = 1 << 10;

/// VMCB control area. See: APM Vol 2 Table B-1.
#[repr(C)]
pub struct ControlArea {
    /// 0x000: intercept reads (15:0) / writes (31:16) of CR0-15.
    pub intercept_cr: u32,
    /// 0x004: intercept reads / writes of DR0-15.
    pub intercept_dr: u32,
    /// 0x008: intercept exception vectors 0-31.
    pub intercept_exceptions: u32,
    /// 0x00C: INTR, NMI, ..., CPUID (18), HLT (24), IOIO_PROT (27), MSR_PROT (28), SHUTDOWN (31).
    pub intercept_misc1: u32,
    /// 0x010: VMRUN (0), VMMCALL (1), VMLOAD (2), VMSAVE (3), STGI (4), CLGI (5), SKINIT (6), ...
    pub intercept_misc2: u32,
    /// 0x014: INVLPGB and later instructions.
    pub intercept_misc3: u32,
    _reserved_018: [u8; 0x03C - 0x018],
    /// 0x03C.
    pub pause_filter_threshold: u16,
    /// 0x03E.
    pub pause_filter_count: u16,
    /// 0x040: physical base of the I/O permission map (12 KiB).
    pub iopm_base_physical: u64,
    /// 0x048: physical base of the MSR permission map (8 KiB).
    pub msrpm_base_physical: u64,
    /// 0x050.
    pub tsc_offset: u64,
    /// 0x058: the guest's ASID (never 0: that is the host's).
    pub guest_asid: u32,
    /// 0x05C: TLB_CONTROL (1 = flush the whole TLB at VMRUN).
    pub tlb_control: u8,
    _reserved_05d: [u8; 3],
    /// 0x060: V_TPR, V_IRQ, V_GIF, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING (bit 24), ...
    pub virtual_interrupt_control: u64,
    /// 0x068: interrupt shadow (bit 0).
    pub interrupt_shadow: u64,
    /// 0x070: EXITCODE.
    pub exit_code: u64,
    /// 0x078: EXITINFO1.
    pub exit_info1: u64,
    /// 0x080: EXITINFO2.
    pub exit_info2: u64,
    /// 0x088: EXITINTINFO (an event whose delivery the exit interrupted).
    pub exit_interrupt_info: u64,
    /// 0x090: NP_ENABLE (bit 0), SEV, ...
    pub nested_paging_control: u64,
    /// 0x098.
    pub avic_apic_bar: u64,
    /// 0x0A0.
    pub ghcb_physical: u64,
    /// 0x0A8: EVENTINJ.
    pub event_injection: u64,
    /// 0x0B0: N_CR3, the nested page tables' root.
    pub nested_cr3: u64,
    /// 0x0B8.
    pub lbr_virtualization: u64,
    /// 0x0C0: VMCB clean bits (0 = reload everything).
    pub clean_bits: u32,
    _reserved_0c4: u32,
    /// 0x0C8: nRIP, the next instruction's RIP (when NRIP save is supported).
    pub next_rip: u64,
    /// 0x0D0: number of guest instruction bytes fetched (decode assists).
    pub guest_bytes_fetched: u8,
    /// 0x0D1.
    pub guest_instruction_bytes: [u8; 15],
    _reserved_0e0: [u8; 0x400 - 0x0E0],
}

/// VMCB state save area. See: APM Vol 2 Table B-2 (offsets relative to 0x400).
#[repr(C)]
pub struct StateSaveArea {
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: Segment,
    pub ldtr: Segment,
    pub idtr: Segment,
    pub tr: Segment,
    _reserved_0a0: [u8; 0x0CB - 0x0A0],
    /// 0x0CB.
    pub cpl: u8,
    _reserved_0cc: u32,
    /// 0x0D0.
    pub efer: u64,
    _reserved_0d8: [u8; 0x148 - 0x0D8],
    /// 0x148.
    pub cr4: u64,
    /// 0x150.
    pub cr3: u64,
    /// 0x158.
    pub cr0: u64,
    /// 0x160.
    pub dr7: u64,
    /// 0x168.
    pub dr6: u64,
    /// 0x170.
    pub rflags: u64,
    /// 0x178.
    pub rip: u64,
    _reserved_180: [u8; 0x1D8 - 0x180],
    /// 0x1D8.
    pub rsp: u64,
    _reserved_1e0: [u8; 0x1F8 - 0x1E0],
    /// 0x1F8.
    pub rax: u64,
    /// 0x200.
    pub star: u64,
    /// 0x208.
    pub lstar: u64,
    /// 0x210.
    pub cstar: u64,
    /// 0x218.
    pub sfmask: u64,
    /// 0x220.
    pub kernel_gs_base: u64,
    /// 0x228.
    pub sysenter_cs: u64,
    /// 0x230.
    pub sysenter_esp: u64,
    /// 0x238.
    pub sysenter_eip: u64,
    /// 0x240.
    pub cr2: u64,
    _reserved_248: [u8; 0x268 - 0x248],
    /// 0x268: the guest's PAT when nested paging is on.
    pub guest_pat: u64,
    _reserved_270: [u8; 0xC00 - 0x270],
}

/// One VMCB page.
#[repr(C, align(4096))]
pub struct Vmcb {
    pub control: ControlArea,
    pub save: StateSaveArea,
}

impl Vmcb {
    /// A VMCB of zeros on the heap: host tests build guest states in one.
    #[cfg(test)]
    pub fn zeroed() -> std::boxed::Box<Vmcb> {
        let layout = std::alloc::Layout::new::<Vmcb>();
        // SAFETY: the layout is Vmcb's own (4 KiB, page-aligned); every field of Vmcb is an
        // integer or an array of integers, for which all zeros is a valid value.
        unsafe {
            let pointer = std::alloc::alloc_zeroed(layout).cast::<Vmcb>();
            if pointer.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            std::boxed::Box::from_raw(pointer)
        }
    }
}

// The layout, checked against APM Vol 2 Appendix B.
const _: () = assert!(size_of::<Segment>() == 16);
const _: () = assert!(offset_of!(ControlArea, intercept_misc1) == 0x00C);
const _: () = assert!(offset_of!(ControlArea, intercept_misc2) == 0x010);
const _: () = assert!(offset_of!(ControlArea, pause_filter_threshold) == 0x03C);
const _: () = assert!(offset_of!(ControlArea, iopm_base_physical) == 0x040);
const _: () = assert!(offset_of!(ControlArea, msrpm_base_physical) == 0x048);
const _: () = assert!(offset_of!(ControlArea, guest_asid) == 0x058);
const _: () = assert!(offset_of!(ControlArea, tlb_control) == 0x05C);
const _: () = assert!(offset_of!(ControlArea, virtual_interrupt_control) == 0x060);
const _: () = assert!(offset_of!(ControlArea, exit_code) == 0x070);
const _: () = assert!(offset_of!(ControlArea, exit_info1) == 0x078);
const _: () = assert!(offset_of!(ControlArea, exit_info2) == 0x080);
const _: () = assert!(offset_of!(ControlArea, exit_interrupt_info) == 0x088);
const _: () = assert!(offset_of!(ControlArea, nested_paging_control) == 0x090);
const _: () = assert!(offset_of!(ControlArea, event_injection) == 0x0A8);
const _: () = assert!(offset_of!(ControlArea, nested_cr3) == 0x0B0);
const _: () = assert!(offset_of!(ControlArea, clean_bits) == 0x0C0);
const _: () = assert!(offset_of!(ControlArea, next_rip) == 0x0C8);
const _: () = assert!(offset_of!(ControlArea, guest_instruction_bytes) == 0x0D1);
const _: () = assert!(size_of::<ControlArea>() == 0x400);
const _: () = assert!(offset_of!(StateSaveArea, cs) == 0x010);
const _: () = assert!(offset_of!(StateSaveArea, gdtr) == 0x060);
const _: () = assert!(offset_of!(StateSaveArea, idtr) == 0x080);
const _: () = assert!(offset_of!(StateSaveArea, tr) == 0x090);
const _: () = assert!(offset_of!(StateSaveArea, cpl) == 0x0CB);
const _: () = assert!(offset_of!(StateSaveArea, efer) == 0x0D0);
const _: () = assert!(offset_of!(StateSaveArea, cr4) == 0x148);
const _: () = assert!(offset_of!(StateSaveArea, cr3) == 0x150);
const _: () = assert!(offset_of!(StateSaveArea, cr0) == 0x158);
const _: () = assert!(offset_of!(StateSaveArea, rflags) == 0x170);
const _: () = assert!(offset_of!(StateSaveArea, rip) == 0x178);
const _: () = assert!(offset_of!(StateSaveArea, rsp) == 0x1D8);
const _: () = assert!(offset_of!(StateSaveArea, rax) == 0x1F8);
const _: () = assert!(offset_of!(StateSaveArea, star) == 0x200);
const _: () = assert!(offset_of!(StateSaveArea, kernel_gs_base) == 0x220);
const _: () = assert!(offset_of!(StateSaveArea, cr2) == 0x240);
const _: () = assert!(offset_of!(StateSaveArea, guest_pat) == 0x268);
const _: () = assert!(offset_of!(Vmcb, save) == 0x400);
const _: () = assert!(size_of::<Vmcb>() == 4096);
