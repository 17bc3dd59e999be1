//! Host tests of the local APIC model: reset state, priorities, IPIs, the timer, the x2APIC MSR
//! view, mode switches, and hostile accesses.

use super::*;

const ID: u32 = 0x20;
const VERSION: u32 = 0x30;
const TPR: u32 = 0x80;
const APR: u32 = 0x90;
const PPR: u32 = 0xA0;
const EOI: u32 = 0xB0;
const LDR: u32 = 0xD0;
const DFR: u32 = 0xE0;
const SVR: u32 = 0xF0;
const ISR: u32 = 0x100;
const TMR: u32 = 0x180;
const IRR: u32 = 0x200;
const ESR: u32 = 0x280;
const ICR_LOW: u32 = 0x300;
const ICR_HIGH: u32 = 0x310;
const LVT_TIMER_OFFSET: u32 = 0x320;
const LVT_LINT0_OFFSET: u32 = 0x350;
const LVT_ERROR_OFFSET: u32 = 0x370;
const INITIAL_COUNT: u32 = 0x380;
const CURRENT_COUNT: u32 = 0x390;
const DIVIDE: u32 = 0x3E0;

const TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_TSC_DEADLINE: u32 = 2 << 17;
const MASKED: u32 = 1 << 16;

/// TSC and APIC timer at the same rate: one timer tick is `divisor` TSC cycles.
const SAME_RATE: TimerClock = TimerClock {
    tsc_hz: 1_000_000_000,
    apic_timer_hz: 1_000_000_000,
};

fn apic(id: u32, bootstrap: bool) -> LocalApic {
    LocalApic::new(id, bootstrap, SAME_RATE)
}

/// A bootstrap APIC, software-enabled (SVR = 0x1FF).
fn enabled_apic() -> LocalApic {
    let mut apic = apic(0, true);
    write(&mut apic, SVR, 0x1FF);
    apic
}

fn write(apic: &mut LocalApic, offset: u32, value: u32) -> Vec<ApicEvent> {
    let mut events = Vec::new();
    apic.write_mmio(offset, value, 0, &mut events);
    events
}

fn write_at(apic: &mut LocalApic, offset: u32, value: u32, now_tsc: u64) {
    let mut events = Vec::new();
    apic.write_mmio(offset, value, now_tsc, &mut events);
    assert!(events.is_empty());
}

fn read(apic: &mut LocalApic, offset: u32) -> u32 {
    apic.read_mmio(offset, 0)
}

/// Switches `apic` to x2APIC mode through IA32_APIC_BASE.
fn enter_x2apic(apic: &mut LocalApic) {
    let base = apic.apic_base_msr() | (1 << 10);
    assert!(apic.write_msr(MSR_APIC_BASE, base, 0, &mut Vec::new()));
    assert!(apic.is_x2apic());
}

fn write_msr(apic: &mut LocalApic, msr: u32, value: u64) -> (bool, Vec<ApicEvent>) {
    let mut events = Vec::new();
    let accepted = apic.write_msr(msr, value, 0, &mut events);
    (accepted, events)
}

fn ipi(destination: IpiDestination, delivery: IpiDelivery) -> Vec<ApicEvent> {
    alloc::vec![ApicEvent::Ipi {
        destination,
        delivery
    }]
}

#[test]
fn power_up_values_follow_the_sdm() {
    let mut apic = apic(0, true);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(read(&mut apic, APR), 0);
    assert_eq!(read(&mut apic, PPR), 0);
    assert_eq!(read(&mut apic, LDR), 0);
    assert_eq!(read(&mut apic, DFR), 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, SVR), 0xFF);
    for index in 0..8 {
        assert_eq!(read(&mut apic, ISR + index * 16), 0);
        assert_eq!(read(&mut apic, TMR + index * 16), 0);
        assert_eq!(read(&mut apic, IRR + index * 16), 0);
    }
    assert_eq!(read(&mut apic, ESR), 0);
    assert_eq!(read(&mut apic, ICR_LOW), 0);
    assert_eq!(read(&mut apic, ICR_HIGH), 0);
    for offset in (0x320..=0x370).step_by(16) {
        assert_eq!(read(&mut apic, offset), MASKED, "LVT at {offset:#x}");
    }
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
    assert_eq!(read(&mut apic, CURRENT_COUNT), 0);
    assert_eq!(read(&mut apic, DIVIDE), 0);
    assert!(!apic.is_software_enabled());
    assert_eq!(apic.apic_base_msr(), 0xFEE0_0000 | (1 << 11) | (1 << 8));
    assert_eq!(apic.mmio_base(), Some(APIC_BASE));
    assert_eq!(apic.tsc_deadline(), 0);
    assert_eq!(apic.pending_vector(), None);
    assert!(!apic.is_waiting_for_sipi());
    let application_processor = LocalApic::new(1, false, SAME_RATE);
    assert!(application_processor.is_waiting_for_sipi());
    assert_eq!(
        application_processor.apic_base_msr(),
        0xFEE0_0000 | (1 << 11)
    );
}

#[test]
fn id_and_version_registers() {
    let mut apic = apic(3, false);
    assert_eq!(apic.id(), 3);
    assert_eq!(read(&mut apic, ID), 0x0300_0000);
    assert_eq!(read(&mut apic, VERSION), 0x0005_0014);
    // ID and version are read-only here.
    write(&mut apic, ID, 0x0700_0000);
    write(&mut apic, VERSION, 0);
    assert_eq!(read(&mut apic, ID), 0x0300_0000);
    assert_eq!(read(&mut apic, VERSION), 0x0005_0014);
    // An x2APIC ID beyond 8 bits shows its low byte in xAPIC mode and in full in x2APIC mode.
    let mut apic = apic_with_id(0x1_2345);
    assert_eq!(read(&mut apic, ID), 0x4500_0000);
    enter_x2apic(&mut apic);
    assert_eq!(apic.read_msr(0x802, 0), Some(0x1_2345));
    assert_eq!(apic.read_msr(0x803, 0), Some(0x0005_0014));
}

fn apic_with_id(id: u32) -> LocalApic {
    LocalApic::new(id, false, SAME_RATE)
}

#[test]
fn task_priority_masks_lower_priority_classes() {
    let mut apic = enabled_apic();
    apic.accept(0x45);
    assert_eq!(apic.pending_vector(), Some(0x45));
    write(&mut apic, TPR, 0x40);
    assert_eq!(read(&mut apic, TPR), 0x40);
    assert_eq!(read(&mut apic, PPR), 0x40);
    assert_eq!(apic.pending_vector(), None, "same class as TPR is blocked");
    write(&mut apic, TPR, 0x3F);
    assert_eq!(apic.pending_vector(), Some(0x45), "subclass does not block");
    write(&mut apic, TPR, 0xFF);
    assert_eq!(apic.pending_vector(), None);
    // Only bits 7:0 are kept.
    write(&mut apic, TPR, 0xFFFF_FF00);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(apic.pending_vector(), Some(0x45));
    // CR8 view.
    apic.set_task_priority(0x50);
    assert_eq!(apic.task_priority(), 0x50);
    assert_eq!(apic.pending_vector(), None);
}

#[test]
fn processor_priority_follows_in_service_class() {
    let mut apic = enabled_apic();
    write(&mut apic, TPR, 0x21);
    apic.accept(0x6A);
    apic.acknowledge(0x6A);
    assert_eq!(read(&mut apic, PPR), 0x60, "ISR class above TPR class");
    write(&mut apic, TPR, 0x75);
    assert_eq!(
        read(&mut apic, PPR),
        0x75,
        "TPR class at or above ISR class"
    );
    write(&mut apic, TPR, 0x6F);
    assert_eq!(read(&mut apic, PPR), 0x6F);
}

#[test]
fn acceptance_acknowledgement_and_end_of_interrupt_in_priority_order() {
    let mut apic = enabled_apic();
    apic.accept(0x30);
    apic.accept(0x80);
    apic.accept(0x51);
    assert_eq!(
        read(&mut apic, IRR + 0x10),
        1 << 16,
        "vector 0x30 in IRR word 1"
    );
    assert_eq!(read(&mut apic, IRR + 0x40), 1, "vector 0x80 in IRR word 4");
    assert_eq!(apic.pending_vector(), Some(0x80));
    apic.acknowledge(0x80);
    assert_eq!(read(&mut apic, ISR + 0x40), 1);
    assert_eq!(read(&mut apic, IRR + 0x40), 0);
    assert_eq!(
        apic.pending_vector(),
        None,
        "0x51 is below the in-service class"
    );
    apic.accept(0x85);
    assert_eq!(
        apic.pending_vector(),
        None,
        "same class as in service waits"
    );
    apic.accept(0x90);
    assert_eq!(apic.pending_vector(), Some(0x90), "higher class nests");
    apic.acknowledge(0x90);
    assert_eq!(read(&mut apic, PPR), 0x90);
    assert!(write(&mut apic, EOI, 0).is_empty());
    assert_eq!(
        read(&mut apic, ISR + 0x40),
        1,
        "EOI ended 0x90, 0x80 still in service"
    );
    assert_eq!(read(&mut apic, ISR + 0x40 + 0x10), 0);
    assert_eq!(apic.pending_vector(), None);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.pending_vector(), Some(0x85));
    apic.acknowledge(0x85);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.pending_vector(), Some(0x51));
    apic.acknowledge(0x51);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.pending_vector(), Some(0x30));
    apic.acknowledge(0x30);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.pending_vector(), None);
    assert_eq!(read(&mut apic, PPR), 0);
    // EOI with nothing in service, and acknowledging a vector not requested, change nothing.
    write(&mut apic, EOI, 0);
    apic.acknowledge(0x99);
    assert_eq!(read(&mut apic, ISR + 0x40), 0);
}

#[test]
fn level_triggered_end_of_interrupt_is_reported() {
    let mut apic = enabled_apic();
    apic.accept_level_triggered(0x41);
    assert_eq!(read(&mut apic, TMR + 0x20), 1 << 1);
    apic.acknowledge(0x41);
    assert_eq!(
        write(&mut apic, EOI, 0),
        alloc::vec![ApicEvent::EndOfInterrupt { vector: 0x41 }]
    );
    // The same vector accepted edge-triggered clears TMR again.
    apic.accept(0x41);
    assert_eq!(read(&mut apic, TMR + 0x20), 0);
    apic.acknowledge(0x41);
    assert!(write(&mut apic, EOI, 0).is_empty());
}

#[test]
fn software_disabled_apic_drops_fixed_interrupts_and_keeps_lvts_masked() {
    let mut apic = apic(0, true);
    apic.accept(0x40);
    assert_eq!(apic.pending_vector(), None);
    write(&mut apic, LVT_TIMER_OFFSET, 0x20);
    assert_eq!(
        read(&mut apic, LVT_TIMER_OFFSET),
        MASKED | 0x20,
        "mask cannot be cleared"
    );
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, LVT_TIMER_OFFSET, 0x20);
    assert_eq!(read(&mut apic, LVT_TIMER_OFFSET), 0x20);
    apic.accept(0x40);
    // Disabling again masks every LVT but keeps what is already requested.
    write(&mut apic, SVR, 0xFF);
    assert_eq!(read(&mut apic, LVT_TIMER_OFFSET), MASKED | 0x20);
    assert_eq!(apic.pending_vector(), Some(0x40));
    // It can still send IPIs.
    let events = write(&mut apic, ICR_LOW, 0x4031);
    assert_eq!(
        events,
        ipi(IpiDestination::Apic(0), IpiDelivery::Fixed { vector: 0x31 })
    );
}

#[test]
fn interrupt_command_register_sends_ipis() {
    let mut apic = enabled_apic();
    write(&mut apic, ICR_HIGH, 0x01FF_FFFF);
    assert_eq!(read(&mut apic, ICR_HIGH), 0x0100_0000, "only bits 31:24");
    // INIT assert, then INIT level de-assert (sends nothing), then two SIPIs.
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_C500),
        ipi(IpiDestination::Apic(1), IpiDelivery::Init)
    );
    assert!(write(&mut apic, ICR_LOW, 0x0000_8500).is_empty());
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_0608),
        ipi(
            IpiDestination::Apic(1),
            IpiDelivery::Startup { vector: 0x08 }
        )
    );
    assert_eq!(
        read(&mut apic, ICR_LOW),
        0x0000_0608,
        "delivery status reads 0"
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_1000 | 0x4031),
        ipi(IpiDestination::Apic(1), IpiDelivery::Fixed { vector: 0x31 })
    );
    assert_eq!(
        read(&mut apic, ICR_LOW) & (1 << 12),
        0,
        "delivery status never set"
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0004_4032),
        ipi(
            IpiDestination::SelfOnly,
            IpiDelivery::Fixed { vector: 0x32 }
        )
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0008_4033),
        ipi(
            IpiDestination::AllIncludingSelf,
            IpiDelivery::Fixed { vector: 0x33 }
        )
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x000C_4500),
        ipi(IpiDestination::AllExcludingSelf, IpiDelivery::Init)
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x000C_4699),
        ipi(
            IpiDestination::AllExcludingSelf,
            IpiDelivery::Startup { vector: 0x99 }
        )
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_4400),
        ipi(IpiDestination::Apic(1), IpiDelivery::Nmi)
    );
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_4140),
        ipi(
            IpiDestination::Apic(1),
            IpiDelivery::LowestPriority { vector: 0x40 }
        )
    );
    // Logical destination mode.
    write(&mut apic, ICR_HIGH, 0x0600_0000);
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_4841),
        ipi(
            IpiDestination::Logical(0x06),
            IpiDelivery::Fixed { vector: 0x41 }
        )
    );
    // Physical destination 0xFF is a broadcast.
    write(&mut apic, ICR_HIGH, 0xFF00_0000);
    assert_eq!(
        write(&mut apic, ICR_LOW, 0x0000_4042),
        ipi(
            IpiDestination::AllIncludingSelf,
            IpiDelivery::Fixed { vector: 0x42 }
        )
    );
    // SMI and the reserved delivery modes send nothing.
    assert!(write(&mut apic, ICR_LOW, 0x0000_4200).is_empty());
    assert!(write(&mut apic, ICR_LOW, 0x0000_4300).is_empty());
    assert!(write(&mut apic, ICR_LOW, 0x0000_4700).is_empty());
}

#[test]
fn illegal_vectors_are_errors_not_interrupts() {
    let mut apic = enabled_apic();
    assert!(write(&mut apic, ICR_LOW, 0x0000_4005).is_empty());
    apic.accept(0x0F);
    assert_eq!(apic.pending_vector(), None);
    assert_eq!(
        read(&mut apic, ESR),
        0,
        "errors show after the next ESR write"
    );
    write(&mut apic, ESR, 0);
    assert_eq!(read(&mut apic, ESR), (1 << 5) | (1 << 6));
    write(&mut apic, ESR, 0);
    assert_eq!(read(&mut apic, ESR), 0);
    // With the error LVT unmasked an error raises its vector; reserved registers are errors.
    write(&mut apic, LVT_ERROR_OFFSET, 0xFE);
    assert_eq!(read(&mut apic, 0x40), 0);
    assert_eq!(apic.pending_vector(), Some(0xFE));
    write(&mut apic, ESR, 0);
    assert_eq!(read(&mut apic, ESR), 1 << 7);
    // An illegal vector in the error LVT itself does not loop.
    write(&mut apic, LVT_ERROR_OFFSET, 0x03);
    apic.accept(0x01);
}

#[test]
fn x2apic_msr_map() {
    let mut apic = enabled_apic();
    // Not in x2APIC mode: the x2APIC MSRs do not exist.
    assert_eq!(apic.read_msr(0x802, 0), None);
    assert!(!write_msr(&mut apic, 0x808, 0).0);
    enter_x2apic(&mut apic);
    assert_eq!(apic.mmio_base(), None);
    assert_eq!(read(&mut apic, VERSION), 0, "no MMIO in x2APIC mode");
    assert_eq!(apic.read_msr(0x802, 0), Some(0));
    assert_eq!(
        apic.read_msr(0x80F, 0),
        Some(0x1FF),
        "state kept across the switch"
    );
    // TPR and PPR.
    assert_eq!(write_msr(&mut apic, 0x808, 0x30), (true, Vec::new()));
    assert_eq!(apic.read_msr(0x808, 0), Some(0x30));
    assert_eq!(apic.read_msr(0x80A, 0), Some(0x30));
    assert!(
        !write_msr(&mut apic, 0x808, 1 << 32).0,
        "bits 63:32 reserved"
    );
    // EOI: write-only, value must be 0.
    apic.accept_level_triggered(0x70);
    apic.acknowledge(0x70);
    assert_eq!(apic.read_msr(0x810 + 3, 0), Some(1 << 16), "ISR word 3");
    assert_eq!(apic.read_msr(0x80B, 0), None);
    assert!(!write_msr(&mut apic, 0x80B, 1).0);
    assert_eq!(
        write_msr(&mut apic, 0x80B, 0),
        (
            true,
            alloc::vec![ApicEvent::EndOfInterrupt { vector: 0x70 }]
        )
    );
    // ICR: one 64-bit MSR with a 32-bit destination.
    let (accepted, events) = write_msr(&mut apic, 0x830, 0x1234_5678_0000_4050);
    assert!(accepted);
    assert_eq!(
        events,
        ipi(
            IpiDestination::Apic(0x1234_5678),
            IpiDelivery::Fixed { vector: 0x50 }
        )
    );
    assert_eq!(apic.read_msr(0x830, 0), Some(0x1234_5678_0000_4050));
    let (_, events) = write_msr(&mut apic, 0x830, 0x0000_0007_0000_C500);
    assert_eq!(events, ipi(IpiDestination::Apic(7), IpiDelivery::Init));
    let (_, events) = write_msr(&mut apic, 0x830, 0x0000_0007_0000_0620);
    assert_eq!(
        events,
        ipi(
            IpiDestination::Apic(7),
            IpiDelivery::Startup { vector: 0x20 }
        )
    );
    let (_, events) = write_msr(&mut apic, 0x830, 0xFFFF_FFFF_0000_4051);
    assert_eq!(
        events,
        ipi(
            IpiDestination::AllIncludingSelf,
            IpiDelivery::Fixed { vector: 0x51 }
        )
    );
    let (_, events) = write_msr(&mut apic, 0x830, 0x000C_4052);
    assert_eq!(
        events,
        ipi(
            IpiDestination::AllExcludingSelf,
            IpiDelivery::Fixed { vector: 0x52 }
        )
    );
    let (_, events) = write_msr(&mut apic, 0x830, 0x0001_0003_0000_4853);
    assert_eq!(
        events,
        ipi(
            IpiDestination::Logical(0x0001_0003),
            IpiDelivery::Fixed { vector: 0x53 }
        )
    );
    // SELF IPI.
    assert_eq!(
        write_msr(&mut apic, 0x83F, 0x61),
        (
            true,
            ipi(
                IpiDestination::SelfOnly,
                IpiDelivery::Fixed { vector: 0x61 }
            )
        )
    );
    assert!(!write_msr(&mut apic, 0x83F, 0x161).0);
    assert_eq!(apic.read_msr(0x83F, 0), None);
    // Registers absent in x2APIC mode, and read-only ones.
    for msr in [
        0x800, 0x801, 0x809, 0x80C, 0x80E, 0x82F, 0x831, 0x83A, 0x840, 0x8FF,
    ] {
        assert_eq!(apic.read_msr(msr, 0), None, "read {msr:#x}");
        assert!(!write_msr(&mut apic, msr, 0).0, "write {msr:#x}");
    }
    for msr in [0x802, 0x803, 0x80A, 0x80D, 0x810, 0x818, 0x820, 0x839] {
        assert!(apic.read_msr(msr, 0).is_some(), "read {msr:#x}");
        assert!(!write_msr(&mut apic, msr, 0).0, "write {msr:#x}");
    }
    // ESR: only 0 may be written.
    assert!(write_msr(&mut apic, 0x828, 0).0);
    assert!(!write_msr(&mut apic, 0x828, 1).0);
    // Non-APIC MSRs are not ours.
    assert_eq!(apic.read_msr(0x10, 0), None);
    assert!(!write_msr(&mut apic, 0xC000_0080, 0).0);
}

#[test]
fn x2apic_logical_destination_is_derived_from_the_id() {
    let mut apic = apic_with_id(0x23);
    enter_x2apic(&mut apic);
    assert_eq!(apic.read_msr(0x80D, 0), Some((0x2 << 16) | (1 << 3)));
    assert!(apic.matches_logical((0x2 << 16) | 0b1000));
    assert!(!apic.matches_logical((0x2 << 16) | 0b0100));
    assert!(!apic.matches_logical((0x3 << 16) | 0b1000));
    assert!(apic.matches_logical(u32::MAX));
}

#[test]
fn xapic_logical_destination_models() {
    let mut apic = enabled_apic();
    write(&mut apic, LDR, 0x04FF_FFFF);
    assert_eq!(read(&mut apic, LDR), 0x0400_0000);
    assert!(apic.matches_logical(0x04));
    assert!(apic.matches_logical(0x0C));
    assert!(!apic.matches_logical(0x03));
    assert!(apic.matches_logical(0xFF));
    // Cluster model: cluster 2, member bit 1.
    write(&mut apic, DFR, 0x0FFF_0000);
    assert_eq!(read(&mut apic, DFR), 0x0FFF_FFFF);
    write(&mut apic, LDR, 0x2200_0000);
    assert!(apic.matches_logical(0x22));
    assert!(apic.matches_logical(0xF2));
    assert!(!apic.matches_logical(0x12));
    assert!(!apic.matches_logical(0x21));
}

#[test]
fn apic_base_mode_transitions() {
    let mut apic = enabled_apic();
    let mut events = Vec::new();
    assert_eq!(apic.read_msr(MSR_APIC_BASE, 0), Some(0xFEE0_0900));
    assert!(
        !apic.write_msr(MSR_APIC_BASE, 0xFEE0_0900 | 1, 0, &mut events),
        "reserved bit 0"
    );
    assert!(
        !apic.write_msr(MSR_APIC_BASE, 0xFEE0_0400, 0, &mut events),
        "x2APIC without enable"
    );
    assert!(apic.write_msr(MSR_APIC_BASE, 0xFEE0_0D00, 0, &mut events));
    assert!(
        !apic.write_msr(MSR_APIC_BASE, 0xFEE0_0900, 0, &mut events),
        "x2APIC to xAPIC"
    );
    apic.accept(0x40);
    assert!(
        apic.write_msr(MSR_APIC_BASE, 0xFEE0_0100, 0, &mut events),
        "disable"
    );
    assert!(!apic.is_globally_enabled());
    assert_eq!(apic.pending_vector(), None);
    apic.accept(0x40);
    assert!(
        !apic.write_msr(MSR_APIC_BASE, 0xFEE0_0D00, 0, &mut events),
        "disabled to x2APIC"
    );
    // Re-enabled, moved to another page, in the power-up state.
    assert!(apic.write_msr(MSR_APIC_BASE, 0xFED0_0800, 0, &mut events));
    assert_eq!(apic.mmio_base(), Some(0xFED0_0000));
    assert_eq!(
        apic.read_msr(MSR_APIC_BASE, 0),
        Some(0xFED0_0900),
        "bootstrap flag kept"
    );
    assert_eq!(read(&mut apic, SVR), 0xFF);
    assert_eq!(apic.pending_vector(), None);
}

#[test]
fn init_resets_everything_but_the_id_and_sipi_starts_once() {
    let mut apic = apic_with_id(2);
    assert_eq!(apic.receive_startup(0x9A), Some(0x9A000));
    assert!(!apic.is_waiting_for_sipi());
    assert_eq!(apic.receive_startup(0x10), None, "a second SIPI is ignored");
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, TPR, 0x20);
    write(&mut apic, LDR, 0x0100_0000);
    write(&mut apic, LVT_TIMER_OFFSET, 0x30);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    apic.accept(0x50);
    apic.receive_init();
    assert!(apic.is_waiting_for_sipi());
    assert_eq!(read(&mut apic, ID), 0x0200_0000);
    assert_eq!(read(&mut apic, SVR), 0xFF);
    assert_eq!(read(&mut apic, TPR), 0);
    assert_eq!(read(&mut apic, LDR), 0);
    assert_eq!(read(&mut apic, LVT_TIMER_OFFSET), MASKED);
    assert_eq!(read(&mut apic, INITIAL_COUNT), 0);
    assert_eq!(apic.advance_timer(1000), None);
    assert_eq!(read(&mut apic, IRR + 0x20), 0);
    assert_eq!(apic.receive_startup(0x08), Some(0x8000));
    // INIT keeps x2APIC mode; the bootstrap processor does not wait for a SIPI.
    let mut bootstrap = enabled_apic();
    enter_x2apic(&mut bootstrap);
    bootstrap.receive_init();
    assert!(bootstrap.is_x2apic());
    assert!(!bootstrap.is_waiting_for_sipi());
    assert_eq!(bootstrap.read_msr(0x80F, 0), Some(0xFF));
}

/// (divide configuration value, divisor). See: SDM Vol 3A Figure 11-10.
const DIVIDES: [(u32, u64); 8] = [
    (0b1011, 1),
    (0b0000, 2),
    (0b0001, 4),
    (0b0010, 8),
    (0b0011, 16),
    (0b1000, 32),
    (0b1001, 64),
    (0b1010, 128),
];

#[test]
fn one_shot_timer_expires_at_the_right_tsc_for_every_divisor() {
    for (configuration, divisor) in DIVIDES {
        let mut apic = enabled_apic();
        write(&mut apic, DIVIDE, configuration);
        assert_eq!(read(&mut apic, DIVIDE), configuration);
        write(&mut apic, LVT_TIMER_OFFSET, 0x20);
        let start = 5000;
        write_at(&mut apic, INITIAL_COUNT, 1000, start);
        let expiry = start + 1000 * divisor;
        assert_eq!(
            apic.advance_timer(expiry - 1),
            Some(expiry),
            "divisor {divisor}"
        );
        assert_eq!(apic.pending_vector(), None, "divisor {divisor}");
        assert_eq!(apic.read_mmio(CURRENT_COUNT, expiry - 1), 1);
        assert_eq!(apic.advance_timer(expiry), None, "one-shot stops");
        assert_eq!(apic.pending_vector(), Some(0x20), "divisor {divisor}");
        assert_eq!(apic.read_mmio(CURRENT_COUNT, expiry), 0);
        assert_eq!(apic.read_mmio(INITIAL_COUNT, expiry), 1000);
        apic.acknowledge(0x20);
        write(&mut apic, EOI, 0);
        assert_eq!(apic.advance_timer(expiry * 10), None);
        assert_eq!(apic.pending_vector(), None, "fires once");
    }
}

#[test]
fn timer_converts_between_clocks_exactly() {
    // 2.5 TSC cycles per APIC timer tick at divide-by-1.
    let clock = TimerClock {
        tsc_hz: 2_500_000_000,
        apic_timer_hz: 1_000_000_000,
    };
    let mut apic = LocalApic::new(0, true, clock);
    write(&mut apic, SVR, 0x1FF);
    write(&mut apic, DIVIDE, 0b1011);
    write(&mut apic, LVT_TIMER_OFFSET, TIMER_PERIODIC | 0x21);
    write_at(&mut apic, INITIAL_COUNT, 3, 100);
    // Period 7.5 cycles: expiries at 107.5, 115, 122.5, ... seen at the next whole cycle.
    assert_eq!(apic.advance_timer(100), Some(108));
    assert_eq!(apic.advance_timer(108), Some(115));
    assert_eq!(apic.advance_timer(115), Some(123));
    assert_eq!(apic.advance_timer(123), Some(130));
    // After a million periods there is still no drift.
    assert_eq!(apic.advance_timer(100 + 7_500_000), Some(100 + 7_500_008));
    assert_eq!(apic.pending_vector(), Some(0x21));
}

#[test]
fn periodic_timer_rearms_and_coalesces_missed_periods() {
    let mut apic = enabled_apic();
    write(&mut apic, DIVIDE, 0b1011);
    write(&mut apic, LVT_TIMER_OFFSET, TIMER_PERIODIC | 0x22);
    write_at(&mut apic, INITIAL_COUNT, 100, 0);
    assert_eq!(apic.advance_timer(99), Some(100));
    assert_eq!(apic.advance_timer(100), Some(200));
    assert_eq!(apic.pending_vector(), Some(0x22));
    apic.acknowledge(0x22);
    write(&mut apic, EOI, 0);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 150), 50);
    assert_eq!(apic.advance_timer(250), Some(300));
    assert_eq!(apic.pending_vector(), Some(0x22));
    apic.acknowledge(0x22);
    write(&mut apic, EOI, 0);
    // Many missed periods: one interrupt, next expiry on the original grid.
    assert_eq!(apic.advance_timer(1050), Some(1100));
    assert_eq!(apic.pending_vector(), Some(0x22));
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 1075), 25);
    // Initial count 0 stops the timer.
    write_at(&mut apic, INITIAL_COUNT, 0, 1080);
    assert_eq!(apic.advance_timer(5000), None);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 5000), 0);
}

#[test]
fn current_count_decreases_with_the_tsc() {
    let mut apic = enabled_apic();
    write(&mut apic, DIVIDE, 0b0000); // divide by 2
    write(&mut apic, LVT_TIMER_OFFSET, MASKED | 0x20);
    write_at(&mut apic, INITIAL_COUNT, 1000, 10_000);
    let mut previous = u32::MAX;
    for now in (10_000..=12_000).step_by(97) {
        let count = apic.read_mmio(CURRENT_COUNT, now);
        assert!(count <= previous);
        previous = count;
    }
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 10_000), 1000);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 10_002), 999);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 11_000), 500);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 11_999), 1);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 12_000), 0);
    assert_eq!(
        apic.read_mmio(CURRENT_COUNT, 9_000),
        0,
        "stopped; time does not run back"
    );
}

#[test]
fn changing_the_divisor_keeps_the_current_count() {
    let mut apic = enabled_apic();
    write(&mut apic, DIVIDE, 0b1011);
    write(&mut apic, LVT_TIMER_OFFSET, 0x23);
    write_at(&mut apic, INITIAL_COUNT, 1000, 0);
    write_at(&mut apic, DIVIDE, 0b0001, 400); // 600 left, now divide by 4
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 400), 600);
    assert_eq!(apic.advance_timer(400), Some(400 + 600 * 4));
}

#[test]
fn masked_timer_does_not_fire() {
    let mut apic = enabled_apic();
    write(&mut apic, DIVIDE, 0b1011);
    write(&mut apic, LVT_TIMER_OFFSET, MASKED | 0x24);
    write_at(&mut apic, INITIAL_COUNT, 10, 0);
    assert_eq!(apic.advance_timer(5), None, "masked: no wake-up needed");
    assert_eq!(apic.advance_timer(100), None);
    assert_eq!(apic.pending_vector(), None);
    // Unmasking after the expiry does not deliver it late.
    write_at(&mut apic, LVT_TIMER_OFFSET, 0x24, 200);
    assert_eq!(apic.advance_timer(300), None);
    assert_eq!(apic.pending_vector(), None);
    // Masked periodic and TSC-deadline timers do not fire either.
    write_at(
        &mut apic,
        LVT_TIMER_OFFSET,
        MASKED | TIMER_PERIODIC | 0x24,
        300,
    );
    write_at(&mut apic, INITIAL_COUNT, 10, 300);
    assert_eq!(apic.advance_timer(10_000), None);
    write_at(
        &mut apic,
        LVT_TIMER_OFFSET,
        MASKED | TIMER_TSC_DEADLINE | 0x24,
        10_000,
    );
    apic.set_tsc_deadline(10_010, 10_000);
    assert_eq!(apic.advance_timer(10_005), None);
    assert_eq!(apic.advance_timer(10_010), None);
    assert_eq!(apic.tsc_deadline(), 0, "passed, even though masked");
    assert_eq!(apic.pending_vector(), None);
}

#[test]
fn tsc_deadline_timer() {
    let mut apic = enabled_apic();
    let mut events = Vec::new();
    // Not in TSC-deadline mode: the MSR reads 0 and ignores writes.
    assert!(apic.write_msr(MSR_TSC_DEADLINE, 5000, 1000, &mut events));
    assert_eq!(apic.read_msr(MSR_TSC_DEADLINE, 1000), Some(0));
    write_at(&mut apic, LVT_TIMER_OFFSET, TIMER_TSC_DEADLINE | 0x30, 1000);
    assert!(apic.write_msr(MSR_TSC_DEADLINE, 5000, 1000, &mut events));
    assert_eq!(apic.read_msr(MSR_TSC_DEADLINE, 1000), Some(5000));
    // Initial count is ignored and current count reads 0.
    write_at(&mut apic, INITIAL_COUNT, 10, 1000);
    assert_eq!(apic.read_mmio(INITIAL_COUNT, 1000), 0);
    assert_eq!(apic.read_mmio(CURRENT_COUNT, 1001), 0);
    assert_eq!(apic.advance_timer(4999), Some(5000));
    assert_eq!(apic.pending_vector(), None);
    assert_eq!(apic.advance_timer(5000), None);
    assert_eq!(apic.pending_vector(), Some(0x30));
    assert_eq!(apic.tsc_deadline(), 0, "disarmed after firing");
    apic.acknowledge(0x30);
    write(&mut apic, EOI, 0);
    // A deadline in the past fires at once; 0 disarms.
    apic.set_tsc_deadline(100, 6000);
    assert_eq!(apic.pending_vector(), Some(0x30));
    apic.acknowledge(0x30);
    write(&mut apic, EOI, 0);
    apic.set_tsc_deadline(9000, 6000);
    apic.set_tsc_deadline(0, 6001);
    assert_eq!(apic.advance_timer(10_000), None);
    assert_eq!(apic.pending_vector(), None);
    // Leaving TSC-deadline mode disarms.
    apic.set_tsc_deadline(20_000, 10_000);
    write_at(&mut apic, LVT_TIMER_OFFSET, 0x30, 10_000);
    write_at(
        &mut apic,
        LVT_TIMER_OFFSET,
        TIMER_TSC_DEADLINE | 0x30,
        10_000,
    );
    assert_eq!(apic.tsc_deadline(), 0);
    assert_eq!(apic.advance_timer(30_000), None);
    assert_eq!(apic.pending_vector(), None);
    // Entering it stops a one-shot count.
    write_at(&mut apic, LVT_TIMER_OFFSET, 0x30, 30_000);
    write_at(&mut apic, INITIAL_COUNT, 10, 30_000);
    write_at(
        &mut apic,
        LVT_TIMER_OFFSET,
        TIMER_TSC_DEADLINE | 0x30,
        30_001,
    );
    assert_eq!(apic.advance_timer(40_000), None);
    assert_eq!(apic.pending_vector(), None);
}

#[test]
fn timer_registers_in_x2apic_mode() {
    let mut apic = enabled_apic();
    enter_x2apic(&mut apic);
    let mut events = Vec::new();
    assert!(apic.write_msr(0x83E, 0b1011, 0, &mut events));
    assert!(apic.write_msr(0x832, 0x25, 0, &mut events));
    assert!(apic.write_msr(0x838, 40, 100, &mut events));
    assert_eq!(apic.read_msr(0x839, 110), Some(30));
    assert_eq!(apic.advance_timer(139), Some(140));
    assert_eq!(apic.advance_timer(140), None);
    assert_eq!(apic.pending_vector(), Some(0x25));
}

#[test]
fn pic_interrupts_need_virtual_wire_or_a_disabled_apic() {
    let mut apic = enabled_apic();
    assert!(!apic.accepts_pic_interrupts());
    write(&mut apic, LVT_LINT0_OFFSET, 0x700);
    assert!(apic.accepts_pic_interrupts());
    write(&mut apic, LVT_LINT0_OFFSET, MASKED | 0x700);
    assert!(!apic.accepts_pic_interrupts());
    assert!(apic.write_msr(MSR_APIC_BASE, 0xFEE0_0000, 0, &mut Vec::new()));
    assert!(apic.accepts_pic_interrupts());
}

/// A small deterministic generator for the hostile-input loop.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_accesses_never_panic() {
    let clocks = [
        SAME_RATE,
        TimerClock {
            tsc_hz: 0,
            apic_timer_hz: 0,
        },
        TimerClock {
            tsc_hz: u64::MAX,
            apic_timer_hz: 1,
        },
        TimerClock {
            tsc_hz: 1,
            apic_timer_hz: u64::MAX,
        },
    ];
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut events = Vec::new();
    for clock in clocks {
        for x2apic in [false, true] {
            let mut apic = LocalApic::new(u32::MAX, false, clock);
            if x2apic {
                enter_x2apic(&mut apic);
            }
            write(&mut apic, SVR, 0x1FF);
            // Every offset, aligned or not, in and past the page.
            for offset in 0..0x1100 {
                let value = random.next() as u32;
                let now = random.next() >> (random.next() % 64);
                apic.read_mmio(offset, now);
                apic.write_mmio(offset, value, now, &mut events);
                apic.write_mmio(offset, u32::MAX, u64::MAX, &mut events);
            }
            // Every x2APIC MSR and a few around it, with random and extreme values.
            for msr in (0x7F0..0x910).chain([0, 0x1B, 0x6E0, u32::MAX]) {
                if msr == MSR_APIC_BASE {
                    continue;
                }
                let now = random.next();
                apic.read_msr(msr, now);
                apic.write_msr(msr, random.next(), now, &mut events);
                apic.write_msr(msr, u64::MAX, now, &mut events);
                apic.write_msr(msr, random.next() & 0xFFFF_FFFF, u64::MAX, &mut events);
            }
            // Timers with extreme counts and every mode, at times running backwards.
            for _ in 0..2000 {
                let now = random.next();
                match random.next() % 9 {
                    0 => apic.write_mmio(LVT_TIMER_OFFSET, random.next() as u32, now, &mut events),
                    1 => apic.write_mmio(INITIAL_COUNT, u32::MAX, now, &mut events),
                    2 => apic.write_mmio(DIVIDE, random.next() as u32, now, &mut events),
                    3 => apic.set_tsc_deadline(random.next(), now),
                    4 => apic.accept(random.next() as u8),
                    5 => apic.acknowledge(random.next() as u8),
                    6 => apic.write_mmio(EOI, 0, now, &mut events),
                    7 => {
                        apic.set_apic_base_msr(random.next());
                    }
                    _ => apic.receive_init(),
                }
                apic.advance_timer(now);
                apic.advance_timer(u64::MAX);
                apic.pending_vector();
                apic.read_mmio(CURRENT_COUNT, now);
                apic.read_msr(0x839, now);
                apic.matches_logical(random.next() as u32);
                apic.receive_startup(random.next() as u8);
                events.clear();
            }
        }
    }
}
