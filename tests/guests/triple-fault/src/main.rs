//! triple-fault: loads an IDT with limit 0 and executes UD2. The #UD cannot be delivered (its
//! gate is beyond the IDT limit: #GP, same for #GP), so the CPU raises #DF, which cannot be
//! delivered either: a triple fault (SDM Vol 3A 6.15, "Interrupt 8"). Under plain QEMU
//! (`-d int`) the chain shows as v=06, v=0d, v=08, then "Triple fault", all at the UD2's RIP. The hypervisor must stop this VM with a triple-fault report and go on with
//! the others. Should the guest ever continue past the UD2, it exits with status 1.
#![no_std]
#![no_main]

use guest_lib::hw::{self, DescriptorTablePointer};
use guest_lib::{exit, println, BootInfo};

guest_lib::flat64_entry!(main);

fn main(_boot_info: BootInfo) -> ! {
    println!(
        "triple-fault: loading an empty IDT and executing ud2 at {:#x}",
        hw::ud2_address()
    );
    let empty = DescriptorTablePointer { limit: 0, base: 0 };
    hw::lidt_and_ud2(&empty);
    println!("triple-fault: execution continued after ud2");
    exit(1)
}
