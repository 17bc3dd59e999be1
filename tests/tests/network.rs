//! The hypervisor's physical NIC (issue 9): `run-qemu.sh --net` gives it a virtio-net PCI
//! device; the hypervisor reports its location, MAC and link state and never transmits at
//! boot. The `net-probe` test hook proves transmit and receive end to end: an ARP request for
//! QEMU user networking's gateway (10.0.2.2) and its reply. A packet capture (QEMU's
//! `filter-dump`) shows what crossed the wire.
//!
//! The VMs' NICs: virtio-net devices on the hypervisor's switch, whose uplink is that physical
//! NIC. Stock Linux guests get addresses from QEMU's DHCP server through it, reach the gateway
//! and each other (tests/linux/scripts/net-*.sh).

use ringzero_tests::{boot, free_local_port, PacketCapture, ScratchDisk};

const CLEAN: i32 = 0;
/// QEMU's default MAC for a NIC, and the MAC user networking answers for 10.0.2.2 with.
const QEMU_DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

fn with_capture<'a>(args: &[&'a str], capture: &'a [String; 2]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.push("--");
    all.extend(capture.iter().map(String::as_str));
    all
}

#[test]
fn qemu_bios_net_probe_gets_the_gateways_arp_reply() {
    let capture = PacketCapture::new();
    let qemu_args = capture.qemu_args();
    let run = boot(&with_capture(
        &[
            "--bios",
            "--no-guests",
            "--net",
            "user",
            "--test-hook",
            "net-probe",
            "--timeout",
            "300",
        ],
        &qemu_args,
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains("net: virtio-net at 00:");
    run.assert_serial_contains(", MAC 52:54:00:12:34:56, link up");
    let reply = run.line_with("net: ARP reply from 10.0.2.2 at 52:55:0a:00:02:02 after ");
    assert!(
        reply.contains(" ms ("),
        "unexpected reply line {reply:?}\n{}",
        run.report()
    );
    run.assert_serial_contains("net: test hook: frames too long or too short are refused");
    run.assert_serial_contains("net: test hook: queued 1000 frames of 1514 bytes in ");
    // The request, the reply, the burst, and the refused frames counted as transmit errors.
    run.assert_serial_contains(
        "net: test hook: counters: in 1 frames 64 bytes, out 1001 frames 1514060 bytes, errors rx 0 tx 2",
    );
    // On the wire: the request (broadcast, an ARP probe from the NIC's MAC for 10.0.2.2), the
    // gateway's reply to the NIC, then the burst, every frame once and in order.
    let frames = capture.frames().expect("QEMU wrote the capture");
    assert_eq!(frames.len(), 1002, "{} frames on the wire", frames.len());
    for (index, frame) in frames[2..].iter().enumerate() {
        assert_eq!(frame.len(), 1514, "burst frame {index}");
        assert_eq!(&frame[6..12], &QEMU_DEFAULT_MAC, "burst frame {index}");
        assert_eq!(
            &frame[14..22],
            &(index as u64).to_be_bytes(),
            "burst frame {index}"
        );
    }
    let (request, reply) = (&frames[0], &frames[1]);
    assert_eq!(request.len(), 60);
    assert_eq!(&request[0..6], &[0xff; 6]);
    assert_eq!(&request[6..12], &QEMU_DEFAULT_MAC);
    assert_eq!(&request[12..14], &ETHERTYPE_ARP);
    assert_eq!(&request[20..22], &[0, 1], "ARP request");
    assert_eq!(
        &request[28..32],
        &[0, 0, 0, 0],
        "ARP probe: no sender address"
    );
    assert_eq!(&request[38..42], &[10, 0, 2, 2]);
    assert_eq!(&reply[0..6], &QEMU_DEFAULT_MAC);
    assert_eq!(&reply[6..12], &GATEWAY_MAC);
    assert_eq!(&reply[12..14], &ETHERTYPE_ARP);
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
}

#[test]
fn qemu_uefi_finds_the_nic_beside_the_disk() {
    // UEFI: OVMF places both devices' 64-bit BARs; one walk of the bus serves both drivers.
    // (OVMF's own network stack sends IPv6 frames from the NIC before the hypervisor starts,
    // so the "never transmits" check is on the BIOS path, where SeaBIOS leaves the NIC alone.)
    let disk = ScratchDisk::new(1 << 20, &[]);
    let port = free_local_port().to_string();
    let forward = format!("tcp:{port}:10.0.2.15:80");
    let run = boot(&[
        "--config",
        "tests/configs/basic.toml",
        "--disk",
        disk.path(),
        "--net",
        "user",
        "--hostfwd",
        &forward,
        "--mac",
        "52:54:00:ab:cd:ef",
        "--timeout",
        "300",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("disk: virtio-blk at ");
    run.assert_serial_contains(", MAC 52:54:00:ab:cd:ef, link up");
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
}

#[test]
fn qemu_bios_never_transmits_at_boot() {
    let capture = PacketCapture::new();
    let qemu_args = capture.qemu_args();
    let run = boot(&with_capture(
        &[
            "--bios",
            "--config",
            "tests/configs/basic.toml",
            "--net",
            "user",
            "--timeout",
            "300",
        ],
        &qemu_args,
    ));
    run.assert_status(CLEAN);
    run.assert_serial_contains(", MAC 52:54:00:12:34:56, link up");
    run.assert_serial_contains("ringzero: vm basic exit=exit-port status=0");
    let frames = capture.frames().expect("QEMU wrote the capture");
    assert!(
        frames.is_empty(),
        "frames on the wire during a normal boot: {frames:02x?}\n{}",
        run.report()
    );
}

#[test]
fn qemu_bios_without_a_nic_says_none() {
    let run = boot(&["--bios", "--no-guests", "--timeout", "300"]);
    run.assert_status(CLEAN);
    run.assert_serial_contains("net: none (no virtio-net on the host PCI bus)");
    run.assert_serial_lacks("net: virtio-net");
}

/// The `sent=N received=M` counts of a `net-test: WHAT ping` line of VM `vm`.
fn ping_counts(run: &ringzero_tests::Run, vm: &str, what: &str) -> (u64, u64) {
    let line = run.line_with(&format!("{vm} | net-test: {what} ping sent="));
    (
        ringzero_tests::field_after(line, "sent=").unwrap_or(0),
        ringzero_tests::field_after(line, "received=").unwrap_or(0),
    )
}

/// Two Linux VMs on one ringzero with QEMU user networking on the physical NIC: each gets an
/// address from QEMU's DHCP server through the switch, pings the gateway 10.0.2.2, and the two
/// ping each other.
#[test]
fn two_linux_vms_get_dhcp_addresses_and_ping_the_gateway_and_each_other() {
    let run = boot(&[
        "--config",
        "tests/configs/net-two.toml",
        "--net",
        "user",
        "--smp",
        "2",
        "--memory",
        "1024",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    let mut addresses = Vec::new();
    for vm in ["vm1", "vm2"] {
        let marker = format!("{vm} | net-test: address ");
        let address = ringzero_tests::text_after(run.line_with(&marker), &marker, |c| {
            c.is_ascii_digit() || c == '.'
        })
        .unwrap_or_default();
        assert!(
            address == "10.0.2.15" || address == "10.0.2.16",
            "{vm} got {address}\n{}",
            run.report()
        );
        addresses.push(address);
        let (sent, received) = ping_counts(&run, vm, "gateway");
        assert!(
            sent == 5 && received >= 4,
            "{vm} gateway ping {received}/{sent}\n{}",
            run.report()
        );
        run.assert_serial_contains(&format!("ringzero: vm {vm} exit=poweroff status=0"));
    }
    assert_ne!(addresses[0], addresses[1], "both VMs got the same address");
    for (vm, peer) in [("vm1", &addresses[1]), ("vm2", &addresses[0])] {
        let (sent, received) = ping_counts(&run, vm, &format!("peer {peer}"));
        assert!(
            sent == 5 && received >= 4,
            "{vm} -> {peer} {received}/{sent}\n{}",
            run.report()
        );
    }
    // Every frame went through the switch: the VMs' ports saw traffic both ways, and nothing
    // was dropped as spoofed.
    for port in ["vm1", "vm2", "uplink"] {
        let line = run.line_with(&format!("vswitch: port {port} in="));
        assert!(
            ringzero_tests::field_after(line, " in=").unwrap_or(0) > 0
                && ringzero_tests::field_after(line, " out=").unwrap_or(0) > 0
                && line.contains("spoofed=0"),
            "{line}\n{}",
            run.report()
        );
    }
    // Frames moved when they were sent: the exit that notified a NIC's transmit queue put them
    // into the switch and into the receiving VM's queue (not only the next scheduler pass), and
    // frames for the other VM were handed to it from that exit (delivered, or marked + kicked).
    let line = run.line_with("network: sent_at_exit=");
    let moved = |key: &str| ringzero_tests::field_after(line, key).unwrap_or(0);
    assert!(
        moved("sent_at_exit=") > 0
            && moved("delivered_at_exit=") > 0
            && moved("direct_deliveries=") + moved("deferred_deliveries=") > 0,
        "{line}\n{}",
        run.report()
    );
}

/// A VM that sends from another VM's MAC: the switch drops its frames and counts them on its
/// port; the victim's MAC stays on the victim's port (it keeps reaching the gateway while and
/// after the spoofer forges its address), and the spoofer works again with its own MAC.
#[test]
fn spoofed_frames_are_dropped_and_counted_and_the_victim_keeps_its_mac() {
    let run = boot(&[
        "--config",
        "tests/configs/net-spoof.toml",
        "--net",
        "user",
        "--smp",
        "2",
        "--memory",
        "1024",
        "--timeout",
        "600",
    ]);
    run.assert_status(CLEAN);
    run.assert_serial_contains(
        "spoofer | net-test: spoof mac 02:f9:8e:75:03:05 -> 02:00:00:00:00:0b",
    );
    assert_eq!(ping_counts(&run, "spoofer", "own").1, 3, "{}", run.report());
    assert_eq!(
        ping_counts(&run, "spoofer", "spoofed").1,
        0,
        "{}",
        run.report()
    );
    assert_eq!(
        ping_counts(&run, "spoofer", "restored").1,
        5,
        "{}",
        run.report()
    );
    let sent = ringzero_tests::field_after(
        run.line_with("spoofer | net-test: spoofed tx_packets="),
        "tx_packets=",
    )
    .unwrap_or(0);
    let port = run.line_with("vswitch: port spoofer in=");
    let spoofed = ringzero_tests::field_after(port, "spoofed=").unwrap_or(0);
    assert!(
        sent > 0 && spoofed >= sent,
        "the guest sent {sent} forged frames, the switch counted {spoofed}\n{}",
        run.report()
    );
    // The victim pinged the gateway after the spoofer had started forging its address.
    assert!(
        run.position_of("victim | net-test: gateway ping sent=")
            > run.position_of("spoofer | net-test: spoof mac "),
        "the victim pinged before the spoofing\n{}",
        run.report()
    );
    assert_eq!(
        ping_counts(&run, "victim", "gateway").1,
        5,
        "{}",
        run.report()
    );
    assert!(
        run.line_with("vswitch: port victim in=")
            .contains("spoofed=0"),
        "{}",
        run.report()
    );
}

/// A TCP service in a VM, reached from the machine running QEMU through a host port forward
/// (QEMU user networking -> the physical NIC -> the switch -> the VM): 4 MiB arrive intact.
#[test]
fn a_tcp_service_in_a_vm_is_reached_from_the_host_and_the_transfer_is_intact() {
    use std::io::Read;
    let port = free_local_port().to_string();
    let forward = format!("tcp:{port}:10.0.2.15:8080");
    let (run, received) = ringzero_tests::boot_while(
        &[
            "--config",
            "tests/configs/net-serve.toml",
            "--net",
            "user",
            "--hostfwd",
            &forward,
            "--memory",
            "512",
            "--timeout",
            "600",
        ],
        "server | net-test: listening port 8080",
        || {
            // nc starts listening just after the line: retry the connection for a while.
            for _ in 0..50 {
                if let Ok(mut stream) = std::net::TcpStream::connect(format!("127.0.0.1:{port}")) {
                    stream
                        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
                        .expect("set a read timeout");
                    let mut data = Vec::new();
                    if stream.read_to_end(&mut data).is_ok() && !data.is_empty() {
                        return data;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Vec::new()
        },
    );
    run.assert_status(CLEAN);
    let data = received.expect("the guest started serving");
    let line = run.line_with("server | net-test: serving md5 ");
    let expected_md5 = line
        .split_whitespace()
        .nth(5)
        .unwrap_or_default()
        .to_string();
    let expected_bytes = ringzero_tests::field_after(line, "bytes ").unwrap_or(0);
    let file = std::env::temp_dir().join(format!("ringzero-received-{}", std::process::id()));
    std::fs::write(&file, &data).expect("keep what arrived");
    let md5 = std::process::Command::new("md5sum")
        .arg(&file)
        .output()
        .expect("md5sum runs");
    let _ = std::fs::remove_file(&file);
    let md5 = String::from_utf8_lossy(&md5.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(expected_bytes, 4 << 20, "{line}");
    assert_eq!(data.len() as u64, expected_bytes, "{}", run.report());
    assert_eq!(md5, expected_md5, "{}", run.report());
    run.assert_serial_contains("server | net-test: served status=0");
}

/// While one VM floods the switch (fragmented pings to the gateway, as fast as it can for 60 s),
/// two others ping each other with less than 5% loss; the flood really went through the switch.
#[test]
fn two_vms_keep_pinging_each_other_while_a_third_floods_the_switch() {
    let run = boot(&[
        "--config",
        "tests/configs/net-flood.toml",
        "--net",
        "user",
        "--smp",
        "2",
        "--memory",
        "1024",
        "--timeout",
        "900",
    ]);
    run.assert_status(CLEAN);
    for (vm, peer) in [("a", "10.0.2.102"), ("b", "10.0.2.101")] {
        let (sent, received) = ping_counts(&run, vm, &format!("peer {peer}"));
        assert!(
            sent == 40 && received * 100 >= sent * 95,
            "{vm} -> {peer}: {received}/{sent} during the flood\n{}",
            run.report()
        );
        // The pings ran while the flood did: they end before the flood's report.
        assert!(
            run.position_of(&format!("{vm} | net-test: peer {peer} ping sent="))
                < run.position_of("flooder | net-test: flood frames="),
            "{vm}'s pings did not overlap the flood\n{}",
            run.report()
        );
    }
    let flood = run.line_with("flooder | net-test: flood frames=");
    let frames = ringzero_tests::field_after(flood, "frames=").unwrap_or(0);
    let port = run.line_with("vswitch: port flooder in=");
    let switched = ringzero_tests::field_after(port, " in=").unwrap_or(0);
    assert!(
        frames >= 10_000 && switched >= frames,
        "flood of {frames} frames, the switch took {switched}\n{}",
        run.report()
    );
}
