#!/usr/bin/env python3
"""Writes the seed inputs of the virtio-net fuzz target (fuzz_targets/virtio_net.rs) into
seeds/virtio-net/: well-formed guests whose rings the fuzzer then mutates.
Layout: 31 header bytes (queue sizes, ring addresses, outbox/link, 16 operations), then RAM."""
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "virtio-net")
NEXT, WRITE = 1, 2
# Operations (low 3 bits): 0 notify tx, 1 notify rx, 2/3 deliver LENGTHS[op >> 3], 4 drain,
# 5 flip link, 6 read ISR, 7 reset + bring-up.
LENGTHS = [0, 1, 13, 14, 15, 42, 60, 64, 500, 1024, 1500, 1514, 1517, 1518, 1519, 4000]


def deliver(length):
    return LENGTHS.index(length) << 3 | 2


def seed(name, outbox, rx_chains, tx_chains, packets, ops, link_up=True):
    ram = bytearray(0x800)
    rx = (0x100, 0x200, 0x240)
    tx = (0x300, 0x400, 0x440)

    def lay(rings, chains):
        desc, avail, _ = rings
        index = 0
        heads = []
        for chain in chains:
            heads.append(index)
            for i, (address, length, writable) in enumerate(chain):
                flags = (WRITE if writable else 0) | (NEXT if i + 1 < len(chain) else 0)
                struct.pack_into("<QIHH", ram, desc + 16 * index, address, length, flags, index + 1)
                index += 1
        struct.pack_into("<HH", ram, avail, 0, len(heads))
        for slot, head in enumerate(heads):
            struct.pack_into("<H", ram, avail + 4 + 2 * slot, head)

    lay(rx, rx_chains)
    lay(tx, tx_chains)
    for address, data in packets:
        ram[address:address + len(data)] = data
    ops = list(ops) + [6] * (16 - len(ops))
    header = bytes([3, 3])  # queue size 8 each
    for desc, avail, used in (rx, tx):
        header += struct.pack("<HHH", desc // 8, avail // 2, used // 2)
    header += bytes([(outbox - 1) | (0x80 if link_up else 0)]) + bytes(ops)
    assert len(header) == 31
    with open(os.path.join(HERE, name), "wb") as out:
        out.write(header + bytes(ram))


def packet(length, salt):
    return bytes(12) + bytes((i * 7 + salt) & 0xFF for i in range(length))


os.makedirs(HERE, exist_ok=True)
# Two frames out (header apart, then inline), frames in, the link down and up, bounds, reset.
seed("tx-rx-link",
     outbox=2,
     rx_chains=[[(0x800, 1530, True)], [(0x1000, 12, True), (0x1100, 1518, True)]],
     tx_chains=[[(0x600, 12, False), (0x60C, 60, False)], [(0x700, 76, False)]],
     packets=[(0x600, packet(60, 1)), (0x700, packet(64, 2))],
     ops=[0, deliver(60), 4, deliver(1518), 6, 5, deliver(60), 5, 0, deliver(1519), deliver(14),
          1, 4, 7, 0, 6])
# Back-pressure: three frames, an outbox of one.
seed("tx-back-pressure",
     outbox=1,
     rx_chains=[],
     tx_chains=[[(0x600, 72, False)], [(0x680, 26, False)], [(0x700, 1530, False)]],
     packets=[(0x600, packet(60, 3)), (0x680, packet(14, 4)), (0x700, packet(200, 5))],
     ops=[0, 0, 4, 0, 4, 4, deliver(42), 6])
# Receive buffers too small, readable, and fine; transmit runt, header only, writable only.
seed("rx-too-small-tx-bounds",
     outbox=4,
     rx_chains=[[(0x800, 71, True)], [(0x880, 100, False)], [(0x900, 600, True)]],
     tx_chains=[[(0x600, 25, False)], [(0x640, 12, False)], [(0x680, 100, True)]],
     packets=[(0x600, packet(13, 6))],
     ops=[deliver(60), deliver(60), deliver(500), deliver(60), 0, 4, 1, 6])
