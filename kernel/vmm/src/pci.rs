//! PCI functions with memory BARs (the virtio devices): how the core reaches them besides their
//! configuration space.
//!
//! A function lives in two places. Its configuration space is on the VM's PCI bus
//! (`ringzero_devices::PciBus`, ports 0xCF8-0xCFF), where the guest finds it and programs its
//! BARs; the bus holds a [`SharedFunction`] that forwards there. Its registers (the BARs) are
//! MMIO: a guest access faults (nothing is mapped outside RAM), [`Vm`]'s `device_at` asks each
//! function whether the address is in one of its BARs *as the guest programmed them*, and the
//! access is emulated against it. A write that notifies a queue makes the device run that queue
//! there and then, with the VM's RAM as [`GuestMemory`] (the "DMA"), and the platform hears of
//! it once the exit is handled, the VM still locked and the function unlocked
//! ([`crate::Platform::exit_handled`]: the kernel moves a NIC's frames on from there).
//! Interrupt lines (INTx) are sampled with the other devices' lines before each guest entry
//! ([`crate::smp::poll_devices`]) and go to the I/O APIC pin the DSDT's `_PRT` names.
//!
//! Everything the guest writes is hostile: the device models (`ringzero-virtio`) validate it;
//! this module only routes.

use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use ringzero_devices::PciDevice;
use ringzero_memory::{GuestPhysAddr, GuestRam, HostMemory};
use ringzero_virtio::{GuestMemory, OutOfRam, VirtioDevice, VirtioPci};
use spin::Mutex;

/// What the core needs of a PCI function with BARs, beyond its configuration space.
pub trait BarFunction: PciDevice {
    /// Which BAR holds `gpa` (as the guest programmed it, with memory decoding on), and the
    /// offset inside it.
    fn bar_containing(&self, gpa: u64) -> Option<(usize, u64)>;
    fn bar_read(&mut self, bar: usize, offset: u64, size: u8) -> u64;
    /// Returns the queue the write notified, if it was a notification.
    fn bar_write(&mut self, bar: usize, offset: u64, size: u8, value: u64) -> Option<u16>;
    /// Runs a notified queue against the VM's RAM; returns the chains used.
    fn process(&mut self, queue: u16, memory: &mut dyn GuestMemory) -> usize;
    /// Queues notified through the configuration window (bit per queue) since the last call.
    fn take_window_notifications(&mut self) -> u64;
    /// The level of INTA#.
    fn interrupt_line(&self) -> bool;
    /// One line of statistics for the end-of-VM report.
    fn statistics(&self) -> String;
    /// The model as `Any`, for what only one kind of device does (a NIC's frames).
    fn as_model_mut(&mut self) -> &mut dyn core::any::Any;
}

impl<D: VirtioDevice + DeviceStatistics + 'static> BarFunction for VirtioPci<D> {
    fn bar_containing(&self, gpa: u64) -> Option<(usize, u64)> {
        VirtioPci::bar_containing(self, gpa)
    }
    fn bar_read(&mut self, bar: usize, offset: u64, size: u8) -> u64 {
        VirtioPci::bar_read(self, bar, offset, size)
    }
    fn bar_write(&mut self, bar: usize, offset: u64, size: u8, value: u64) -> Option<u16> {
        VirtioPci::bar_write(self, bar, offset, size, value).map(|notify| notify.queue)
    }
    fn process(&mut self, queue: u16, memory: &mut dyn GuestMemory) -> usize {
        VirtioPci::process(self, queue, memory)
    }
    fn take_window_notifications(&mut self) -> u64 {
        VirtioPci::take_window_notifications(self)
    }
    fn interrupt_line(&self) -> bool {
        VirtioPci::interrupt_line(self)
    }
    fn statistics(&self) -> String {
        let mut line = DeviceStatistics::statistics(self.device());
        if let Some(error) = self.queue_error() {
            line.push_str(&alloc::format!(" last-queue-fault={error:?}"));
        }
        line
    }
    fn as_model_mut(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

/// A device model's statistics line (`Block`'s Display, ...).
pub trait DeviceStatistics {
    fn statistics(&self) -> String;
}

impl<B: ringzero_vdisk::BlockDevice> DeviceStatistics for ringzero_virtio::Block<B> {
    fn statistics(&self) -> String {
        alloc::format!("virtio-blk {}", self.stats())
    }
}

impl DeviceStatistics for ringzero_virtio::Net {
    fn statistics(&self) -> String {
        alloc::format!("virtio-net {}", self.stats())
    }
}

/// A function shared between the PCI bus (configuration space) and the core (BARs).
pub type Function = Arc<Mutex<Box<dyn BarFunction>>>;

/// The PCI bus's handle on a [`Function`].
pub struct SharedFunction {
    name: &'static str,
    function: Function,
}

impl SharedFunction {
    pub fn new(function: Function) -> Self {
        let name = function.lock().name();
        SharedFunction { name, function }
    }
}

impl PciDevice for SharedFunction {
    fn name(&self) -> &'static str {
        self.name
    }
    fn read_config(&mut self, offset: u16) -> u32 {
        self.function.lock().read_config(offset)
    }
    fn write_config(&mut self, offset: u16, value: u32, byte_mask: u32) {
        self.function.lock().write_config(offset, value, byte_mask);
    }
}

/// A PCI function of a VM, as the core sees it.
pub struct PciSlot {
    /// Device number on bus 0.
    pub device: u8,
    /// The I/O APIC pin its INTA# is wired to.
    pub gsi: u32,
    pub function: Function,
}

/// The VM's RAM as the device models' [`GuestMemory`]: reads of pages not backed yet read zeros,
/// writes back them (as a guest store would, through a nested page fault).
pub struct VmMemory<'a> {
    pub ram: &'a mut GuestRam,
    pub host: &'a mut dyn HostMemory,
}

impl GuestMemory for VmMemory<'_> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRam> {
        let refused = OutOfRam {
            gpa,
            len: buf.len() as u64,
        };
        if !self.contains(gpa, buf.len() as u64) {
            return Err(refused);
        }
        self.ram
            .read(self.host, GuestPhysAddr(gpa), buf)
            .map_err(|_| refused)
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRam> {
        let refused = OutOfRam {
            gpa,
            len: data.len() as u64,
        };
        if !self.contains(gpa, data.len() as u64) {
            return Err(refused);
        }
        self.ram
            .write_allocating(self.host, GuestPhysAddr(gpa), data)
            .map_err(|_| refused)
    }
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some() && self.ram.contains(GuestPhysAddr(gpa), len)
    }
}

/// The function (index into `vm.pci`) whose BAR holds `gpa`.
pub fn function_at(vm: &Vm, gpa: u64) -> Option<usize> {
    vm.pci
        .iter()
        .position(|slot| slot.function.lock().bar_containing(gpa).is_some())
}

/// A guest load from function `index`'s BAR at `gpa`.
pub fn load(vm: &mut Vm, index: usize, gpa: u64, size: u8) -> u64 {
    let Some(slot) = vm.pci.get(index) else {
        return ringzero_devices::mmio::size_mask(size);
    };
    let mut function = slot.function.lock();
    match function.bar_containing(gpa) {
        Some((bar, offset)) => function.bar_read(bar, offset, size),
        // The guest moved the BAR between the fault and now (another vCPU): floating bus.
        None => ringzero_devices::mmio::size_mask(size),
    }
}

/// A guest store to function `index`'s BAR at `gpa`; a queue notification runs the queue (and
/// is remembered for `Platform::exit_handled`, which runs once the function is unlocked).
pub fn store(vm: &mut Vm, host: &mut dyn HostMemory, index: usize, gpa: u64, size: u8, value: u64) {
    let Some(slot) = vm.pci.get(index) else {
        return;
    };
    let function = slot.function.clone();
    let mut function = function.lock();
    let Some((bar, offset)) = function.bar_containing(gpa) else {
        return;
    };
    if let Some(queue) = function.bar_write(bar, offset, size, value) {
        let mut memory = VmMemory {
            ram: &mut vm.ram,
            host,
        };
        function.process(queue, &mut memory);
        vm.queues_run = true;
    }
}

/// Runs the queues notified through a function's configuration window (after a guest write to
/// the PCI configuration data ports).
pub fn service_windows(vm: &mut Vm, host: &mut dyn HostMemory) {
    for index in 0..vm.pci.len() {
        let function = vm.pci[index].function.clone();
        let mut function = function.lock();
        let mut queues = function.take_window_notifications();
        while queues != 0 {
            let queue = queues.trailing_zeros() as u16;
            queues &= queues - 1;
            let mut memory = VmMemory {
                ram: &mut vm.ram,
                host,
            };
            function.process(queue, &mut memory);
            vm.queues_run = true;
        }
    }
}

/// The level of each INTx pin: bit `gsi` set when any function wired to it asserts its line.
pub fn interrupt_lines(vm: &Vm) -> u32 {
    vm.pci
        .iter()
        .filter(|slot| slot.gsi < 32 && slot.function.lock().interrupt_line())
        .fold(0, |lines, slot| lines | 1 << slot.gsi)
}
