//! The virtual local APIC of one vCPU: its registers in both the xAPIC (MMIO at 0xFEE00000) and
//! the x2APIC (MSRs 0x800-0x8FF) views, interrupt acceptance and priority (IRR, ISR, TPR, PPR,
//! EOI), the inter-processor interrupts a guest sends through the ICR (INIT, SIPI, fixed, NMI),
//! the APIC timer (one-shot, periodic, TSC-deadline) and the IA32_APIC_BASE mode switches.
//!
//! Manual: Intel 64 and IA-32 Architectures Software Developer's Manual (SDM), Volume 3A,
//! chapter 11 "Advanced Programmable Interrupt Controller (APIC)" (order number 253668, the
//! edition where the APIC is chapter 11; older editions number the same sections 10.x).
//! Section and table numbers below refer to that chapter.
//!
//! Written here rather than taken from a crate: the `x2apic` / `x86_64` crates drive a real
//! APIC from the inside; nothing in no_std emulates one for a guest.
//!
//! # Contract with the hypervisor core
//! - One [`LocalApic`] per vCPU. The hypervisor routes guest accesses here: MMIO exits in the
//!   page at [`LocalApic::mmio_base`] to [`LocalApic::read_mmio`] / [`LocalApic::write_mmio`],
//!   RDMSR/WRMSR of 0x800-0x8FF, IA32_APIC_BASE (0x1B) and IA32_TSC_DEADLINE (0x6E0) to
//!   [`LocalApic::read_msr`] / [`LocalApic::write_msr`] (`None` / `false` means: inject #GP).
//! - Every access takes the current TSC and first advances the timer to it, so register reads
//!   (current count, IRR) are consistent with time. After any access, and whenever the vCPU is
//!   about to run, the hypervisor calls [`LocalApic::advance_timer`] and arms a wake-up for the
//!   TSC it returns, then injects [`LocalApic::pending_vector`] (if the guest can take it) and
//!   reports the injection with [`LocalApic::acknowledge`].
//! - Writes append [`ApicEvent`]s. For an [`ApicEvent::Ipi`] the hypervisor picks the targets
//!   (by APIC ID, by [`LocalApic::matches_logical`], or by shorthand) and calls, on each target:
//!   `accept(vector)` for fixed and lowest-priority (the hypervisor picks one target for the
//!   latter), [`LocalApic::receive_init`] for INIT, [`LocalApic::receive_startup`] for a SIPI,
//!   and injects an NMI itself for NMI. [`ApicEvent::EndOfInterrupt`] is for the I/O APIC
//!   (level-triggered vectors, which it put in with [`LocalApic::accept_level_triggered`]).
//! - The guest must be told, through CPUID, that x2APIC (CPUID.01H:ECX[21]) and TSC-deadline
//!   (CPUID.01H:ECX[24]) exist: this model always implements both. The APIC timer frequency is
//!   [`TimerClock::apic_timer_hz`]; the hypervisor reports it to the guest (Linux takes it from
//!   CPUID leaf 0x15 ECX, the core crystal clock, when that leaf is present).
//!
//! # Model decisions
//! - Delivery is instant: the ICR delivery-status bit (bit 12) and the LVT delivery-status bits
//!   always read 0.
//! - MMIO accesses are the 32-bit loads and stores the SDM requires (11.4.1: registers are 16-byte
//!   aligned, accessed 32 bits at a time). The hypervisor passes only 4-byte accesses; an offset
//!   that is not 16-byte aligned or is at or above 0x1000 reads 0 and ignores writes. A 16-byte
//!   aligned offset that is no register (reserved in Table 11-1, including the absent CMCI LVT
//!   at 0x2F0) reads 0, ignores writes and records "illegal register address" in the ESR.
//!   MMIO while the APIC is in x2APIC mode or globally disabled reads 0 and ignores writes.
//! - The APIC ID register is read-only here (the hypervisor routes IPIs by the initial APIC ID).
//!   In xAPIC mode it shows the low 8 bits of the ID in bits 31:24.
//! - x2APIC MSRs: a read of a register that does not exist in x2APIC mode or is write-only, a
//!   write to a read-only register, a write with any of bits 63:32 set (except the ICR), a
//!   non-zero write to EOI or ESR, and a SELF IPI write with bits 31:8 set are refused (#GP), as
//!   11.12.1.2 and 11.12.1.3 describe. Other reserved bits in bits 31:0 are ignored (masked), not
//!   faulted.
//! - A software-disabled APIC (SVR bit 8 clear) masks all LVTs and keeps them masked (11.4.7.2);
//!   it drops incoming fixed interrupts but keeps what is already in IRR and ISR, which stay
//!   deliverable (as KVM does); it still sends IPIs. INIT and SIPI are always handled.
//! - A globally disabled APIC (IA32_APIC_BASE bit 11 clear) is reset and takes no interrupts;
//!   re-enabling gives the power-up state (11.4.3). Mode changes follow 11.12.5: x2APIC to
//!   xAPIC directly, disabled to x2APIC directly, and x2APIC enabled while globally disabled are
//!   refused (#GP). The base address can be moved (11.4.5); the hypervisor reads it back with
//!   [`LocalApic::mmio_base`]. Reserved bits are 0-7, 9 and 52-63 (MAXPHYADDR taken as 52).
//! - INIT (11.4.7.3) resets all registers except the APIC ID and keeps IA32_APIC_BASE (mode
//!   included). Following KVM, the bootstrap processor restarts at the reset vector after INIT
//!   while an application processor waits for a SIPI; [`LocalApic::new`] starts application
//!   processors waiting for a SIPI. An INIT level de-assert (ICR: INIT, level-triggered, level 0)
//!   sends nothing. SMI and the reserved delivery modes are dropped.
//! - Vectors 0-15 are illegal (11.5.2): sending one as fixed or lowest-priority records "send
//!   illegal vector" in the ESR and sends nothing; receiving one records "receive illegal vector"
//!   and sets no IRR bit. Errors become visible in the ESR after the next ESR write (11.5.3) and
//!   raise the error LVT interrupt if it is unmasked.
//! - The timer counts at [`TimerClock::apic_timer_hz`] divided by the divide configuration,
//!   converted to TSC exactly (no drift for periodic mode). Changing the divide configuration
//!   while counting keeps the current count and continues at the new rate (the sub-tick part is
//!   dropped). Timer mode 11b (reserved) never counts. Periods missed while the hypervisor was
//!   not looking coalesce into one interrupt (IRR holds one bit per vector anyway).
//! - The x2APIC logical destination (LDR) is derived from the ID (11.12.10.2); in xAPIC mode the
//!   guest programs LDR and DFR. In xAPIC logical mode a destination of 0xFF, and in x2APIC a
//!   destination of 0xFFFFFFFF, reach every APIC (11.6.2.2, 11.12.10).

use alloc::vec::Vec;

/// The default physical address of the xAPIC MMIO page. See: SDM Vol 3A 11.4.1.
pub const APIC_BASE: u64 = 0xFEE0_0000;

/// The IA32_APIC_BASE MSR. See: SDM Vol 3A 11.4.4.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// The IA32_TSC_DEADLINE MSR. See: SDM Vol 3A 11.5.4.1.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// The first and last MSR of the x2APIC register space. See: SDM Vol 3A 11.12.1.2.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8FF;

/// Something the APIC asks the hypervisor to do after a register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicEvent {
    /// An inter-processor interrupt to deliver (from the ICR or the x2APIC SELF IPI register).
    Ipi {
        destination: IpiDestination,
        delivery: IpiDelivery,
    },
    /// The guest ended a level-triggered interrupt (its TMR bit was set): the I/O APIC clears
    /// Remote IRR for this vector. See: SDM Vol 3A 11.8.5.
    EndOfInterrupt { vector: u8 },
}

/// Who an IPI is for. See: SDM Vol 3A 11.6.1 (destination shorthand), 11.6.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiDestination {
    /// Physical destination mode: the APIC with this ID (8-bit in xAPIC, 32-bit in x2APIC mode).
    Apic(u32),
    /// Logical destination mode: every APIC for which [`LocalApic::matches_logical`] is true.
    Logical(u32),
    SelfOnly,
    /// Also what a physical destination of 0xFF (xAPIC) or 0xFFFFFFFF (x2APIC) means.
    AllIncludingSelf,
    AllExcludingSelf,
}

/// What an IPI does on its targets. See: SDM Vol 3A 11.6.1 (delivery mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpiDelivery {
    Fixed {
        vector: u8,
    },
    /// Like fixed, to one of the targets (the hypervisor chooses which).
    LowestPriority {
        vector: u8,
    },
    Init,
    Startup {
        vector: u8,
    },
    Nmi,
}

/// The clocks the APIC timer is measured against. Zero frequencies are taken as 1 Hz so that
/// no value can divide by zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerClock {
    /// The guest's TSC frequency.
    pub tsc_hz: u64,
    /// The APIC timer input clock before the divide configuration (the "bus" or core crystal
    /// clock). See: SDM Vol 3A 11.5.4.
    pub apic_timer_hz: u64,
}

// Register indices: the xAPIC MMIO offset divided by 16, which is also the x2APIC MSR minus
// 0x800. See: SDM Vol 3A Table 11-1 (xAPIC) and Table 11-6 (x2APIC).
const REGISTER_ID: u32 = 0x02;
const REGISTER_VERSION: u32 = 0x03;
const REGISTER_TASK_PRIORITY: u32 = 0x08;
const REGISTER_ARBITRATION_PRIORITY: u32 = 0x09;
const REGISTER_PROCESSOR_PRIORITY: u32 = 0x0A;
const REGISTER_END_OF_INTERRUPT: u32 = 0x0B;
const REGISTER_REMOTE_READ: u32 = 0x0C;
const REGISTER_LOGICAL_DESTINATION: u32 = 0x0D;
const REGISTER_DESTINATION_FORMAT: u32 = 0x0E;
const REGISTER_SPURIOUS_VECTOR: u32 = 0x0F;
const REGISTER_IN_SERVICE_FIRST: u32 = 0x10;
const REGISTER_TRIGGER_MODE_FIRST: u32 = 0x18;
const REGISTER_INTERRUPT_REQUEST_FIRST: u32 = 0x20;
const REGISTER_ERROR_STATUS: u32 = 0x28;
const REGISTER_COMMAND_LOW: u32 = 0x30;
const REGISTER_COMMAND_HIGH: u32 = 0x31;
const REGISTER_LVT_FIRST: u32 = 0x32;
const REGISTER_INITIAL_COUNT: u32 = 0x38;
const REGISTER_CURRENT_COUNT: u32 = 0x39;
const REGISTER_DIVIDE_CONFIGURATION: u32 = 0x3E;
const REGISTER_SELF_IPI: u32 = 0x3F;

/// Version register: version 0x14 (integrated APIC), max LVT entry 5 (six LVTs, no CMCI), no
/// EOI-broadcast suppression. See: SDM Vol 3A 11.4.8.
const VERSION_VALUE: u32 = 0x0005_0014;

// LVT entries, in register order. See: SDM Vol 3A 11.5.1, Figure 11-8.
const LVT_TIMER: usize = 0;
const LVT_THERMAL: usize = 1;
const LVT_PERFORMANCE: usize = 2;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
const LVT_VECTOR: u32 = 0xFF;
/// Writable bits of each LVT (vector, delivery mode, pin polarity, trigger mode, mask, timer
/// mode); delivery status and remote IRR read 0. See: SDM Vol 3A 11.5.1, Figure 11-8.
const LVT_WRITABLE: [u32; LVT_COUNT] = {
    let mut writable = [0; LVT_COUNT];
    // Vector, mask, timer mode.
    writable[LVT_TIMER] = 0x0007_00FF;
    // Vector, delivery mode, mask.
    writable[LVT_THERMAL] = 0x0001_07FF;
    writable[LVT_PERFORMANCE] = 0x0001_07FF;
    // Vector, delivery mode, pin polarity, trigger mode, mask.
    writable[LVT_LINT0] = 0x0001_A7FF;
    writable[LVT_LINT1] = 0x0001_A7FF;
    // Vector, mask.
    writable[LVT_ERROR] = 0x0001_00FF;
    writable
};
const LVT_DELIVERY_MODE_SHIFT: u32 = 8;
const LVT_DELIVERY_MODE_MASK: u32 = 0x7;
const LVT_DELIVERY_MODE_EXTERNAL_INTERRUPT: u32 = 0b111;
/// Timer mode, LVT timer bits 18:17. See: SDM Vol 3A 11.5.1, 11.5.4.
const LVT_TIMER_MODE_SHIFT: u32 = 17;

// Spurious-interrupt vector register. See: SDM Vol 3A 11.9, Figure 11-23.
/// Spurious vector, APIC software enable (bit 8), focus processor checking (bit 9).
const SPURIOUS_WRITABLE: u32 = 0x3FF;
const SPURIOUS_APIC_ENABLED: u32 = 1 << 8;
const SPURIOUS_RESET: u32 = 0xFF;

// Error status register bits. See: SDM Vol 3A 11.5.3, Figure 11-9.
const ERROR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ERROR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ERROR_ILLEGAL_REGISTER_ADDRESS: u32 = 1 << 7;

// Interrupt command register. See: SDM Vol 3A 11.6.1, Figure 11-12.
/// Vector, delivery mode, destination mode, level, trigger mode, shorthand; delivery status
/// (bit 12) reads 0.
const COMMAND_LOW_WRITABLE: u32 = 0x000C_CFFF;
const COMMAND_DELIVERY_MODE_SHIFT: u32 = 8;
const COMMAND_LOGICAL_DESTINATION: u32 = 1 << 11;
const COMMAND_LEVEL_ASSERT: u32 = 1 << 14;
const COMMAND_LEVEL_TRIGGERED: u32 = 1 << 15;
const COMMAND_SHORTHAND_SHIFT: u32 = 18;
/// xAPIC: destination in bits 63:56, that is bits 31:24 of the high register.
const COMMAND_HIGH_XAPIC_WRITABLE: u32 = 0xFF00_0000;

// Destination format register: model in bits 31:28, the rest reads as ones. See: SDM Vol 3A 11.6.2.2.
const DESTINATION_FORMAT_WRITABLE: u32 = 0xF000_0000;
const DESTINATION_FORMAT_FLAT: u32 = 0xF;
const DESTINATION_FORMAT_CLUSTER: u32 = 0x0;
const LOGICAL_DESTINATION_XAPIC_WRITABLE: u32 = 0xFF00_0000;

/// Divide configuration: bits 0, 1 and 3. See: SDM Vol 3A 11.5.4, Figure 11-10.
const DIVIDE_WRITABLE: u32 = 0xB;

// IA32_APIC_BASE. See: SDM Vol 3A 11.4.4, Figure 11-5, and 11.12.1 (bit 10).
const APIC_BASE_BOOTSTRAP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_GLOBAL_ENABLE: u64 = 1 << 11;
/// Bits 0-7, 9 and 52-63 (MAXPHYADDR taken as 52).
const APIC_BASE_RESERVED: u64 = 0xFFF0_0000_0000_02FF;
const APIC_BASE_ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;

/// The lowest vector an interrupt may use. See: SDM Vol 3A 11.5.2.
const FIRST_LEGAL_VECTOR: u8 = 16;

/// How the guest reaches the registers, from IA32_APIC_BASE. See: SDM Vol 3A 11.12.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ApicMode {
    GloballyDisabled,
    XApic,
    X2Apic,
}

/// Timer mode from LVT timer bits 18:17. See: SDM Vol 3A 11.5.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    Reserved,
}

/// A running one-shot or periodic count. Time is kept in "scaled TSC units" of
/// 1/`apic_timer_hz` of a TSC cycle, so one timer tick is `tsc_hz * divisor` units exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CountDown {
    /// The count started at `start_tsc + start_fraction / apic_timer_hz`.
    start_tsc: u64,
    /// Always below `apic_timer_hz`.
    start_fraction: u128,
    /// The count at the start point (the initial count, or what was left when the divide
    /// configuration changed).
    count_at_start: u32,
}

/// The local APIC of one vCPU. See the module documentation for what is modelled and how.
#[derive(Clone, Debug)]
pub struct LocalApic {
    id: u32,
    bootstrap: bool,
    clock: TimerClock,
    mode: ApicMode,
    /// Bits 12-51 of IA32_APIC_BASE.
    base_address: u64,
    waiting_for_startup: bool,
    task_priority: u32,
    /// xAPIC LDR (bits 31:24); the x2APIC LDR is derived from the ID.
    logical_destination: u32,
    destination_format: u32,
    spurious_vector: u32,
    /// ISR, TMR, IRR: bit `v % 32` of word `v / 32` is vector `v`, as in the registers.
    in_service: [u32; 8],
    trigger_mode: [u32; 8],
    interrupt_request: [u32; 8],
    /// The ESR as the guest reads it, and the errors seen since the last ESR write.
    error_status: u32,
    errors_since_error_status_write: u32,
    command_low: u32,
    /// The destination: bits 31:24 in xAPIC mode, all 32 bits in x2APIC mode.
    command_high: u32,
    local_vector_table: [u32; LVT_COUNT],
    initial_count: u32,
    divide_configuration: u32,
    count_down: Option<CountDown>,
    tsc_deadline: u64,
}

impl LocalApic {
    /// A local APIC in its power-up state (SDM 11.4.7.1): xAPIC mode at [`APIC_BASE`],
    /// software-disabled, every LVT masked. `id` is the initial APIC ID (the vCPU index);
    /// `bootstrap` is true for vCPU 0 only. Application processors start waiting for a SIPI.
    pub fn new(id: u32, bootstrap: bool, clock: TimerClock) -> Self {
        let clock = TimerClock {
            tsc_hz: clock.tsc_hz.max(1),
            apic_timer_hz: clock.apic_timer_hz.max(1),
        };
        let mut apic = Self {
            id,
            bootstrap,
            clock,
            mode: ApicMode::XApic,
            base_address: APIC_BASE,
            waiting_for_startup: !bootstrap,
            task_priority: 0,
            logical_destination: 0,
            destination_format: u32::MAX,
            spurious_vector: SPURIOUS_RESET,
            in_service: [0; 8],
            trigger_mode: [0; 8],
            interrupt_request: [0; 8],
            error_status: 0,
            errors_since_error_status_write: 0,
            command_low: 0,
            command_high: 0,
            local_vector_table: [LVT_MASKED; LVT_COUNT],
            initial_count: 0,
            divide_configuration: 0,
            count_down: None,
            tsc_deadline: 0,
        };
        apic.reset_registers();
        apic
    }

    /// The initial APIC ID given to [`Self::new`].
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this is the bootstrap processor's APIC (IA32_APIC_BASE bit 8).
    pub fn is_bootstrap(&self) -> bool {
        self.bootstrap
    }

    /// The timer clocks given to [`Self::new`] (zeros replaced by 1).
    pub fn clock(&self) -> TimerClock {
        self.clock
    }

    /// Whether the APIC is in x2APIC mode (IA32_APIC_BASE bits 11 and 10 set).
    pub fn is_x2apic(&self) -> bool {
        self.mode == ApicMode::X2Apic
    }

    /// Whether the APIC is globally enabled (IA32_APIC_BASE bit 11).
    pub fn is_globally_enabled(&self) -> bool {
        self.mode != ApicMode::GloballyDisabled
    }

    /// Whether the APIC is software-enabled (SVR bit 8). See: SDM Vol 3A 11.4.3.
    pub fn is_software_enabled(&self) -> bool {
        self.spurious_vector & SPURIOUS_APIC_ENABLED != 0
    }

    /// The physical address of the MMIO page the hypervisor should trap, or `None` when the
    /// guest cannot use MMIO (x2APIC mode or globally disabled). See: SDM Vol 3A 11.4.5, 11.12.1.2.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode == ApicMode::XApic).then_some(self.base_address)
    }

    /// The IA32_APIC_BASE MSR value. See: SDM Vol 3A 11.4.4.
    pub fn apic_base_msr(&self) -> u64 {
        let mut value = self.base_address;
        if self.bootstrap {
            value |= APIC_BASE_BOOTSTRAP;
        }
        match self.mode {
            ApicMode::GloballyDisabled => {}
            ApicMode::XApic => value |= APIC_BASE_GLOBAL_ENABLE,
            ApicMode::X2Apic => value |= APIC_BASE_GLOBAL_ENABLE | APIC_BASE_X2APIC,
        }
        value
    }

    /// A guest WRMSR to IA32_APIC_BASE. Returns false (inject #GP) for reserved bits or an
    /// illegal mode transition. The bootstrap flag (bit 8) is fixed; writes to it are ignored.
    /// See: SDM Vol 3A 11.4.3, 11.4.4, 11.12.5.
    pub fn set_apic_base_msr(&mut self, value: u64) -> bool {
        if value & APIC_BASE_RESERVED != 0 {
            return false;
        }
        let new_mode = match (
            value & APIC_BASE_GLOBAL_ENABLE != 0,
            value & APIC_BASE_X2APIC != 0,
        ) {
            (false, false) => ApicMode::GloballyDisabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            // See: SDM Vol 3A 11.12.5 (EN=0, EXTD=1 is invalid).
            (false, true) => return false,
        };
        match (self.mode, new_mode) {
            // See: SDM Vol 3A 11.12.5: x2APIC to xAPIC, and disabled to x2APIC, are illegal.
            (ApicMode::X2Apic, ApicMode::XApic)
            | (ApicMode::GloballyDisabled, ApicMode::X2Apic) => return false,
            _ => {}
        }
        if new_mode == ApicMode::GloballyDisabled && self.mode != ApicMode::GloballyDisabled {
            // See: SDM Vol 3A 11.4.3: disabling may return the APIC to its power-up state.
            self.reset_registers();
        }
        self.mode = new_mode;
        self.base_address = value & APIC_BASE_ADDRESS;
        true
    }

    /// An INIT IPI (or INIT signal) arrived: every register returns to its power-up value except
    /// the APIC ID; IA32_APIC_BASE (and so the mode) is kept. An application processor then
    /// waits for a SIPI; the bootstrap processor does not (it restarts at the reset vector, as
    /// in KVM). See: SDM Vol 3A 11.4.7.3.
    pub fn receive_init(&mut self) {
        self.reset_registers();
        self.waiting_for_startup = !self.bootstrap;
    }

    /// Whether the vCPU is in the wait-for-SIPI state (after power-up as an application
    /// processor, or after INIT). See: SDM Vol 3A 11.4.7.3.
    pub fn is_waiting_for_sipi(&self) -> bool {
        self.waiting_for_startup
    }

    /// A SIPI with `vector` arrived. If the vCPU was waiting for one, it leaves that state and
    /// the physical address where it starts in real mode is returned (`vector << 12`: CS
    /// selector `vector << 8`, IP 0). Otherwise the SIPI is ignored and `None` is returned.
    /// See: SDM Vol 3A 11.6.1 (Start-Up delivery mode), 11.4.7.3.
    pub fn receive_startup(&mut self, vector: u8) -> Option<u64> {
        if !self.waiting_for_startup {
            return None;
        }
        self.waiting_for_startup = false;
        Some(u64::from(vector) << 12)
    }

    /// An edge-triggered interrupt arrives for this APIC (fixed IPI, MSI, I/O APIC edge, local
    /// sources): sets its IRR bit and clears its TMR bit. Dropped while the APIC is globally or
    /// software disabled; vectors 0-15 record "receive illegal vector" instead.
    /// See: SDM Vol 3A 11.8.4, 11.5.2, 11.4.7.2.
    pub fn accept(&mut self, vector: u8) {
        self.accept_with_trigger(vector, false);
    }

    /// Like [`Self::accept`] for a level-triggered interrupt (I/O APIC level pin): also sets its
    /// TMR bit, so the guest's EOI produces [`ApicEvent::EndOfInterrupt`]. See: SDM Vol 3A 11.8.4.
    pub fn accept_level_triggered(&mut self, vector: u8) {
        self.accept_with_trigger(vector, true);
    }

    /// Whether `vector` waits in IRR (accepted, not yet injected).
    pub fn is_requested(&self, vector: u8) -> bool {
        test_bit(&self.interrupt_request, vector)
    }

    /// The highest-priority vector in IRR whose priority class is above the processor priority
    /// class (PPR), if any: the one the hypervisor may inject now (when the guest's RFLAGS.IF
    /// and interruptibility allow). `None` while globally disabled. See: SDM Vol 3A 11.8.3.1.
    pub fn pending_vector(&self) -> Option<u8> {
        if self.mode == ApicMode::GloballyDisabled {
            return None;
        }
        let requested = highest_vector(&self.interrupt_request)?;
        (u32::from(requested) >> 4 > self.processor_priority() >> 4).then_some(requested)
    }

    /// The hypervisor injected `vector`: its IRR bit moves to ISR. Nothing happens if the vector
    /// is not requested. See: SDM Vol 3A 11.8.4.
    pub fn acknowledge(&mut self, vector: u8) {
        if test_bit(&self.interrupt_request, vector) {
            clear_bit(&mut self.interrupt_request, vector);
            set_bit(&mut self.in_service, vector);
        }
    }

    /// The TPR, for CR8 accesses (CR8 bits 3:0 = TPR bits 7:4). See: SDM Vol 3A 11.8.6.
    pub fn task_priority(&self) -> u8 {
        (self.task_priority & 0xFF) as u8
    }

    /// Sets the TPR (from a guest MOV to CR8: pass `cr8 << 4`). See: SDM Vol 3A 11.8.6.
    pub fn set_task_priority(&mut self, priority: u8) {
        self.task_priority = u32::from(priority);
    }

    /// The PPR: the task priority, or the in-service priority class if that is higher.
    /// See: SDM Vol 3A 11.8.3.1.
    pub fn processor_priority(&self) -> u32 {
        let task = self.task_priority & 0xFF;
        let in_service = highest_vector(&self.in_service).map_or(0, u32::from);
        if task >> 4 >= in_service >> 4 {
            task
        } else {
            in_service & 0xF0
        }
    }

    /// Whether a logical-mode IPI to `destination` (8 bits in xAPIC, 32 in x2APIC mode) is for
    /// this APIC: flat model `(destination & LDR) != 0`, cluster model same cluster (or cluster
    /// 0xF, all) and a common member bit; x2APIC cluster ID in bits 31:16 and member bits 15:0.
    /// See: SDM Vol 3A 11.6.2.2, 11.12.10.
    pub fn matches_logical(&self, destination: u32) -> bool {
        match self.mode {
            ApicMode::GloballyDisabled => false,
            ApicMode::X2Apic => {
                let logical = self.logical_destination_register();
                destination == u32::MAX
                    || (destination >> 16 == logical >> 16 && destination & logical & 0xFFFF != 0)
            }
            ApicMode::XApic => {
                let destination = destination & 0xFF;
                let logical = self.logical_destination >> 24;
                if destination == 0xFF {
                    return true;
                }
                match self.destination_format >> 28 {
                    DESTINATION_FORMAT_FLAT => destination & logical != 0,
                    DESTINATION_FORMAT_CLUSTER => {
                        (destination >> 4 == 0xF || destination >> 4 == logical >> 4)
                            && destination & logical & 0xF != 0
                    }
                    _ => false,
                }
            }
        }
    }

    /// Whether interrupts from the legacy PIC (8259) reach this vCPU: the APIC is globally
    /// disabled, or LVT LINT0 is unmasked with ExtINT delivery (virtual wire mode; as KVM
    /// decides). After reset LINT0 is masked, as the SDM says; firmware (or the hypervisor
    /// standing in for it, with a write of 0x700 to offset 0x350) programs it.
    /// See: SDM Vol 3A 11.5.1.
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.local_vector_table[LVT_LINT0];
        self.mode == ApicMode::GloballyDisabled
            || (lint0 & LVT_MASKED == 0
                && (lint0 >> LVT_DELIVERY_MODE_SHIFT) & LVT_DELIVERY_MODE_MASK
                    == LVT_DELIVERY_MODE_EXTERNAL_INTERRUPT)
    }

    /// A guest 32-bit MMIO read at `offset` into the APIC page. See the module documentation for
    /// offsets that are not registers. See: SDM Vol 3A Table 11-1.
    pub fn read_mmio(&mut self, offset: u32, now_tsc: u64) -> u32 {
        self.advance_timer(now_tsc);
        let Some(register) = self.mmio_register(offset) else {
            return 0;
        };
        match register {
            REGISTER_ID => (self.id & 0xFF) << 24,
            REGISTER_ARBITRATION_PRIORITY | REGISTER_REMOTE_READ | REGISTER_END_OF_INTERRUPT => 0,
            REGISTER_LOGICAL_DESTINATION => self.logical_destination,
            REGISTER_DESTINATION_FORMAT => self.destination_format,
            REGISTER_COMMAND_HIGH => self.command_high,
            REGISTER_SELF_IPI => self.illegal_register(),
            _ => self
                .read_common(register, now_tsc)
                .unwrap_or_else(|| self.illegal_register()),
        }
    }

    /// A guest 32-bit MMIO write of `value` at `offset` into the APIC page. Writes to read-only
    /// registers are ignored. See: SDM Vol 3A Table 11-1.
    pub fn write_mmio(
        &mut self,
        offset: u32,
        value: u32,
        now_tsc: u64,
        events: &mut Vec<ApicEvent>,
    ) {
        self.advance_timer(now_tsc);
        let Some(register) = self.mmio_register(offset) else {
            return;
        };
        match register {
            // Read-only (ID: see the module documentation) or write-only-and-ignored.
            REGISTER_ID
            | REGISTER_VERSION
            | REGISTER_ARBITRATION_PRIORITY
            | REGISTER_PROCESSOR_PRIORITY
            | REGISTER_REMOTE_READ
            | REGISTER_CURRENT_COUNT => {}
            REGISTER_IN_SERVICE_FIRST..=0x27 => {}
            REGISTER_END_OF_INTERRUPT => self.end_of_interrupt(events),
            REGISTER_LOGICAL_DESTINATION => {
                self.logical_destination = value & LOGICAL_DESTINATION_XAPIC_WRITABLE
            }
            REGISTER_DESTINATION_FORMAT => {
                self.destination_format =
                    (value & DESTINATION_FORMAT_WRITABLE) | !DESTINATION_FORMAT_WRITABLE;
            }
            REGISTER_ERROR_STATUS => self.write_error_status(),
            REGISTER_COMMAND_LOW => {
                // See: SDM Vol 3A 11.6.1: writing the low doubleword sends the IPI.
                self.command_low = value & COMMAND_LOW_WRITABLE;
                let destination = self.command_high >> 24;
                self.send_ipi(self.command_low, destination, 0xFF, events);
            }
            REGISTER_COMMAND_HIGH => self.command_high = value & COMMAND_HIGH_XAPIC_WRITABLE,
            REGISTER_SELF_IPI => {
                self.illegal_register();
            }
            _ => {
                if !self.write_common(register, value, now_tsc) {
                    self.illegal_register();
                }
            }
        }
    }

    /// A guest RDMSR. Handles IA32_APIC_BASE, IA32_TSC_DEADLINE and, in x2APIC mode, the x2APIC
    /// registers 0x800-0x8FF (the ICR is one 64-bit MSR, 0x830). `None` means the MSR does not
    /// exist now: the caller injects #GP. See: SDM Vol 3A 11.12.1.2, Table 11-6.
    pub fn read_msr(&mut self, msr: u32, now_tsc: u64) -> Option<u64> {
        self.advance_timer(now_tsc);
        match msr {
            MSR_APIC_BASE => return Some(self.apic_base_msr()),
            MSR_TSC_DEADLINE => return Some(self.tsc_deadline()),
            _ => {}
        }
        let register = self.x2apic_register(msr)?;
        match register {
            REGISTER_ID => Some(u64::from(self.id)),
            REGISTER_LOGICAL_DESTINATION => Some(u64::from(self.logical_destination_register())),
            REGISTER_COMMAND_LOW => {
                Some((u64::from(self.command_high) << 32) | u64::from(self.command_low))
            }
            _ => self.read_common(register, now_tsc).map(u64::from),
        }
    }

    /// A guest WRMSR. Handles IA32_APIC_BASE, IA32_TSC_DEADLINE and, in x2APIC mode, the x2APIC
    /// registers. `false` means #GP (no such MSR, read-only, or reserved bits set as described in
    /// the module documentation). See: SDM Vol 3A 11.12.1.2, 11.12.1.3, Table 11-6.
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now_tsc: u64,
        events: &mut Vec<ApicEvent>,
    ) -> bool {
        self.advance_timer(now_tsc);
        match msr {
            MSR_APIC_BASE => return self.set_apic_base_msr(value),
            MSR_TSC_DEADLINE => {
                self.set_tsc_deadline(value, now_tsc);
                return true;
            }
            _ => {}
        }
        let Some(register) = self.x2apic_register(msr) else {
            return false;
        };
        if register == REGISTER_COMMAND_LOW {
            // See: SDM Vol 3A 11.12.9: one 64-bit write; destination in bits 63:32.
            self.command_low = (value as u32) & COMMAND_LOW_WRITABLE;
            self.command_high = (value >> 32) as u32;
            self.send_ipi(self.command_low, self.command_high, u32::MAX, events);
            return true;
        }
        let Ok(value) = u32::try_from(value) else {
            return false;
        };
        match register {
            // See: SDM Vol 3A 11.12.1.2: a non-zero write to EOI raises #GP.
            REGISTER_END_OF_INTERRUPT if value == 0 => {
                self.end_of_interrupt(events);
                true
            }
            // See: SDM Vol 3A Table 11-6: a non-zero write to ESR raises #GP.
            REGISTER_ERROR_STATUS if value == 0 => {
                self.write_error_status();
                true
            }
            // See: SDM Vol 3A 11.12.11: vector in bits 7:0, the rest reserved.
            REGISTER_SELF_IPI if value <= 0xFF => {
                let command = value | (0b01 << COMMAND_SHORTHAND_SHIFT);
                self.send_ipi(command, 0, u32::MAX, events);
                true
            }
            REGISTER_TASK_PRIORITY
            | REGISTER_SPURIOUS_VECTOR
            | REGISTER_INITIAL_COUNT
            | REGISTER_DIVIDE_CONFIGURATION
            | REGISTER_LVT_FIRST..=0x37 => self.write_common(register, value, now_tsc),
            _ => false,
        }
    }

    /// Advances the timer to `now_tsc`: a one-shot or periodic count that reached zero, or a
    /// TSC deadline that passed, accepts the LVT timer vector unless the LVT is masked (the
    /// count goes on regardless). Returns the TSC of the next expiry that would interrupt the
    /// guest, so the hypervisor can schedule a wake-up; `None` when the timer is stopped or
    /// masked. See: SDM Vol 3A 11.5.4, 11.5.4.1.
    pub fn advance_timer(&mut self, now_tsc: u64) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                if self.tsc_deadline != 0 && now_tsc >= self.tsc_deadline {
                    // See: SDM Vol 3A 11.5.4.1: the timer fires, then disarms and clears the MSR.
                    self.tsc_deadline = 0;
                    self.timer_fired();
                }
                (self.tsc_deadline != 0 && !self.timer_masked()).then_some(self.tsc_deadline)
            }
            TimerMode::OneShot | TimerMode::Periodic => {
                let count_down = self.count_down?;
                let elapsed = self.elapsed_units(&count_down, now_tsc);
                let tick = self.tick_units();
                let first_expiry = u128::from(count_down.count_at_start) * tick;
                if elapsed >= first_expiry {
                    self.timer_fired();
                    let period = u128::from(self.initial_count) * tick;
                    if self.timer_mode() == TimerMode::Periodic && period != 0 {
                        // Restart at the last period boundary not after now; missed periods
                        // coalesce. See: SDM Vol 3A 11.5.4 (periodic mode reloads the count).
                        let periods = (elapsed - first_expiry) / period;
                        let advance = first_expiry + periods * period;
                        self.count_down =
                            Some(self.shifted_count_down(&count_down, advance, self.initial_count));
                    } else {
                        self.count_down = None;
                    }
                }
                let count_down = self.count_down?;
                if self.timer_masked() {
                    return None;
                }
                let until =
                    count_down.start_fraction + u128::from(count_down.count_at_start) * tick;
                let whole_cycles = until.div_ceil(u128::from(self.clock.apic_timer_hz));
                Some(
                    count_down
                        .start_tsc
                        .saturating_add(u64::try_from(whole_cycles).unwrap_or(u64::MAX)),
                )
            }
            TimerMode::Reserved => None,
        }
    }

    /// A guest write of IA32_TSC_DEADLINE. Ignored unless the timer is in TSC-deadline mode; 0
    /// disarms; a deadline not after `now_tsc` fires at once. See: SDM Vol 3A 11.5.4.1.
    pub fn set_tsc_deadline(&mut self, deadline: u64, now_tsc: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = deadline;
        self.advance_timer(now_tsc);
    }

    /// IA32_TSC_DEADLINE as the guest reads it: 0 when disarmed or not in TSC-deadline mode.
    /// See: SDM Vol 3A 11.5.4.1.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    // ---- internals ----

    /// The power-up values of everything but the ID, the mode, the base and the SIPI state.
    /// See: SDM Vol 3A 11.4.7.1.
    fn reset_registers(&mut self) {
        self.task_priority = 0;
        self.logical_destination = 0;
        self.destination_format = u32::MAX;
        self.spurious_vector = SPURIOUS_RESET;
        self.in_service = [0; 8];
        self.trigger_mode = [0; 8];
        self.interrupt_request = [0; 8];
        self.error_status = 0;
        self.errors_since_error_status_write = 0;
        self.command_low = 0;
        self.command_high = 0;
        self.local_vector_table = [LVT_MASKED; LVT_COUNT];
        self.initial_count = 0;
        self.divide_configuration = 0;
        self.count_down = None;
        self.tsc_deadline = 0;
    }

    /// The register index for an MMIO offset, or `None` (read 0, write ignored) when the offset
    /// is misaligned, outside the page, or the APIC is not in xAPIC mode.
    fn mmio_register(&self, offset: u32) -> Option<u32> {
        if self.mode != ApicMode::XApic || !offset.is_multiple_of(16) || offset >= 0x1000 {
            return None;
        }
        Some(offset / 16)
    }

    /// The register index for an x2APIC MSR, or `None` outside 0x800-0x8FF or outside x2APIC
    /// mode. See: SDM Vol 3A 11.12.1.2.
    fn x2apic_register(&self, msr: u32) -> Option<u32> {
        if self.mode != ApicMode::X2Apic || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return None;
        }
        Some(msr - MSR_X2APIC_FIRST)
    }

    /// Reads of the registers whose meaning is the same in both modes; `None` for an index that
    /// is no such register.
    fn read_common(&mut self, register: u32, now_tsc: u64) -> Option<u32> {
        let value = match register {
            REGISTER_VERSION => VERSION_VALUE,
            REGISTER_TASK_PRIORITY => self.task_priority,
            REGISTER_PROCESSOR_PRIORITY => self.processor_priority(),
            REGISTER_SPURIOUS_VECTOR => self.spurious_vector,
            REGISTER_IN_SERVICE_FIRST..=0x17 => {
                self.in_service[(register - REGISTER_IN_SERVICE_FIRST) as usize]
            }
            REGISTER_TRIGGER_MODE_FIRST..=0x1F => {
                self.trigger_mode[(register - REGISTER_TRIGGER_MODE_FIRST) as usize]
            }
            REGISTER_INTERRUPT_REQUEST_FIRST..=0x27 => {
                self.interrupt_request[(register - REGISTER_INTERRUPT_REQUEST_FIRST) as usize]
            }
            REGISTER_ERROR_STATUS => self.error_status,
            REGISTER_COMMAND_LOW => self.command_low,
            REGISTER_LVT_FIRST..=0x37 => {
                self.local_vector_table[(register - REGISTER_LVT_FIRST) as usize]
            }
            REGISTER_INITIAL_COUNT => self.initial_count,
            REGISTER_CURRENT_COUNT => self.current_count(now_tsc),
            REGISTER_DIVIDE_CONFIGURATION => self.divide_configuration,
            _ => return None,
        };
        Some(value)
    }

    /// Writes of the registers whose meaning is the same in both modes; false for an index that
    /// is no such register.
    fn write_common(&mut self, register: u32, value: u32, now_tsc: u64) -> bool {
        match register {
            // See: SDM Vol 3A 11.8.3.1, Figure 11-18.
            REGISTER_TASK_PRIORITY => self.task_priority = value & 0xFF,
            REGISTER_SPURIOUS_VECTOR => self.write_spurious_vector(value),
            REGISTER_LVT_FIRST..=0x37 => {
                self.write_local_vector((register - REGISTER_LVT_FIRST) as usize, value)
            }
            REGISTER_INITIAL_COUNT => self.write_initial_count(value, now_tsc),
            REGISTER_DIVIDE_CONFIGURATION => self.write_divide_configuration(value, now_tsc),
            _ => return false,
        }
        true
    }

    /// An access to a reserved register: record the error, read 0. See: SDM Vol 3A 11.5.3.
    fn illegal_register(&mut self) -> u32 {
        self.record_error(ERROR_ILLEGAL_REGISTER_ADDRESS);
        0
    }

    /// The x2APIC LDR: cluster ID (ID bits 31:4) in bits 31:16, one bit for ID bits 3:0.
    /// See: SDM Vol 3A 11.12.10.2.
    fn logical_destination_register(&self) -> u32 {
        match self.mode {
            ApicMode::X2Apic => ((self.id >> 4) << 16) | (1 << (self.id & 0xF)),
            _ => self.logical_destination,
        }
    }

    fn accept_with_trigger(&mut self, vector: u8, level_triggered: bool) {
        if self.mode == ApicMode::GloballyDisabled || !self.is_software_enabled() {
            return;
        }
        self.request_interrupt(vector, level_triggered);
    }

    /// Sets IRR (and TMR for level-triggered) for a legal vector. See: SDM Vol 3A 11.8.4, 11.5.2.
    fn request_interrupt(&mut self, vector: u8, level_triggered: bool) {
        if vector < FIRST_LEGAL_VECTOR {
            self.record_error(ERROR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        set_bit(&mut self.interrupt_request, vector);
        if level_triggered {
            set_bit(&mut self.trigger_mode, vector);
        } else {
            clear_bit(&mut self.trigger_mode, vector);
        }
    }

    /// Records an error for the next ESR write and raises the error LVT interrupt if unmasked.
    /// An illegal vector in the error LVT itself is not reported again (no loop).
    /// See: SDM Vol 3A 11.5.3.
    fn record_error(&mut self, error: u32) {
        self.errors_since_error_status_write |= error;
        let entry = self.local_vector_table[LVT_ERROR];
        let vector = (entry & LVT_VECTOR) as u8;
        if entry & LVT_MASKED == 0 && vector >= FIRST_LEGAL_VECTOR {
            self.request_interrupt(vector, false);
        }
    }

    /// A write to the ESR makes the errors seen since the previous write visible.
    /// See: SDM Vol 3A 11.5.3.
    fn write_error_status(&mut self) {
        self.error_status = self.errors_since_error_status_write;
        self.errors_since_error_status_write = 0;
    }

    /// EOI: clears the highest ISR bit; a level-triggered vector is reported to the I/O APIC.
    /// See: SDM Vol 3A 11.8.5.
    fn end_of_interrupt(&mut self, events: &mut Vec<ApicEvent>) {
        let Some(vector) = highest_vector(&self.in_service) else {
            return;
        };
        clear_bit(&mut self.in_service, vector);
        if test_bit(&self.trigger_mode, vector) {
            events.push(ApicEvent::EndOfInterrupt { vector });
        }
    }

    /// See: SDM Vol 3A 11.9 (bits 7:0 vector, 8 enable, 9 focus checking), 11.4.7.2 (clearing
    /// bit 8 masks every LVT).
    fn write_spurious_vector(&mut self, value: u32) {
        self.spurious_vector = value & SPURIOUS_WRITABLE;
        if !self.is_software_enabled() {
            for entry in &mut self.local_vector_table {
                *entry |= LVT_MASKED;
            }
        }
    }

    /// See: SDM Vol 3A 11.5.1 (layout), 11.4.7.2 (mask stays set while software-disabled),
    /// 11.5.4.1 (switching into or out of TSC-deadline mode disarms the timer).
    fn write_local_vector(&mut self, index: usize, value: u32) {
        let Some(&writable) = LVT_WRITABLE.get(index) else {
            return;
        };
        let mut value = value & writable;
        if !self.is_software_enabled() {
            value |= LVT_MASKED;
        }
        let old_mode = self.timer_mode();
        self.local_vector_table[index] = value;
        if index == LVT_TIMER {
            let new_mode = self.timer_mode();
            if (old_mode == TimerMode::TscDeadline) != (new_mode == TimerMode::TscDeadline) {
                self.initial_count = 0;
                self.count_down = None;
                self.tsc_deadline = 0;
            }
        }
    }

    /// Starts the count (or stops it, for 0); ignored in TSC-deadline mode. See: SDM Vol 3A
    /// 11.5.4, 11.5.4.1.
    fn write_initial_count(&mut self, value: u32, now_tsc: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.initial_count = value;
        self.count_down = (value != 0).then_some(CountDown {
            start_tsc: now_tsc,
            start_fraction: 0,
            count_at_start: value,
        });
    }

    /// See: SDM Vol 3A 11.5.4, Figure 11-10. A running count keeps its current value.
    fn write_divide_configuration(&mut self, value: u32, now_tsc: u64) {
        let remaining = self.current_count(now_tsc);
        self.divide_configuration = value & DIVIDE_WRITABLE;
        if self.count_down.is_some() {
            self.count_down = (remaining != 0).then_some(CountDown {
                start_tsc: now_tsc,
                start_fraction: 0,
                count_at_start: remaining,
            });
        }
    }

    /// The current-count register at `now_tsc` (the timer already advanced to it): 0 when
    /// stopped or in TSC-deadline mode. See: SDM Vol 3A 11.5.4, 11.5.4.1.
    fn current_count(&self, now_tsc: u64) -> u32 {
        if !matches!(self.timer_mode(), TimerMode::OneShot | TimerMode::Periodic) {
            return 0;
        }
        let Some(count_down) = self.count_down else {
            return 0;
        };
        let ticks = self.elapsed_units(&count_down, now_tsc) / self.tick_units();
        let remaining = u128::from(count_down.count_at_start).saturating_sub(ticks);
        u32::try_from(remaining).unwrap_or(u32::MAX)
    }

    /// The divisor from the divide configuration register. See: SDM Vol 3A 11.5.4, Figure 11-10.
    fn divisor(&self) -> u128 {
        let code = (self.divide_configuration & 0x3) | ((self.divide_configuration >> 1) & 0x4);
        match code {
            0b111 => 1,
            code => 2 << code,
        }
    }

    /// One timer tick in scaled units (see [`CountDown`]).
    fn tick_units(&self) -> u128 {
        u128::from(self.clock.tsc_hz) * self.divisor()
    }

    /// Scaled units since the count started (0 if `now_tsc` is before the start).
    fn elapsed_units(&self, count_down: &CountDown, now_tsc: u64) -> u128 {
        let cycles = u128::from(now_tsc.saturating_sub(count_down.start_tsc));
        (cycles * u128::from(self.clock.apic_timer_hz)).saturating_sub(count_down.start_fraction)
    }

    /// `count_down` with its start moved `advance` scaled units later and a new start count.
    fn shifted_count_down(
        &self,
        count_down: &CountDown,
        advance: u128,
        count_at_start: u32,
    ) -> CountDown {
        let hz = u128::from(self.clock.apic_timer_hz);
        let total = count_down.start_fraction + advance;
        let whole_cycles = u64::try_from(total / hz).unwrap_or(u64::MAX);
        CountDown {
            start_tsc: count_down.start_tsc.saturating_add(whole_cycles),
            start_fraction: total % hz,
            count_at_start,
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.local_vector_table[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 0x3 {
            0b00 => TimerMode::OneShot,
            0b01 => TimerMode::Periodic,
            0b10 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    fn timer_masked(&self) -> bool {
        self.local_vector_table[LVT_TIMER] & LVT_MASKED != 0
    }

    /// The timer expired: its vector is requested unless the LVT is masked. The timer LVT has
    /// no delivery mode (always fixed). See: SDM Vol 3A 11.5.1, 11.5.4.
    fn timer_fired(&mut self) {
        let entry = self.local_vector_table[LVT_TIMER];
        if entry & LVT_MASKED == 0 && self.mode != ApicMode::GloballyDisabled {
            self.request_interrupt((entry & LVT_VECTOR) as u8, false);
        }
    }

    /// Decodes an ICR value into an IPI. `destination` is the destination field; a physical
    /// destination equal to `broadcast` (0xFF in xAPIC, 0xFFFFFFFF in x2APIC mode) means all.
    /// See: SDM Vol 3A 11.6.1, Figure 11-12; 11.6.2; 11.12.9.
    fn send_ipi(
        &mut self,
        command: u32,
        destination: u32,
        broadcast: u32,
        events: &mut Vec<ApicEvent>,
    ) {
        let vector = (command & 0xFF) as u8;
        let delivery = match (command >> COMMAND_DELIVERY_MODE_SHIFT) & 0x7 {
            0b000 => IpiDelivery::Fixed { vector },
            0b001 => IpiDelivery::LowestPriority { vector },
            0b100 => IpiDelivery::Nmi,
            0b101 => {
                // INIT level de-assert: only an arbitration ID synchronization, nothing to do.
                if command & COMMAND_LEVEL_TRIGGERED != 0 && command & COMMAND_LEVEL_ASSERT == 0 {
                    return;
                }
                IpiDelivery::Init
            }
            0b110 => IpiDelivery::Startup { vector },
            // SMI (0b010) and the reserved modes: not modelled.
            _ => return,
        };
        if matches!(
            delivery,
            IpiDelivery::Fixed { .. } | IpiDelivery::LowestPriority { .. }
        ) && vector < FIRST_LEGAL_VECTOR
        {
            // See: SDM Vol 3A 11.5.2, 11.5.3.
            self.record_error(ERROR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let destination = match (command >> COMMAND_SHORTHAND_SHIFT) & 0x3 {
            0b01 => IpiDestination::SelfOnly,
            0b10 => IpiDestination::AllIncludingSelf,
            0b11 => IpiDestination::AllExcludingSelf,
            _ if command & COMMAND_LOGICAL_DESTINATION != 0 => IpiDestination::Logical(destination),
            _ if destination == broadcast => IpiDestination::AllIncludingSelf,
            _ => IpiDestination::Apic(destination),
        };
        events.push(ApicEvent::Ipi {
            destination,
            delivery,
        });
    }
}

fn test_bit(bitmap: &[u32; 8], vector: u8) -> bool {
    bitmap[usize::from(vector / 32)] & (1 << (vector % 32)) != 0
}

fn set_bit(bitmap: &mut [u32; 8], vector: u8) {
    bitmap[usize::from(vector / 32)] |= 1 << (vector % 32);
}

fn clear_bit(bitmap: &mut [u32; 8], vector: u8) {
    bitmap[usize::from(vector / 32)] &= !(1 << (vector % 32));
}

/// The highest vector set in an ISR/IRR-shaped bitmap.
fn highest_vector(bitmap: &[u32; 8]) -> Option<u8> {
    bitmap
        .iter()
        .enumerate()
        .rev()
        .find(|(_, word)| **word != 0)
        .map(|(index, word)| (index as u32 * 32 + 31 - word.leading_zeros()) as u8)
}

#[cfg(test)]
mod tests;
