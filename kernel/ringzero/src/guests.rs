//! The VMs as the kernel builds them: each VM's RAM, nested page tables or shadow paging, image
//! and platform devices (`build_vm`); the vendor backends and their vCPUs (`Backend`,
//! `AnyVcpu`, the only place the vendor matters); the report when a VM ends (`finish_vm`); and
//! the check that the hypervisor's own memory came through untouched (`IntegrityCheck`). The
//! scheduler (`scheduler.rs`) runs the vCPUs.

use crate::console;
use crate::memory::{self, HostPhysAddr};
use crate::virt::Extension;
use alloc::string::String;
use core::ptr::NonNull;
use ringzero_acpi::PCI_MMIO32_WINDOW_START;
use ringzero_loader::boot_plan;
use ringzero_loader::manifest::{GuestFormat, Paging, VmManifest};
use ringzero_memory::shadow::{GuestPagingState, ShadowPaging};
use ringzero_memory::{
    GuestPhysAddr, GuestRam, HostMemory, NestedFormat, NestedPageTables, OutOfHostMemory,
};
use ringzero_svm::vcpu::PermissionMaps;
use ringzero_svm::{PagingSetup as SvmPagingSetup, SvmFeatures, SvmFrames, SvmVcpu};
use ringzero_vmm::paging::GuestPaging;
use ringzero_vmm::vcpu::Vcpu;
use ringzero_vmm::vm::{self, Vm, VmEnd};
use ringzero_vmm::Platform;
use ringzero_vmx::vcpu::{Bitmaps, HostState};
use ringzero_vmx::{PagingSetup as VmxPagingSetup, VmxFrames, VmxVcpu};
use ringzero_x86::caps::vmx::VmxCapabilities;
use ringzero_x86::caps::{nested_paging_missing, Vendor};
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
pub struct KernelPlatform;

impl Platform for KernelPlatform {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        hw::cpuid_words(leaf, subleaf)
    }

    fn timestamp(&self) -> u64 {
        hw::rdtsc()
    }

    fn console_line(&mut self, vm_name: &str, line: &str) {
        console::print_line(format_args!("{vm_name} | {line}"));
    }
}

fn svm_frame(physical: HostPhysAddr) -> ringzero_svm::vcpu::Frame {
    let virtual_address =
        NonNull::new(memory::physical_window(physical)).expect("the physical window is never at 0");
    ringzero_svm::vcpu::Frame {
        physical,
        virtual_address,
    }
}

fn vmx_frame(physical: HostPhysAddr) -> ringzero_vmx::vcpu::Frame {
    let virtual_address =
        NonNull::new(memory::physical_window(physical)).expect("the physical window is never at 0");
    ringzero_vmx::vcpu::Frame {
        physical,
        virtual_address,
    }
}

/// This CPU's virtualization backend, chosen once from the detected extension: the only
/// place where the vendor matters (the run loop sees `dyn Vcpu`).
pub enum Backend {
    Svm {
        maps: PermissionMaps,
        features: SvmFeatures,
        asids: u32,
    },
    Vmx {
        bitmaps: Bitmaps,
        capabilities: VmxCapabilities,
        host: HostState,
    },
}

/// What VM building needs to know of the vendor before any CPU's backend exists.
pub struct BackendKind {
    vendor: Vendor,
    nested: bool,
}

impl BackendKind {
    pub fn of(extension: &Extension) -> BackendKind {
        match extension {
            Extension::Svm(capabilities) => BackendKind {
                vendor: Vendor::Amd,
                nested: capabilities.nested_paging,
            },
            Extension::Vmx(capabilities) => BackendKind {
                vendor: Vendor::Intel,
                nested: capabilities.ept && capabilities.unrestricted_guest,
            },
        }
    }

    /// Whether VMs may use nested paging here (NPT; EPT with unrestricted guest).
    fn nested_paging_supported(&self) -> bool {
        self.nested
    }

    fn nested_format(&self) -> NestedFormat {
        match self.vendor {
            Vendor::Intel => NestedFormat::Ept,
            _ => NestedFormat::Npt,
        }
    }

    fn vendor(&self) -> Vendor {
        self.vendor
    }
}

/// A vCPU of either vendor, with what tearing it down needs.
pub enum AnyVcpu {
    Svm(SvmVcpu),
    Vmx(VmxVcpu),
}

impl AnyVcpu {
    pub fn as_vcpu(&mut self) -> &mut dyn Vcpu {
        match self {
            AnyVcpu::Svm(vcpu) => vcpu,
            AnyVcpu::Vmx(vcpu) => vcpu,
        }
    }

    pub fn corrupt_guest_state_for_test(&mut self) {
        match self {
            AnyVcpu::Svm(vcpu) => vcpu.corrupt_guest_state_for_test(),
            AnyVcpu::Vmx(vcpu) => vcpu.corrupt_guest_state_for_test(),
        }
    }

    /// Erases the guest registers the vCPU keeps in hypervisor memory, in place.
    pub fn erase_saved_registers(&mut self) {
        match self {
            AnyVcpu::Svm(vcpu) => vcpu.erase_saved_registers(),
            AnyVcpu::Vmx(vcpu) => vcpu.erase_saved_registers(),
        }
    }

    pub fn tear_down(self) {
        match self {
            AnyVcpu::Svm(vcpu) => {
                let frames = vcpu.into_frames();
                memory::free_frame(frames.vmcb.physical);
                memory::free_frame(frames.host_state.physical);
            }
            AnyVcpu::Vmx(vcpu) => memory::free_frame(vcpu.into_frames().vmcs.physical),
        }
    }
}

const IA32_EFER: u32 = 0xC000_0080;
const IA32_PAT: u32 = 0x277;
const IA32_FS_BASE: u32 = 0xC000_0100;
const IA32_GS_BASE: u32 = 0xC000_0101;

impl Backend {
    pub fn new(extension: &Extension) -> Result<Backend, String> {
        match extension {
            Extension::Svm(capabilities) => {
                let no_memory =
                    || String::from("no memory for the SVM host state and permission maps");
                let host_save_area = memory::allocate_frame().ok_or_else(no_memory)?;
                let iopm = memory::allocate_contiguous(3).ok_or_else(no_memory)?;
                let msrpm = memory::allocate_contiguous(2).ok_or_else(no_memory)?;
                // SAFETY: the CPU has SVM and VM_CR.SVMDIS is clear (virt::detect checked both);
                // the save area is a dedicated page kept for the hypervisor's whole life.
                unsafe { ringzero_svm::hw::enable(host_save_area.0) };
                // SAFETY: iopm is 3 and msrpm 2 fresh contiguous frames, mapped by the window.
                let maps = unsafe {
                    PermissionMaps::intercept_everything(svm_frame(iopm), svm_frame(msrpm))
                };
                log::info!(
                    "svm: enabled on cpu{} (host save area {:#x}, I/O map {:#x}, MSR map {:#x}); NRIP save {}",
                    console::cpu_index(),
                    host_save_area.0,
                    iopm.0,
                    msrpm.0,
                    if capabilities.nrip_save { "yes" } else { "no: instruction lengths are decoded" }
                );
                Ok(Backend::Svm {
                    maps,
                    features: SvmFeatures {
                        nrip_save: capabilities.nrip_save,
                        decode_assists: capabilities.decode_assists,
                    },
                    asids: capabilities.asids,
                })
            }
            Extension::Vmx(capabilities) => {
                let no_memory = || String::from("no memory for the VMXON region and the bitmaps");
                let vmxon_region = memory::allocate_frame().ok_or_else(no_memory)?;
                let (io_a, io_b, msr) = (
                    memory::allocate_frame().ok_or_else(no_memory)?,
                    memory::allocate_frame().ok_or_else(no_memory)?,
                    memory::allocate_frame().ok_or_else(no_memory)?,
                );
                crate::virt::enter_vmx_operation(capabilities, vmxon_region)
                    .map_err(|error| alloc::format!("cannot enter VMX operation: {error}"))?;
                // SAFETY: three fresh frames, mapped by the window, kept for the hypervisor's life.
                let bitmaps = unsafe {
                    Bitmaps::intercept_everything(vmx_frame(io_a), vmx_frame(io_b), vmx_frame(msr))
                };
                // SAFETY: EFER, PAT and the FS/GS base MSRs exist on every x86-64 CPU.
                let host = unsafe {
                    HostState {
                        cr0: hw::read_cr0(),
                        cr3: x86_64::registers::control::Cr3::read_raw()
                            .0
                            .start_address()
                            .as_u64(),
                        cr4: hw::read_cr4(),
                        efer: hw::read_msr(IA32_EFER),
                        pat: hw::read_msr(IA32_PAT),
                        fs_base: hw::read_msr(IA32_FS_BASE),
                        gs_base: hw::read_msr(IA32_GS_BASE),
                    }
                };
                log::info!(
                    "vmx: in VMX root operation on cpu{} (VMXON region {:#x}, I/O bitmaps {:#x}/{:#x}, MSR bitmap {:#x})",
                    console::cpu_index(),
                    vmxon_region.0,
                    io_a.0,
                    io_b.0,
                    msr.0
                );
                Ok(Backend::Vmx {
                    bitmaps,
                    capabilities: *capabilities,
                    host,
                })
            }
        }
    }

    /// Creates the vCPU of VM number `index`: on nested tables rooted at `nested_root`, or
    /// (None) on shadow tables the core loads before the first run.
    pub fn create_vcpu(
        &self,
        index: usize,
        nested_root: Option<HostPhysAddr>,
        entry: &boot_plan::EntryState,
    ) -> Result<AnyVcpu, String> {
        let page = || {
            memory::allocate_frame()
                .ok_or_else(|| String::from("out of host memory for the vCPU's control block"))
        };
        match self {
            Backend::Svm {
                maps,
                features,
                asids,
                ..
            } => {
                // ASIDs 1.. rotate over the VMs; each vCPU flushes the TLB before its first run.
                let asid = 1 + (index as u32 % asids.saturating_sub(1).max(1));
                let frames = SvmFrames {
                    vmcb: svm_frame(page()?),
                    host_state: svm_frame(page()?),
                };
                let paging = match nested_root {
                    Some(root) => SvmPagingSetup::Nested { root },
                    None => SvmPagingSetup::Shadow,
                };
                // SAFETY: both frames are fresh zeroed pages owned by this vCPU until tear-down.
                Ok(AnyVcpu::Svm(unsafe {
                    SvmVcpu::new(frames, maps, paging, asid, entry, *features)
                }))
            }
            Backend::Vmx {
                bitmaps,
                capabilities,
                host,
            } => {
                // VPIDs 1.. rotate over the VMs; each vCPU flushes its VPID and EPTP first.
                let vpid = 1 + (index % 0xFFFE) as u16;
                let vmcs = page()?;
                let frames = VmxFrames {
                    vmcs: vmx_frame(vmcs),
                };
                let paging = match nested_root {
                    Some(root) => VmxPagingSetup::Nested { root },
                    None => VmxPagingSetup::Shadow,
                };
                // SAFETY: VMX is on (Backend::new), the VMCS page is fresh and owned by this vCPU,
                // and the host state was read from this CPU.
                match unsafe {
                    VmxVcpu::new(frames, bitmaps, capabilities, host, paging, vpid, entry)
                } {
                    Ok(vcpu) => Ok(AnyVcpu::Vmx(vcpu)),
                    Err(error) => {
                        memory::free_frame(vmcs);
                        Err(alloc::format!("cannot build the VMCS: {error}"))
                    }
                }
            }
        }
    }
}

/// What the hypervisor checks after each VM: its own memory must be as it was.
pub struct IntegrityCheck {
    /// The kernel ELF's read-only loadable parts (code, read-only data), as (address in the
    /// physical window, length): its writable data legitimately changes while CPUs run.
    kernel_read_only: alloc::vec::Vec<(u64, u64)>,
    kernel_hash: u64,
    canary: HostPhysAddr,
    heap_start: HostPhysAddr,
    heap_size: u64,
}

const CANARY_WORD: u64 = 0x5249_4E47_5A45_524F;
/// The first 8 bytes of the escape guest's marker ("RZ-ESCAP").
const GUEST_MARKER_PREFIX: u64 = u64::from_le_bytes(*b"RZ-ESCAP");

/// FNV-1a over the given ranges of the kernel image.
fn fnv1a(ranges: &[(u64, u64)]) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for &(bytes_at, length) in ranges {
        for offset in 0..length {
            // SAFETY: every range lies inside the kernel image the bootloader loaded and
            // mapped (`read_only_segments` checked it against the image's length).
            let byte = unsafe { ((bytes_at + offset) as *const u8).read_volatile() };
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    hash
}

/// The file ranges of the kernel ELF's loadable segments that are not writable (PT_LOAD
/// without PF_W), as (address, length), for an image of `length` bytes at `image` (in the
/// physical window). None when the image is not a 64-bit little-endian ELF file or a header
/// points outside it. See: System V ABI, ELF-64 Object File Format (file and program headers).
fn read_only_segments(image: u64, length: u64) -> Option<alloc::vec::Vec<(u64, u64)>> {
    let read = |offset: u64, size: usize| -> Option<u64> {
        if offset.checked_add(size as u64)? > length {
            return None;
        }
        let mut bytes = [0u8; 8];
        for (index, byte) in bytes.iter_mut().take(size).enumerate() {
            // SAFETY: offset + size <= length: inside the mapped image.
            *byte = unsafe { ((image + offset + index as u64) as *const u8).read_volatile() };
        }
        Some(u64::from_le_bytes(bytes))
    };
    // e_ident: magic, ELFCLASS64 (2), ELFDATA2LSB (1).
    if read(0, 4)? != 0x464C_457F || read(4, 1)? != 2 || read(5, 1)? != 1 {
        return None;
    }
    let (program_headers, entry_size, count) = (read(0x20, 8)?, read(0x36, 2)?, read(0x38, 2)?);
    const PT_LOAD: u64 = 1;
    const PF_W: u64 = 2;
    let mut ranges = alloc::vec::Vec::new();
    for index in 0..count {
        let header = program_headers.checked_add(index.checked_mul(entry_size)?)?;
        let (kind, flags) = (read(header, 4)?, read(header + 4, 4)?);
        let (offset, file_size) = (read(header + 8, 8)?, read(header + 0x20, 8)?);
        if kind == PT_LOAD && flags & PF_W == 0 && file_size > 0 {
            if offset.checked_add(file_size)? > length {
                return None;
            }
            ranges.push((image + offset, file_size));
        }
    }
    Some(ranges)
}

impl IntegrityCheck {
    pub fn new(
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
        // Hash the kernel's code and read-only data through the physical window.
        let image = memory::physical_window(HostPhysAddr(kernel_start)) as u64;
        let kernel_read_only = read_only_segments(image, kernel_length).unwrap_or_else(|| {
            log::warn!("memory check: the kernel image is not an ELF file this check can read; its hash is left out");
            alloc::vec::Vec::new()
        });
        let kernel_hash = fnv1a(&kernel_read_only);
        Some(IntegrityCheck {
            kernel_read_only,
            kernel_hash,
            canary,
            heap_start,
            heap_size,
        })
    }

    /// Returns a description of what is wrong, or None when everything is intact. The heap is
    /// scanned for a guest's marker only with `scan_heap`: while VMs run, their saved register
    /// images (XSAVE/FXSAVE areas) legitimately hold guest data there.
    pub fn verify(&self, scan_heap: bool) -> Option<&'static str> {
        if fnv1a(&self.kernel_read_only) != self.kernel_hash {
            return Some("the hypervisor's kernel image (code or read-only data) changed");
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
        if !scan_heap {
            return None;
        }
        let heap = memory::physical_window(self.heap_start).cast::<u64>();
        for index in 0..(self.heap_size / 8) as usize {
            // SAFETY: the heap region is the hypervisor's own RAM, mapped by the window.
            if unsafe { heap.add(index).read_volatile() } == GUEST_MARKER_PREFIX {
                log::error!(
                    "memory check: the marker is at heap offset {:#x} (physical {:#x})",
                    index * 8,
                    self.heap_start.0 + index as u64 * 8
                );
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

/// A VM ready to run: its shared state and what its vCPUs are created from.
pub struct BuiltVm {
    pub vm: Vm,
    /// The nested page tables' root (None: shadow paging).
    pub nested_root: Option<HostPhysAddr>,
    /// vCPU 0's first instruction state (the others start through INIT/SIPI).
    pub entry: boot_plan::EntryState,
}

pub fn end_line(name: &str, reason: &str, status: u32, exits: u64) {
    console::print_line(format_args!(
        "ringzero: vm {name} exit={reason} status={status} exits={exits}"
    ));
}

/// Builds VM number `index` of the manifest: its boot plan, RAM (promised, backed on touch),
/// the image, its nested page tables or shadow paging engine, and its platform devices. On
/// failure the VM's end line is printed and None returned.
pub fn build_vm(
    vm_manifest: &VmManifest<'static>,
    index: usize,
    backend: &BackendKind,
    clock: ringzero_devices::TimerClock,
) -> Option<BuiltVm> {
    let name = vm_manifest.name;
    let mut host = KernelHostMemory;
    let vcpus = (vm_manifest.cpus as usize).max(1);
    log::info!(
        "vm {name}: {} guest, {} MiB, {vcpus} vCPU(s), paging {}, cmdline '{}'{}",
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
    // The VM's disks first: a refused disk (missing partition, shared writable partition)
    // stops this VM before any memory is taken for it.
    let disks = match crate::vdisks::build(vm_manifest) {
        Ok(disks) => disks,
        Err(why) => {
            log::error!("vm {name}: {why}; VM not started");
            end_line(name, "disk-refused", vm::STATUS_STOPPED, 0);
            return None;
        }
    };
    if !disks.is_empty() && vm_manifest.memory_bytes > u64::from(PCI_MMIO32_WINDOW_START) {
        log::error!(
            "vm {name}: {} MiB of RAM would overlap the PCI BAR window at {PCI_MMIO32_WINDOW_START:#x} where its disks' registers go; give a VM with disks at most {} MiB; VM not started",
            vm_manifest.memory_bytes >> 20,
            PCI_MMIO32_WINDOW_START >> 20
        );
        end_line(name, "disk-refused", vm::STATUS_STOPPED, 0);
        return None;
    }
    // Linux guests find their platform through ACPI tables the hypervisor builds, in the
    // BIOS area below 1 MiB (the boot parameters point at the RSDP).
    let acpi = if vm_manifest.format == GuestFormat::Linux {
        ringzero_acpi::build(
            &ringzero_acpi::PlatformDescription::pc(vcpus as u32),
            ACPI_TABLES_ADDRESS,
        )
        .ok()
    } else {
        None
    };
    let plan = match boot_plan::plan_with_acpi(
        vm_manifest,
        acpi.as_ref()
            .map(|tables| ACPI_TABLES_ADDRESS + tables.rsdp_offset as u64),
    ) {
        Ok(plan) => plan,
        Err(error) => {
            log::error!("vm {name}: cannot load the image: {error}");
            end_line(name, "load-failed", vm::STATUS_STOPPED, 0);
            return None;
        }
    };
    // RAM is promised, not allocated: a frame is taken on the first touch of each page
    // (overcommit). Loading the image touches the pages it fills.
    let mut ram = GuestRam::new_lazy(vm_manifest.memory_bytes);
    for placement in &plan.placements {
        // Frames come zeroed: only the data needs writing (the zero fill up to `size` is done).
        if let Err(error) = ram.write_allocating(
            &mut host,
            GuestPhysAddr(placement.guest_physical),
            &placement.data,
        ) {
            log::error!("vm {name}: cannot load the boot plan ({error:?})");
            ram.release(&mut host);
            end_line(name, "load-failed", vm::STATUS_STOPPED, 0);
            return None;
        }
    }
    if let Some(tables) = &acpi {
        // The SMBIOS tables (who made the platform: Linux's `DMI:` line) after the ACPI ones,
        // where a guest's scan of 0xF0000..0xFFFFF finds them.
        let smbios = ringzero_acpi::smbios::build(
            &ringzero_acpi::smbios::SmbiosIdentity { vm_name: name },
            SMBIOS_ADDRESS,
        );
        let fits = ACPI_TABLES_ADDRESS + tables.bytes.len() as u64 <= SMBIOS_ADDRESS;
        let placed = ram
            .write_allocating(&mut host, GuestPhysAddr(ACPI_TABLES_ADDRESS), &tables.bytes)
            .and_then(|()| ram.write_allocating(&mut host, GuestPhysAddr(SMBIOS_ADDRESS), &smbios));
        if !fits || placed.is_err() {
            log::error!(
                "vm {name}: cannot place the ACPI ({} bytes) and SMBIOS tables below 1 MiB ({placed:?})",
                tables.bytes.len()
            );
            ram.release(&mut host);
            end_line(name, "load-failed", vm::STATUS_STOPPED, 0);
            return None;
        }
    }
    let shadow = vm_manifest.paging == Paging::Shadow;
    let format = backend.nested_format();
    if !shadow && !backend.nested_paging_supported() {
        log::error!(
            "vm {name}: cannot run with paging = \"nested\": {}; VM not started",
            nested_paging_missing(backend.vendor())
        );
        ram.release(&mut host);
        end_line(name, "unsupported-paging-mode", vm::STATUS_STOPPED, 0);
        return None;
    }
    let paging = if shadow {
        let visible = GuestPagingState {
            cr0: plan.entry.cr0,
            cr3: plan.entry.cr3,
            cr4: plan.entry.cr4,
            efer: plan.entry.efer,
        };
        GuestPaging::Shadow {
            engine: ShadowPaging::new(SHADOW_ROOTS_PER_VM)
                .with_physical_address_bits(guest_physical_address_bits()),
            visible,
        }
    } else {
        // The nested tables map the pages backed so far; the rest is mapped on first touch.
        match NestedPageTables::build(&ram, format, &mut host) {
            Ok(tables) => GuestPaging::Nested(tables),
            Err(OutOfHostMemory) => {
                ram.release(&mut host);
                log::error!(
                    "vm {name}: out of host memory while allocating its nested page tables; VM not started"
                );
                end_line(name, "out-of-host-memory", vm::STATUS_STOPPED, 0);
                return None;
            }
        }
    };
    let nested_root = match &paging {
        GuestPaging::Nested(tables) => Some(tables.root()),
        GuestPaging::Shadow { .. } => None,
    };
    log::info!(
        "vm {name}: {} MiB promised, {} KiB backed after loading, {} paging, entry rip={:#x}",
        ram.promised_pages() >> 8,
        ram.backed_pages() * 4,
        if shadow {
            "shadow"
        } else if format == NestedFormat::Npt {
            "nested (NPT)"
        } else {
            "nested (EPT)"
        },
        plan.entry.rip
    );
    let mut vm = Vm::with_vcpus(name, ram, paging, vm_manifest.trace, vcpus, clock);
    vm.id = index;
    if vm_manifest.format == GuestFormat::Linux {
        attach_pc_platform(&mut vm, clock.tsc_hz);
    }
    attach_disks(&mut vm, disks);
    if let Some(nic) = &vm_manifest.nic {
        attach_nic(&mut vm, nic.mac);
    }
    Some(BuiltVm {
        vm,
        nested_root,
        entry: plan.entry,
    })
}

/// When the VM's last vCPU is done: the report, the end line, its memory given back. Returns
/// whether it passed.
pub fn finish_vm(vm: &mut Vm) -> bool {
    let mut host = KernelHostMemory;
    let end = vm.end.clone().unwrap_or(VmEnd::HaltedForever { rip: 0 });
    report(vm, &end);
    // The VM stays in its slot (for its statistics); its memory goes back now.
    let released = GuestPaging::Shadow {
        engine: ShadowPaging::new(1),
        visible: GuestPagingState::default(),
    };
    release_paging(core::mem::replace(&mut vm.paging, released), &mut host);
    core::mem::replace(&mut vm.ram, GuestRam::new_lazy(0)).release(&mut host);
    end.is_success()
}

/// The MAXPHYADDR guests see (CPUID 0x80000008:EAX[7:0] passes through from the host).
fn guest_physical_address_bits() -> u8 {
    if hw::cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        (hw::cpuid(0x8000_0008, 0).eax & 0xFF) as u8
    } else {
        36
    }
}

/// Shadow roots cached per VM (address spaces that switch without a rebuild).
const SHADOW_ROOTS_PER_VM: usize = 4;

fn release_paging(paging: GuestPaging, host: &mut KernelHostMemory) {
    match paging {
        GuestPaging::Nested(tables) => tables.release(host),
        GuestPaging::Shadow { engine, .. } => engine.release(host),
    }
}

fn report(vm: &Vm, end: &VmEnd) {
    if end.is_success() {
        log::info!("vm {}: {}", vm.name, end.describe());
    } else {
        log::warn!("vm {}: {}", vm.name, end.describe());
    }
    for slot in &vm.pci {
        log::info!(
            "vm {}: 00:{:02x}.0 {}",
            vm.name,
            slot.device,
            slot.function.lock().statistics()
        );
    }
    log::info!(
        "vm {}: exit statistics (cycles spent in the hypervisor per exit reason):",
        vm.name
    );
    for line in vm.stats.table().lines() {
        log::info!("{line}");
    }
    log::info!(
        "vm {}: memory: {} MiB promised, {} KiB backed at the end, peak {} KiB, {} pages backed on first touch",
        vm.name,
        vm.ram.promised_pages() >> 8,
        vm.ram.backed_pages() * 4,
        vm.ram.peak_backed_pages() * 4,
        vm.lazy.pages_backed_on_touch
    );
    if let GuestPaging::Shadow { engine, .. } = &vm.paging {
        let stats = engine.stats();
        log::info!(
            "vm {}: shadow paging: {} faults fixed, {} injected, {} CR3 switches ({} cache hits), {} INVLPGs, {} rebuilds, {} leaves dropped by resync, {} table pages",
            vm.name,
            stats.faults_fixed,
            stats.faults_injected,
            stats.cr3_switches,
            stats.cr3_cache_hits,
            stats.invlpgs,
            stats.rebuilds,
            stats.resync_dropped,
            stats.table_frames
        );
    }
    end_line(&vm.name, end.reason(), end.status(), vm.stats.total_exits());
}

/// Where a Linux guest's ACPI tables go (the BIOS area the kernel may also scan).
const ACPI_TABLES_ADDRESS: u64 = 0xE0000;
/// Where a Linux guest's SMBIOS entry point goes (the start of the range Linux scans for it).
const SMBIOS_ADDRESS: u64 = 0xF0000;

/// Plugs `function` into the VM's PCI bus (adding the bus if the VM has none) at the next free
/// device number from 00:01.0, with BAR 0 placed the way firmware would (16 KiB apart from the
/// start of the PCI window; the guest may move it) and INTA# wired to the I/O APIC pin the
/// DSDT's `_PRT` gives (its Interrupt Line register says the same). Returns the device number,
/// BAR address and GSI, or `None` (logged, naming `what`) if it could not be plugged in.
fn plug_pci_function<F>(vm: &mut Vm, mut function: F, what: &str) -> Option<(u8, u32, u32)>
where
    F: ringzero_vmm::pci::BarFunction + 'static,
{
    use alloc::boxed::Box;
    use alloc::sync::Arc;
    use ringzero_devices::PciBus;
    use ringzero_vmm::pci::{BarFunction, PciSlot, SharedFunction};
    if vm.bus.device_mut::<PciBus>(PciBus::ADDRESS_PORT).is_none()
        && vm.bus.add(Box::new(PciBus::new())).is_err()
    {
        log::error!(
            "vm {}: the PCI ports are taken; its {what} is left out",
            vm.name
        );
        return None;
    }
    let device = vm.pci.iter().map(|slot| slot.device).max().unwrap_or(0) + 1;
    let bar = PCI_MMIO32_WINDOW_START + 0x4000 * u32::from(device - 1);
    let gsi = ringzero_acpi::pci_intx_gsi(device, 0);
    // BAR 0 (offset 0x10) and the Interrupt Line (offset 0x3C, byte 0), as firmware sets them.
    function.write_config(0x10, bar, 0xFFFF_FFFF);
    function.write_config(0x3C, gsi, 0xFF);
    let function: ringzero_vmm::pci::Function =
        Arc::new(spin::Mutex::new(Box::new(function) as Box<dyn BarFunction>));
    let added = vm
        .bus
        .device_mut::<PciBus>(PciBus::ADDRESS_PORT)
        .map(|bus| bus.add(device, 0, Box::new(SharedFunction::new(function.clone()))));
    if !matches!(added, Some(Ok(()))) {
        log::error!(
            "vm {}: cannot plug its {what} in at 00:{device:02x}.0",
            vm.name
        );
        return None;
    }
    vm.pci.push(PciSlot {
        device,
        gsi,
        function,
    });
    Some((device, bar, gsi))
}

/// Plugs the VM's disks in as virtio-blk PCI functions at 00:01.0, 00:02.0, ... (the order
/// of `[[vm.disk]]`: the first is /dev/vda in Linux).
fn attach_disks(
    vm: &mut Vm,
    disks: alloc::vec::Vec<alloc::boxed::Box<dyn ringzero_vdisk::BlockDevice>>,
) {
    for (number, backend) in disks.into_iter().enumerate() {
        let sectors = backend.sectors();
        let writable = backend.writable();
        let function = ringzero_virtio::VirtioPci::new(ringzero_virtio::Block::new(
            ringzero_virtio::BoxedBackend(backend),
        ));
        let what = alloc::format!("disk #{}", number + 1);
        if let Some((device, bar, gsi)) = plug_pci_function(vm, function, &what) {
            log::info!(
                "vm {}: {what} virtio-blk at 00:{device:02x}.0, {sectors} sectors ({} MiB), {}, BAR 0 at {bar:#x}, INTA# -> GSI {gsi}",
                vm.name,
                sectors >> 11,
                if writable { "writable" } else { "read-only" }
            );
        }
    }
}

/// Plugs the VM's NIC in as a virtio-net PCI function after its disks, and connects it to the
/// hypervisor's switch.
fn attach_nic(vm: &mut Vm, mac: [u8; 6]) {
    let net = match ringzero_virtio::Net::new(ringzero_virtio::NetConfig::new(mac)) {
        Ok(net) => net,
        Err(error) => {
            log::error!("vm {}: no NIC: {error:?}", vm.name);
            return;
        }
    };
    let Some((device, bar, gsi)) =
        plug_pci_function(vm, ringzero_virtio::VirtioPci::new(net), "NIC")
    else {
        return;
    };
    let mac_text = crate::net::MacDisplay(mac);
    match crate::network::connect(vm.id, &vm.name, vm.pci.len() - 1, mac) {
        Ok(()) => log::info!(
            "vm {}: NIC virtio-net at 00:{device:02x}.0, MAC {mac_text}, BAR 0 at {bar:#x}, INTA# -> GSI {gsi}, on the switch{}",
            vm.name,
            if crate::net::physical_nic().is_some() {
                " (uplink: the physical NIC)"
            } else {
                " (no physical NIC: VMs only)"
            }
        ),
        Err(why) => log::error!(
            "vm {}: NIC at 00:{device:02x}.0 (MAC {mac_text}) not connected to the switch: {why}",
            vm.name
        ),
    }
}

/// The PC platform a Linux guest probes, matching `ringzero_acpi::PlatformDescription::pc`: the
/// PIT (and port 0x61), RTC, PCI configuration space (with the reset register), the two (masked)
/// PICs and the ACPI PM blocks on the port bus, and the I/O APIC, which the core routes to the
/// vCPUs' local APICs (each vCPU's local APIC exists for every VM).
fn attach_pc_platform(vm: &mut Vm, tsc_hz: u64) {
    use alloc::boxed::Box;
    let pit = ringzero_devices::Pit::new(tsc_hz);
    let port_61 = pit.nmi_status_control();
    let results = [
        vm.bus.add(Box::new(pit)).is_ok(),
        vm.bus.add(Box::new(port_61)).is_ok(),
        vm.bus
            .add(Box::new(ringzero_devices::Rtc::new(
                crate::time::unix_seconds(),
            )))
            .is_ok(),
        vm.bus
            .add(Box::new(ringzero_devices::PciBus::new()))
            .is_ok(),
        vm.bus
            .add(Box::new(ringzero_devices::Pic::master()))
            .is_ok(),
        vm.bus.add(Box::new(ringzero_devices::Pic::slave())).is_ok(),
        vm.bus
            .add(Box::new(ringzero_devices::AcpiPm::new(0x600)))
            .is_ok(),
    ];
    if results.contains(&false) {
        log::warn!(
            "vm {}: a platform device overlaps another; the guest may miss it",
            vm.name
        );
    }
    // The I/O APIC (ID 1, as the MADT says) is the core's: it routes the PIT's IRQ 0 and the
    // UART's IRQ 4 to the vCPUs' local APICs (`ringzero_vmm::smp::poll_devices`).
    vm.io_apic = Some(ringzero_devices::IoApic::new(1));
    vm.interrupt_sources = true;
}
