//! The guest configuration: a TOML file with one `[[vm]]` table per guest, checked here on
//! the host so the hypervisor only ever receives a valid manifest.
//!
//! ```toml
//! [[vm]]
//! name = "basic"            # required; 1-32 chars of [A-Za-z0-9_-]; unique
//! kernel = "path/to/image"  # required; relative to the config file's directory
//! format = "flat64"         # required: "flat64" | "multiboot" | "linux"
//! memory = 16               # MiB, required; 2..=4096
//! cmdline = "..."           # optional, default ""; at most 3072 bytes (linux: the kernel's cmdline_size)
//! modules = ["a", "b"]      # optional list of paths (relative to the config file), multiboot only
//! initrd = "path"           # optional initial RAM disk (relative to the config file), linux only
//! cpus = 1                  # optional, default 1; 1..=16 vCPUs (above 1 needs paging = "nested")
//! pin = [0, 1]              # optional: host CPUs 0..=63, one (all vCPUs) or `cpus` entries (vCPU i on pin[i])
//! paging = "nested"         # optional: "nested" (default) | "shadow"
//! trace = false             # optional: log every exit
//! time_limit = 60           # optional: stop the VM after 1..=86400 seconds of wall time
//!
//! [[vm.disk]]               # optional, up to 4 per VM: virtio-blk disks, in device order
//! partition = "vm1"         # a partition of the physical disk by GPT label, or
//! # guid = "8DA63339-0007-60C0-C436-083AC8230908"   # by unique GUID (as sgdisk -i prints it), or
//! # image = "disks/ro.img"  # an image file (relative to the config file), packed into the
//! #                         # bundle and held in RAM; a whole number of 512-byte sectors
//! writable = true           # optional, default false; a writable image's changes are lost at power-off
//!
//! [[vm.nic]]                # optional, at most 1 per VM for now: a virtio-net NIC on the switch
//! mac = "02:00:00:00:00:01" # optional; default: derived from the VM's name (mac_from_name)
//! ```
//!
//! A partition given `writable = true` to one disk may not be named (by the same label or
//! GUID) by any other disk of any VM. With `ringzero-boot --disk FILE` (the physical disk the
//! hypervisor will get), every partition must exist on it ([`check_partitions`]), which also
//! catches a label and a GUID that name the same partition.
//!
//! No two NICs of any VMs may have the same MAC address, given or derived
//! ([`check_unique_macs`]).
//!
//! Over all VMs, at most 64 vCPUs ([`MAX_TOTAL_CPUS`]). Whether a pinned CPU exists is only
//! known at boot; the hypervisor refuses that then.
//!
//! Validation is by hand over `toml::Table` (not serde) so that every error names the file, the
//! VM (`vm "NAME"`, or `[[vm]] #N` when it has no usable name) and the key, in one line:
//! `tests/configs/bad.toml: vm "basic": key "memory": 0 MiB is not a valid size (2..=4096)`.
//! All errors are collected, not just the first. Each VM that passes the key checks is also
//! planned with [`ringzero_loader::boot_plan::plan`], so an image that does not fit its
//! memory is refused here, at build time.

use ringzero_loader::boot_plan::{self, LoadError};
use ringzero_loader::manifest::{
    is_valid_nic_mac, is_valid_partition_label, is_valid_vm_name, DiskManifest, DiskSource,
    GuestFormat, MacText, Manifest, Module, NicManifest, Paging, TestHook, VmManifest,
    DISK_SECTOR_SIZE, MAX_CMDLINE_LEN, MAX_CPUS, MAX_DISKS, MAX_HOST_CPU, MAX_MODULES,
    MAX_MODULE_NAME_LEN, MAX_NICS, MAX_TIME_LIMIT_SECONDS, MAX_TOTAL_CPUS,
};
use ringzero_vdisk::gpt::{guid_text, parse_guid, GptTable, Guid, PartitionSelector};
use ringzero_virtio::net::mac_from_name;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Smallest accepted `memory`, in MiB.
pub const MIN_MEMORY_MIB: i64 = 2;
/// Largest accepted `memory`, in MiB (4 GiB: the boot protocols' address limit).
pub const MAX_MEMORY_MIB: i64 = 4096;
/// The keys a `[[vm]]` table may have.
pub const VM_KEYS: [&str; 14] = [
    "name",
    "kernel",
    "format",
    "memory",
    "cmdline",
    "modules",
    "initrd",
    "cpus",
    "pin",
    "paging",
    "trace",
    "time_limit",
    "disk",
    "nic",
];
/// The keys a `[[vm.disk]]` table may have.
pub const DISK_KEYS: [&str; 4] = ["partition", "guid", "image", "writable"];
/// The keys a `[[vm.nic]]` table may have.
pub const NIC_KEYS: [&str; 1] = ["mac"];

/// One checked guest, with its image and modules read into memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub format: GuestFormat,
    pub memory_mib: u64,
    pub cmdline: String,
    /// vCPUs, 1..=[`MAX_CPUS`].
    pub cpus: u32,
    /// Host CPUs the vCPUs run on: empty (not pinned), one, or `cpus` entries.
    pub pin: Vec<u8>,
    /// Seconds of wall time after which the hypervisor stops the VM.
    pub time_limit_seconds: Option<u32>,
    pub paging: Paging,
    pub trace: bool,
    pub kernel_path: PathBuf,
    pub kernel: Vec<u8>,
    pub modules: Vec<ModuleFile>,
    /// The initial RAM disk of a linux guest: its path and bytes.
    pub initrd: Option<(PathBuf, Vec<u8>)>,
    /// The virtual disks, in device order (at most [`MAX_DISKS`]).
    pub disks: Vec<DiskConfig>,
    /// The virtual NIC (at most [`MAX_NICS`], so at most one for now).
    pub nic: Option<NicConfig>,
}

/// One checked `[[vm.nic]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicConfig {
    /// Unicast and not all zero.
    pub mac: [u8; 6],
    /// True when `mac` was not given and is `mac_from_name(vm name)`.
    pub derived: bool,
}

impl NicConfig {
    /// `02:f1:1e:72:48:19`, followed by `suffix` when the MAC was derived from the name.
    fn describe(&self, suffix: &str) -> String {
        if self.derived {
            format!("{} {suffix}", MacText(self.mac))
        } else {
            MacText(self.mac).to_string()
        }
    }
}

/// One checked `[[vm.disk]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub source: DiskConfigSource,
    pub writable: bool,
}

/// What backs a configured disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskConfigSource {
    /// `partition = "LABEL"`.
    PartitionLabel(String),
    /// `guid = "..."`, in GPT byte order.
    PartitionGuid([u8; 16]),
    /// `image = "path"`: the file's name (the disk's serial), path and bytes.
    Image {
        name: String,
        path: PathBuf,
        bytes: Vec<u8>,
    },
}

impl DiskConfigSource {
    /// How the disk is named in messages: `partition "vm1"`, `guid ...`, `image "path"`.
    fn describe(&self) -> String {
        match self {
            DiskConfigSource::PartitionLabel(label) => format!("partition \"{label}\""),
            DiskConfigSource::PartitionGuid(guid) => {
                format!("guid {}", guid_text(Guid::from_bytes(*guid)))
            }
            DiskConfigSource::Image { path, .. } => format!("image \"{}\"", path.display()),
        }
    }

    /// The partition it names on a GPT, if it names one.
    fn selector(&self) -> Option<PartitionSelector> {
        match self {
            DiskConfigSource::PartitionLabel(label) => {
                Some(PartitionSelector::Label(label.clone()))
            }
            DiskConfigSource::PartitionGuid(guid) => {
                Some(PartitionSelector::Guid(Guid::from_bytes(*guid)))
            }
            DiskConfigSource::Image { .. } => None,
        }
    }
}

/// A Multiboot module file; `name` (the file name) is what the guest sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// A checked configuration: the VMs in run order (at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub vms: Vec<VmConfig>,
}

impl VmConfig {
    /// The VM as the manifest carries it (borrowing the image and modules).
    pub fn manifest(&self) -> VmManifest<'_> {
        VmManifest {
            name: &self.name,
            format: self.format,
            memory_bytes: self.memory_mib << 20,
            cmdline: &self.cmdline,
            cpus: self.cpus,
            pin: &self.pin,
            time_limit_seconds: self.time_limit_seconds,
            paging: self.paging,
            trace: self.trace,
            kernel: &self.kernel,
            modules: self
                .modules
                .iter()
                .map(|module| Module {
                    name: &module.name,
                    bytes: &module.bytes,
                })
                .collect(),
            initrd: self.initrd.as_ref().map(|(_, bytes)| bytes.as_slice()),
            disks: self
                .disks
                .iter()
                .map(|disk| DiskManifest {
                    source: match &disk.source {
                        DiskConfigSource::PartitionLabel(label) => {
                            DiskSource::PartitionLabel(label)
                        }
                        DiskConfigSource::PartitionGuid(guid) => DiskSource::PartitionGuid(*guid),
                        DiskConfigSource::Image { name, bytes, .. } => {
                            DiskSource::Image { name, bytes }
                        }
                    },
                    writable: disk.writable,
                })
                .collect(),
            nic: self.nic.map(|nic| NicManifest { mac: nic.mac }),
        }
    }
}

impl Config {
    /// The manifest for these VMs.
    pub fn manifest(&self, test_hook: TestHook) -> Manifest<'_> {
        Manifest {
            test_hook,
            vms: self.vms.iter().map(VmConfig::manifest).collect(),
        }
    }
}

/// One problem in a configuration file, displayed as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as given on the command line.
    pub file: String,
    /// `vm "NAME"` or `[[vm]] #N`, when the error is about one VM.
    pub vm: Option<String>,
    /// The key the error is about.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: ", self.file)?;
        if let Some(vm) = &self.vm {
            write!(formatter, "{vm}: ")?;
        }
        if let Some(key) = &self.key {
            write!(formatter, "key \"{key}\": ")?;
        }
        write!(formatter, "{}", self.message)
    }
}

/// Reads and checks the configuration at `path` (relative paths inside it are resolved
/// against its directory). Returns every error found.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        vec![ConfigError {
            file: file.clone(),
            vm: None,
            key: None,
            message: format!("cannot read the configuration: {error}"),
        }]
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&file, &text, base)
}

/// Checks configuration `text` (named `file` in errors), reading images relative to `base`.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, Vec<ConfigError>> {
    let mut errors = Errors {
        file,
        list: Vec::new(),
    };
    let table: Table = match text.parse() {
        Ok(table) => table,
        Err(error) => {
            let error: toml::de::Error = error;
            let location = match error.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
                    format!("line {line}, column {column}: ")
                }
                None => String::new(),
            };
            let message = error.message().trim().replace('\n', " ");
            errors.push(
                None,
                None,
                format!("{location}TOML syntax error: {message}"),
            );
            return Err(errors.list);
        }
    };

    for key in table.keys().filter(|key| *key != "vm") {
        errors.push(
            None,
            Some(key),
            "unknown top-level key (only [[vm]] tables are allowed)".into(),
        );
    }
    let vm_tables: Vec<&Value> = match table.get("vm") {
        None => Vec::new(),
        Some(Value::Array(array)) => array.iter().collect(),
        Some(other) => {
            errors.push(
                None,
                Some("vm"),
                format!(
                    "expected [[vm]] tables, found {}",
                    with_article(other.type_str())
                ),
            );
            return Err(errors.list);
        }
    };
    if vm_tables.is_empty() {
        errors.push(
            None,
            None,
            "no [[vm]] table: at least one VM is required".into(),
        );
    }
    if vm_tables.len() > ringzero_loader::manifest::MAX_VMS {
        errors.push(
            None,
            Some("vm"),
            format!(
                "{} [[vm]] tables: at most {} VMs fit the boot manifest",
                vm_tables.len(),
                ringzero_loader::manifest::MAX_VMS
            ),
        );
    }

    let mut vms = Vec::new();
    let mut names: Vec<(String, usize)> = Vec::new();
    for (index, value) in vm_tables.into_iter().enumerate() {
        let number = index + 1;
        let Value::Table(vm_table) = value else {
            errors.push(
                Some(format!("[[vm]] #{number}")),
                None,
                format!("expected a table, found {}", with_article(value.type_str())),
            );
            continue;
        };
        // Duplicate names are reported with both table numbers, so the later VM is named by
        // its number (its name alone would be ambiguous).
        if let Some(Value::String(name)) = vm_table.get("name") {
            if is_valid_vm_name(name) {
                if let Some((_, first)) = names.iter().find(|(seen, _)| seen == name) {
                    errors.push(
                        Some(format!("[[vm]] #{number}")),
                        Some("name"),
                        format!("\"{name}\" is already the name of [[vm]] #{first}"),
                    );
                } else {
                    names.push((name.clone(), number));
                }
            }
        }
        if let Some(vm) = check_vm(&mut errors, vm_table, number, base) {
            vms.push(vm);
        }
    }
    check_shared_partitions(&mut errors, &vms);
    check_unique_macs(&mut errors, &vms);
    let total_cpus = total_cpus(&table);
    if total_cpus > u64::from(MAX_TOTAL_CPUS) {
        errors.push(
            None,
            Some("cpus"),
            format!(
                "{total_cpus} vCPUs over all [[vm]] tables: at most {MAX_TOTAL_CPUS} fit the boot manifest"
            ),
        );
    }
    if errors.list.is_empty() {
        Ok(Config { vms })
    } else {
        Err(errors.list)
    }
}

/// The vCPUs the `[[vm]]` tables ask for, counting a missing or invalid `cpus` as 1 (the
/// invalid ones are reported on their VM).
fn total_cpus(table: &Table) -> u64 {
    let Some(Value::Array(vms)) = table.get("vm") else {
        return 0;
    };
    vms.iter()
        .filter_map(Value::as_table)
        .map(|vm| match vm.get("cpus") {
            Some(Value::Integer(count)) if (1..=i64::from(MAX_CPUS)).contains(count) => {
                *count as u64
            }
            _ => 1,
        })
        .sum()
}

struct Errors<'a> {
    file: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, vm: Option<String>, key: Option<&str>, message: String) {
        self.list.push(ConfigError {
            file: self.file.to_string(),
            vm,
            key: key.map(str::to_string),
            message,
        });
    }
}

fn with_article(type_name: &str) -> String {
    let article = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {type_name}")
}

/// The checks of one `[[vm]]` table; errors go to `errors` under `label`.
struct VmChecker<'a, 'e> {
    errors: &'e mut Errors<'a>,
    table: &'e Table,
    label: String,
    failed: bool,
}

impl<'e> VmChecker<'_, 'e> {
    fn error(&mut self, key: &str, message: String) {
        self.failed = true;
        self.errors
            .push(Some(self.label.clone()), Some(key), message);
    }

    fn wrong_type(&mut self, key: &str, expected: &str, found: &Value) {
        let message = format!(
            "expected {expected}, found {}",
            with_article(found.type_str())
        );
        self.error(key, message);
    }

    /// The values of the `[[vm.KEY]]` array of tables, at most `max` of them (`too_many` says
    /// the limit in the error). `None` when the key is absent, and (after an error) when it
    /// holds too many values or something other than an array.
    fn array_of_tables(&mut self, key: &str, max: usize, too_many: &str) -> Option<Vec<&'e Value>> {
        let table: &'e Table = self.table;
        match table.get(key) {
            None => None,
            Some(Value::Array(values)) if values.len() > max => {
                let count = values.len();
                self.error(key, format!("{count} [[vm.{key}]] tables, {too_many}"));
                None
            }
            Some(Value::Array(values)) => Some(values.iter().collect()),
            Some(Value::Table(_)) => {
                self.error(
                    key,
                    format!("expected [[vm.{key}]] tables (double brackets), found a single [vm.{key}] table"),
                );
                None
            }
            Some(other) => {
                self.wrong_type(key, &format!("[[vm.{key}]] tables"), other);
                None
            }
        }
    }

    /// Entry `number` (from 1) of the `[[vm.KEY]]` array: its table, and whether it has keys
    /// outside `known` (each named in an error). `None` (after an error) when it is not a table.
    fn entry_table<'v>(
        &mut self,
        key: &str,
        number: usize,
        value: &'v Value,
        known: &[&str],
    ) -> Option<(&'v Table, bool)> {
        let Value::Table(table) = value else {
            let found = with_article(value.type_str());
            self.error(
                key,
                format!("{key} #{number}: expected a table, found {found}"),
            );
            return None;
        };
        let mut unknown = false;
        for name in table.keys() {
            if !known.contains(&name.as_str()) {
                let known = known.join(", ");
                self.error(
                    key,
                    format!("{key} #{number}: unknown key \"{name}\" (known: {known})"),
                );
                unknown = true;
            }
        }
        Some((table, unknown))
    }

    /// The string at `key`; `None` (with an error when `required` or of the wrong type) if
    /// absent or not a string.
    fn string(&mut self, key: &str, required: bool) -> Option<String> {
        match self.table.get(key) {
            Some(Value::String(text)) => Some(text.clone()),
            Some(other) => {
                self.wrong_type(key, "a string", other);
                None
            }
            None => {
                if required {
                    self.error(key, "missing (every [[vm]] needs it)".into());
                }
                None
            }
        }
    }

    fn integer(&mut self, key: &str, required: bool) -> Option<i64> {
        match self.table.get(key) {
            Some(Value::Integer(number)) => Some(*number),
            Some(other) => {
                self.wrong_type(key, "an integer", other);
                None
            }
            None => {
                if required {
                    self.error(key, "missing (every [[vm]] needs it)".into());
                }
                None
            }
        }
    }
}

fn read_file(base: &Path, relative: &str) -> Result<(PathBuf, Vec<u8>), String> {
    if relative.is_empty() {
        return Err("the path is empty".into());
    }
    let path = base.join(relative);
    match std::fs::read(&path) {
        Ok(bytes) => Ok((path, bytes)),
        Err(error) => Err(format!("cannot read \"{}\": {error}", path.display())),
    }
}

/// Checks one `[[vm]]` table (number `number`, counting from 1); returns the VM when it has no
/// error.
fn check_vm(
    errors: &mut Errors<'_>,
    table: &Table,
    number: usize,
    base: &Path,
) -> Option<VmConfig> {
    let label = match table.get("name") {
        Some(Value::String(name)) if is_valid_vm_name(name) => format!("vm \"{name}\""),
        _ => format!("[[vm]] #{number}"),
    };
    let mut check = VmChecker {
        errors,
        table,
        label,
        failed: false,
    };

    for key in table.keys() {
        if !VM_KEYS.contains(&key.as_str()) {
            check.error(key, format!("unknown key (known: {})", VM_KEYS.join(", ")));
        }
    }

    let name = check.string("name", true);
    if let Some(name) = &name {
        if !is_valid_vm_name(name) {
            check.error(
                "name",
                format!("\"{name}\" is not a valid name (1-32 characters of A-Z a-z 0-9 _ -)"),
            );
        }
    }

    let format = check.string("format", true).and_then(|text| {
        let format = GuestFormat::from_name(&text);
        if format.is_none() {
            check.error(
                "format",
                format!(
                    "unknown format \"{text}\" (known: {})",
                    GuestFormat::ALL.map(GuestFormat::name).join(", ")
                ),
            );
        }
        format
    });

    let memory_mib = check.integer("memory", true).and_then(|mib| {
        if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            Some(mib as u64)
        } else {
            check.error(
                "memory",
                format!("{mib} MiB is not a valid size ({MIN_MEMORY_MIB}..={MAX_MEMORY_MIB})"),
            );
            None
        }
    });

    let kernel = check
        .string("kernel", true)
        .and_then(|path| match read_file(base, &path) {
            Ok(file) => Some(file),
            Err(message) => {
                check.error("kernel", message);
                None
            }
        });

    let cmdline = check.string("cmdline", false).unwrap_or_default();
    if cmdline.len() > MAX_CMDLINE_LEN {
        check.error(
            "cmdline",
            format!(
                "{} bytes is too long (at most {MAX_CMDLINE_LEN})",
                cmdline.len()
            ),
        );
    } else if cmdline.contains('\0') {
        check.error("cmdline", "must not contain a NUL character".into());
    }

    let mut modules = Vec::new();
    match table.get("modules") {
        None => {}
        Some(Value::Array(paths)) => {
            if let Some(format @ (GuestFormat::Flat64 | GuestFormat::Linux)) =
                format.filter(|_| !paths.is_empty())
            {
                let hint = if format == GuestFormat::Linux {
                    "; give its initramfs as initrd"
                } else {
                    ""
                };
                check.error(
                    "modules",
                    format!(
                        "modules are only for format = \"multiboot\" (a {} guest cannot receive them{hint})",
                        format.name()
                    ),
                );
            } else if paths.len() > MAX_MODULES {
                check.error(
                    "modules",
                    format!("{} modules, at most {MAX_MODULES} are allowed", paths.len()),
                );
            } else {
                for (index, path) in paths.iter().enumerate() {
                    let Value::String(relative) = path else {
                        let message = format!(
                            "entry {}: expected a string (a path), found {}",
                            index + 1,
                            with_article(path.type_str())
                        );
                        check.error("modules", message);
                        continue;
                    };
                    match read_file(base, relative) {
                        Ok((path, bytes)) => {
                            let name = path
                                .file_name()
                                .map(|name| name.to_string_lossy().into_owned())
                                .unwrap_or_else(|| relative.clone());
                            modules.push(ModuleFile { name, path, bytes });
                        }
                        Err(message) => check.error("modules", message),
                    }
                }
            }
        }
        Some(other) => check.wrong_type("modules", "an array of paths", other),
    }

    let initrd = check.string("initrd", false).and_then(|relative| {
        if let Some(format) = format.filter(|format| *format != GuestFormat::Linux) {
            check.error(
                "initrd",
                format!(
                    "initrd is only for format = \"linux\" (a {} guest cannot receive it)",
                    format.name()
                ),
            );
            return None;
        }
        match read_file(base, &relative) {
            Ok(file) => Some(file),
            Err(message) => {
                check.error("initrd", message);
                None
            }
        }
    });

    // `None` when `cpus` is given but not valid (then `pin`'s length is not checked).
    let cpus = match check.integer("cpus", false) {
        None => Some(1),
        Some(count) => match u32::try_from(count) {
            Ok(count) if (1..=MAX_CPUS).contains(&count) => Some(count),
            _ => {
                check.error(
                    "cpus",
                    format!("{count} is not a valid vCPU count (1..={MAX_CPUS})"),
                );
                None
            }
        },
    };

    let mut pin = Vec::new();
    match table.get("pin") {
        None => {}
        Some(Value::Array(entries)) => {
            for (index, entry) in entries.iter().enumerate() {
                let number = index + 1;
                match entry {
                    Value::Integer(cpu) => match u8::try_from(*cpu) {
                        Ok(cpu) if cpu <= MAX_HOST_CPU => pin.push(cpu),
                        _ => check.error(
                            "pin",
                            format!(
                                "entry {number}: {cpu} is not a valid CPU number (0..={MAX_HOST_CPU})"
                            ),
                        ),
                    },
                    other => {
                        let message = format!(
                            "entry {number}: expected an integer (a CPU number), found {}",
                            with_article(other.type_str())
                        );
                        check.error("pin", message);
                    }
                }
            }
            if let Some(cpus) = cpus {
                let count = entries.len();
                if count != 1 && count != cpus as usize {
                    check.error(
                        "pin",
                        format!(
                            "{count} entries for cpus = {cpus}: give one CPU (every vCPU runs on it) or exactly {cpus} (vCPU i runs on entry i)"
                        ),
                    );
                }
            }
        }
        Some(other) => check.wrong_type("pin", "an array of CPU numbers", other),
    }

    let time_limit_seconds =
        check
            .integer("time_limit", false)
            .and_then(|seconds| match u32::try_from(seconds) {
                Ok(seconds) if (1..=MAX_TIME_LIMIT_SECONDS).contains(&seconds) => Some(seconds),
                _ => {
                    check.error(
                        "time_limit",
                        format!(
                        "{seconds} seconds is not a valid time limit (1..={MAX_TIME_LIMIT_SECONDS})"
                    ),
                    );
                    None
                }
            });

    let paging = match check.string("paging", false).as_deref() {
        None | Some("nested") => Paging::Nested,
        Some("shadow") => Paging::Shadow,
        Some(other) => {
            check.error(
                "paging",
                format!("unknown paging \"{other}\" (known: nested, shadow)"),
            );
            Paging::Nested
        }
    };
    if let Some(count @ 2..) = cpus.filter(|_| paging == Paging::Shadow) {
        check.error(
            "cpus",
            format!(
                "cpus = {count} with paging = \"shadow\": guest SMP needs paging = \"nested\"; shadow page tables are kept per VM and not synchronised between vCPUs"
            ),
        );
    }

    let trace = match table.get("trace") {
        None => false,
        Some(Value::Boolean(trace)) => *trace,
        Some(other) => {
            check.wrong_type("trace", "a boolean (true or false)", other);
            false
        }
    };

    let disks = check_disks(&mut check, base);
    let nic = check_nic(&mut check, name.as_deref());

    if check.failed {
        return None;
    }
    let (Some(name), Some(format), Some(memory_mib), Some((kernel_path, kernel)), Some(cpus)) =
        (name, format, memory_mib, kernel, cpus)
    else {
        return None;
    };
    let vm = VmConfig {
        name,
        format,
        memory_mib,
        cmdline,
        cpus,
        pin,
        time_limit_seconds,
        paging,
        trace,
        kernel_path,
        kernel,
        modules,
        initrd,
        disks,
        nic,
    };
    // The hypervisor will plan exactly this; refuse here what it would refuse there.
    if let Err(error) = boot_plan::plan(&vm.manifest()) {
        let key = load_error_key(&error, format);
        check.error(key, error.to_string());
        return None;
    }
    Some(vm)
}

/// Checks the `[[vm.disk]]` tables of the VM `check` is about.
fn check_disks(check: &mut VmChecker<'_, '_>, base: &Path) -> Vec<DiskConfig> {
    let too_many = format!("at most {MAX_DISKS} disks per VM are allowed");
    let Some(tables) = check.array_of_tables("disk", MAX_DISKS, &too_many) else {
        return Vec::new();
    };
    let mut disks = Vec::new();
    for (index, value) in tables.into_iter().enumerate() {
        let number = index + 1;
        let Some((table, mut failed)) = check.entry_table("disk", number, value, &DISK_KEYS) else {
            continue;
        };
        let mut fail = |message: String| check.error("disk", format!("disk #{number}: {message}"));
        let writable = match table.get("writable") {
            None => false,
            Some(Value::Boolean(writable)) => *writable,
            Some(other) => {
                fail(format!(
                    "key \"writable\": expected a boolean (true or false), found {}",
                    with_article(other.type_str())
                ));
                failed = true;
                false
            }
        };
        let given: Vec<&str> = ["partition", "guid", "image"]
            .into_iter()
            .filter(|key| table.contains_key(*key))
            .collect();
        let [key] = given[..] else {
            fail(if given.is_empty() {
                "give one of partition = \"LABEL\", guid = \"GUID\" or image = \"PATH\"".into()
            } else {
                format!(
                    "give only one of {} (a disk is one partition or one image)",
                    given.join(", ")
                )
            });
            continue;
        };
        let Some(Value::String(text)) = table.get(key) else {
            let found = table.get(key).map_or("nothing", Value::type_str);
            fail(format!(
                "key \"{key}\": expected a string, found {}",
                with_article(found)
            ));
            continue;
        };
        let source = match key {
            "partition" if is_valid_partition_label(text) => {
                DiskConfigSource::PartitionLabel(text.clone())
            }
            "partition" => {
                fail(format!(
                    "partition \"{text}\" is not a GPT label (1 to 36 UTF-16 characters, no NUL)"
                ));
                continue;
            }
            "guid" => match parse_guid(text) {
                Some(guid) if !guid.is_zero() => DiskConfigSource::PartitionGuid(guid.to_bytes()),
                _ => {
                    fail(format!(
                        "guid \"{text}\" is not a partition GUID (8-4-4-4-12 hex digits, not all zero)"
                    ));
                    continue;
                }
            },
            _ => match read_file(base, text) {
                Err(message) => {
                    fail(format!("image: {message}"));
                    continue;
                }
                Ok((path, bytes)) => {
                    if bytes.is_empty() || !bytes.len().is_multiple_of(DISK_SECTOR_SIZE) {
                        fail(format!(
                            "image \"{}\" is {} bytes, not a whole (non-zero) number of {DISK_SECTOR_SIZE}-byte sectors",
                            path.display(),
                            bytes.len()
                        ));
                        continue;
                    }
                    let name: String = path
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_else(|| text.clone())
                        .chars()
                        .filter(|c| *c != '\0')
                        .take(MAX_MODULE_NAME_LEN / 4)
                        .collect();
                    DiskConfigSource::Image { name, path, bytes }
                }
            },
        };
        if !failed {
            disks.push(DiskConfig { source, writable });
        }
    }
    disks
}

/// Checks the `[[vm.nic]]` tables of the VM `check` is about (named `name`, when it has a
/// name: the default MAC is derived from it).
fn check_nic(check: &mut VmChecker<'_, '_>, name: Option<&str>) -> Option<NicConfig> {
    let too_many = format!("at most {MAX_NICS} NIC per VM is allowed for now");
    let tables = check.array_of_tables("nic", MAX_NICS, &too_many)?;
    let mut nic = None;
    for (index, value) in tables.into_iter().enumerate() {
        let number = index + 1;
        let Some((table, failed)) = check.entry_table("nic", number, value, &NIC_KEYS) else {
            continue;
        };
        let mut fail = |message: String| check.error("nic", format!("nic #{number}: {message}"));
        let config = match table.get("mac") {
            None => name.map(|name| NicConfig {
                mac: mac_from_name(name),
                derived: true,
            }),
            Some(Value::String(text)) => match parse_mac(text) {
                None => {
                    fail(format!(
                        "key \"mac\": \"{text}\" is not a MAC address (six two-digit hex bytes separated by colons, e.g. \"02:00:00:00:00:01\")"
                    ));
                    None
                }
                Some(mac) if mac == [0; 6] => {
                    fail(format!(
                        "key \"mac\": {} is all zero: a NIC needs a unicast, non-zero address (e.g. \"02:00:00:00:00:01\")",
                        MacText(mac)
                    ));
                    None
                }
                Some(mac) if !is_valid_nic_mac(mac) => {
                    fail(format!(
                        "key \"mac\": {} is a multicast (group) address: a NIC needs a unicast one, with the lowest bit of the first byte clear (e.g. \"02:00:00:00:00:01\")",
                        MacText(mac)
                    ));
                    None
                }
                Some(mac) => Some(NicConfig {
                    mac,
                    derived: false,
                }),
            },
            Some(other) => {
                fail(format!(
                    "key \"mac\": expected a string, found {}",
                    with_article(other.type_str())
                ));
                None
            }
        };
        if !failed {
            nic = config;
        }
    }
    nic
}

/// Parses `02:00:00:00:00:01` (either case): six bytes of exactly two hex digits each,
/// separated by colons.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|digit| digit.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Refuses two NICs (of any VMs) with the same MAC address, given or derived: the switch
/// tells ports apart by MAC. The error is on the later VM and names the earlier.
fn check_unique_macs(errors: &mut Errors<'_>, vms: &[VmConfig]) {
    for (later, vm) in vms.iter().enumerate() {
        let Some(nic) = vm.nic else { continue };
        let earlier = vms[..later]
            .iter()
            .find(|other| other.nic.is_some_and(|other| other.mac == nic.mac));
        if let Some(other) = earlier {
            let derived = if other.nic.is_some_and(|nic| nic.derived) {
                " (derived from its name)"
            } else {
                ""
            };
            errors.push(
                Some(format!("vm \"{}\"", vm.name)),
                Some("nic"),
                format!(
                    "nic #1: MAC {} is also the MAC of the NIC of vm \"{}\"{derived}; every NIC needs its own MAC (give one of them another mac)",
                    nic.describe("(derived from the VM's name)"),
                    other.name
                ),
            );
        }
    }
}

/// Refuses a partition that is writable for one disk and named (by the same label or GUID)
/// by another disk of any VM; the error is on the later disk.
fn check_shared_partitions(errors: &mut Errors<'_>, vms: &[VmConfig]) {
    let disks: Vec<(&str, usize, &DiskConfig)> = vms
        .iter()
        .flat_map(|vm| {
            vm.disks
                .iter()
                .enumerate()
                .map(move |(index, disk)| (vm.name.as_str(), index + 1, disk))
        })
        .collect();
    for (later, &(vm, number, disk)) in disks.iter().enumerate() {
        let Some(selector) = disk.source.selector() else {
            continue;
        };
        let earlier = disks[..later].iter().find(|(_, _, other)| {
            (disk.writable || other.writable) && other.source.selector().as_ref() == Some(&selector)
        });
        if let Some((other_vm, other_number, _)) = earlier {
            errors.push(
                Some(format!("vm \"{vm}\"")),
                Some("disk"),
                format!(
                    "disk #{number}: {} is also disk #{other_number} of vm \"{other_vm}\"; a partition that is writable for one disk cannot be named by another",
                    disk.source.describe()
                ),
            );
        }
    }
}

/// Checks every partition disk of `config` against the GPT of the physical disk (`disk`
/// names it in messages): each must exist, and no two disks may name the same partition when
/// one of them is writable (a label and a GUID can name the same one). Errors name the
/// configuration `file`, the VM and key "disk".
pub fn check_partitions(
    config: &Config,
    file: &str,
    disk: &Path,
    table: &GptTable,
) -> Vec<ConfigError> {
    let mut errors = Errors {
        file,
        list: Vec::new(),
    };
    // (vm, disk number, partition index, writable, how it was named)
    let mut found: Vec<(&str, usize, u32, bool, String)> = Vec::new();
    for vm in &config.vms {
        for (index, entry) in vm.disks.iter().enumerate() {
            let Some(selector) = entry.source.selector() else {
                continue;
            };
            match table.find(&selector) {
                Ok(partition) => {
                    if let Some((other_vm, other_number, _, _, other_name)) =
                        found.iter().find(|(_, _, other, other_writable, _)| {
                            *other == partition.index && (entry.writable || *other_writable)
                        })
                    {
                        errors.push(
                            Some(format!("vm \"{}\"", vm.name)),
                            Some("disk"),
                            format!(
                                "disk #{}: {} on {} is the partition {other_name} names (disk #{other_number} of vm \"{other_vm}\"); a partition that is writable for one disk cannot be named by another",
                                index + 1,
                                entry.source.describe(),
                                disk.display()
                            ),
                        );
                    }
                    found.push((
                        &vm.name,
                        index + 1,
                        partition.index,
                        entry.writable,
                        entry.source.describe(),
                    ));
                }
                Err(error) => errors.push(
                    Some(format!("vm \"{}\"", vm.name)),
                    Some("disk"),
                    format!("disk #{}: {}: {error}", index + 1, disk.display()),
                ),
            }
        }
    }
    errors.list
}

/// The configuration key a planning error is about.
fn load_error_key(error: &LoadError, format: GuestFormat) -> &'static str {
    match error {
        LoadError::MemoryTooSmall { .. } | LoadError::MemoryTooLarge { .. } => "memory",
        LoadError::CommandLineTooLong { .. } | LoadError::CommandLineHasNul => "cmdline",
        LoadError::TooManyModules { .. }
        | LoadError::ModulesNotSupported { .. }
        | LoadError::BootInfoTooLarge { .. } => "modules",
        LoadError::InitrdNotSupported { .. } | LoadError::InitrdDoesNotFit { .. } => "initrd",
        // Multiboot images that run past memory are refused as segments; what is left over
        // is the modules.
        LoadError::ImageTooLarge { .. } if format == GuestFormat::Multiboot => "modules",
        // Everything else is about the image: for linux, a bzImage that is truncated, not a
        // bzImage, too old, without the 64-bit entry, or too big for the memory.
        _ => "kernel",
    }
}

#[cfg(test)]
mod tests;
