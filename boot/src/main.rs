//! `ringzero-boot`: the host tool that turns a built hypervisor kernel into bootable disk
//! images (UEFI and BIOS, through the rust-osdev `bootloader` crate) and packs the boot
//! manifest into the bootloader's ramdisk.
//!
//! Usage: `ringzero-boot --kernel KERNEL_ELF --out-dir DIR [--test-hook NAME] [--config FILE]
//! [--disk FILE]` writes `DIR/uefi.img`, `DIR/bios.img` and `DIR/manifest.bin`. The ramdisk is
//! the manifest, with every guest's image, modules and disk images inside; without `--config`
//! it lists no VMs. `--disk` names the physical disk image the hypervisor will be given: the
//! partitions the VMs' disks name are checked against its GPT (a configuration error if one
//! is missing).
//!
//! `ringzero-boot disk create|list|read ...` makes and inspects GPT disk images for the VMs'
//! partition disks (see `disk.rs`).
//!
//! Exit status: 0 on success, 2 when the guest configuration has errors (every error is
//! printed, one line each, naming the file, the VM and the key), 1 on any other failure.

mod config;
mod disk;

use bootloader::{BiosBoot, BootConfig, UefiBoot};
use bootloader_boot_config::LevelFilter;
use ringzero_loader::manifest::{MacText, Manifest, TestHook};
use std::path::PathBuf;
use std::process::ExitCode;

/// Why the tool stopped.
enum Failure {
    /// The guest configuration has errors (exit status 2).
    Config(Vec<config::ConfigError>),
    /// Anything else (exit status 1).
    Other(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

struct Options {
    kernel: PathBuf,
    out_dir: PathBuf,
    test_hook: TestHook,
    config: Option<PathBuf>,
    disk: Option<PathBuf>,
}

const USAGE: &str = "usage: ringzero-boot --kernel KERNEL_ELF --out-dir DIR [--test-hook none|page-fault|invalid-guest-state|disk-write|net-probe|double-free|triple-fault] [--config FILE] [--disk FILE]
       ringzero-boot disk create|list|read ... (ringzero-boot disk --help)";

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let (mut kernel, mut out_dir, mut test_hook, mut config, mut disk) =
        (None, None, TestHook::None, None, None);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--test-hook" => {
                let name = value()?;
                test_hook = TestHook::from_name(&name).ok_or_else(|| {
                    format!(
                        "unknown test hook '{name}' (known: none, page-fault, invalid-guest-state, disk-write, net-probe, double-free, triple-fault)"
                    )
                })?;
            }
            "--config" => config = Some(PathBuf::from(value()?)),
            "--disk" => disk = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    Ok(Options {
        kernel: kernel.ok_or_else(|| format!("--kernel is required\n{USAGE}"))?,
        out_dir: out_dir.ok_or_else(|| format!("--out-dir is required\n{USAGE}"))?,
        test_hook,
        config,
        disk,
    })
}

fn build(options: &Options) -> Result<(), Failure> {
    let guests = match &options.config {
        Some(path) => config::load(path).map_err(Failure::Config)?,
        None => config::Config { vms: Vec::new() },
    };
    // The physical disk matters only to VMs that name its partitions (any other disk, or none,
    // is not this tool's to judge: the hypervisor reports what it finds).
    let names_partitions = guests.vms.iter().any(|vm| {
        vm.disks
            .iter()
            .any(|disk| !matches!(disk.source, config::DiskConfigSource::Image { .. }))
    });
    if let Some(disk) = options.disk.as_ref().filter(|_| names_partitions) {
        let io = disk::FileIo::open(disk, false)?;
        let table = ringzero_vdisk::gpt::read_gpt(&io)
            .map_err(|error| format!("physical disk {}: {error}", disk.display()))?;
        let file = options.config.as_ref().map_or_else(
            || "(no --config)".to_string(),
            |path| path.display().to_string(),
        );
        let errors = config::check_partitions(&guests, &file, disk, &table);
        if !errors.is_empty() {
            return Err(Failure::Config(errors));
        }
    }
    if !options.kernel.is_file() {
        return Err(Failure::Other(format!(
            "kernel '{}' not found: build it first (scripts/run-qemu.sh does)",
            options.kernel.display()
        )));
    }
    std::fs::create_dir_all(&options.out_dir)
        .map_err(|error| format!("cannot create {}: {error}", options.out_dir.display()))?;

    let manifest_path = options.out_dir.join("manifest.bin");
    let manifest: Manifest<'_> = guests.manifest(options.test_hook);
    std::fs::write(&manifest_path, manifest.encode())
        .map_err(|error| format!("cannot write {}: {error}", manifest_path.display()))?;
    for vm in &guests.vms {
        println!(
            "ringzero-boot: vm \"{}\": {}, {} MiB, image {} bytes ({}), {} module(s){}, {} disk(s){}, {} vCPU{}, paging {}{}{}",
            vm.name,
            vm.format.name(),
            vm.memory_mib,
            vm.kernel.len(),
            vm.kernel_path.display(),
            vm.modules.len(),
            match &vm.initrd {
                Some((path, bytes)) => format!(", initrd {} bytes ({})", bytes.len(), path.display()),
                None => String::new(),
            },
            vm.disks.len(),
            match vm.nic {
                Some(nic) => format!(", nic {}", MacText(nic.mac)),
                None => String::new(),
            },
            vm.cpus,
            if vm.pin.is_empty() {
                String::new()
            } else {
                format!(
                    " pinned to CPU {}",
                    vm.pin
                        .iter()
                        .map(u8::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )
            },
            vm.paging.name(),
            if vm.trace { ", trace" } else { "" },
            match vm.time_limit_seconds {
                Some(seconds) => format!(", time limit {seconds} s"),
                None => String::new(),
            }
        );
    }

    // The bootloader's own log goes to serial only (drawing text into the framebuffer is
    // slow under emulation, Bochs above all) and only for warnings.
    let mut boot_config = BootConfig::default();
    boot_config.frame_buffer_logging = false;
    boot_config.log_level = LevelFilter::Warn;

    let uefi_path = options.out_dir.join("uefi.img");
    UefiBoot::new(&options.kernel)
        .set_ramdisk(&manifest_path)
        .set_boot_config(&boot_config)
        .create_disk_image(&uefi_path)
        .map_err(|error| {
            format!(
                "cannot create the UEFI image {}: {error:#}",
                uefi_path.display()
            )
        })?;
    let bios_path = options.out_dir.join("bios.img");
    BiosBoot::new(&options.kernel)
        .set_ramdisk(&manifest_path)
        .set_boot_config(&boot_config)
        .create_disk_image(&bios_path)
        .map_err(|error| {
            format!(
                "cannot create the BIOS image {}: {error:#}",
                bios_path.display()
            )
        })?;
    println!(
        "ringzero-boot: wrote {} and {} ({} VM(s), test hook: {})",
        uefi_path.display(),
        bios_path.display(),
        guests.vms.len(),
        options.test_hook.name()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("disk") {
        return match disk::main(args.skip(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("ringzero-boot: error: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let result = parse_options(args)
        .map_err(Failure::Other)
        .and_then(|options| build(&options));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(errors)) => {
            for error in &errors {
                eprintln!("ringzero-boot: error: {error}");
            }
            eprintln!(
                "ringzero-boot: the guest configuration has {} error(s); nothing was written",
                errors.len()
            );
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("ringzero-boot: error: {message}");
            ExitCode::FAILURE
        }
    }
}
