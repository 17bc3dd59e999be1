//! Unit tests of the configuration checks: each test writes its own files into a fresh
//! directory under the system temp dir.

use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory holding `files`; removed when dropped.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(files: &[(&str, &[u8])]) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringzero-boot-config-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        Scratch { dir }
    }

    /// Writes `text` as `vms.toml` and loads it.
    fn load(&self, text: &str) -> Result<Config, Vec<ConfigError>> {
        let path = self.dir.join("vms.toml");
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    /// Loads `text`, expects errors, and returns them as lines with the directory replaced by
    /// `DIR`.
    fn errors(&self, text: &str) -> Vec<String> {
        let errors = self
            .load(text)
            .expect_err("the configuration should be refused");
        errors
            .iter()
            .map(|error| {
                error
                    .to_string()
                    .replace(&self.dir.display().to_string(), "DIR")
            })
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const TINY: &[u8] = &[0xF4; 16];

/// A Multiboot image in the a.out-kludge form: loaded at 1 MiB, entered at its byte 32.
fn multiboot_image() -> Vec<u8> {
    let flags: u32 = 0x1_0003;
    let magic: u32 = 0x1BAD_B002;
    let fields = [
        magic,
        flags,
        0u32.wrapping_sub(magic).wrapping_sub(flags),
        0x10_0000,
        0x10_0000,
        0,
        0x10_1000,
        0x10_0020,
    ];
    let mut image: Vec<u8> = fields
        .iter()
        .flat_map(|field| field.to_le_bytes())
        .collect();
    image.extend_from_slice(&[0x90; 32]);
    image
}

fn one_error(scratch: &Scratch, text: &str) -> String {
    let errors = scratch.errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

#[test]
fn happy_path_round_trips_through_the_manifest() {
    let image = multiboot_image();
    let scratch = Scratch::new(&[
        ("tiny.bin", TINY),
        ("mb.elf", &image),
        ("initrd", b"module bytes"),
        ("second.mod", b""),
    ]);
    std::fs::create_dir_all(scratch.dir.join("sub")).unwrap();
    std::fs::write(scratch.dir.join("sub/nested.mod"), b"nested").unwrap();
    let config = scratch
        .load(
            r#"
# comment
[[vm]]
name = "basic"
kernel = "tiny.bin"
format = "flat64"
memory = 16

[[vm]]
name = "mb_2"
kernel = "mb.elf"
format = "multiboot"
memory = 32
cmdline = "console=ttyS0 quiet"
modules = ["initrd", "second.mod", "sub/nested.mod"]
cpus = 1
paging = "nested"
trace = true
"#,
        )
        .unwrap();
    assert_eq!(config.vms.len(), 2);
    let basic = &config.vms[0];
    assert_eq!(basic.name, "basic");
    assert_eq!(basic.format, GuestFormat::Flat64);
    assert_eq!(basic.memory_mib, 16);
    assert_eq!(basic.cmdline, "");
    assert_eq!(basic.cpus, 1);
    assert_eq!(basic.paging, Paging::Nested);
    assert!(!basic.trace);
    assert_eq!(basic.kernel, TINY);
    assert_eq!(basic.kernel_path, scratch.dir.join("tiny.bin"));
    let multiboot = &config.vms[1];
    assert!(multiboot.trace);
    let module_names: Vec<&str> = multiboot
        .modules
        .iter()
        .map(|module| module.name.as_str())
        .collect();
    assert_eq!(module_names, ["initrd", "second.mod", "nested.mod"]);
    assert_eq!(multiboot.modules[2].bytes, b"nested");

    let manifest = config.manifest(TestHook::None);
    let bytes = manifest.encode();
    let decoded = Manifest::decode(&bytes).unwrap();
    assert_eq!(decoded, manifest);
    assert_eq!(decoded.vms[0].memory_bytes, 16 << 20);
    assert_eq!(decoded.vms[1].cmdline, "console=ttyS0 quiet");
    assert_eq!(decoded.vms[1].modules[0].bytes, b"module bytes");
    // What the hypervisor will do with it works.
    for vm in &decoded.vms {
        boot_plan::plan(vm).unwrap();
    }
}

#[test]
fn missing_file_and_syntax_errors() {
    let scratch = Scratch::new(&[]);
    let missing = scratch.dir.join("nope.toml");
    let errors = load(&missing).unwrap_err();
    assert_eq!(errors.len(), 1);
    let line = errors[0].to_string();
    assert!(
        line.starts_with(&format!(
            "{}: cannot read the configuration: ",
            missing.display()
        )),
        "{line}"
    );

    let line = one_error(&scratch, "[[vm]]\nname = \"a\"\nmemory = = 3\n");
    assert!(line.starts_with("DIR/vms.toml: line 3, column "), "{line}");
    assert!(line.contains("TOML syntax error"), "{line}");
    assert!(!line.contains('\n'));
}

#[test]
fn top_level_errors() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert_eq!(
        one_error(&scratch, ""),
        "DIR/vms.toml: no [[vm]] table: at least one VM is required"
    );
    assert_eq!(
        one_error(&scratch, "vm = []"),
        "DIR/vms.toml: no [[vm]] table: at least one VM is required"
    );
    assert_eq!(
        one_error(&scratch, "vm = 3"),
        "DIR/vms.toml: key \"vm\": expected [[vm]] tables, found an integer"
    );
    assert_eq!(
        one_error(&scratch, "vm = [1]"),
        "DIR/vms.toml: [[vm]] #1: expected a table, found an integer"
    );
    let errors = scratch.errors(
        "colour = \"red\"\n[[vm]]\nname = \"a\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = 2\n",
    );
    assert_eq!(
        errors,
        ["DIR/vms.toml: key \"colour\": unknown top-level key (only [[vm]] tables are allowed)"]
    );
}

const BASIC: &str =
    "[[vm]]\nname = \"basic\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = 16\n";

#[test]
fn basic_is_valid() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert!(scratch.load(BASIC).is_ok());
}

#[test]
fn unknown_key() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let line = one_error(&scratch, &format!("{BASIC}colour = \"red\"\n"));
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"basic\": key \"colour\": unknown key (known: name, kernel, format, memory, cmdline, modules, initrd, cpus, pin, paging, trace, time_limit, disk, nic)"
    );
}

#[test]
fn wrong_types() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let errors = scratch.errors(
        "[[vm]]\nname = \"basic\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = \"16\"\ntrace = \"yes\"\ncpus = 1.0\ncmdline = 3\n",
    );
    assert_eq!(
        errors,
        [
            "DIR/vms.toml: vm \"basic\": key \"memory\": expected an integer, found a string",
            "DIR/vms.toml: vm \"basic\": key \"cmdline\": expected a string, found an integer",
            "DIR/vms.toml: vm \"basic\": key \"cpus\": expected an integer, found a float",
            "DIR/vms.toml: vm \"basic\": key \"trace\": expected a boolean (true or false), found a string",
        ]
    );
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"mb\"\nkernel = \"tiny.bin\"\nformat = \"multiboot\"\nmemory = 16\nmodules = \"a\"\n",
    );
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"mb\": key \"modules\": expected an array of paths, found a string"
    );
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"mb\"\nkernel = \"tiny.bin\"\nformat = \"multiboot\"\nmemory = 16\nmodules = [\"tiny.bin\", 4]\n",
    );
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"mb\": key \"modules\": entry 2: expected a string (a path), found an integer"
    );
}

#[test]
fn required_keys_and_unnamed_vms() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let errors = scratch.errors(&format!("{BASIC}[[vm]]\n"));
    assert_eq!(
        errors,
        [
            "DIR/vms.toml: [[vm]] #2: key \"name\": missing (every [[vm]] needs it)",
            "DIR/vms.toml: [[vm]] #2: key \"format\": missing (every [[vm]] needs it)",
            "DIR/vms.toml: [[vm]] #2: key \"memory\": missing (every [[vm]] needs it)",
            "DIR/vms.toml: [[vm]] #2: key \"kernel\": missing (every [[vm]] needs it)",
        ]
    );
    let line = one_error(&scratch, &BASIC.replace("\"basic\"", "\"has space\""));
    assert_eq!(
        line,
        "DIR/vms.toml: [[vm]] #1: key \"name\": \"has space\" is not a valid name (1-32 characters of A-Z a-z 0-9 _ -)"
    );
    let long_name = "n".repeat(33);
    let line = one_error(&scratch, &BASIC.replace("basic", &long_name));
    assert!(
        line.starts_with("DIR/vms.toml: [[vm]] #1: key \"name\": "),
        "{line}"
    );
}

#[test]
fn unknown_format() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert_eq!(
        one_error(&scratch, &BASIC.replace("flat64", "elf")),
        "DIR/vms.toml: vm \"basic\": key \"format\": unknown format \"elf\" (known: flat64, multiboot, linux)"
    );
}

#[test]
fn memory_sizes() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    for (value, shown) in [
        ("0", "0"),
        ("1", "1"),
        ("4097", "4097"),
        ("-5", "-5"),
        ("99999999999", "99999999999"),
    ] {
        assert_eq!(
            one_error(&scratch, &BASIC.replace("memory = 16", &format!("memory = {value}"))),
            format!("DIR/vms.toml: vm \"basic\": key \"memory\": {shown} MiB is not a valid size (2..=4096)")
        );
    }
    assert!(scratch
        .load(&BASIC.replace("memory = 16", "memory = 2"))
        .is_ok());
    assert!(scratch
        .load(&BASIC.replace("memory = 16", "memory = 4096"))
        .is_ok());
}

#[test]
fn duplicate_names_name_both() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let text = format!("{BASIC}{BASIC}[[vm]]\nname = \"other\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = 2\n{BASIC}");
    assert_eq!(
        scratch.errors(&text),
        [
            "DIR/vms.toml: [[vm]] #2: key \"name\": \"basic\" is already the name of [[vm]] #1",
            "DIR/vms.toml: [[vm]] #4: key \"name\": \"basic\" is already the name of [[vm]] #1",
        ]
    );
}

#[test]
fn missing_image_and_module() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let line = one_error(&scratch, &BASIC.replace("tiny.bin", "absent.bin"));
    assert!(
        line.starts_with(
            "DIR/vms.toml: vm \"basic\": key \"kernel\": cannot read \"DIR/absent.bin\": "
        ),
        "{line}"
    );
    let line = one_error(&scratch, &BASIC.replace("\"tiny.bin\"", "\"\""));
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"basic\": key \"kernel\": the path is empty"
    );
    let image = multiboot_image();
    let scratch = Scratch::new(&[("mb.elf", &image)]);
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"mb\"\nkernel = \"mb.elf\"\nformat = \"multiboot\"\nmemory = 4\nmodules = [\"gone.mod\"]\n",
    );
    assert!(
        line.starts_with(
            "DIR/vms.toml: vm \"mb\": key \"modules\": cannot read \"DIR/gone.mod\": "
        ),
        "{line}"
    );
}

#[test]
fn image_too_large() {
    let big = vec![0u8; (1 << 20) + 1];
    let scratch = Scratch::new(&[("big.bin", &big)]);
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"big\"\nkernel = \"big.bin\"\nformat = \"flat64\"\nmemory = 2\n",
    );
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"big\": key \"kernel\": the image does not fit the VM's memory: it needs RAM up to 0x200001 (2049 KiB) but the VM has 0x200000 (2048 KiB)"
    );
    // Multiboot: the modules do not fit; a broken image is reported under "kernel".
    let image = multiboot_image();
    let scratch = Scratch::new(&[("mb.elf", &image), ("big.mod", &big), ("junk.elf", TINY)]);
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"mb\"\nkernel = \"mb.elf\"\nformat = \"multiboot\"\nmemory = 2\nmodules = [\"big.mod\"]\n",
    );
    assert!(
        line.starts_with(
            "DIR/vms.toml: vm \"mb\": key \"modules\": the image does not fit the VM's memory"
        ),
        "{line}"
    );
    let line = one_error(
        &scratch,
        "[[vm]]\nname = \"junk\"\nkernel = \"junk.elf\"\nformat = \"multiboot\"\nmemory = 2\n",
    );
    assert!(
        line.starts_with("DIR/vms.toml: vm \"junk\": key \"kernel\": no Multiboot header"),
        "{line}"
    );
}

#[test]
fn modules_on_flat64() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}modules = [\"tiny.bin\"]\n")),
        "DIR/vms.toml: vm \"basic\": key \"modules\": modules are only for format = \"multiboot\" (a flat64 guest cannot receive them)"
    );
    // An empty list is harmless.
    assert!(scratch.load(&format!("{BASIC}modules = []\n")).is_ok());
}

#[test]
fn too_many_modules() {
    let image = multiboot_image();
    let scratch = Scratch::new(&[("mb.elf", &image), ("m", b"x")]);
    let list = vec!["\"m\""; 65].join(", ");
    let line = one_error(
        &scratch,
        &format!("[[vm]]\nname = \"mb\"\nkernel = \"mb.elf\"\nformat = \"multiboot\"\nmemory = 4\nmodules = [{list}]\n"),
    );
    assert_eq!(
        line,
        "DIR/vms.toml: vm \"mb\": key \"modules\": 65 modules, at most 64 are allowed"
    );
}

#[test]
fn cpus() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    for value in ["0", "17", "-1", "4294967297"] {
        assert_eq!(
            one_error(&scratch, &format!("{BASIC}cpus = {value}\n")),
            format!("DIR/vms.toml: vm \"basic\": key \"cpus\": {value} is not a valid vCPU count (1..=16)")
        );
    }
    for count in [1, 2, 16] {
        let config = scratch.load(&format!("{BASIC}cpus = {count}\n")).unwrap();
        assert_eq!(config.vms[0].cpus, count);
        assert!(config.vms[0].pin.is_empty());
    }
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}cpus = \"2\"\n")),
        "DIR/vms.toml: vm \"basic\": key \"cpus\": expected an integer, found a string"
    );
}

#[test]
fn smp_needs_nested_paging() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}cpus = 2\npaging = \"shadow\"\n")),
        "DIR/vms.toml: vm \"basic\": key \"cpus\": cpus = 2 with paging = \"shadow\": guest SMP needs paging = \"nested\"; shadow page tables are kept per VM and not synchronised between vCPUs"
    );
    assert!(scratch
        .load(&format!("{BASIC}cpus = 1\npaging = \"shadow\"\n"))
        .is_ok());
    assert!(scratch
        .load(&format!("{BASIC}cpus = 16\npaging = \"nested\"\n"))
        .is_ok());
    // An invalid count is reported once, not again as SMP on shadow paging.
    assert_eq!(
        one_error(
            &scratch,
            &format!("{BASIC}cpus = 17\npaging = \"shadow\"\n")
        ),
        "DIR/vms.toml: vm \"basic\": key \"cpus\": 17 is not a valid vCPU count (1..=16)"
    );
}

#[test]
fn pin() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    for (keys, pin) in [
        ("pin = [3]", vec![3]),
        ("cpus = 4\npin = [5]", vec![5]),
        ("cpus = 3\npin = [0, 63, 0]", vec![0, 63, 0]),
    ] {
        let config = scratch.load(&format!("{BASIC}{keys}\n")).unwrap();
        assert_eq!(config.vms[0].pin, pin, "{keys}");
    }
    let cases = [
        (
            "cpus = 2\npin = [0, 1, 2]",
            "3 entries for cpus = 2: give one CPU (every vCPU runs on it) or exactly 2 (vCPU i runs on entry i)",
        ),
        (
            "cpus = 4\npin = [0, 1]",
            "2 entries for cpus = 4: give one CPU (every vCPU runs on it) or exactly 4 (vCPU i runs on entry i)",
        ),
        (
            "pin = [0, 1]",
            "2 entries for cpus = 1: give one CPU (every vCPU runs on it) or exactly 1 (vCPU i runs on entry i)",
        ),
        (
            "cpus = 2\npin = []",
            "0 entries for cpus = 2: give one CPU (every vCPU runs on it) or exactly 2 (vCPU i runs on entry i)",
        ),
        ("pin = [64]", "entry 1: 64 is not a valid CPU number (0..=63)"),
        (
            "cpus = 2\npin = [1, -1]",
            "entry 2: -1 is not a valid CPU number (0..=63)",
        ),
        (
            "cpus = 2\npin = [0, \"1\"]",
            "entry 2: expected an integer (a CPU number), found a string",
        ),
        ("pin = [1.0]", "entry 1: expected an integer (a CPU number), found a float"),
        ("pin = 3", "expected an array of CPU numbers, found an integer"),
    ];
    for (keys, expected) in cases {
        assert_eq!(
            one_error(&scratch, &format!("{BASIC}{keys}\n")),
            format!("DIR/vms.toml: vm \"basic\": key \"pin\": {expected}"),
            "{keys}"
        );
    }
    // With an invalid cpus, only cpus is reported.
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}cpus = 0\npin = [1, 2]\n")),
        "DIR/vms.toml: vm \"basic\": key \"cpus\": 0 is not a valid vCPU count (1..=16)"
    );
}

#[test]
fn time_limit() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    for seconds in [1, 60, 86_400] {
        let config = scratch
            .load(&format!("{BASIC}time_limit = {seconds}\n"))
            .unwrap();
        assert_eq!(config.vms[0].time_limit_seconds, Some(seconds));
    }
    assert_eq!(scratch.load(BASIC).unwrap().vms[0].time_limit_seconds, None);
    for value in ["0", "86401", "-5", "99999999999"] {
        assert_eq!(
            one_error(&scratch, &format!("{BASIC}time_limit = {value}\n")),
            format!("DIR/vms.toml: vm \"basic\": key \"time_limit\": {value} seconds is not a valid time limit (1..=86400)")
        );
    }
    for (value, found) in [
        ("1.5", "a float"),
        ("\"1h\"", "a string"),
        ("true", "a boolean"),
    ] {
        assert_eq!(
            one_error(&scratch, &format!("{BASIC}time_limit = {value}\n")),
            format!("DIR/vms.toml: vm \"basic\": key \"time_limit\": expected an integer, found {found}")
        );
    }
}

#[test]
fn total_vcpus_are_bounded() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let vms = |counts: &[u32]| -> String {
        counts
            .iter()
            .enumerate()
            .map(|(index, count)| {
                BASIC.replace("basic", &format!("vm{index}")) + &format!("cpus = {count}\n")
            })
            .collect()
    };
    // 64 in all is the most.
    let config = scratch.load(&vms(&[16, 16, 16, 15, 1])).unwrap();
    let total: u32 = config.vms.iter().map(|vm| vm.cpus).sum();
    assert_eq!(total, 64);
    assert_eq!(
        scratch.errors(&vms(&[16, 16, 16, 16, 1])),
        ["DIR/vms.toml: key \"cpus\": 65 vCPUs over all [[vm]] tables: at most 64 fit the boot manifest"]
    );
    // 64 VMs without cpus are 64 vCPUs; an invalid count counts as 1 (and is reported on its VM).
    let mut text = vms(&[1; 63]);
    text += &BASIC.replace("basic", "last");
    assert!(scratch.load(&text).is_ok());
    let errors =
        scratch.errors(&(vms(&[1; 62]) + &vms(&[0, 2]).replace("vm0", "x").replace("vm1", "y")));
    assert_eq!(
        errors,
        [
            "DIR/vms.toml: vm \"x\": key \"cpus\": 0 is not a valid vCPU count (1..=16)",
            "DIR/vms.toml: key \"cpus\": 65 vCPUs over all [[vm]] tables: at most 64 fit the boot manifest",
        ]
    );
}

#[test]
fn smp_settings_round_trip_through_the_manifest() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let config = scratch
        .load(&format!(
            "{BASIC}cpus = 4\npin = [2, 3, 0, 1]\ntime_limit = 30\n{}",
            BASIC.replace("basic", "other") + "cpus = 2\npin = [7]\n"
        ))
        .unwrap();
    let manifest = config.manifest(TestHook::None);
    let bytes = manifest.encode();
    let decoded = Manifest::decode(&bytes).unwrap();
    assert_eq!(decoded, manifest);
    let first = &decoded.vms[0];
    assert_eq!(
        (first.cpus, first.pin, first.time_limit_seconds),
        (4, &[2, 3, 0, 1][..], Some(30))
    );
    assert_eq!(first.pinned_cpu(3), Some(1));
    let second = &decoded.vms[1];
    assert_eq!(
        (second.cpus, second.pin, second.time_limit_seconds),
        (2, &[7][..], None)
    );
    assert_eq!(second.pinned_cpu(1), Some(7));
}

#[test]
fn paging() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    assert!(scratch
        .load(&format!("{BASIC}paging = \"shadow\"\n"))
        .is_ok());
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}paging = \"ept\"\n")),
        "DIR/vms.toml: vm \"basic\": key \"paging\": unknown paging \"ept\" (known: nested, shadow)"
    );
    assert!(scratch
        .load(&format!("{BASIC}paging = \"nested\"\n"))
        .is_ok());
}

#[test]
fn cmdline_limits() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let long = "x".repeat(3073);
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}cmdline = \"{long}\"\n")),
        "DIR/vms.toml: vm \"basic\": key \"cmdline\": 3073 bytes is too long (at most 3072)"
    );
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}cmdline = \"a\\u0000b\"\n")),
        "DIR/vms.toml: vm \"basic\": key \"cmdline\": must not contain a NUL character"
    );
    assert!(scratch
        .load(&format!("{BASIC}cmdline = \"{}\"\n", &long[..3072]))
        .is_ok());
}

#[test]
fn every_error_is_collected() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let text = "extra = 1\n\
        [[vm]]\nname = \"one\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = 0\nbogus = true\n\
        [[vm]]\nkernel = \"missing.bin\"\nformat = \"pe\"\nmemory = 16\ncpus = 40\n\
        [[vm]]\nname = \"one\"\nkernel = \"tiny.bin\"\nformat = \"flat64\"\nmemory = 8\npaging = \"tlb\"\n";
    let errors = scratch.errors(text);
    let expected_starts = [
        "DIR/vms.toml: key \"extra\": unknown top-level key",
        "DIR/vms.toml: vm \"one\": key \"bogus\": unknown key",
        "DIR/vms.toml: vm \"one\": key \"memory\": 0 MiB is not a valid size (2..=4096)",
        "DIR/vms.toml: [[vm]] #2: key \"name\": missing",
        "DIR/vms.toml: [[vm]] #2: key \"format\": unknown format \"pe\"",
        "DIR/vms.toml: [[vm]] #2: key \"kernel\": cannot read \"DIR/missing.bin\"",
        "DIR/vms.toml: [[vm]] #2: key \"cpus\": 40 is not a valid vCPU count (1..=16)",
        "DIR/vms.toml: [[vm]] #3: key \"name\": \"one\" is already the name of [[vm]] #1",
        "DIR/vms.toml: vm \"one\": key \"paging\": unknown paging \"tlb\"",
    ];
    assert_eq!(errors.len(), expected_starts.len(), "{errors:#?}");
    for (line, start) in errors.iter().zip(expected_starts) {
        assert!(
            line.starts_with(start),
            "{line:?} should start with {start:?}"
        );
    }
}

/// A minimal bzImage (the same fields as `kernel/loader/src/linux/tests.rs` sets by hand):
/// boot protocol 2.15, relocatable to 16 MiB, 64-bit entry, one setup sector, a 4 KiB
/// protected-mode kernel, init_size 1 MiB (so it needs 17 MiB of RAM).
fn bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 0x400 + 0x1000];
    let mut put = |offset: usize, bytes: &[u8]| {
        image[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0x1F1, &[1]);
    put(0x1F4, &(0x1000u32 / 16).to_le_bytes());
    put(0x1FE, &0xAA55u16.to_le_bytes());
    put(0x200, &[0xEB, 0x6A]);
    put(0x202, b"HdrS");
    put(0x206, &0x020Fu16.to_le_bytes());
    put(0x211, &[0x01]);
    put(0x22C, &0x7FFF_FFFFu32.to_le_bytes());
    put(0x230, &0x20_0000u32.to_le_bytes());
    put(0x234, &[1]);
    put(0x236, &0x0003u16.to_le_bytes());
    put(0x238, &2047u32.to_le_bytes());
    put(0x258, &0x100_0000u64.to_le_bytes());
    put(0x260, &0x10_0000u32.to_le_bytes());
    image
}

const LINUX: &str =
    "[[vm]]\nname = \"linux\"\nkernel = \"vmlinuz\"\nformat = \"linux\"\nmemory = 64\n";

#[test]
fn linux_with_initrd_round_trips_through_the_manifest() {
    let image = bzimage();
    let scratch = Scratch::new(&[("vmlinuz", &image), ("initramfs.cpio.gz", b"cpio bytes")]);
    let config = scratch
        .load(&format!(
            "{LINUX}initrd = \"initramfs.cpio.gz\"\ncmdline = \"console=ttyS0 earlyprintk=serial\"\n"
        ))
        .unwrap();
    let linux = &config.vms[0];
    assert_eq!(linux.format, GuestFormat::Linux);
    assert_eq!(
        linux.initrd,
        Some((
            scratch.dir.join("initramfs.cpio.gz"),
            b"cpio bytes".to_vec()
        ))
    );
    let manifest = config.manifest(TestHook::None);
    let bytes = manifest.encode();
    let decoded = Manifest::decode(&bytes).unwrap();
    assert_eq!(decoded, manifest);
    assert_eq!(decoded.vms[0].initrd, Some(&b"cpio bytes"[..]));
    assert_eq!(decoded.vms[0].cmdline, "console=ttyS0 earlyprintk=serial");
    let plan = boot_plan::plan(&decoded.vms[0]).unwrap();
    assert_eq!(plan.entry.rsi, 0x8000);
    assert_eq!(plan.entry.rip, 0x10_0200);
    // Without an initrd, too.
    let config = scratch.load(LINUX).unwrap();
    assert_eq!(config.vms[0].initrd, None);
    assert_eq!(config.manifest(TestHook::None).vms[0].initrd, None);
}

#[test]
fn linux_refusals() {
    let image = bzimage();
    let mut old = image.clone();
    old[0x206] = 0x0B;
    let mut no_64 = image.clone();
    no_64[0x236] = 0x02;
    let big_initrd = vec![0u8; 2 << 20];
    let scratch = Scratch::new(&[
        ("vmlinuz", &image),
        ("old", &old),
        ("no64", &no_64),
        ("truncated", &image[..0x300]),
        ("tiny.bin", TINY),
        ("initrd", b"x"),
        ("big-initrd", &big_initrd),
    ]);
    let cases = [
        (
            LINUX.replace("\"vmlinuz\"", "\"tiny.bin\""),
            "key \"kernel\": the bzImage is truncated: the Linux boot protocol needs 0x264 bytes but the file has 0x10",
        ),
        (
            LINUX.replace("\"vmlinuz\"", "\"truncated\""),
            "key \"kernel\": the bzImage is truncated: the Linux boot protocol needs 0x1400 bytes but the file has 0x300",
        ),
        (
            LINUX.replace("\"vmlinuz\"", "\"old\""),
            "key \"kernel\": the bzImage speaks Linux boot protocol 2.11, at least 2.12 is needed",
        ),
        (
            LINUX.replace("\"vmlinuz\"", "\"no64\""),
            "key \"kernel\": the bzImage has no 64-bit entry point",
        ),
        (
            LINUX.replace("memory = 64", "memory = 16"),
            "key \"kernel\": the image does not fit the VM's memory: it needs RAM up to 0x1100000",
        ),
        (
            format!("{LINUX}modules = [\"initrd\"]\n"),
            "key \"modules\": modules are only for format = \"multiboot\" (a linux guest cannot receive them; give its initramfs as initrd)",
        ),
        (
            format!("{}initrd = \"big-initrd\"\n", LINUX.replace("memory = 64", "memory = 18")),
            "key \"initrd\": the initrd of 0x200000 bytes does not fit between the kernel's memory (up to 0x1100000) and 0x1200000",
        ),
        (
            format!("{LINUX}initrd = \"gone\"\n"),
            "key \"initrd\": cannot read \"DIR/gone\": ",
        ),
        (
            format!("{LINUX}initrd = 3\n"),
            "key \"initrd\": expected a string, found an integer",
        ),
        (
            format!("{LINUX}cmdline = \"{}\"\n", "c".repeat(2048)),
            "key \"cmdline\": the command line is 2048 bytes long, at most 2047 are allowed",
        ),
        (
            format!("{}initrd = \"initrd\"\n", BASIC),
            "key \"initrd\": initrd is only for format = \"linux\" (a flat64 guest cannot receive it)",
        ),
    ];
    for (text, expected) in cases {
        let line = one_error(&scratch, &text);
        let vm = if text.contains("\"basic\"") {
            "basic"
        } else {
            "linux"
        };
        let prefix = format!("DIR/vms.toml: vm \"{vm}\": {expected}");
        assert!(
            line.starts_with(&prefix),
            "{line:?} should start with {prefix:?}"
        );
    }
}

/// tests/configs/linux.toml validates once scripts/lib/linux-guest.sh has built the guest.
#[test]
fn the_repository_linux_config_when_built() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root.join("target/linux/vmlinuz").is_file() {
        eprintln!("skipped: target/linux/vmlinuz is not built (scripts/lib/linux-guest.sh)");
        return;
    }
    let config = load(&root.join("tests/configs/linux.toml")).unwrap();
    let linux = &config.vms[0];
    assert_eq!(linux.format, GuestFormat::Linux);
    assert!(linux.initrd.is_some());
    let plan = boot_plan::plan(&linux.manifest()).unwrap();
    assert_eq!(plan.entry.rip, 0x10_0200);
}

/// BASIC with `disks` appended as `[[vm.disk]]` tables, and a second VM "other" with
/// `other_disks`.
fn with_disks(disks: &[&str], other_disks: &[&str]) -> String {
    let mut text = BASIC.to_string();
    for disk in disks {
        text += &format!("[[vm.disk]]\n{disk}\n");
    }
    if !other_disks.is_empty() {
        text += &BASIC.replace("basic", "other");
        for disk in other_disks {
            text += &format!("[[vm.disk]]\n{disk}\n");
        }
    }
    text
}

const SECTORS_2: &[u8] = &[0x5A; 1024];

#[test]
fn disks_round_trip_through_the_manifest() {
    let scratch = Scratch::new(&[("tiny.bin", TINY), ("ro.img", SECTORS_2)]);
    let config = scratch
        .load(&with_disks(
            &[
                "partition = \"vm1\"\nwritable = true",
                "guid = \"8da63339-0007-60c0-c436-083ac8230908\"",
                "image = \"ro.img\"\nwritable = false",
                "partition = \"shared\"",
            ],
            &[
                "partition = \"shared\"",
                "image = \"ro.img\"\nwritable = true",
            ],
        ))
        .unwrap();
    let disks = &config.vms[0].disks;
    assert_eq!(disks.len(), 4);
    assert_eq!(
        disks[0],
        DiskConfig {
            source: DiskConfigSource::PartitionLabel("vm1".into()),
            writable: true
        }
    );
    let encoded = config.manifest(TestHook::None).encode();
    let manifest = Manifest::decode(&encoded).unwrap();
    let vm = &manifest.vms[0];
    assert_eq!(vm.disks[0].source, DiskSource::PartitionLabel("vm1"));
    assert!(vm.disks[0].writable);
    assert_eq!(
        vm.disks[1].source,
        DiskSource::PartitionGuid(
            parse_guid("8DA63339-0007-60C0-C436-083AC8230908")
                .unwrap()
                .to_bytes()
        )
    );
    assert!(!vm.disks[1].writable);
    assert_eq!(
        vm.disks[2].source,
        DiskSource::Image {
            name: "ro.img",
            bytes: SECTORS_2
        }
    );
    assert!(!vm.disks[2].writable);
    assert!(manifest.vms[1].disks[1].writable);
}

#[test]
fn bad_disks() {
    let scratch = Scratch::new(&[
        ("tiny.bin", TINY),
        ("ro.img", SECTORS_2),
        ("odd.img", &[1; 1000]),
        ("empty.img", &[]),
    ]);
    let errors = |disks: &[&str], other: &[&str]| scratch.errors(&with_disks(disks, other));
    let one = |disks: &[&str]| {
        let lines = errors(disks, &[]);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        lines.into_iter().next().unwrap()
    };
    let prefix = "DIR/vms.toml: vm \"basic\": key \"disk\": ";
    let line = one(&["image = \"gone.img\""]);
    assert!(
        line.starts_with(&format!(
            "{prefix}disk #1: image: cannot read \"DIR/gone.img\": "
        )),
        "{line}"
    );
    assert_eq!(
        one(&["partition = \"vm1\"", "partition = \"vm2\"\nimage = \"ro.img\""]),
        format!("{prefix}disk #2: give only one of partition, image (a disk is one partition or one image)")
    );
    assert_eq!(
        one(&["writable = true"]),
        format!("{prefix}disk #1: give one of partition = \"LABEL\", guid = \"GUID\" or image = \"PATH\"")
    );
    assert_eq!(
        one(&["image = \"odd.img\""]),
        format!("{prefix}disk #1: image \"DIR/odd.img\" is 1000 bytes, not a whole (non-zero) number of 512-byte sectors")
    );
    assert_eq!(
        one(&["image = \"empty.img\""]),
        format!("{prefix}disk #1: image \"DIR/empty.img\" is 0 bytes, not a whole (non-zero) number of 512-byte sectors")
    );
    assert_eq!(
        one(&["partition = \"vm1\"", "partition = \"vm1\"\nwritable = true"]),
        format!("{prefix}disk #2: partition \"vm1\" is also disk #1 of vm \"basic\"; a partition that is writable for one disk cannot be named by another")
    );
    assert_eq!(
        one(&["partition = \"a\""; 5]),
        format!("{prefix}5 [[vm.disk]] tables, at most 4 disks per VM are allowed")
    );
    assert_eq!(
        one(&["partition = \"a\"\nsize = 3"]),
        format!("{prefix}disk #1: unknown key \"size\" (known: partition, guid, image, writable)")
    );
    assert_eq!(
        one(&["partition = \"a\"\nwritable = \"yes\""]),
        format!(
            "{prefix}disk #1: key \"writable\": expected a boolean (true or false), found a string"
        )
    );
    assert_eq!(
        one(&["partition = 3"]),
        format!("{prefix}disk #1: key \"partition\": expected a string, found an integer")
    );
    assert_eq!(
        one(&["partition = \"\""]),
        format!("{prefix}disk #1: partition \"\" is not a GPT label (1 to 36 UTF-16 characters, no NUL)")
    );
    assert_eq!(
        one(&["guid = \"8da63339-0007-60c0-c436\""]),
        format!("{prefix}disk #1: guid \"8da63339-0007-60c0-c436\" is not a partition GUID (8-4-4-4-12 hex digits, not all zero)")
    );
    assert_eq!(
        one(&["guid = \"00000000-0000-0000-0000-000000000000\""]),
        format!("{prefix}disk #1: guid \"00000000-0000-0000-0000-000000000000\" is not a partition GUID (8-4-4-4-12 hex digits, not all zero)")
    );
    // Two VMs, one writable partition (named the same way; by GUID too).
    assert_eq!(
        errors(&["partition = \"vm1\"\nwritable = true"], &["partition = \"vm1\""]),
        ["DIR/vms.toml: vm \"other\": key \"disk\": disk #1: partition \"vm1\" is also disk #1 of vm \"basic\"; a partition that is writable for one disk cannot be named by another"]
    );
    let guid = "guid = \"8da63339-0007-60c0-c436-083ac8230908\"";
    assert_eq!(
        errors(&[guid], &[&format!("{guid}\nwritable = true")]),
        ["DIR/vms.toml: vm \"other\": key \"disk\": disk #1: guid 8DA63339-0007-60C0-C436-083AC8230908 is also disk #1 of vm \"basic\"; a partition that is writable for one disk cannot be named by another"]
    );
    // `disk` that is not an array of tables.
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}disk = \"vm1\"\n")),
        format!("{prefix}expected [[vm.disk]] tables, found a string")
    );
    assert_eq!(
        one_error(
            &scratch,
            &format!("{BASIC}[vm.disk]\npartition = \"vm1\"\n")
        ),
        format!(
            "{prefix}expected [[vm.disk]] tables (double brackets), found a single [vm.disk] table"
        )
    );
}

#[test]
fn partitions_are_checked_against_the_physical_disk() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let disk_path = scratch.dir.join("disk.img");
    let vm2 = "8DA63339-0007-60C0-C436-083AC8230908";
    crate::disk::create(
        &disk_path,
        8 << 20,
        &[
            crate::disk::parse_partition_spec("vm1:2M").unwrap(),
            crate::disk::parse_partition_spec(&format!("vm2:2M:{vm2}")).unwrap(),
        ],
    )
    .unwrap();
    let io = crate::disk::FileIo::open(&disk_path, false).unwrap();
    let table = ringzero_vdisk::gpt::read_gpt(&io).unwrap();
    let check = |disks: &[&str], other: &[&str]| -> Vec<String> {
        let config = scratch.load(&with_disks(disks, other)).unwrap();
        check_partitions(&config, "vms.toml", &disk_path, &table)
            .iter()
            .map(|error| {
                error
                    .to_string()
                    .replace(&scratch.dir.display().to_string(), "DIR")
            })
            .collect()
    };
    assert!(check(
        &["partition = \"vm1\"\nwritable = true"],
        &[&format!("guid = \"{vm2}\"\nwritable = true")]
    )
    .is_empty());
    assert_eq!(
        check(&["partition = \"vm3\""], &["guid = \"11111111-2222-3333-4444-555555555555\""]),
        [
            "vms.toml: vm \"basic\": key \"disk\": disk #1: DIR/disk.img: no partition with label \"vm3\" on the disk (its partitions: \"vm1\", \"vm2\")",
            "vms.toml: vm \"other\": key \"disk\": disk #1: DIR/disk.img: no partition with GUID 11111111-2222-3333-4444-555555555555 on the disk (its partitions: \"vm1\", \"vm2\")",
        ]
    );
    // A label and a GUID naming the same partition, one of them writable.
    assert_eq!(
        check(&["partition = \"vm2\"\nwritable = true"], &[&format!("guid = \"{vm2}\"")]),
        [format!("vms.toml: vm \"other\": key \"disk\": disk #1: guid {vm2} on DIR/disk.img is the partition partition \"vm2\" names (disk #1 of vm \"basic\"); a partition that is writable for one disk cannot be named by another")]
    );
    // Read-only sharing is fine.
    assert!(check(&["partition = \"vm2\""], &[&format!("guid = \"{vm2}\"")]).is_empty());
}

/// BASIC named `name`, with `nic` (the lines after `[[vm.nic]]`, or no NIC when `None`).
fn vm_with_nic(name: &str, nic: Option<&str>) -> String {
    let mut text = BASIC.replace("basic", name);
    if let Some(nic) = nic {
        text += &format!("[[vm.nic]]\n{nic}\n");
    }
    text
}

#[test]
fn the_default_mac_is_mac_from_name_and_pinned() {
    // The same values as ringzero_virtio's own test: boot uses that function, not a copy.
    assert_eq!(mac_from_name("web"), [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]);
    assert_eq!(mac_from_name("db"), [0x02, 0xe3, 0xa1, 0x3b, 0xb5, 0x07]);
}

#[test]
fn nics_round_trip_through_the_manifest() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let text = vm_with_nic("web", Some(""))
        + &vm_with_nic("given", Some("mac = \"02:00:00:AB:cd:01\""))
        + &vm_with_nic("none", None);
    let config = scratch.load(&text).unwrap();
    assert_eq!(
        config.vms[0].nic,
        Some(NicConfig {
            mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19],
            derived: true
        })
    );
    assert_eq!(
        config.vms[1].nic,
        Some(NicConfig {
            mac: [0x02, 0, 0, 0xab, 0xcd, 0x01],
            derived: false
        })
    );
    assert_eq!(config.vms[2].nic, None);
    let encoded = config.manifest(TestHook::None).encode();
    let manifest = Manifest::decode(&encoded).unwrap();
    let macs: Vec<Option<[u8; 6]>> = manifest
        .vms
        .iter()
        .map(|vm| vm.nic.map(|nic| nic.mac))
        .collect();
    assert_eq!(
        macs,
        [
            Some([0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]),
            Some([0x02, 0, 0, 0xab, 0xcd, 0x01]),
            None
        ]
    );
    // A globally administered (vendor) unicast address is accepted as given.
    let vendor = scratch
        .load(&vm_with_nic("basic", Some("mac = \"52:54:00:12:34:56\"")))
        .unwrap();
    assert_eq!(
        vendor.vms[0].nic.map(|nic| nic.mac),
        Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
    );
}

#[test]
fn bad_nics() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let prefix = "DIR/vms.toml: vm \"basic\": key \"nic\": ";
    let one = |nic: &str| one_error(&scratch, &vm_with_nic("basic", Some(nic)));
    for malformed in [
        "02:00:00:00:00",
        "02:00:00:00:00:01:02",
        "02-00-00-00-00-01",
        "2:00:00:00:00:01",
        "02:00:00:00:00:0g",
        "020000000001",
        "02:00:00:00:00:+1",
        "",
    ] {
        assert_eq!(
            one(&format!("mac = \"{malformed}\"")),
            format!("{prefix}nic #1: key \"mac\": \"{malformed}\" is not a MAC address (six two-digit hex bytes separated by colons, e.g. \"02:00:00:00:00:01\")")
        );
    }
    for multicast in [
        "01:00:5e:00:00:01",
        "33:33:00:00:00:01",
        "FF:FF:FF:FF:FF:FF",
    ] {
        assert_eq!(
            one(&format!("mac = \"{multicast}\"")),
            format!("{prefix}nic #1: key \"mac\": {} is a multicast (group) address: a NIC needs a unicast one, with the lowest bit of the first byte clear (e.g. \"02:00:00:00:00:01\")", multicast.to_lowercase())
        );
    }
    assert_eq!(
        one("mac = \"00:00:00:00:00:00\""),
        format!("{prefix}nic #1: key \"mac\": 00:00:00:00:00:00 is all zero: a NIC needs a unicast, non-zero address (e.g. \"02:00:00:00:00:01\")")
    );
    assert_eq!(
        one("mac = \"02:00:00:00:00:01\"\nmodel = \"e1000\""),
        format!("{prefix}nic #1: unknown key \"model\" (known: mac)")
    );
    assert_eq!(
        one("mac = 2"),
        format!("{prefix}nic #1: key \"mac\": expected a string, found an integer")
    );
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}[[vm.nic]]\n[[vm.nic]]\n")),
        format!("{prefix}2 [[vm.nic]] tables, at most 1 NIC per VM is allowed for now")
    );
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}[vm.nic]\n")),
        format!(
            "{prefix}expected [[vm.nic]] tables (double brackets), found a single [vm.nic] table"
        )
    );
    assert_eq!(
        one_error(&scratch, &format!("{BASIC}nic = \"02:00:00:00:00:01\"\n")),
        format!("{prefix}expected [[vm.nic]] tables, found a string")
    );
}

#[test]
fn two_vms_may_not_share_a_mac() {
    let scratch = Scratch::new(&[("tiny.bin", TINY)]);
    let errors = |vms: &[(&str, Option<&str>)]| {
        let text: String = vms
            .iter()
            .map(|(name, nic)| vm_with_nic(name, *nic))
            .collect();
        scratch.errors(&text)
    };
    let web = "mac = \"02:f1:1e:72:48:19\"";
    // Both given.
    assert_eq!(
        errors(&[("a", Some(web)), ("b", Some(web))]),
        ["DIR/vms.toml: vm \"b\": key \"nic\": nic #1: MAC 02:f1:1e:72:48:19 is also the MAC of the NIC of vm \"a\"; every NIC needs its own MAC (give one of them another mac)"]
    );
    // Given, then derived from the name "web".
    assert_eq!(
        errors(&[("a", Some(web)), ("web", Some(""))]),
        ["DIR/vms.toml: vm \"web\": key \"nic\": nic #1: MAC 02:f1:1e:72:48:19 (derived from the VM's name) is also the MAC of the NIC of vm \"a\"; every NIC needs its own MAC (give one of them another mac)"]
    );
    // Derived, then given.
    assert_eq!(
        errors(&[("web", Some("")), ("a", None), ("b", Some(web))]),
        ["DIR/vms.toml: vm \"b\": key \"nic\": nic #1: MAC 02:f1:1e:72:48:19 is also the MAC of the NIC of vm \"web\" (derived from its name); every NIC needs its own MAC (give one of them another mac)"]
    );
    // A VM without a NIC has no MAC to collide with.
    assert!(scratch
        .load(&(vm_with_nic("web", None) + &vm_with_nic("a", Some(web))))
        .is_ok());
}
