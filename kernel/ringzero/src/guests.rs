//! Runs the VMs the manifest lists, one after another, on this CPU: builds each VM's RAM and
//! nested page tables, loads its image, creates its vCPU on the vendor's backend, hands it to
//! the vendor-neutral run loop (`ringzero_vmm::vm::run`), reports how it ended, releases it,
//! and checks that the hypervisor's own memory came through untouched.

use crate::console;
use crate::memory::{self, HostPhysAddr};
use crate::virt::Extension;
use core::ptr::NonNull;
use ringzero_loader::boot_plan;
use ringzero_loader::manifest::{Manifest, Paging, VmManifest};
use ringzero_memory::{
    GuestPhysAddr, GuestRam, HostMemory, NestedFormat, NestedPageTables, OutOfHostMemory,
};
use ringzero_svm::vcpu::{Frame, PermissionMaps};
use ringzero_svm::{SvmFrames, SvmVcpu};
use ringzero_vmm::vm::{self, Vm, VmEnd};
use ringzero_vmm::Platform;
use ringzero_x86::hw;

/// Host memory for the pure crates: frames from the kernel's allocator, reached through the
/// physical window.
pub struct KernelHostMemory;

impl HostMemory for KernelHostMemory {
    fn read(&self, address: HostPhysAddr, buffer: &mut [u8]) {
        // SAFETY: callers pass addresses of frames they own (guest RAM, page tables), which the
        // physical window maps; the range stays inside one frame.
        unsafe {
            core::ptr::copy_nonoverlapping(
                memory::physical_window(address),
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
    }

    fn write(&mut self, address: HostPhysAddr, bytes: &[u8]) {
        // SAFETY: as in `read`; `&mut self` serialises writers on this CPU.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                memory::physical_window(address),
                bytes.len(),
            )
        };
    }

    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        memory::allocate_frame()
    }

    fn free_frame(&mut self, frame: HostPhysAddr) {
        memory::free_frame(frame);
    }
}

/// The machine as the VM core sees it.
struct KernelPlatform;

impl Platform for KernelPlatform {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let result = hw::cpuid(leaf, subleaf);
        [result.eax, result.ebx, result.ecx, result.edx]
    }

    fn timestamp(&self) -> u64 {
        hw::rdtsc()
    }

    fn console_line(&mut self, vm_name: &str, line: &str) {
        console::print_line(format_args!("{vm_name} | {line}"));
    }
}

fn frame(physical: HostPhysAddr) -> Frame {
    let virtual_address =
        NonNull::new(memory::physical_window(physical)).expect("the physical window is never at 0");
    Frame {
        physical,
        virtual_address,
    }
}

/// The SVM backend's per-CPU state: SVM on, the shared permission maps.
struct SvmBackend {
    maps: PermissionMaps,
    nrip_save: bool,
    asids: u32,
}

impl SvmBackend {
    fn new(nrip_save: bool, asids: u32) -> Option<SvmBackend> {
        let host_save_area = memory::allocate_frame()?;
        let iopm = memory::allocate_contiguous(3)?;
        let msrpm = memory::allocate_contiguous(2)?;
        // SAFETY: the CPU has SVM and VM_CR.SVMDIS is clear (virt::detect checked both); the
        // save area is a dedicated page kept for the hypervisor's whole life.
        unsafe { ringzero_svm::hw::enable(host_save_area.0) };
        // SAFETY: iopm is 3 and msrpm 2 fresh contiguous frames, mapped by the window.
        let maps = unsafe { PermissionMaps::intercept_everything(frame(iopm), frame(msrpm)) };
        log::info!(
            "svm: enabled on cpu{} (host save area {:#x}, I/O map {:#x}, MSR map {:#x}); NRIP save {}",
            console::cpu_index(),
            host_save_area.0,
            iopm.0,
            msrpm.0,
            if nrip_save { "yes" } else { "no: instruction lengths are decoded" }
        );
        Some(SvmBackend {
            maps,
            nrip_save,
            asids,
        })
    }
}

/// What the hypervisor checks after each VM: its own memory must be as it was.
struct IntegrityCheck {
    kernel_start: u64,
    kernel_length: u64,
    kernel_hash: u64,
    canary: HostPhysAddr,
    heap_start: HostPhysAddr,
    heap_size: u64,
}

const CANARY_WORD: u64 = 0x5249_4E47_5A45_524F;
/// The first 8 bytes of the escape guest's marker ("RZ-ESCAP").
const GUEST_MARKER_PREFIX: u64 = u64::from_le_bytes(*b"RZ-ESCAP");

fn fnv1a(bytes_at: u64, length: u64) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for offset in 0..length {
        // SAFETY: [bytes_at, +length) is the kernel image the bootloader loaded and mapped.
        let byte = unsafe { ((bytes_at + offset) as *const u8).read_volatile() };
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3);
    }
    hash
}

impl IntegrityCheck {
    fn new(
        kernel_start: u64,
        kernel_length: u64,
        heap_start: HostPhysAddr,
        heap_size: u64,
    ) -> Option<IntegrityCheck> {
        let canary = memory::allocate_frame()?;
        for index in 0..512u64 {
            // SAFETY: the canary frame is ours; the window maps it.
            unsafe {
                memory::physical_window(canary)
                    .cast::<u64>()
                    .add(index as usize)
                    .write_volatile(CANARY_WORD ^ index)
            };
        }
        // Hash the kernel image through the physical window.
        let kernel_start = memory::physical_window(HostPhysAddr(kernel_start)) as u64;
        let kernel_hash = fnv1a(kernel_start, kernel_length);
        Some(IntegrityCheck {
            kernel_start,
            kernel_length,
            kernel_hash,
            canary,
            heap_start,
            heap_size,
        })
    }

    /// Returns a description of what is wrong, or None when everything is intact.
    fn verify(&self) -> Option<&'static str> {
        if fnv1a(self.kernel_start, self.kernel_length) != self.kernel_hash {
            return Some("the hypervisor's kernel image changed");
        }
        for index in 0..512u64 {
            // SAFETY: the canary frame is ours; the window maps it.
            let word = unsafe {
                memory::physical_window(self.canary)
                    .cast::<u64>()
                    .add(index as usize)
                    .read_volatile()
            };
            if word != CANARY_WORD ^ index {
                return Some("the canary page changed");
            }
        }
        let heap = memory::physical_window(self.heap_start).cast::<u64>();
        for index in 0..(self.heap_size / 8) as usize {
            // SAFETY: the heap region is the hypervisor's own RAM, mapped by the window.
            if unsafe { heap.add(index).read_volatile() } == GUEST_MARKER_PREFIX {
                return Some("a guest's marker appeared in the hypervisor's heap");
            }
        }
        None
    }
}

/// Where the kernel image and heap are, for the integrity check.
pub struct HypervisorMemory {
    pub kernel_start: u64,
    pub kernel_length: u64,
    pub heap_start: HostPhysAddr,
    pub heap_size: u64,
}

/// Runs every VM of the manifest. Returns true when every VM ended with exit-port status 0.
pub fn run_all(manifest: &Manifest<'_>, extension: &Extension, own: &HypervisorMemory) -> bool {
    if manifest.vms.is_empty() {
        log::info!("no guests configured");
        return true;
    }
    let capabilities = match extension {
        Extension::Svm(capabilities) => capabilities,
        Extension::Vmx(_) => {
            log::error!(
                "the VMX backend is not built yet: {} VM(s) not run (Intel VT-x guests arrive with the VMX backend)",
                manifest.vms.len()
            );
            return false;
        }
    };
    let Some(backend) = SvmBackend::new(capabilities.nrip_save, capabilities.asids) else {
        log::error!("no memory for the SVM host state and permission maps");
        return false;
    };
    let Some(check) = IntegrityCheck::new(
        own.kernel_start,
        own.kernel_length,
        own.heap_start,
        own.heap_size,
    ) else {
        log::error!("no memory for the integrity canary");
        return false;
    };
    let mut all_passed = true;
    for (index, vm_manifest) in manifest.vms.iter().enumerate() {
        let passed = run_one(vm_manifest, index, &backend);
        all_passed &= passed;
        match check.verify() {
            None => log::info!(
                "memory check after vm {}: hypervisor memory intact (kernel image hash, canary page, no guest marker in the heap); {} frames in use",
                vm_manifest.name,
                memory::allocated_frames()
            ),
            Some(problem) => {
                log::error!("memory check after vm {}: {problem}!", vm_manifest.name);
                all_passed = false;
            }
        }
    }
    all_passed
}

fn end_line(name: &str, reason: &str, status: u32, exits: u64) {
    console::print_line(format_args!(
        "ringzero: vm {name} exit={reason} status={status} exits={exits}"
    ));
}

/// Builds, runs and tears down one VM. Returns whether it passed.
fn run_one(vm_manifest: &VmManifest<'_>, index: usize, backend: &SvmBackend) -> bool {
    let name = vm_manifest.name;
    let mut host = KernelHostMemory;
    log::info!(
        "vm {name}: {} guest, {} MiB, paging {}, cmdline '{}'{}",
        vm_manifest.format.name(),
        vm_manifest.memory_bytes >> 20,
        vm_manifest.paging.name(),
        vm_manifest.cmdline,
        if vm_manifest.trace {
            ", trap trace on"
        } else {
            ""
        }
    );
    if vm_manifest.paging != Paging::Nested {
        log::error!(
            "vm {name}: paging {} is not supported by this hypervisor",
            vm_manifest.paging.name()
        );
        end_line(name, "refused", vm::STATUS_STOPPED, 0);
        return false;
    }
    let plan = match boot_plan::plan(vm_manifest) {
        Ok(plan) => plan,
        Err(error) => {
            log::error!("vm {name}: cannot load the image: {error}");
            end_line(name, "load-failed", vm::STATUS_STOPPED, 0);
            return false;
        }
    };
    let out_of_memory = |what: &str| {
        log::error!("vm {name}: out of host memory while allocating {what}; VM not started");
        end_line(name, "out-of-host-memory", vm::STATUS_STOPPED, 0);
        false
    };
    let ram = match GuestRam::new(vm_manifest.memory_bytes, &mut host) {
        Ok(ram) => ram,
        Err(OutOfHostMemory) => return out_of_memory("its RAM"),
    };
    for placement in &plan.placements {
        // Frames are zeroed: only the data needs writing (the zero fill up to `size` is done).
        if let Err(error) = ram.write(
            &mut host,
            GuestPhysAddr(placement.guest_physical),
            &placement.data,
        ) {
            log::error!("vm {name}: boot plan placement outside RAM ({error:?})");
            ram.release(&mut host);
            end_line(name, "load-failed", vm::STATUS_STOPPED, 0);
            return false;
        }
    }
    let nested = match NestedPageTables::build(&ram, NestedFormat::Npt, &mut host) {
        Ok(nested) => nested,
        Err(OutOfHostMemory) => {
            ram.release(&mut host);
            return out_of_memory("its nested page tables");
        }
    };
    let (Some(vmcb), Some(host_state)) = (memory::allocate_frame(), memory::allocate_frame())
    else {
        nested.release(&mut host);
        ram.release(&mut host);
        return out_of_memory("its VMCB");
    };
    // ASIDs 1.. rotate over the VMs; each vCPU flushes the TLB before its first run.
    let asid = 1 + (index as u32 % backend.asids.saturating_sub(1).max(1));
    log::info!(
        "vm {name}: {} KiB of RAM, nested page tables at {:#x} ({} table pages), ASID {asid}, entry rip={:#x}",
        ram.size() >> 10,
        nested.root().0,
        nested.table_frames(),
        plan.entry.rip
    );
    let frames = SvmFrames {
        vmcb: frame(vmcb),
        host_state: frame(host_state),
    };
    // SAFETY: both frames are fresh zeroed pages owned by this vCPU until it is torn down.
    let mut vcpu = unsafe {
        SvmVcpu::new(
            frames,
            &backend.maps,
            nested.root(),
            asid,
            &plan.entry,
            backend.nrip_save,
        )
    };
    let mut vm = Vm::new(name, ram, vm_manifest.trace);
    let end = vm::run(&mut vm, &mut vcpu, &mut KernelPlatform, &mut host);
    report(&vm, &end);

    let Vm { ram, .. } = vm;
    let frames = vcpu.into_frames();
    memory::free_frame(frames.vmcb.physical);
    memory::free_frame(frames.host_state.physical);
    nested.release(&mut host);
    ram.release(&mut host);
    end.is_success()
}

fn report(vm: &Vm, end: &VmEnd) {
    if end.is_success() {
        log::info!("vm {}: {}", vm.name, end.describe());
    } else {
        log::warn!("vm {}: {}", vm.name, end.describe());
    }
    log::info!(
        "vm {}: exit statistics (cycles spent in the hypervisor per exit reason):",
        vm.name
    );
    for line in vm.stats.table().lines() {
        log::info!("{line}");
    }
    end_line(&vm.name, end.reason(), end.status(), vm.stats.total_exits());
}
