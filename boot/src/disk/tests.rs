use super::*;

/// A fresh path in the system's temporary directory.
fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringzero-disk-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn spec(text: &str) -> PartitionSpec {
    parse_partition_spec(text).unwrap()
}

#[test]
fn sizes() {
    assert_eq!(parse_size("64K"), Ok(64 << 10));
    assert_eq!(parse_size("128M"), Ok(128 << 20));
    assert_eq!(parse_size("128MiB"), Ok(128 << 20));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert!(parse_size("128").unwrap_err().contains("needs a unit"));
    assert!(parse_size("12T").is_err());
    assert!(parse_size("0M").is_err());
    assert!(parse_size("M").is_err());
    assert!(parse_size("99999999999999G").is_err());
}

#[test]
fn partition_specs() {
    assert_eq!(
        spec("vm1:128M"),
        PartitionSpec {
            label: "vm1".into(),
            size: Some(128 << 20),
            guid: None
        }
    );
    assert_eq!(
        spec("data::8da63339-0007-60c0-c436-083ac8230908").guid,
        parse_guid("8DA63339-0007-60C0-C436-083AC8230908")
    );
    assert_eq!(spec("rest").size, None);
    assert!(parse_partition_spec(":1M").is_err());
    assert!(parse_partition_spec(&format!("{}:1M", "x".repeat(37))).is_err());
    assert!(parse_partition_spec("a:1M:nope").is_err());
    assert!(parse_partition_spec("a:1M:8da63339-0007-60c0-c436-083ac8230908:x").is_err());
    assert!(parse_partition_spec("a:1K").is_ok());
}

#[test]
fn layouts_are_aligned_and_must_fit() {
    let sectors = (16 << 20) / 512;
    let partitions = layout(sectors, &[spec("a:1M"), spec("b:100K"), spec("c")]).unwrap();
    let ranges: Vec<(u64, u64)> = partitions
        .iter()
        .map(|p| (p.first_lba, p.last_lba))
        .collect();
    assert_eq!(ranges, [(2048, 4095), (4096, 4295), (6144, 30719)]);
    assert!(layout(sectors, &[spec("a"), spec("b:1M")])
        .unwrap_err()
        .contains("only the last partition"));
    assert!(layout(sectors, &[spec("a:1M"), spec("a:1M")])
        .unwrap_err()
        .contains("given twice"));
    // 16 MiB less the 1 MiB start and the backup GPT's 33 sectors.
    assert!(layout(sectors, &[spec("a:15M")])
        .unwrap_err()
        .contains("does not fit"));
    let most = (15 << 20) - 33 * 512;
    assert!(layout(sectors, &[spec(&format!("a:{}K", most / 1024))]).is_ok());
    assert!(layout(sectors, &[spec("a:14M"), spec("b:1M")]).is_err());
}

#[test]
fn create_list_read_round_trip() {
    let path = temp("round-trip.img");
    let vm2_guid = "8DA63339-0007-60C0-C436-083AC8230908";
    main(
        [
            "create",
            "--out",
            path.to_str().unwrap(),
            "--size",
            "8M",
            "--partition",
            "vm1:2M",
            "--partition",
            &format!("vm2:3M:{vm2_guid}"),
        ]
        .map(String::from)
        .into_iter(),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 20);

    let lines = list(&path).unwrap();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].ends_with("sectors 16384 (8 MiB), 2 partition(s)"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("partition 1: label \"vm1\" guid "),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].ends_with(" lba 2048..=6143 sectors 4096 (2 MiB)"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2],
        format!("partition 2: label \"vm2\" guid {vm2_guid} lba 6144..=12287 sectors 6144 (3 MiB)")
    );

    // A pattern in each partition (as a VM would write it) reads back from its own only.
    let io = FileIo::open(&path, true).unwrap();
    io.write(2048, &[0x11; 512]).unwrap();
    io.write(6143, &[0x12; 512]).unwrap();
    io.write(6144, &[0x21; 512]).unwrap();
    drop(io);
    let mut vm1 = Vec::new();
    let copied = read(&path, &PartitionSelector::Label("vm1".into()), &mut vm1).unwrap();
    assert_eq!(copied, 2 << 20);
    assert_eq!(vm1.len(), 2 << 20);
    assert_eq!(vm1[..512], [0x11; 512]);
    assert_eq!(vm1[vm1.len() - 512..], [0x12; 512]);
    assert!(vm1[512..vm1.len() - 512].iter().all(|&b| b == 0));
    let out = temp("vm2.bin");
    main(
        [
            "read",
            "--disk",
            path.to_str().unwrap(),
            "--guid",
            &vm2_guid.to_lowercase(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .into_iter(),
    )
    .unwrap();
    let vm2 = std::fs::read(&out).unwrap();
    assert_eq!(vm2.len(), 3 << 20);
    assert_eq!(vm2[..512], [0x21; 512]);
    assert!(vm2[512..].iter().all(|&b| b == 0));

    let missing = read(
        &path,
        &PartitionSelector::Label("vm3".into()),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(
        missing.ends_with(
            "no partition with label \"vm3\" on the disk (its partitions: \"vm1\", \"vm2\")"
        ),
        "{missing}"
    );

    // A damaged primary header: list says so and still reads through the backup.
    let io = FileIo::open(&path, true).unwrap();
    io.write(1, &[0; 512]).unwrap();
    drop(io);
    let lines = list(&path).unwrap();
    assert!(
        lines[1].starts_with("warning: the primary GPT header is bad"),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 4);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn command_line_errors() {
    let run = |args: &[&str]| main(args.iter().map(|arg| arg.to_string())).unwrap_err();
    assert!(run(&["create", "--size", "8M"]).contains("--out is required"));
    assert!(run(&["create", "--out", "x"]).contains("--size is required"));
    assert!(run(&["read", "--disk", "x"]).contains("give one of --partition LABEL or --guid GUID"));
    assert!(run(&["list"]).contains("--disk is required"));
    assert!(run(&["frob"]).contains("unknown disk command 'frob'"));
    assert!(run(&["list", "--disk", "/nonexistent/disk.img"]).contains("cannot open"));
    let odd = temp("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    assert!(run(&["list", "--disk", odd.to_str().unwrap()]).contains("not a whole number"));
    std::fs::write(&odd, [0u8; 4096]).unwrap();
    assert!(run(&["list", "--disk", odd.to_str().unwrap()]).contains("protective MBR"));
    std::fs::remove_file(&odd).unwrap();
}
