//! A guest's extended processor state (x87, SSE, AVX, AVX-512 registers) and its XCR0, kept
//! apart from every other guest's: loaded into the CPU when its vCPU is activated, saved when
//! it is deactivated. VMRUN/#VMEXIT and VM entry/exit switch neither the registers nor XCR0,
//! so each backend does it with this type around the world switch. Both backends share it.
//!
//! With XSAVE (CR4.OSXSAVE on this CPU) the state lives in a standard-form XSAVE area sized for
//! every component the guest may enable; without it, in an FXSAVE image (x87/SSE only, and the
//! guest is shown no XSAVE).
//!
//! XCR0 while the guest runs is the guest's; whenever the hypervisor itself may XSAVE or XRSTOR
//! it is `HOST_XCR0` (x87|SSE: the hypervisor is built soft-float and uses no extended state,
//! so nothing between the world switch and `deactivate` depends on XCR0). Saving and restoring
//! always covers x87 and SSE, even for a guest whose XCR0 is 1 (the XMM registers are usable
//! through CR4.OSFXSR whatever XCR0 says), so XCR0 is briefly `guest | x87 | SSE` around each
//! XSAVE/XRSTOR. See: SDM Vol 1 13.3 (XCR0), 13.7 (XSAVE), 13.8 (XRSTOR), 13.4.2 (the header).

extern crate alloc;

use crate::hw::{self, FpuState};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// x87 and SSE: always saved and restored.
const X87_SSE: u64 = 0b11;
/// The hypervisor's own XCR0 (set on every CPU at bring-up with CR4.OSXSAVE).
pub const HOST_XCR0: u64 = X87_SSE;
/// XCR0 after reset: x87 only. See: SDM Vol 3A 9.1.1 Table 9-1.
const RESET_XCR0: u64 = 1;
/// Byte offset of XSTATE_BV (the XSAVE header's first word) in the area.
const XSTATE_BV: usize = 512;
/// The legacy region and the header: the smallest area.
const MINIMUM_AREA: usize = 512 + 64;

/// 64 bytes, 64-byte aligned: a `Vec` of these is an XSAVE area with the alignment XSAVE
/// requires (#GP otherwise). See: SDM Vol 1 13.4.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Block([u8; 64]);

enum Storage {
    /// No XSAVE on this CPU: FXSAVE/FXRSTOR of x87/SSE.
    Fxsave(Box<FpuState>),
    /// The standard-form XSAVE area, and the XCR0 bits the guest may enable (the area holds
    /// exactly those; XSAVE/XRSTOR never touch more: their instruction mask is `allowed`).
    Xsave { area: Vec<Block>, allowed: u64 },
}

/// One vCPU's extended state and XCR0.
pub struct GuestExtendedState {
    storage: Storage,
    /// The guest's XCR0 (what its XGETBV reads).
    xcr0: u64,
    /// Whether the CPU holds this guest's registers and XCR0 (from `activate` to `deactivate`).
    loaded: bool,
}

impl GuestExtendedState {
    /// The state of a new vCPU (x87 and SSE registers as after FNINIT with MXCSR 0x1F80, the rest
    /// initial, XCR0 = 1). `xsave`: the XCR0 bits the guest may enable and the XSAVE area's size
    /// for them, or `None` to switch x87/SSE with FXSAVE. XSAVE is also left unused when this
    /// CPU's CR4.OSXSAVE is clear.
    pub fn new(xsave: Option<(u64, u32)>) -> GuestExtendedState {
        let storage = match xsave {
            Some((allowed, size)) if hw::osxsave_enabled() => {
                let blocks = (size as usize).max(MINIMUM_AREA).div_ceil(64);
                let mut area = alloc::vec![Block([0; 64]); blocks];
                // FCW 0x037F (bytes 0-1) and MXCSR 0x1F80 (bytes 24-27): XRSTOR loads MXCSR
                // from the area whenever SSE or AVX is restored, even with XSTATE_BV clear;
                // XSTATE_BV = 0 puts every component in its initial configuration.
                // See: SDM Vol 1 13.8.1.
                let initial = FpuState::initial();
                area[0].0[..32].copy_from_slice(&initial.0[..32]);
                Storage::Xsave {
                    area,
                    allowed: allowed | X87_SSE,
                }
            }
            // FpuState::default() is FpuState::initial().
            _ => Storage::Fxsave(Box::default()),
        };
        GuestExtendedState {
            storage,
            xcr0: RESET_XCR0,
            loaded: false,
        }
    }

    /// Whether the state is switched with XSAVE (else FXSAVE).
    pub fn uses_xsave(&self) -> bool {
        matches!(self.storage, Storage::Xsave { .. })
    }

    /// The guest's XCR0. While loaded that is the real XCR0: the same value on hardware that
    /// intercepts XSETBV, the guest's own where it does not (QEMU 7.2 TCG ignored SVM's XSETBV
    /// intercept: the CPU checked and loaded the value itself; QEMU 10 takes it).
    pub fn xcr0(&self) -> u64 {
        match (&self.storage, self.loaded) {
            (Storage::Xsave { .. }, true) => hw::xcr0().unwrap_or(self.xcr0),
            _ => self.xcr0,
        }
    }

    /// The guest's registers and XCR0 into the CPU (no-op when already there).
    pub fn activate(&mut self) {
        if self.loaded {
            return;
        }
        match &mut self.storage {
            // SAFETY: the image is FpuState::initial or came from FXSAVE in `deactivate`.
            Storage::Fxsave(image) => unsafe { hw::fxrstor(image) },
            Storage::Xsave { area, allowed } => {
                let (switch, mask) = (self.xcr0 | X87_SSE, *allowed);
                // Step 1: XCR0 covering what is restored.
                if hw::xcr0() != Some(switch) {
                    // SAFETY: OSXSAVE is on (an Xsave area exists only then); `switch` is the
                    // guest's XCR0, checked by the core against what this CPU supports (or by
                    // the CPU itself when it let the guest load it), plus x87|SSE, which every
                    // XSAVE CPU supports.
                    unsafe { hw::set_xcr0(switch) };
                }
                // Step 2: XSTATE_BV may name components the guest has since disabled (XSAVE
                // leaves the bits outside its mask alone): XRSTOR would #GP on a bit not in
                // XCR0, so drop them (their state is the guest's own and it turned them off).
                let mut header = [0u8; 8];
                header.copy_from_slice(&area[XSTATE_BV / 64].0[..8]);
                let xstate_bv = u64::from_le_bytes(header) & switch;
                area[XSTATE_BV / 64].0[..8].copy_from_slice(&xstate_bv.to_le_bytes());
                // SAFETY: OSXSAVE is on; the area is 64-byte aligned (Block) and sized for every
                // component the guest may enable (`new`), and `mask` keeps XRSTOR to those; it
                // was initialized in
                // `new` or written by XSAVE, XCOMP_BV and the reserved header bytes stay zero,
                // and XSTATE_BV is now within XCR0.
                unsafe { hw::xrstor(area.as_ptr().cast(), mask) };
                // Step 3: the guest's own XCR0 for the guest to run with.
                if self.xcr0 != switch {
                    // SAFETY: as in step 1; dropping SSE from XCR0 leaves the XMM registers
                    // intact (they do not depend on XCR0).
                    unsafe { hw::set_xcr0(self.xcr0) };
                }
            }
        }
        self.loaded = true;
    }

    /// The guest's registers out of the CPU, and the host's XCR0 back (no-op when not loaded).
    pub fn deactivate(&mut self) {
        if !self.loaded {
            return;
        }
        match &mut self.storage {
            Storage::Fxsave(image) => hw::fxsave(image),
            Storage::Xsave { area, allowed } => {
                // The guest may have loaded XCR0 itself (no XSETBV intercept): take its value.
                self.xcr0 = hw::xcr0().unwrap_or(self.xcr0);
                let (switch, mask) = (self.xcr0 | X87_SSE, *allowed);
                if self.xcr0 != switch {
                    // SAFETY: OSXSAVE is on; `switch` only adds SSE to a valid XCR0.
                    unsafe { hw::set_xcr0(switch) };
                }
                // SAFETY: OSXSAVE is on; the area is 64-byte aligned and large enough for
                // every allowed component, and `mask` keeps XSAVE to those.
                unsafe { hw::xsave(area.as_mut_ptr().cast(), mask) };
                if switch != HOST_XCR0 {
                    // SAFETY: x87|SSE is valid on every XSAVE CPU; the guest's state of the
                    // components this disables was just saved.
                    unsafe { hw::set_xcr0(HOST_XCR0) };
                }
            }
        }
        self.loaded = false;
    }

    /// The guest's XSETBV, checked by the caller: XCR0 becomes `value`. While loaded, the state
    /// is saved under the old XCR0 and restored under the new one, so components the guest
    /// enables anew start initial (never another guest's leftovers in the registers).
    pub fn set_xcr0(&mut self, value: u64) {
        if !self.uses_xsave() {
            return;
        }
        let loaded = self.loaded;
        self.deactivate();
        self.xcr0 = value;
        if loaded {
            self.activate();
        }
    }

    /// Overwrites the saved image with zeros (volatile writes the compiler keeps), so a guest's
    /// registers do not linger in the hypervisor's memory once its vCPU is gone.
    pub fn erase(&mut self) {
        match &mut self.storage {
            Storage::Fxsave(image) => image.erase(),
            Storage::Xsave { area, .. } => {
                for byte in area.iter_mut().flat_map(|block| block.0.iter_mut()) {
                    // SAFETY: `byte` is a valid, exclusive reference into the area.
                    unsafe { core::ptr::write_volatile(byte, 0) };
                }
            }
        }
    }
}
