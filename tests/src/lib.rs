//! The emulator test harness: boots ringzero's images through `scripts/run-qemu.sh` and
//! captures what the hypervisor printed and how it ended. The test table is in
//! `tests/emulators.rs`; `scripts/test.sh` builds the images once and then runs it.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// How one boot ended.
pub struct Run {
    /// The command line, for the failure report.
    pub command: String,
    /// Exit status of `scripts/run-qemu.sh` (the hypervisor's power-off status, or 12x).
    pub status: i32,
    /// The serial console (the script's stdout).
    pub serial: String,
    /// The script's and the emulator's messages (stderr).
    pub messages: String,
    pub wall_time: Duration,
}

impl Run {
    /// A readable dump of the run, for assertion messages: the command, how it ended, the
    /// serial console (its head and its tail when long: how a run ended is at its end; the whole
    /// of it goes to a file under `target/test-runs/`, named here) and the scripts' messages.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {} after {:.1}s\n--- serial ---\n{}\n--- messages ---\n{}",
            self.command,
            self.status,
            self.wall_time.as_secs_f64(),
            self.serial_excerpt(),
            self.messages
        )
    }

    /// The serial console whole when short; else its first and last lines around a note of
    /// what was left out and where the whole of it was saved.
    fn serial_excerpt(&self) -> String {
        const HEAD: usize = 40;
        const TAIL: usize = 160;
        let lines: Vec<&str> = self.serial.lines().collect();
        if lines.len() <= HEAD + TAIL {
            return self.serial.clone();
        }
        let saved = save_serial(&self.serial)
            .map(|path| format!("the whole serial is in {}", path.display()))
            .unwrap_or_else(|error| format!("saving the whole serial failed: {error}"));
        format!(
            "{}\n[... {} lines left out; {saved} ...]\n{}",
            lines[..HEAD].join("\n"),
            lines.len() - HEAD - TAIL,
            lines[lines.len() - TAIL..].join("\n")
        )
    }

    /// Asserts the exit status, showing the whole run when it differs.
    pub fn assert_status(&self, expected: i32) {
        assert_eq!(
            self.status,
            expected,
            "unexpected exit status\n{}",
            self.report()
        );
    }

    /// Asserts that the serial output contains `needle`, showing the whole run when not.
    pub fn assert_serial_contains(&self, needle: &str) {
        assert!(
            self.serial.contains(needle),
            "serial output lacks {needle:?}\n{}",
            self.report()
        );
    }

    /// Asserts that the serial output does not contain `needle`.
    pub fn assert_serial_lacks(&self, needle: &str) {
        assert!(
            !self.serial.contains(needle),
            "serial output has {needle:?}\n{}",
            self.report()
        );
    }
}

/// The run of characters `accept` takes right after the first `key` in `line` (a guest's
/// kernel may print into the same console line, so the rest of the line is not the value).
pub fn text_after<'a>(line: &'a str, key: &str, accept: impl Fn(char) -> bool) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest.find(|c: char| !accept(c)).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The number in `key=N` on the first serial line that contains `prefix`.
pub fn field_after(line: &str, key: &str) -> Option<u64> {
    text_after(line, key, |c| c.is_ascii_digit())?.parse().ok()
}

impl Run {
    /// The first serial line containing `needle`.
    pub fn line_with(&self, needle: &str) -> &str {
        self.serial
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no serial line contains {needle:?}\n{}", self.report()))
    }

    /// The basic guest's last line reports how many CPUID, I/O, RDMSR and HLT instructions it
    /// executed (counting the report itself and its exit); asserts the hypervisor's exit
    /// statistics say the same.
    pub fn assert_basic_guest_counts_match(&self) {
        let report = self.line_with("basic: report ");
        for (guest_key, reason) in [
            ("cpuid=", "cpuid"),
            ("io=", "io"),
            ("msr=", "msr-read"),
            ("hlt=", "hlt"),
        ] {
            let guest_count = field_after(report, guest_key).expect("report field");
            assert_eq!(
                guest_count,
                self.exit_count(reason),
                "guest and hypervisor disagree on {reason}\n{}",
                self.report()
            );
        }
    }

    /// Like [`Run::exit_count`], 0 when the table has no row for `reason`.
    pub fn exit_count_or_zero(&self, reason: &str) -> u64 {
        let has_row = self.serial.lines().any(|line| {
            line.split(']')
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                == Some(reason)
        });
        if has_row {
            self.exit_count(reason)
        } else {
            0
        }
    }

    /// The count column of the exit-statistics row for `reason` (first table in the run).
    pub fn exit_count(&self, reason: &str) -> u64 {
        let row = self
            .serial
            .lines()
            .find(|line| {
                line.split(']')
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    == Some(reason)
            })
            .unwrap_or_else(|| panic!("no statistics row for {reason:?}\n{}", self.report()));
        let after = row.split(']').nth(1).expect("row has a prefix");
        after
            .split_whitespace()
            .nth(1)
            .and_then(|count| count.parse().ok())
            .expect("count column")
    }
}

/// The repository root (this crate lives in `tests/`).
pub fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Boots the prebuilt images with `scripts/run-qemu.sh --no-build ARGS`.
pub fn boot(args: &[&str]) -> Run {
    let script = repository_root().join("scripts/run-qemu.sh");
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(&script)
        .arg("--no-build")
        .args(args)
        .current_dir(repository_root())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    Run {
        command: format!("scripts/run-qemu.sh --no-build {}", args.join(" ")),
        status: output.status.code().unwrap_or(-1),
        serial: String::from_utf8_lossy(&output.stdout).into_owned(),
        messages: String::from_utf8_lossy(&output.stderr).into_owned(),
        wall_time: started.elapsed(),
    }
}

/// Boots like [`boot`], but in the background: once `ready` appears in the serial output (or
/// the run ends), calls `during` (a test talking to a guest over the network, say), then waits
/// for the run to end. Returns the run and what `during` returned (`None` if the run ended
/// before `ready` appeared).
pub fn boot_while<T>(args: &[&str], ready: &str, during: impl FnOnce() -> T) -> (Run, Option<T>) {
    use std::io::Read;
    let script = repository_root().join("scripts/run-qemu.sh");
    let started = Instant::now();
    let serial_path = std::env::temp_dir().join(format!(
        "ringzero-serial-{}-{:?}.txt",
        std::process::id(),
        std::thread::current().id()
    ));
    let serial_file = std::fs::File::create(&serial_path).expect("create the serial log");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--no-build")
        .args(args)
        .current_dir(repository_root())
        .stdin(std::process::Stdio::null())
        .stdout(serial_file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    let mut result = None;
    loop {
        let serial = std::fs::read_to_string(&serial_path).unwrap_or_default();
        if serial.contains(ready) {
            result = Some(during());
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let status = child.wait().expect("wait for run-qemu.sh");
    let mut messages = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut messages);
    }
    let serial = std::fs::read_to_string(&serial_path).unwrap_or_default();
    let _ = std::fs::remove_file(&serial_path);
    let run = Run {
        command: format!("scripts/run-qemu.sh --no-build {}", args.join(" ")),
        status: status.code().unwrap_or(-1),
        serial,
        messages,
        wall_time: started.elapsed(),
    };
    (run, result)
}

/// The backend's arguments followed by the test's own.
pub fn with<'a>(backend: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
    backend.iter().chain(args).copied().collect()
}

/// Instantiates test functions `fn NAME(backend: &[&str])` once per backend: as
/// `qemu_svm::NAME` (AMD SVM, QEMU `-cpu EPYC`, BIOS image) and `bochs_vmx::NAME` (Intel VMX,
/// Bochs `corei7_skylake_x`, BIOS image). A test is vendor-specific only when it tests a
/// vendor feature.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        /// AMD SVM: QEMU `-cpu EPYC`, BIOS image.
        mod qemu_svm {
            #[allow(unused_imports)]
            use super::*;
            $(#[test] fn $name() { super::$name(&["--bios"]) })*
        }
        /// Intel VMX: Bochs `corei7_skylake_x`, BIOS image.
        mod bochs_vmx {
            #[allow(unused_imports)]
            use super::*;
            $(#[test] fn $name() { super::$name(&["--bochs"]) })*
        }
    };
}

/// One `ringzero: vcpu NAME/I cpu=C start=T0 end=T1 ...` line: where and when a vCPU ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuLine {
    pub vm: String,
    pub index: u64,
    /// None when the vCPU never ran.
    pub cpu: Option<u64>,
    pub start: u64,
    pub end: u64,
    pub exits: u64,
    pub preemptions: u64,
    pub interrupts: u64,
}

impl VcpuLine {
    /// Whether the two vCPUs were in their VMs during a common stretch of time.
    pub fn overlaps(&self, other: &VcpuLine) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl Run {
    /// Every `ringzero: vcpu` line of the run.
    pub fn vcpu_lines(&self) -> Vec<VcpuLine> {
        self.serial
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("ringzero: vcpu ")?;
                let (name, _) = rest.split_once(' ')?;
                let (vm, index) = name.rsplit_once('/')?;
                Some(VcpuLine {
                    vm: vm.to_string(),
                    index: index.parse().ok()?,
                    cpu: field_after(line, " cpu="),
                    start: field_after(line, " start=")?,
                    end: field_after(line, " end=")?,
                    exits: field_after(line, " exits=")?,
                    preemptions: field_after(line, " preemptions=")?,
                    interrupts: field_after(line, " interrupts=")?,
                })
            })
            .collect()
    }

    /// The `ringzero: vcpu` line of vCPU `index` of VM `vm`.
    pub fn vcpu(&self, vm: &str, index: u64) -> VcpuLine {
        self.vcpu_lines()
            .into_iter()
            .find(|line| line.vm == vm && line.index == index)
            .unwrap_or_else(|| panic!("no vcpu line for {vm}/{index}\n{}", self.report()))
    }

    /// The position of the first serial line containing `needle`.
    pub fn position_of(&self, needle: &str) -> usize {
        self.serial
            .find(needle)
            .unwrap_or_else(|| panic!("serial output lacks {needle:?}\n{}", self.report()))
    }
}

/// A raw disk file for `scripts/run-qemu.sh --disk` (the hypervisor's physical disk), made
/// by the test in the system's temporary directory and removed when dropped.
pub struct ScratchDisk {
    path: PathBuf,
}

impl ScratchDisk {
    /// A file of `bytes` zero bytes (sparse), with each `(offset, data)` of `contents` written.
    pub fn new(bytes: u64, contents: &[(u64, &[u8])]) -> ScratchDisk {
        use std::io::{Seek, SeekFrom, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringzero-disk-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = std::fs::File::create(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        file.set_len(bytes).expect("set the disk's length");
        for (offset, data) in contents {
            file.seek(SeekFrom::Start(*offset))
                .expect("seek in the disk");
            file.write_all(data).expect("write the disk");
        }
        ScratchDisk { path }
    }

    /// A disk of `size_mib` MiB with a GPT and the partitions `(label, MiB)` in order, made by
    /// the image tool (`ringzero-boot disk create`, built by scripts/test.sh).
    pub fn partitioned(size_mib: u64, partitions: &[(&str, u64)]) -> ScratchDisk {
        let disk = ScratchDisk::new(0, &[]);
        let mut args = vec![
            "disk".to_string(),
            "create".to_string(),
            "--out".to_string(),
            disk.path().to_string(),
            "--size".to_string(),
            format!("{size_mib}M"),
        ];
        for (label, mib) in partitions {
            args.push("--partition".to_string());
            args.push(format!("{label}:{mib}M"));
        }
        run_disk_tool(&args);
        disk
    }

    /// The bytes of partition `label`, read back by the image tool (`disk read`).
    pub fn partition(&self, label: &str) -> Vec<u8> {
        let out = format!("{}.{label}", self.path());
        run_disk_tool(&[
            "disk".to_string(),
            "read".to_string(),
            "--disk".to_string(),
            self.path().to_string(),
            "--partition".to_string(),
            label.to_string(),
            "--out".to_string(),
            out.clone(),
        ]);
        let bytes = std::fs::read(&out).expect("read the partition copy");
        let _ = std::fs::remove_file(&out);
        bytes
    }

    /// Writes `data` at byte `offset` of partition `label` (found with `disk list`).
    pub fn write_partition(&self, label: &str, offset: u64, data: &[u8]) {
        use std::io::{Seek, SeekFrom, Write};
        let listing = run_disk_tool(&[
            "disk".to_string(),
            "list".to_string(),
            "--disk".to_string(),
            self.path().to_string(),
        ]);
        let line = listing
            .lines()
            .find(|line| line.contains(&format!("label \"{label}\"")))
            .unwrap_or_else(|| panic!("no partition {label} in\n{listing}"));
        let first_lba = field_after(line, "lba ").expect("a first LBA");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open the disk");
        file.seek(SeekFrom::Start(first_lba * 512 + offset))
            .expect("seek in the disk");
        file.write_all(data).expect("write the disk");
    }

    /// The file's path, for `--disk`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8 here")
    }

    /// The file's whole contents now.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read the disk back")
    }
}

/// Runs the image tool with `args`; panics with its output when it fails. Returns stdout.
fn run_disk_tool(args: &[String]) -> String {
    let tool = repository_root().join("target/release/ringzero-boot");
    let output = std::process::Command::new(&tool)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", tool.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}{}",
        tool.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for `--hostfwd` and `--net socket-*`).
pub fn free_local_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("bind a port on 127.0.0.1")
}

/// A record of every frame on the hypervisor's NIC, both directions, as QEMU's `filter-dump`
/// writes it (a pcap file): pass [`PacketCapture::qemu_args`] after `--` with `--net`.
pub struct PacketCapture {
    path: PathBuf,
}

impl Default for PacketCapture {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketCapture {
    /// A capture file name in the temporary directory (QEMU creates the file).
    pub fn new() -> PacketCapture {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringzero-net-{}-{}.pcap",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        PacketCapture { path }
    }

    /// QEMU's arguments for the capture of `run-qemu.sh --net`'s netdev (`net0`).
    pub fn qemu_args(&self) -> [String; 2] {
        [
            "-object".to_string(),
            format!(
                "filter-dump,id=capture0,netdev=net0,file={}",
                self.path.to_str().expect("temporary paths are UTF-8 here")
            ),
        ]
    }

    /// The captured frames in order (each without FCS), or `None` when there is no valid pcap
    /// file (the boot did not start QEMU with the capture).
    pub fn frames(&self) -> Option<Vec<Vec<u8>>> {
        const GLOBAL_HEADER: usize = 24;
        const RECORD_HEADER: usize = 16;
        const MAGIC: u32 = 0xA1B2_C3D4;
        let bytes = std::fs::read(&self.path).ok()?;
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
        };
        if word(0)? != MAGIC {
            return None;
        }
        let mut frames = Vec::new();
        let mut at = GLOBAL_HEADER;
        while at < bytes.len() {
            let captured = word(at + 8)? as usize;
            let start = at + RECORD_HEADER;
            frames.push(bytes.get(start..start + captured)?.to_vec());
            at = start + captured;
        }
        Some(frames)
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Saves a run's serial console under `target/test-runs/` (for a failure report) and returns
/// the file's path.
fn save_serial(serial: &str) -> std::io::Result<PathBuf> {
    static SAVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let directory = repository_root().join("target/test-runs");
    std::fs::create_dir_all(&directory)?;
    let number = SAVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = directory.join(format!("serial-{}-{number}.txt", std::process::id()));
    std::fs::write(&path, serial)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::{field_after, text_after};

    #[test]
    fn values_end_where_a_kernel_message_begins() {
        let line = "vm1 | net-test: address 10.0.2.16[   11.07] IPv6: eth0: link becomes ready";
        let dotted = |c: char| c.is_ascii_digit() || c == '.';
        assert_eq!(text_after(line, "address ", dotted), Some("10.0.2.16"));
        assert_eq!(text_after(line, "absent ", dotted), None);
        assert_eq!(
            field_after("sent=40 received=37[ 9.1] x", "received="),
            Some(37)
        );
        assert_eq!(field_after("sent= received=1", "sent="), None);
    }
}
