//! What a failure report shows of a guest that ended badly, beyond its registers: the event
//! its last entry delivered, its descriptor tables, and for each address that delivery needs
//! (the code, the stack, the IDT and the handlers it names, the GDT, the TSS and its stacks)
//! where the guest's page tables put it, whether the VM's RAM backs that page, and the nested
//! page table entry for it.
//!
//! A triple fault at the first instruction after an entry means the CPU could not deliver an
//! event there: one of these lines then shows the break (a walk that fails, a page whose
//! nested entry does not match the frame the RAM map holds, a handler that is not mapped).

use crate::paging::GuestPaging;
use crate::vcpu::{FaultContext, GuestSnapshot, Vcpu};
use crate::vm::Vm;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use ringzero_memory::page_table::{self, LongModeFormat, WalkFault};
use ringzero_memory::{
    paging_mode, read_guest_virtual, translate_guest_virtual, GuestMemoryError, GuestPagingMode,
    GuestPhysAddr, GuestVirtAddr, HostMemory,
};

/// Vectors whose IDT entries are always shown: #DF, #GP, #PF.
const ALWAYS_SHOWN_VECTORS: [u8; 3] = [8, 13, 14];
/// Bit 31 of EVENTINJ / EXITINTINFO / VM-entry and IDT-vectoring information: valid.
const EVENT_VALID: u64 = 1 << 31;

/// The report's lines (without the VM and vCPU prefix the caller adds).
pub fn describe(vm: &Vm, vcpu: &dyn Vcpu, host: &dyn HostMemory) -> Vec<String> {
    let state = vcpu.snapshot();
    let context = vcpu.fault_context();
    let mut lines = Vec::new();
    lines.push(format!(
        "entry event {} exit event {} idt={:#x}/{:#x} gdt={:#x}/{:#x} tss={:#x}/{:#x}",
        event(context.entry_event),
        event(context.exit_event),
        context.idtr_base,
        context.idtr_limit,
        context.gdtr_base,
        context.gdtr_limit,
        context.tr_base,
        context.tr_limit,
    ));
    let mut places: Vec<(String, u64)> = alloc::vec![
        ("rip".into(), state.rip),
        ("rsp".into(), state.rsp),
        ("rsp-64".into(), state.rsp.wrapping_sub(64)),
        ("cr2".into(), context.cr2),
        ("idt".into(), context.idtr_base),
        ("gdt".into(), context.gdtr_base),
        ("tss".into(), context.tr_base),
    ];
    let mut vectors: Vec<u8> = ALWAYS_SHOWN_VECTORS.to_vec();
    for raw in [context.entry_event, context.exit_event] {
        if raw & EVENT_VALID != 0 && !vectors.contains(&(raw as u8)) {
            vectors.push(raw as u8);
        }
    }
    for vector in vectors {
        match idt_gate(vm, host, &state, &context, vector) {
            Some((handler, ist)) => {
                lines.push(format!("idt[{vector}]: handler {handler:#x} ist {ist}"));
                places.push((format!("handler[{vector}]"), handler));
            }
            None => lines.push(format!("idt[{vector}]: unreadable")),
        }
    }
    for (name, stack) in tss_stacks(vm, host, &state, &context) {
        places.push((name, stack.wrapping_sub(8)));
    }
    lines.push(format!(
        "rip walk: {}",
        walk_entries(vm, host, &state, state.rip)
    ));
    for (name, address) in places {
        lines.push(format!(
            "{name} {address:#x}: {}",
            place(vm, host, &state, address)
        ));
    }
    if let Some(line) = nested_consistency(vm, context.nested_root, host) {
        lines.push(line);
    }
    lines
}

fn event(raw: u64) -> String {
    if raw & EVENT_VALID == 0 {
        return "none".into();
    }
    let kind = match (raw >> 8) & 7 {
        0 => "interrupt",
        2 => "nmi",
        3 => "exception",
        4 => "software-interrupt",
        5 => "privileged-software-exception",
        6 => "software-exception",
        _ => "other",
    };
    format!("{kind} vector {} ({raw:#x})", raw as u8)
}

/// Reads `buffer.len()` bytes at guest-virtual `address` through the guest's page tables.
fn read(
    vm: &Vm,
    host: &dyn HostMemory,
    state: &GuestSnapshot,
    address: u64,
    buffer: &mut [u8],
) -> bool {
    let mode = paging_mode(state.cr0, state.cr4, state.efer);
    read_guest_virtual(
        &vm.ram,
        host,
        mode,
        state.cr3,
        GuestVirtAddr(address),
        buffer,
    )
    .is_ok()
}

/// The 64-bit IDT gate of `vector`: its handler's address and IST index.
/// See: SDM Vol 3A 6.14.1 (Figure 6-8, 64-bit IDT gate descriptors).
fn idt_gate(
    vm: &Vm,
    host: &dyn HostMemory,
    state: &GuestSnapshot,
    context: &FaultContext,
    vector: u8,
) -> Option<(u64, u8)> {
    let offset = u64::from(vector) * 16;
    if offset + 15 > u64::from(context.idtr_limit) {
        return None;
    }
    let mut gate = [0u8; 16];
    if !read(
        vm,
        host,
        state,
        context.idtr_base.wrapping_add(offset),
        &mut gate,
    ) {
        return None;
    }
    let low = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let middle = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    Some((low | (middle << 16) | (high << 32), gate[4] & 7))
}

/// RSP0 and the non-zero IST entries of the 64-bit TSS. See: SDM Vol 3A 8.7 (Figure 8-11).
fn tss_stacks(
    vm: &Vm,
    host: &dyn HostMemory,
    state: &GuestSnapshot,
    context: &FaultContext,
) -> Vec<(String, u64)> {
    let mut tss = [0u8; 0x68];
    if context.tr_base == 0 || !read(vm, host, state, context.tr_base, &mut tss) {
        return Vec::new();
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&tss[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let mut stacks = alloc::vec![("rsp0".into(), word(4))];
    for ist in 1..=7 {
        let value = word(0x24 + 8 * (ist - 1));
        if value != 0 {
            stacks.push((format!("ist{ist}"), value));
        }
    }
    stacks
}

/// Where guest-virtual `address` lands: the guest-physical address, whether the RAM backs
/// that page and with which frame, and the nested entry (which must name the same frame).
fn place(vm: &Vm, host: &dyn HostMemory, state: &GuestSnapshot, address: u64) -> String {
    let mode = paging_mode(state.cr0, state.cr4, state.efer);
    let gpa = match translate_guest_virtual(&vm.ram, host, mode, state.cr3, GuestVirtAddr(address))
    {
        Ok(gpa) => gpa,
        Err(error) => return format!("guest walk fails: {error}"),
    };
    let frame = match vm.ram.host_frame(gpa) {
        Some(frame) => format!("frame {:#x}", frame.0),
        None if vm.ram.contains(gpa, 1) => "RAM page not backed".into(),
        None => "outside RAM".into(),
    };
    let nested = match &vm.paging {
        GuestPaging::Nested(tables) => {
            match tables.leaf_entry(host, GuestPhysAddr(gpa.0 & !0xFFF)) {
                Some(entry) => {
                    let agrees = vm.ram.host_frame(gpa).map(|frame| {
                        tables.translate(host, GuestPhysAddr(gpa.0 & !0xFFF)) == Some(frame)
                    });
                    match agrees {
                        Some(false) => format!(", nested entry {entry:#x} NAMES ANOTHER FRAME"),
                        _ => format!(", nested entry {entry:#x}"),
                    }
                }
                None => ", not in the nested tables".into(),
            }
        }
        GuestPaging::Shadow { .. } => String::new(),
    };
    format!("gpa {:#x}, {frame}{nested}", gpa.0)
}

/// The guest's 4-level walk of `linear` entry by entry (as guest RAM holds it now), so an entry
/// with reserved bits or a wrong address shows: "L4 gpa=value L3 ... -> result". 4-level
/// long mode only. The generic walker does the walking; its reader records each entry it reads.
fn walk_entries(vm: &Vm, host: &dyn HostMemory, state: &GuestSnapshot, linear: u64) -> String {
    if paging_mode(state.cr0, state.cr4, state.efer) != GuestPagingMode::Long4 {
        return "not in 4-level long mode".into();
    }
    let mut out = String::new();
    let mut level = 4u8;
    let result = page_table::walk(
        &LongModeFormat,
        state.cr3 & page_table::ADDRESS_MASK_64,
        4,
        linear,
        |_table, address| {
            let entry = vm.ram.read_u64(host, GuestPhysAddr(address))?;
            out.push_str(&format!("L{level} {address:#x}={entry:#x} "));
            level = level.saturating_sub(1);
            Ok::<u64, GuestMemoryError>(entry)
        },
    );
    match result {
        Ok(mapping) => out.push_str(&format!("-> {:#x}", mapping.physical_address(linear))),
        Err(WalkFault::NotPresent { level }) => out.push_str(&format!("-> L{level} not present")),
        Err(WalkFault::ReservedBits { level }) => {
            out.push_str(&format!("-> L{level} reserved bits"));
        }
        Err(WalkFault::Unreadable { table, .. }) => {
            out.push_str(&format!("-> table {table:#x} outside RAM"));
        }
    }
    out
}

/// Whether the nested tables and the RAM map agree on every page (the hardware walks the
/// first, the hypervisor reads and writes guest memory through the second): `None` under
/// shadow paging. `used` is the nested root the vCPU runs with ([`FaultContext::nested_root`]).
fn nested_consistency(vm: &Vm, used: u64, host: &dyn HostMemory) -> Option<String> {
    let GuestPaging::Nested(tables) = &vm.paging else {
        return None;
    };
    let root = tables.root().0;
    let root_line = if used == root {
        format!("root {root:#x}")
    } else {
        format!("THE VCPU USES ROOT {used:#x}, THE VM'S IS {root:#x}")
    };
    let pages = vm.ram.size() >> 12;
    let mut mapped = 0u64;
    let mut wrong = Vec::new();
    for page in 0..pages {
        let gpa = GuestPhysAddr(page << 12);
        let nested = tables.translate(host, gpa);
        if nested.is_some() {
            mapped += 1;
        }
        let ram = vm.ram.host_frame(gpa);
        // A backed page the guest has not touched yet has no nested entry: that is fine.
        if nested.is_some() && nested != ram {
            wrong.push((gpa.0, nested, ram));
        }
    }
    let mut line = format!(
        "nested tables: {root_line}, {mapped} pages mapped, {} disagree with the RAM map",
        wrong.len()
    );
    for (gpa, nested, ram) in wrong.iter().take(8) {
        line.push_str(&format!("; gpa {gpa:#x} nested {nested:x?} ram {ram:x?}"));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::walk_entries;
    use crate::paging::GuestPaging;
    use crate::vcpu::GuestSnapshot;
    use crate::vm::Vm;
    use ringzero_memory::fake::FakeHostMemory;
    use ringzero_memory::shadow::{GuestPagingState, ShadowPaging};
    use ringzero_memory::{GuestPhysAddr, GuestRam};

    /// A VM whose tables map linear 0x20_0000 with a 2 MiB page at guest-physical 0x40_0000:
    /// PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000.
    fn vm_with_tables(host: &mut FakeHostMemory) -> Vm {
        let paging = GuestPaging::Shadow {
            engine: ShadowPaging::new(1),
            visible: GuestPagingState::default(),
        };
        let mut ram = GuestRam::new_lazy(8 << 20);
        for (address, entry) in [(0x1000, 0x2003u64), (0x2000, 0x3003), (0x3008, 0x40_0083)] {
            ram.write_allocating(host, GuestPhysAddr(address), &entry.to_le_bytes())
                .unwrap();
        }
        Vm::new("guest", ram, paging, false)
    }

    fn long_mode(cr3: u64) -> GuestSnapshot {
        GuestSnapshot {
            cr0: 1 << 31 | 1,
            cr3,
            efer: 1 << 10 | 1 << 8,
            ..GuestSnapshot::default()
        }
    }

    #[test]
    fn the_walk_shows_each_entry_and_where_it_ends() {
        let mut host = FakeHostMemory::new();
        let vm = vm_with_tables(&mut host);
        let state = long_mode(0x1000);
        assert_eq!(
            walk_entries(&vm, &host, &state, 0x20_1234),
            "L4 0x1000=0x2003 L3 0x2000=0x3003 L2 0x3008=0x400083 -> 0x401234"
        );
        assert_eq!(
            walk_entries(&vm, &host, &state, 0x40_0000),
            "L4 0x1000=0x2003 L3 0x2000=0x3003 L2 0x3010=0x0 -> L2 not present"
        );
        assert_eq!(
            walk_entries(&vm, &host, &long_mode(0x90_0000), 0),
            "-> table 0x900000 outside RAM"
        );
        assert_eq!(
            walk_entries(&vm, &host, &GuestSnapshot::default(), 0),
            "not in 4-level long mode"
        );
    }
}
