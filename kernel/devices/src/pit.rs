//! The VM's programmable interval timer: an Intel 8254 at ports 0x40..=0x43 (channels 0-2 and
//! the control word register), with port 0x61 (NMI status and control: channel 2's gate and
//! output, the speaker enable and the refresh toggle) as a small companion device. Linux
//! calibrates its TSC against channel 2 (`pit_calibrate_tsc`, `quick_pit_calibrate`) and takes
//! its early periodic tick and its `check_timer` test from channel 0 on IRQ 0.
//!
//! Spec: Intel "82C54 CHMOS Programmable Interval Timer" datasheet (order number 231244):
//! "Control Word Format", "Write Operations", "Read Operations" with "Counter Latch Command"
//! and "Read-Back Command" (status byte: Figure "Status Byte"), "Mode Definitions" (Modes 0-5)
//! and the "Gate Pin Operations Summary" table. Section titles below refer to it. Port 0x61:
//! IBM "Personal Computer AT Technical Reference", System Board, "I/O Address Map" (port 61h,
//! "PPI port B" bits) and Intel I/O Controller Hub datasheets (for example ICH10, 82801JIB),
//! section "NMI_SC - NMI Status and Control Register" (bits named here as there).
//!
//! Written here rather than taken from a crate: no `no_std` crate emulates an 8254 for a guest.
//!
//! # Time
//! There is no ticking thread. The chip's clock input runs at [`Pit::INPUT_HZ`] (1,193,182 Hz);
//! the PIT tick at TSC value `t` is `floor(t * 1193182 / tsc_hz)`, with `tsc_hz` given to
//! [`Pit::new`]. Every counter value and output is computed from the tick at which the counter
//! was loaded and the current tick. The port API ([`PortDevice`]) carries no time, so:
//! - the hypervisor calls [`Pit::advance`] with the current TSC before it routes a guest access
//!   to ports 0x40..=0x43 or 0x61 (accesses happen at the last time advanced to);
//! - before each VM entry it calls [`Pit::irq0_edges`], which advances too and returns the rising
//!   edges of channel 0's output since the previous call: it raises IRQ 0 (I/O APIC pin 2 with
//!   the usual MADT interrupt source override, or pin 0) once if the count is non-zero (or that
//!   many times, as it prefers);
//! - before halting a vCPU it asks [`Pit::next_irq0`] for the TSC of the next edge and wakes the
//!   vCPU then.
//!
//! Time given to the chip never goes backwards: an earlier TSC than the last one is taken as the
//! last one. A `tsc_hz` of 0 stops the clock (every count stays where it is, no edges).
//!
//! ```
//! use ringzero_devices::{Pit, PortBus};
//! let tsc_hz = 2_000_000_000;
//! let pit = Pit::new(tsc_hz);
//! let port_61 = pit.nmi_status_control();
//! let mut bus = PortBus::new();
//! bus.add(Box::new(pit)).unwrap();
//! bus.add(Box::new(port_61)).unwrap();
//!
//! // On a guest IN/OUT at TSC `now`, before routing it to the bus:
//! let now = 1_000_000;
//! bus.device_mut::<Pit>(Pit::BASE).unwrap().advance(now);
//! let mut events = Vec::new();
//! bus.write(0x43, 1, 0x34, &mut events); // channel 0, LSB then MSB, mode 2
//! bus.write(0x40, 1, 0xA9, &mut events); // 0x04A9 = 1193 ticks: 1 ms
//! bus.write(0x40, 1, 0x04, &mut events);
//!
//! // Before each VM entry: raise IRQ 0 if channel 0's output rose.
//! let later = now + tsc_hz / 100;
//! let pit = bus.device_mut::<Pit>(Pit::BASE).unwrap();
//! assert_eq!(pit.irq0_edges(later), 10);
//! // Before halting a vCPU: wake it at the next edge.
//! assert!(pit.next_irq0(later).unwrap() > later);
//! ```
//!
//! # Ports: why two devices
//! A [`PortDevice`] owns one contiguous range, and 0x44..=0x60 (0x60 is the keyboard
//! controller's data port) must stay free, so port 0x61 is a second device,
//! [`NmiStatusControl`], made with [`Pit::nmi_status_control`]. Both hold the same state behind
//! an `Arc<spin::Mutex<_>>`: the gate written at 0x61 and channel 2's output read there are the
//! 8254's own. The lock is never contended in practice (the VM's port bus is used under the VM's
//! lock) and never held across calls.
//!
//! # Model decisions
//! - Modes 0, 2, 3 and 4 are exact to the tick (a count takes effect on the first clock tick
//!   after the write that completes it, as on the chip); modes 1 and 5 are triggered by a rising
//!   gate, which only channel 2 has (channels 0 and 1 have their gates tied high, as on the PC,
//!   so modes 1 and 5 never trigger on them and their output stays high).
//! - IRQ 0 edges are the low-to-high transitions of channel 0's output: in mode 2 at the end of
//!   each period, in mode 3 at the start of each high half, in mode 0 at terminal count, in mode
//!   4 after the one-clock strobe; a control word or count write that raises the output (for
//!   example leaving mode 0 for mode 2) is an edge too, as on the chip.
//! - In modes 2 and 3 a count written while the counter runs takes effect at the end of the
//!   current period (the chip: mode 2 at the end of the period, mode 3 at the end of the current
//!   half-cycle). A count of 1, below the minimum of 2 for modes 2 and 3 (datasheet, table
//!   "Minimum and Maximum Initial Counts"), gives an output that stays high, so a guest cannot
//!   ask for an interrupt storm of 1.19 MHz; a count of 2 is allowed and gives one edge every 2
//!   ticks (the hypervisor owes a guest at most 16 late ticks and hands them over one at a
//!   time, `ringzero_vmm::smp::poll_devices`).
//! - A count of 0 means 0x10000 (datasheet, "Write Operations": the largest count).
//! - BCD counting (control word bit 0) is accepted and shown in the status byte, but the
//!   counter counts in binary.
//! - Reading a counter without a latch returns the counter's value at the last advanced time
//!   (on the chip such a read may be off while the counter changes; here it never is). Before a
//!   count is loaded (no count written, modes 1 and 5 untriggered, or a count written in mode 2
//!   or 3 while the gate is low), a counter reads the last count written. A gate that goes low
//!   while counting freezes the count where it is.
//! - The power-up state (the datasheet leaves it undefined): every channel in mode 3, LSB then
//!   MSB access, binary, no count written, output high; port 0x61 reads 0 in its writable bits
//!   (channel 2 gated off). No IRQ 0 edge comes before the guest programs channel 0.
//! - Port 0x61: bits 0-3 (timer 2 gate, speaker data enable, SERR# NMI and IOCHK# NMI enables)
//!   are stored and read back; bit 4 (refresh toggle) flips every 18 PIT ticks (15.09 µs, the PC's
//!   refresh period from channel 1); bit 5 is channel 2's output; bits 6 and 7 (IOCHK# and SERR#
//!   NMI status) read 0: no NMI source exists. Writes to bits 4-7 are ignored. No sound is made.
//! - Channel 1 (DRAM refresh on the PC) is an ordinary channel whose output goes nowhere.
//! - The control port reads 0xFF (the chip does not drive the bus, datasheet "Read Operations").
//!   Wider accesses are split into byte accesses at consecutive ports; bytes outside a device's
//!   ports read 0xFF and ignore writes.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use spin::Mutex;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// Control word fields. See: 82C54 datasheet, "Control Word Format".
/// SC1, SC0: bits 7:6 select the counter; 11 is the read-back command.
const CONTROL_SELECT_SHIFT: u32 = 6;
const SELECT_READ_BACK: u8 = 0b11;
/// RW1, RW0: bits 5:4; 00 is the counter latch command.
const CONTROL_ACCESS_SHIFT: u32 = 4;
/// M2..M0: bits 3:1 (X10 is mode 2, X11 is mode 3).
const CONTROL_MODE_SHIFT: u32 = 1;
/// The bits a control word leaves in the status byte (RW, M, and BCD in bit 0, which is kept
/// there only: the counters count in binary).
const CONTROL_STATUS_BITS: u8 = 0x3F;

// Read-back command bits (active low). See: 82C54 datasheet, "Read-Back Command".
/// COUNT#: 0 latches the count of the selected counters.
const READ_BACK_NO_COUNT: u8 = 1 << 5;
/// STATUS#: 0 latches the status of the selected counters.
const READ_BACK_NO_STATUS: u8 = 1 << 4;
/// CNT0 is bit 1, CNT1 bit 2, CNT2 bit 3.
const READ_BACK_COUNTER_SHIFT: u32 = 1;

// Status byte. See: 82C54 datasheet, "Read-Back Command", Figure "Status Byte".
const STATUS_OUTPUT: u8 = 1 << 7;
const STATUS_NULL_COUNT: u8 = 1 << 6;

/// The power-up control bits: LSB then MSB, mode 3, binary.
const CONTROL_POWER_UP: u8 = 0x36;

// Port 0x61 bits. See: ICH datasheet, "NMI_SC - NMI Status and Control Register"; PC/AT
// Technical Reference, port 61h.
/// TIM_CNT2_EN: channel 2's gate.
const NMI_SC_TIMER2_GATE: u8 = 1 << 0;
/// Bits 0-3 (gate, SPKR_DAT_EN, PCI_SERR_EN, IOCHK_NMI_EN) are read/write.
const NMI_SC_WRITABLE: u8 = 0x0F;
/// REF_TOGGLE: flips every refresh period.
const NMI_SC_REFRESH_TOGGLE: u8 = 1 << 4;
/// TMR2_OUT_STS: channel 2's output.
const NMI_SC_TIMER2_OUTPUT: u8 = 1 << 5;
/// The refresh period in PIT ticks: channel 1's count of 18 on the PC (15.09 µs).
const REFRESH_PERIOD_TICKS: u64 = 18;

/// Number of counters.
const CHANNELS: usize = 3;

/// RW1, RW0 of a control word. See: 82C54 datasheet, "Control Word Format".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    LeastSignificantByte,
    MostSignificantByte,
    LeastThenMost,
}

impl Access {
    /// RW bits 01, 10 or 11; 00 (the latch command) is not an access mode.
    fn from_bits(bits: u8) -> Option<Self> {
        match bits & 0b11 {
            0b01 => Some(Self::LeastSignificantByte),
            0b10 => Some(Self::MostSignificantByte),
            0b11 => Some(Self::LeastThenMost),
            _ => None,
        }
    }
}

/// A count latched by a latch or read-back command, waiting to be read.
#[derive(Clone, Copy, Debug)]
struct LatchedCount {
    value: u16,
    /// In LSB-then-MSB access, the LSB was read and the MSB comes next.
    most_next: bool,
}

/// The counting element once a count is loaded: its position is `elapsed(tick)` ticks counted
/// since the load (the gate can freeze it).
#[derive(Clone, Copy, Debug)]
struct Counting {
    /// The count loaded, 1..=0x10000.
    initial: u64,
    /// The tick at which the count was loaded (one tick after the write that gave it).
    load_tick: u64,
    /// Ticks counted before `mark`.
    counted: u64,
    /// From this tick on, while `running`, every tick counts.
    mark: u64,
    running: bool,
    /// Mode 1: the output before the load tick (low when retriggered during a one-shot).
    low_before_load: bool,
}

impl Counting {
    fn load(count: u16, load_tick: u64, running: bool) -> Self {
        Self {
            initial: count_value(count),
            load_tick,
            counted: 0,
            mark: load_tick,
            running,
            low_before_load: false,
        }
    }

    /// Ticks counted since the load, at `tick` (0 before the load).
    fn elapsed(&self, tick: u64) -> u64 {
        if self.running {
            self.counted.saturating_add(tick.saturating_sub(self.mark))
        } else {
            self.counted
        }
    }

    /// Stops counting at `tick` (gate low in modes 0, 2, 3 and 4).
    fn freeze(&mut self, tick: u64) {
        self.counted = self.elapsed(tick);
        self.running = false;
    }

    /// Counts again from `tick` on.
    fn resume(&mut self, tick: u64) {
        if !self.running {
            self.mark = tick.max(self.load_tick);
            self.running = true;
        }
    }

    /// The tick at which the elapsed count reaches `position`, if it ever does (running).
    fn tick_of(&self, position: u64) -> Option<u64> {
        if !self.running {
            return None;
        }
        let ahead = position.checked_sub(self.counted)?;
        self.mark.checked_add(ahead)
    }
}

/// A count as written (0 is 0x10000) as a number. See: 82C54 datasheet, "Write Operations".
fn count_value(count: u16) -> u64 {
    if count == 0 {
        0x1_0000
    } else {
        u64::from(count)
    }
}

/// One counter of the 8254.
#[derive(Clone, Debug)]
struct Channel {
    /// Operating mode 0..=5 (6 and 7 are read as 2 and 3).
    mode: u8,
    access: Access,
    /// RW, M and BCD bits of the last control word, for the status byte.
    control_bits: u8,
    /// The count register (CR): the last complete count written.
    count_register: u16,
    /// A complete count was written since the last control word.
    count_written: bool,
    /// In LSB-then-MSB access, the LSB written, waiting for the MSB.
    pending_least: Option<u8>,
    /// In LSB-then-MSB access, the next unlatched read returns the MSB.
    read_most_next: bool,
    latched_count: Option<LatchedCount>,
    latched_status: Option<u8>,
    /// The counting element; `None` until a count is loaded.
    counting: Option<Counting>,
    /// Modes 2 and 3: a count written while counting is loaded at this tick (end of period).
    reload_at: Option<u64>,
    /// NULL COUNT is set until this tick (`u64::MAX`: until a gate trigger loads the count).
    null_count_until: Option<u64>,
    gate: bool,
}

impl Channel {
    fn power_up(gate: bool) -> Self {
        Self {
            mode: 3,
            access: Access::LeastThenMost,
            control_bits: CONTROL_POWER_UP,
            count_register: 0,
            count_written: false,
            pending_least: None,
            read_most_next: false,
            latched_count: None,
            latched_status: None,
            counting: None,
            reload_at: None,
            null_count_until: Some(u64::MAX),
            gate,
        }
    }

    /// The output pin at `tick`. See: 82C54 datasheet, "Mode Definitions".
    fn output(&self, tick: u64) -> bool {
        let Some(counting) = &self.counting else {
            // Mode 0: the control word sets OUT low (and the first byte of a two-byte count
            // stops counting with OUT low). Every other mode starts high.
            return self.mode != 0;
        };
        let count = counting.initial;
        let elapsed = counting.elapsed(tick);
        match self.mode {
            // Low until terminal count, then high.
            0 => elapsed >= count,
            // Low from the tick after the trigger until terminal count.
            1 if tick < counting.load_tick => !counting.low_before_load,
            1 => elapsed >= count,
            // Low for the one clock in which the count is 1; a low gate forces OUT high.
            2 => !self.gate || count < 2 || elapsed % count != count - 1,
            // High for ceil(N/2) ticks, low for floor(N/2); a low gate forces OUT high.
            3 => !self.gate || elapsed % count < count.div_ceil(2),
            // Low for the one clock after the count reaches 0.
            _ => elapsed != count,
        }
    }

    /// The counting element's value at `tick` (what an unlatched read or a latch returns).
    fn count_at(&self, tick: u64) -> u16 {
        let Some(counting) = &self.counting else {
            return self.count_register;
        };
        let count = counting.initial;
        let elapsed = counting.elapsed(tick);
        let value = match self.mode {
            // Counts N, N-1, ..., 1, then N again.
            2 => count - elapsed % count,
            // Even N: N, N-2, ..., 2 in each half. Odd N: N, N-1, N-3, ..., 2 in the high half
            // and N, N-3, ..., 2 in the low half. See: 82C54 datasheet, "Mode 3".
            3 => {
                let phase = elapsed % count;
                let high = count.div_ceil(2);
                if count % 2 == 0 {
                    count - 2 * (phase % (count / 2).max(1))
                } else if phase < high {
                    if phase == 0 {
                        count
                    } else {
                        count + 1 - 2 * phase
                    }
                } else {
                    let low_phase = phase - high;
                    if low_phase == 0 {
                        count
                    } else {
                        count - 1 - 2 * low_phase
                    }
                }
            }
            // Modes 0, 1, 4 and 5 count down through 0 and wrap to 0xFFFF.
            _ => count.wrapping_sub(elapsed),
        };
        // 0x10000 reads as 0.
        (value & 0xFFFF) as u16
    }

    /// The elapsed positions at which the output rises: the first one after `after`, if any.
    fn next_edge_position(&self, after: u64) -> Option<u64> {
        let count = self.counting.as_ref()?.initial;
        match self.mode {
            0 | 1 => (count > after).then_some(count),
            2 | 3 if count < 2 => None,
            2 | 3 => (after / count).checked_add(1)?.checked_mul(count),
            _ => {
                let position = count.checked_add(1)?;
                (position > after).then_some(position)
            }
        }
    }

    /// Rising output edges from the counting element between ticks `from` (excluded) and `to`
    /// (included). Gate transitions (channel 2 only) are not counted.
    fn edges_between(&self, from: u64, to: u64) -> u64 {
        let Some(counting) = &self.counting else {
            return 0;
        };
        let (start, end) = (counting.elapsed(from), counting.elapsed(to));
        if end <= start {
            return 0;
        }
        let count = counting.initial;
        match self.mode {
            0 | 1 => u64::from(start < count && count <= end),
            2 | 3 if count < 2 => 0,
            2 | 3 => end / count - start / count,
            _ => {
                let position = count.saturating_add(1);
                u64::from(start < position && position <= end)
            }
        }
    }

    /// The tick of the first rising edge after `tick` from the counting element, if any.
    fn next_edge_tick(&self, tick: u64) -> Option<u64> {
        let counting = self.counting.as_ref()?;
        let position = self.next_edge_position(counting.elapsed(tick))?;
        counting.tick_of(position)
    }

    fn null_count(&self, tick: u64) -> bool {
        self.null_count_until.is_some_and(|until| tick < until)
    }

    /// The status byte. See: 82C54 datasheet, "Read-Back Command", Figure "Status Byte".
    fn status(&self, tick: u64) -> u8 {
        let mut status = self.control_bits & CONTROL_STATUS_BITS;
        if self.output(tick) {
            status |= STATUS_OUTPUT;
        }
        if self.null_count(tick) {
            status |= STATUS_NULL_COUNT;
        }
        status
    }

    /// Loads the count register into the counting element on the tick after `tick`.
    fn load_next_tick(&mut self, tick: u64, running: bool) {
        let load_tick = tick.saturating_add(1);
        let low_before_load = !self.output(tick);
        let mut counting = Counting::load(self.count_register, load_tick, running);
        counting.low_before_load = low_before_load;
        self.counting = Some(counting);
        self.reload_at = None;
        self.null_count_until = Some(load_tick);
    }

    /// Modes 2 and 3: applies a count written during counting if its period ended by `tick`.
    fn apply_reload(&mut self, tick: u64) {
        let Some(reload_tick) = self.reload_at else {
            return;
        };
        if reload_tick > tick {
            return;
        }
        let running = self.counting.is_some_and(|counting| counting.running);
        self.counting = Some(Counting::load(self.count_register, reload_tick, running));
        self.reload_at = None;
    }

    /// A control word for this counter (RW is not 00). See: 82C54 datasheet, "Control Word
    /// Format" and "Mode Definitions" (OUT's state after a control word).
    fn write_control(&mut self, control: u8, access: Access) {
        let mode = (control >> CONTROL_MODE_SHIFT) & 0b111;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.access = access;
        self.control_bits = control & CONTROL_STATUS_BITS;
        self.count_written = false;
        self.pending_least = None;
        self.read_most_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.counting = None;
        self.reload_at = None;
        self.null_count_until = Some(u64::MAX);
    }

    /// Counter latch command, or the count part of a read-back: a second latch before the first
    /// is read is ignored. See: 82C54 datasheet, "Counter Latch Command".
    fn latch_count(&mut self, tick: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(LatchedCount {
                value: self.count_at(tick),
                most_next: false,
            });
        }
    }

    /// The status part of a read-back; ignored while a status is latched. See: 82C54
    /// datasheet, "Read-Back Command".
    fn latch_status(&mut self, tick: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(tick));
        }
    }

    /// A byte read from the counter's port: the latched status first, then a latched count,
    /// else the live count, per the access mode. See: 82C54 datasheet, "Read Operations".
    fn read(&mut self, tick: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        let (value, most) = if let Some(latched) = &mut self.latched_count {
            let value = latched.value;
            let most = match self.access {
                Access::LeastSignificantByte => false,
                Access::MostSignificantByte => true,
                Access::LeastThenMost => latched.most_next,
            };
            if self.access == Access::LeastThenMost && !latched.most_next {
                latched.most_next = true;
            } else {
                self.latched_count = None;
            }
            (value, most)
        } else {
            let most = match self.access {
                Access::LeastSignificantByte => false,
                Access::MostSignificantByte => true,
                Access::LeastThenMost => {
                    let most = self.read_most_next;
                    self.read_most_next = !most;
                    most
                }
            };
            (self.count_at(tick), most)
        };
        let [least, most_byte] = value.to_le_bytes();
        if most {
            most_byte
        } else {
            least
        }
    }

    /// A byte written to the counter's port. See: 82C54 datasheet, "Write Operations" and
    /// "Mode Definitions" (when a new count takes effect in each mode).
    fn write(&mut self, tick: u64, byte: u8) {
        let count = match self.access {
            Access::LeastSignificantByte => u16::from(byte),
            Access::MostSignificantByte => u16::from(byte) << 8,
            Access::LeastThenMost => match self.pending_least.take() {
                None => {
                    self.pending_least = Some(byte);
                    // Mode 0: writing the first byte stops counting and sets OUT low.
                    if self.mode == 0 {
                        self.counting = None;
                        self.null_count_until = Some(u64::MAX);
                    }
                    return;
                }
                Some(least) => u16::from_le_bytes([least, byte]),
            },
        };
        self.count_register = count;
        let first_count = !self.count_written;
        self.count_written = true;
        match self.mode {
            // Loaded on the next tick; the gate decides whether it counts.
            0 | 4 => self.load_next_tick(tick, self.gate),
            // Waits for a gate trigger; a running one-shot is not disturbed.
            1 | 5 => self.null_count_until = Some(u64::MAX),
            // Modes 2 and 3.
            _ => match self.counting {
                Some(counting) if !first_count && counting.running => {
                    // The current period ends at the next multiple of the old count.
                    let elapsed = counting.elapsed(tick);
                    let period = counting.initial;
                    let end = (elapsed / period)
                        .checked_add(1)
                        .and_then(|periods| periods.checked_mul(period))
                        .and_then(|position| counting.tick_of(position));
                    match end {
                        Some(end) => {
                            if self.reload_at.is_none() {
                                self.reload_at = Some(end);
                            }
                            self.null_count_until = self.reload_at;
                        }
                        None => self.load_next_tick(tick, true),
                    }
                }
                _ if self.gate => self.load_next_tick(tick, true),
                // Gate low: the rising gate loads the count.
                _ => {
                    self.counting = None;
                    self.null_count_until = Some(u64::MAX);
                }
            },
        }
    }

    /// Channel 2's gate from port 0x61. See: 82C54 datasheet, "Gate Pin Operations Summary".
    fn set_gate(&mut self, tick: u64, gate: bool) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        match (self.mode, gate) {
            // Modes 0 and 4: the gate enables counting.
            (0 | 4, false) => {
                if let Some(counting) = &mut self.counting {
                    counting.freeze(tick);
                }
            }
            (0 | 4, true) => {
                if let Some(counting) = &mut self.counting {
                    counting.resume(tick);
                }
            }
            // Modes 2 and 3: low stops counting (OUT high), rising reloads and restarts.
            (2 | 3, false) => {
                if let Some(counting) = &mut self.counting {
                    counting.freeze(tick);
                }
            }
            // Modes 1, 2, 3 and 5: the rising edge (re)triggers with the count register.
            (_, true) => {
                if self.count_written {
                    self.load_next_tick(tick, true);
                }
            }
            // Modes 1 and 5: a low gate does nothing.
            (_, false) => {}
        }
    }
}

/// The chip's state, shared by [`Pit`] and [`NmiStatusControl`].
#[derive(Debug)]
struct State {
    tsc_hz: u64,
    /// The PIT tick of the last time advanced to (accesses happen then).
    tick: u64,
    channels: [Channel; CHANNELS],
    /// Port 0x61 bits 0-3.
    nmi_status_control: u8,
    /// Rising edges of channel 0's output not yet collected by [`Pit::irq0_edges`], counted up
    /// to `tick`.
    irq0_pending: u64,
}

impl State {
    fn new(tsc_hz: u64) -> Self {
        Self {
            tsc_hz,
            tick: 0,
            // Channels 0 and 1 have their gates tied high; channel 2's comes from port 0x61.
            channels: [
                Channel::power_up(true),
                Channel::power_up(true),
                Channel::power_up(false),
            ],
            nmi_status_control: 0,
            irq0_pending: 0,
        }
    }

    /// The PIT tick at TSC value `tsc` (saturated; 0 if the frequency is 0).
    fn tick_of_tsc(&self, tsc: u64) -> u64 {
        if self.tsc_hz == 0 {
            return 0;
        }
        let ticks = u128::from(tsc) * u128::from(Pit::INPUT_HZ) / u128::from(self.tsc_hz);
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// The first TSC value whose tick is `tick` or later (saturated).
    fn tsc_of_tick(&self, tick: u64) -> u64 {
        let tsc = (u128::from(tick) * u128::from(self.tsc_hz)).div_ceil(u128::from(Pit::INPUT_HZ));
        u64::try_from(tsc).unwrap_or(u64::MAX)
    }

    /// Moves time to `tsc` (never backwards): counts channel 0's edges on the way and applies
    /// counts written in modes 2 and 3 whose period ended.
    fn advance(&mut self, tsc: u64) {
        let target = self.tick_of_tsc(tsc).max(self.tick);
        // A pending reload splits the interval: edges of the old count up to the reload tick,
        // then the new count. At most one reload is pending per channel.
        for index in 0..CHANNELS {
            if let Some(reload_tick) = self.channels[index].reload_at {
                if reload_tick <= target {
                    if index == 0 {
                        self.count_irq0_edges(reload_tick);
                    }
                    self.channels[index].apply_reload(reload_tick);
                }
            }
        }
        self.count_irq0_edges(target);
        self.tick = target;
    }

    /// Adds channel 0's rising edges between the last tick and `to` (which must not pass a
    /// pending reload of channel 0).
    fn count_irq0_edges(&mut self, to: u64) {
        let edges = self.channels[0].edges_between(self.tick, to);
        self.irq0_pending = self.irq0_pending.saturating_add(edges);
        self.tick = self.tick.max(to);
    }

    fn read_timer_port(&mut self, offset: u16) -> u8 {
        let tick = self.tick;
        match self.channels.get_mut(usize::from(offset)) {
            Some(channel) => channel.read(tick),
            // The control word register is write-only.
            None => 0xFF,
        }
    }

    fn write_timer_port(&mut self, offset: u16, byte: u8) {
        let tick = self.tick;
        let before = self.channels[0].output(tick);
        match self.channels.get_mut(usize::from(offset)) {
            Some(channel) => channel.write(tick, byte),
            None => self.write_control(byte),
        }
        // A write that raises channel 0's output is an edge (for example mode 0 to mode 2).
        if !before && self.channels[0].output(tick) {
            self.irq0_pending = self.irq0_pending.saturating_add(1);
        }
    }

    /// A write to port 0x43. See: 82C54 datasheet, "Control Word Format", "Counter Latch
    /// Command" and "Read-Back Command".
    fn write_control(&mut self, control: u8) {
        let tick = self.tick;
        let select = control >> CONTROL_SELECT_SHIFT;
        if select == SELECT_READ_BACK {
            for (index, channel) in self.channels.iter_mut().enumerate() {
                if control & (1 << (READ_BACK_COUNTER_SHIFT + index as u32)) == 0 {
                    continue;
                }
                // Count first, status second: the order of latching does not matter, the status
                // is always read first.
                if control & READ_BACK_NO_COUNT == 0 {
                    channel.latch_count(tick);
                }
                if control & READ_BACK_NO_STATUS == 0 {
                    channel.latch_status(tick);
                }
            }
            return;
        }
        let Some(channel) = self.channels.get_mut(usize::from(select)) else {
            return;
        };
        match Access::from_bits(control >> CONTROL_ACCESS_SHIFT) {
            None => channel.latch_count(tick),
            Some(access) => channel.write_control(control, access),
        }
    }

    /// Port 0x61. See: ICH datasheet, "NMI_SC - NMI Status and Control Register".
    fn read_nmi_status_control(&self) -> u8 {
        let mut value = self.nmi_status_control;
        if (self.tick / REFRESH_PERIOD_TICKS) % 2 == 1 {
            value |= NMI_SC_REFRESH_TOGGLE;
        }
        if self.channels[2].output(self.tick) {
            value |= NMI_SC_TIMER2_OUTPUT;
        }
        value
    }

    fn write_nmi_status_control(&mut self, byte: u8) {
        self.nmi_status_control = byte & NMI_SC_WRITABLE;
        let tick = self.tick;
        self.channels[2].set_gate(tick, byte & NMI_SC_TIMER2_GATE != 0);
    }

    /// The TSC of channel 0's first rising edge after the last tick.
    fn next_irq0_tsc(&self) -> Option<u64> {
        if self.tsc_hz == 0 {
            return None;
        }
        let channel = &self.channels[0];
        let edge = match channel.reload_at {
            None => channel.next_edge_tick(self.tick),
            Some(reload_tick) => match channel.next_edge_tick(self.tick) {
                Some(edge) if edge <= reload_tick => Some(edge),
                _ => {
                    let mut reloaded = channel.clone();
                    reloaded.apply_reload(reload_tick);
                    reloaded.next_edge_tick(reload_tick.max(self.tick))
                }
            },
        }?;
        Some(self.tsc_of_tick(edge))
    }
}

/// The 8254 on ports 0x40..=0x43. See the module documentation.
#[derive(Debug)]
pub struct Pit {
    state: Arc<Mutex<State>>,
}

impl Pit {
    /// Channel 0's data port; channels 1 and 2 follow.
    pub const BASE: u16 = 0x40;
    /// The control word register.
    pub const CONTROL_PORT: u16 = 0x43;
    /// The chip's clock input. See: 82C54 datasheet; the PC's 14.31818 MHz / 12.
    pub const INPUT_HZ: u64 = 1_193_182;

    /// A PIT in its power-up state (see the module documentation) whose clock is derived from a
    /// TSC running at `tsc_hz`, at time 0 until the first [`Pit::advance`].
    pub fn new(tsc_hz: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::new(tsc_hz))),
        }
    }

    /// The port 0x61 device sharing this chip's state (channel 2's gate and output). Put it on
    /// the same bus. Each call makes another handle to the same state.
    pub fn nmi_status_control(&self) -> NmiStatusControl {
        NmiStatusControl {
            state: Arc::clone(&self.state),
        }
    }

    /// The TSC frequency given at construction.
    pub fn tsc_hz(&self) -> u64 {
        self.state.lock().tsc_hz
    }

    /// Moves the chip's time to TSC value `now_tsc` (an earlier value than the last is taken as
    /// the last). Call it before routing a guest access to the PIT's ports or to port 0x61.
    pub fn advance(&mut self, now_tsc: u64) {
        self.state.lock().advance(now_tsc);
    }

    /// Advances to `now_tsc` and returns the rising edges of channel 0's output since the last
    /// call (saturated to `u32::MAX`): the hypervisor raises IRQ 0 once (or that many times)
    /// if it is non-zero. Call it before each VM entry.
    pub fn irq0_edges(&mut self, now_tsc: u64) -> u32 {
        let mut state = self.state.lock();
        state.advance(now_tsc);
        let edges = core::mem::take(&mut state.irq0_pending);
        u32::try_from(edges).unwrap_or(u32::MAX)
    }

    /// The TSC value of channel 0's next rising edge, so a halted vCPU can be woken then; `None`
    /// if channel 0 will not raise its output again (or the clock is stopped). Edges not yet
    /// collected by [`Pit::irq0_edges`] make this `now_tsc` (one is due); otherwise the result
    /// can be at or before `now_tsc` when `now_tsc` is past the last time advanced to, meaning
    /// an edge is due as well.
    pub fn next_irq0(&self, now_tsc: u64) -> Option<u64> {
        let state = self.state.lock();
        if state.irq0_pending > 0 {
            return Some(now_tsc);
        }
        state.next_irq0_tsc()
    }

    /// The output pin of `channel` (0..=2) at the last time advanced to; `None` for another
    /// channel number.
    pub fn output(&self, channel: u8) -> Option<bool> {
        let state = self.state.lock();
        let tick = state.tick;
        state
            .channels
            .get(usize::from(channel))
            .map(|channel| channel.output(tick))
    }

    /// The offset (0..=3) of byte `index` of an access at `port`, if it is one of the chip's.
    fn offset_of(port: u16, index: u8) -> Option<u16> {
        let offset = (u32::from(port) + u32::from(index)).checked_sub(u32::from(Self::BASE))?;
        u16::try_from(offset).ok().filter(|offset| *offset < 4)
    }
}

impl PortDevice for Pit {
    fn name(&self) -> &'static str {
        "i8254-pit"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        Self::BASE..=Self::CONTROL_PORT
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let mut state = self.state.lock();
        let mut value = 0;
        for index in 0..access_width(size) {
            let byte = match Self::offset_of(port, index) {
                Some(offset) => state.read_timer_port(offset),
                None => 0xFF,
            };
            value |= u32::from(byte) << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _events: &mut Vec<DeviceEvent>) {
        let mut state = self.state.lock();
        for (index, byte) in (0..access_width(size)).zip(value.to_le_bytes()) {
            if let Some(offset) = Self::offset_of(port, index) {
                state.write_timer_port(offset, byte);
            }
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// Port 0x61, NMI status and control (PC/AT "port B"): channel 2's gate and output, made by
/// [`Pit::nmi_status_control`]. See the module documentation.
#[derive(Debug)]
pub struct NmiStatusControl {
    state: Arc<Mutex<State>>,
}

impl NmiStatusControl {
    /// The port.
    pub const PORT: u16 = 0x61;

    /// The same as [`Pit::advance`] on the chip this port belongs to.
    pub fn advance(&mut self, now_tsc: u64) {
        self.state.lock().advance(now_tsc);
    }
}

impl PortDevice for NmiStatusControl {
    fn name(&self) -> &'static str {
        "nmi-status-control"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        Self::PORT..=Self::PORT
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let state = self.state.lock();
        let mut value = 0;
        for index in 0..access_width(size) {
            let byte = if u32::from(port) + u32::from(index) == u32::from(Self::PORT) {
                state.read_nmi_status_control()
            } else {
                0xFF
            };
            value |= u32::from(byte) << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _events: &mut Vec<DeviceEvent>) {
        let mut state = self.state.lock();
        for (index, byte) in (0..access_width(size)).zip(value.to_le_bytes()) {
            if u32::from(port) + u32::from(index) == u32::from(Self::PORT) {
                state.write_nmi_status_control(byte);
            }
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortBus;
    use alloc::boxed::Box;

    /// TSC cycles per PIT tick in most tests: tick `n` is TSC `n * 1000` exactly.
    const TSC_PER_TICK: u64 = 1000;
    const EXACT_TSC_HZ: u64 = Pit::INPUT_HZ * TSC_PER_TICK;

    const CHANNEL0: u16 = 0x40;
    const CHANNEL1: u16 = 0x41;
    const CHANNEL2: u16 = 0x42;
    const CONTROL: u16 = 0x43;
    const PORT_B: u16 = 0x61;

    /// The PIT and port 0x61 on a bus, with the TSC the hypervisor would pass.
    struct Rig {
        bus: PortBus,
        tsc: u64,
    }

    impl Rig {
        fn new(tsc_hz: u64) -> Self {
            let pit = Pit::new(tsc_hz);
            let port_b = pit.nmi_status_control();
            let mut bus = PortBus::new();
            bus.add(Box::new(pit)).unwrap();
            bus.add(Box::new(port_b)).unwrap();
            Self { bus, tsc: 0 }
        }

        fn exact() -> Self {
            Self::new(EXACT_TSC_HZ)
        }

        fn pit(&mut self) -> &mut Pit {
            self.bus.device_mut::<Pit>(Pit::BASE).unwrap()
        }

        /// Sets the TSC to `tsc` and advances the chip (what the hypervisor does before an
        /// access).
        fn at_tsc(&mut self, tsc: u64) -> &mut Self {
            self.tsc = tsc;
            self.pit().advance(tsc);
            self
        }

        /// The same at PIT tick `tick` (exact rigs only).
        fn at(&mut self, tick: u64) -> &mut Self {
            self.at_tsc(tick * TSC_PER_TICK)
        }

        fn out(&mut self, port: u16, value: u8) -> &mut Self {
            let tsc = self.tsc;
            self.pit().advance(tsc);
            let mut events = Vec::new();
            self.bus.write(port, 1, u32::from(value), &mut events);
            assert!(events.is_empty());
            self
        }

        fn inb(&mut self, port: u16) -> u8 {
            let tsc = self.tsc;
            self.pit().advance(tsc);
            self.bus.read(port, 1).value as u8
        }

        /// Channel `channel`'s output at tick `tick`.
        fn output_at(&mut self, channel: u8, tick: u64) -> bool {
            self.at(tick);
            self.pit().output(channel).unwrap()
        }

        /// The outputs of `channel` at ticks `from..to` as a string of 1s and 0s.
        fn waveform(&mut self, channel: u8, from: u64, to: u64) -> alloc::string::String {
            (from..to)
                .map(|tick| {
                    if self.output_at(channel, tick) {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect()
        }

        /// The waveform of `channel` at ticks `from..to` and its count latched at each tick.
        fn trace(&mut self, channel: u8, from: u64, to: u64) -> (alloc::string::String, Vec<u16>) {
            let mut counts = Vec::new();
            let waveform = (from..to)
                .map(|tick| {
                    let output = self.output_at(channel, tick);
                    counts.push(self.latched(channel));
                    if output {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect();
            (waveform, counts)
        }

        /// Reads a 16-bit count after a counter latch command (LSB then MSB access).
        fn latched(&mut self, channel: u8) -> u16 {
            self.out(CONTROL, channel << 6);
            let port = Pit::BASE + u16::from(channel);
            let least = self.inb(port);
            let most = self.inb(port);
            u16::from_le_bytes([least, most])
        }

        /// Programs `channel` in `mode` with LSB-then-MSB access and writes `count`.
        fn program(&mut self, channel: u8, mode: u8, count: u16) -> &mut Self {
            let port = Pit::BASE + u16::from(channel);
            let [least, most] = count.to_le_bytes();
            self.out(CONTROL, channel << 6 | 0x30 | mode << 1)
                .out(port, least)
                .out(port, most)
        }

        fn next_irq0(&mut self) -> Option<u64> {
            let tsc = self.tsc;
            self.pit().next_irq0(tsc)
        }

        fn edges(&mut self) -> u32 {
            let tsc = self.tsc;
            self.pit().irq0_edges(tsc)
        }
    }

    #[test]
    fn ports_and_power_up_state() {
        let mut rig = Rig::exact();
        assert_eq!(rig.bus.owner_name(0x40), Some("i8254-pit"));
        assert_eq!(rig.bus.owner_name(0x43), Some("i8254-pit"));
        assert_eq!(rig.bus.owner_name(0x61), Some("nmi-status-control"));
        for free in [0x3F, 0x44, 0x60, 0x62, 0x64] {
            assert_eq!(rig.bus.owner_name(free), None, "port {free:#x}");
        }
        assert_eq!(rig.pit().tsc_hz(), EXACT_TSC_HZ);
        assert_eq!(rig.inb(CONTROL), 0xFF, "control register is write-only");
        for channel in 0..3 {
            assert_eq!(rig.pit().output(channel), Some(true));
        }
        assert_eq!(rig.pit().output(3), None);
        // Nothing programmed: no IRQ 0, ever.
        rig.at(10_000_000);
        assert_eq!(rig.edges(), 0);
        assert_eq!(rig.next_irq0(), None);
        // Port 0x61: gate off, speaker off, no NMI status, timer 2 output high.
        assert_eq!(rig.inb(PORT_B) & !NMI_SC_REFRESH_TOGGLE, 0x20);
        // Wide accesses are split into bytes; bytes past the devices read 0xFF.
        assert_eq!(rig.bus.read(CONTROL, 2).value, 0xFFFF);
        assert_eq!(rig.bus.read(PORT_B, 2).value >> 8, 0xFF);
    }

    #[test]
    fn mode_0_interrupt_on_terminal_count() {
        let mut rig = Rig::exact();
        rig.at(100).out(CONTROL, 0x30);
        assert!(!rig.pit().output(0).unwrap(), "control word sets OUT low");
        rig.out(CHANNEL0, 10);
        assert!(!rig.pit().output(0).unwrap());
        rig.out(CHANNEL0, 0);
        // Loaded at tick 101 with 10; OUT rises N + 1 ticks after the write.
        let (waveform, counts) = rig.trace(0, 100, 114);
        assert_eq!(waveform, "00000000000111");
        // The counter wraps and goes on.
        assert_eq!(
            counts,
            [10, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0xFFFF, 0xFFFE]
        );
        assert_eq!(rig.edges(), 1);
        rig.at(1_000_000);
        assert_eq!(rig.edges(), 0, "one-shot: one edge");
        assert!(rig.pit().output(0).unwrap());
        // A new count restarts it: OUT goes low at once.
        rig.program(0, 0, 3);
        assert!(!rig.pit().output(0).unwrap());
        assert_eq!(rig.waveform(0, 1_000_000, 1_000_006), "000011");
        // The first byte of a two-byte count stops counting with OUT low.
        rig.out(CHANNEL0, 0x20);
        assert!(!rig.pit().output(0).unwrap());
        rig.at(2_000_000);
        assert!(!rig.pit().output(0).unwrap());
        rig.out(CHANNEL0, 0x00);
        assert_eq!(rig.waveform(0, 2_000_000, 2_000_034), "0".repeat(33) + "1");
        assert_eq!(rig.edges(), 2);
    }

    #[test]
    fn mode_2_rate_generator() {
        let mut rig = Rig::exact();
        rig.program(0, 2, 5);
        // Loaded at tick 1; low while the count is 1 (ticks 5, 10, 15...).
        assert_eq!(rig.next_irq0(), Some(6 * TSC_PER_TICK));
        let (waveform, counts) = rig.trace(0, 0, 17);
        assert_eq!(waveform, "11111011110111101");
        assert_eq!(counts, [5, 5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5, 4, 3, 2, 1, 5]);
        // Rising edges at ticks 6, 11, 16, 21.
        assert_eq!(rig.edges(), 3);
        assert_eq!(rig.next_irq0(), Some(21 * TSC_PER_TICK));
        rig.at(21);
        assert_eq!(rig.edges(), 1);
        assert_eq!(rig.next_irq0(), Some(26 * TSC_PER_TICK));
        // Count 0 is 0x10000.
        rig.program(0, 2, 0);
        rig.edges();
        rig.at(21 + 0x10000);
        assert_eq!(rig.edges(), 0);
        rig.at(22 + 0x10000);
        assert_eq!(rig.edges(), 1);
        // Mode bits X10 are mode 2 too.
        rig.out(CONTROL, 0x3C).out(CHANNEL0, 4).out(CHANNEL0, 0);
        rig.out(CONTROL, 0xC2);
        assert_eq!(rig.inb(CHANNEL0) & 0x0F, 0b1100, "status shows M = 110");
    }

    #[test]
    fn mode_3_square_wave() {
        let mut rig = Rig::exact();
        // Even count: 3 ticks high, 3 low, counting down by two.
        rig.program(0, 3, 6);
        let (waveform, counts) = rig.trace(0, 1, 19);
        assert_eq!(waveform, "111000111000111000");
        assert_eq!(counts[..7], [6, 4, 2, 6, 4, 2, 6]);
        rig.at(19);
        assert_eq!(rig.edges(), 3, "ticks 7, 13 and 19");
        // Odd count: (N + 1) / 2 high, (N - 1) / 2 low.
        rig.program(0, 3, 5);
        let (waveform, counts) = rig.trace(0, 20, 35);
        assert_eq!(waveform, "111001110011100");
        assert_eq!(counts[..5], [5, 4, 2, 5, 2]);
        // Edges at the start of each high half: ticks 25, 30.
        assert_eq!(rig.pit().irq0_edges(34 * TSC_PER_TICK), 2);
        assert_eq!(rig.pit().next_irq0(0), Some(35 * TSC_PER_TICK));
        // Count 1 is illegal: the output stays high and raises nothing. (The control word
        // raises OUT, low at tick 34: that is one edge.)
        rig.program(0, 3, 1);
        assert_eq!(rig.edges(), 1);
        assert_eq!(rig.waveform(0, 40, 50), "1111111111");
        assert_eq!(rig.edges(), 0);
        assert_eq!(rig.next_irq0(), None);
        rig.program(0, 2, 1);
        assert_eq!(rig.waveform(0, 50, 60), "1111111111");
        assert_eq!(rig.edges(), 0);
    }

    #[test]
    fn mode_4_software_strobe() {
        let mut rig = Rig::exact();
        rig.at(10).program(0, 4, 3);
        // Loaded at 11, reaches 0 at 14: low for that one tick.
        assert_eq!(rig.waveform(0, 10, 18), "11110111");
        assert_eq!(rig.edges(), 1);
        rig.at(100_000);
        assert_eq!(rig.edges(), 0);
        // Linux's one-shot: a new count re-arms it.
        rig.program(0, 4, 2);
        assert_eq!(rig.next_irq0(), Some(100_004 * TSC_PER_TICK));
        assert_eq!(rig.pit().irq0_edges(100_004 * TSC_PER_TICK), 1);
    }

    #[test]
    fn modes_1_and_5_need_a_gate_trigger() {
        let mut rig = Rig::exact();
        // Channel 0's gate is tied high: mode 1 never triggers.
        rig.program(0, 1, 4);
        assert_eq!(rig.waveform(0, 0, 10), "1111111111");
        assert_eq!(rig.edges(), 0);
        // Channel 2, mode 1: the rising gate at tick 10 loads the count at 11.
        rig.program(2, 1, 4);
        assert_eq!(rig.waveform(2, 0, 10), "1111111111");
        rig.at(10).out(PORT_B, 0x01);
        assert_eq!(rig.waveform(2, 10, 17), "1000011");
        // The gate going low does nothing; a new rising edge retriggers.
        rig.at(17).out(PORT_B, 0x00);
        assert!(rig.output_at(2, 17));
        rig.at(20).out(PORT_B, 0x01);
        assert_eq!(rig.waveform(2, 20, 22), "10");
        rig.at(22).out(PORT_B, 0x00).out(PORT_B, 0x01);
        assert_eq!(rig.waveform(2, 22, 29), "0000011");
        // Mode 5: the trigger starts a strobe N + 1 ticks later.
        rig.at(30).out(PORT_B, 0x00);
        rig.program(2, 5, 3);
        assert_eq!(rig.waveform(2, 30, 35), "11111");
        rig.at(35).out(PORT_B, 0x01);
        assert_eq!(rig.waveform(2, 35, 42), "1111011");
    }

    #[test]
    fn counter_latch_holds_the_count() {
        let mut rig = Rig::exact();
        rig.program(0, 2, 1000);
        rig.at(101).out(CONTROL, 0x00);
        // Latched at 900; a second latch before reading is ignored.
        rig.at(150).out(CONTROL, 0x00);
        assert_eq!(rig.inb(CHANNEL0), (900u16 & 0xFF) as u8);
        rig.at(200);
        assert_eq!(rig.inb(CHANNEL0), (900u16 >> 8) as u8);
        // Released: the next latch sees the new value.
        assert_eq!(rig.latched(0), 801);
        // Unlatched reads alternate LSB and MSB of the live count.
        rig.at(201);
        assert_eq!(rig.inb(CHANNEL0), 800u16.to_le_bytes()[0]);
        rig.at(202);
        assert_eq!(rig.inb(CHANNEL0), 799u16.to_le_bytes()[1]);
        // LSB-only and MSB-only access modes.
        rig.out(CONTROL, 0x54).out(CHANNEL1, 0x34);
        rig.at(203);
        assert_eq!(rig.inb(CHANNEL1), 0x34);
        rig.at(210).out(CONTROL, 0x40);
        rig.at(211);
        assert_eq!(rig.inb(CHANNEL1), 0x34 - 7, "latched LSB, one read");
        assert_eq!(rig.inb(CHANNEL1), 0x34 - 8, "released: live count");
        rig.out(CONTROL, 0x64).out(CHANNEL1, 0x12);
        rig.at(212);
        assert_eq!(rig.inb(CHANNEL1), 0x12, "MSB of 0x1200");
        rig.at(213);
        rig.out(CONTROL, 0x40);
        assert_eq!(rig.inb(CHANNEL1), 0x11, "MSB of 0x11FF, latched");
    }

    #[test]
    fn read_back_status_and_count() {
        let mut rig = Rig::exact();
        rig.at(50).out(CONTROL, 0xB0);
        // Read-back of channel 2's status: OUT low (mode 0), null count, RW 11, mode 0.
        rig.out(CONTROL, 0xE8);
        assert_eq!(rig.inb(CHANNEL2), 0x40 | 0x30);
        rig.out(CHANNEL2, 0x10).out(CHANNEL2, 0x00);
        rig.out(CONTROL, 0xE8);
        assert_eq!(rig.inb(CHANNEL2), 0x70, "null count until the load tick");
        rig.at(51).out(CONTROL, 0xE8);
        assert_eq!(rig.inb(CHANNEL2), 0x30, "gate low: loaded, not counting");
        rig.out(PORT_B, 0x01);
        // Status and count of channels 0 and 2 at tick 60: status first, then the count.
        rig.program(0, 3, 0x1234);
        rig.at(60).out(CONTROL, 0xCA);
        assert_eq!(rig.inb(CHANNEL0), 0x80 | 0x36, "OUT high, mode 3");
        rig.at(70);
        assert_eq!(rig.inb(CHANNEL0), 0x1234u16.wrapping_sub(2 * 8) as u8);
        assert_eq!(rig.inb(CHANNEL0), 0x12);
        assert_eq!(rig.inb(CHANNEL2), 0x30);
        assert_eq!(rig.inb(CHANNEL2), 0x10 - 9);
        assert_eq!(rig.inb(CHANNEL2), 0x00);
        // Status only; a second read-back before reading keeps the first status.
        rig.at(80).out(CONTROL, 0xE4);
        rig.program(1, 4, 5);
        assert_eq!(rig.pit().output(1), Some(true));
        rig.out(CONTROL, 0xE4);
        assert_eq!(
            rig.inb(CHANNEL1),
            0xF8,
            "new control word dropped the latch"
        );
        rig.at(95).out(CONTROL, 0xE4);
        rig.at(96).out(CONTROL, 0xE4);
        assert_eq!(rig.inb(CHANNEL1), 0xB8);
        // Count only; the live count follows.
        rig.at(97).out(CONTROL, 0xD4);
        assert_eq!(rig.inb(CHANNEL1), 0xF5, "5 - 16 wrapped");
        assert_eq!(rig.inb(CHANNEL1), 0xFF);
    }

    #[test]
    fn two_byte_writes_and_single_byte_modes() {
        let mut rig = Rig::exact();
        // LSB-only count in mode 2.
        rig.out(CONTROL, 0x14).out(CHANNEL0, 4);
        assert_eq!(rig.waveform(0, 0, 9), "111101110");
        // MSB-only: count 0x0100.
        rig.out(CONTROL, 0x24).out(CHANNEL0, 0x01);
        rig.at(10);
        rig.edges();
        // Loaded at tick 9: the first edge at 9 + 256.
        rig.at(8 + 256);
        assert_eq!(rig.edges(), 0);
        rig.at(9 + 256);
        assert_eq!(rig.edges(), 1);
        // LSB then MSB: a control word in between restarts the sequence.
        rig.out(CONTROL, 0x34).out(CHANNEL0, 0x99);
        rig.out(CONTROL, 0x34)
            .out(CHANNEL0, 0x03)
            .out(CHANNEL0, 0x00);
        rig.out(CONTROL, 0x00);
        assert_eq!(rig.inb(CHANNEL0), 3);
        assert_eq!(rig.inb(CHANNEL0), 0);
    }

    #[test]
    fn count_written_while_running_waits_for_the_period_end() {
        let mut rig = Rig::exact();
        rig.program(0, 2, 10);
        // Period ends at ticks 11, 21, 31...; at 15 write 4: it takes effect at 21.
        rig.at(15);
        rig.out(CHANNEL0, 4).out(CHANNEL0, 0);
        rig.out(CONTROL, 0xE2);
        assert_eq!(
            rig.inb(CHANNEL0),
            0x80 | 0x40 | 0x34,
            "OUT high, null count until the reload"
        );
        // The edge at 11 is due now; after it, the next is at 21.
        assert_eq!(rig.next_irq0(), Some(15 * TSC_PER_TICK));
        assert_eq!(rig.edges(), 1);
        assert_eq!(rig.next_irq0(), Some(21 * TSC_PER_TICK));
        assert_eq!(rig.waveform(0, 15, 30), "111110111011101");
        assert_eq!(rig.pit().irq0_edges(29 * TSC_PER_TICK), 3, "21, 25, 29");
        // Collected in one step across the reload.
        let mut other = Rig::exact();
        other.program(0, 2, 10);
        other.at(15).out(CHANNEL0, 4).out(CHANNEL0, 0);
        assert_eq!(other.pit().irq0_edges(29 * TSC_PER_TICK), 4);
        // A count 1 period followed by a real count: next_irq0 looks past the reload.
        let mut rig = Rig::exact();
        rig.program(0, 2, 1);
        rig.at(5).out(CHANNEL0, 3).out(CHANNEL0, 0);
        assert_eq!(rig.next_irq0(), Some(9 * TSC_PER_TICK));
        assert_eq!(rig.pit().irq0_edges(9 * TSC_PER_TICK), 1);
    }

    #[test]
    fn a_control_word_that_raises_out_is_an_edge() {
        let mut rig = Rig::exact();
        // Linux's clockevent shutdown leaves mode 0; setting periodic mode raises OUT.
        rig.out(CONTROL, 0x30).out(CHANNEL0, 0).out(CHANNEL0, 0);
        assert_eq!(rig.edges(), 0);
        rig.at(100).out(CONTROL, 0x34);
        assert_eq!(rig.edges(), 1);
        // Other channels do not touch IRQ 0.
        rig.out(CONTROL, 0x70).out(CONTROL, 0x74).out(CONTROL, 0xB0);
        assert_eq!(rig.edges(), 0);
    }

    #[test]
    fn channel_2_gate_and_output_through_port_0x61() {
        let mut rig = Rig::exact();
        // Bits 0-3 read back; writes to 4-7 are ignored.
        rig.out(PORT_B, 0xFE);
        assert_eq!(rig.inb(PORT_B) & 0xCF, 0x0E);
        rig.out(PORT_B, 0x00);
        // Mode 0 on channel 2 with the gate low: loaded, but not counting.
        rig.program(2, 0, 5);
        rig.at(100);
        assert_eq!(rig.inb(PORT_B) & NMI_SC_TIMER2_OUTPUT, 0);
        assert_eq!(rig.latched(2), 5);
        // Gate high at 100: counts 5 ticks, OUT high at 105.
        rig.out(PORT_B, 0x01);
        rig.at(104);
        assert_eq!(rig.inb(PORT_B) & NMI_SC_TIMER2_OUTPUT, 0);
        // Gate low at 104 for 50 ticks freezes the count at 1.
        rig.out(PORT_B, 0x00);
        rig.at(154);
        assert_eq!(rig.latched(2), 1);
        assert_eq!(rig.inb(PORT_B) & NMI_SC_TIMER2_OUTPUT, 0);
        rig.out(PORT_B, 0x03);
        rig.at(155);
        assert_eq!(rig.inb(PORT_B), 0x03 | NMI_SC_TIMER2_OUTPUT);
        // Mode 3 on channel 2 (the PC speaker): a low gate forces OUT high and stops it; a
        // rising gate restarts the period.
        rig.program(2, 3, 4);
        rig.at(160);
        assert_eq!(rig.waveform(2, 160, 166), "110011");
        rig.at(166).out(PORT_B, 0x02);
        assert_eq!(rig.waveform(2, 166, 170), "1111");
        rig.at(170).out(PORT_B, 0x03);
        assert_eq!(rig.waveform(2, 170, 176), "111001");
        // Channel 2 never raises IRQ 0.
        assert_eq!(rig.edges(), 0);
    }

    #[test]
    fn refresh_toggle_flips_about_every_15_microseconds() {
        let mut rig = Rig::new(3_000_000_000);
        let mut flips = 0;
        let mut last = rig.inb(PORT_B) & NMI_SC_REFRESH_TOGGLE;
        // One millisecond in steps of 1 µs.
        for microsecond in 1..=1000u64 {
            rig.at_tsc(microsecond * 3000);
            let bit = rig.inb(PORT_B) & NMI_SC_REFRESH_TOGGLE;
            if bit != last {
                flips += 1;
            }
            last = bit;
        }
        // 1 ms / 15.09 µs = 66.3 flips.
        assert!((65..=67).contains(&flips), "{flips} flips");
    }

    /// Linux's `pit_calibrate_tsc` (arch/x86/kernel/tsc.c): gate on with the speaker off,
    /// channel 2 in mode 0 with `latch`, then poll port 0x61 bit 5 while reading the TSC.
    /// Returns the TSC frequency in kHz it computes, or `None` where Linux gives up.
    fn linux_pit_calibrate_tsc(
        rig: &mut Rig,
        latch: u16,
        ms: u64,
        loopmin: u64,
        tsc_per_poll: u64,
    ) -> Option<u64> {
        let port_b = rig.inb(PORT_B);
        rig.out(PORT_B, (port_b & !0x02) | 0x01);
        rig.out(CONTROL, 0xB0);
        rig.out(CHANNEL2, (latch & 0xFF) as u8);
        rig.out(CHANNEL2, (latch >> 8) as u8);
        let t1 = rig.tsc;
        let mut t2 = t1;
        let mut polls = 0u64;
        loop {
            // The IN itself takes time.
            let now = rig.tsc + tsc_per_poll;
            rig.at_tsc(now);
            if rig.inb(PORT_B) & 0x20 != 0 {
                break;
            }
            t2 = rig.tsc;
            polls += 1;
            assert!(polls < 100_000_000, "output never rose");
        }
        (polls >= loopmin).then(|| (t2 - t1) / ms)
    }

    #[test]
    fn linux_pit_calibrate_tsc_finds_the_tsc_frequency() {
        for tsc_hz in [
            2_593_907_000u64,
            3_000_000_000,
            1_000_000_000,
            4_712_345_678,
        ] {
            for (ms, tsc_per_poll) in [(10u64, 1700u64), (50, 2300)] {
                let mut rig = Rig::new(tsc_hz);
                rig.at_tsc(987_654_321_987);
                // CAL_LATCH / CAL2_LATCH: PIT_TICK_RATE / (1000 / ms).
                let latch = (Pit::INPUT_HZ / (1000 / ms)) as u16;
                let khz = linux_pit_calibrate_tsc(&mut rig, latch, ms, 1000, tsc_per_poll)
                    .expect("enough polls");
                let expected_khz = tsc_hz / 1000;
                let error = khz.abs_diff(expected_khz) as f64 / expected_khz as f64;
                assert!(
                    error < 0.001,
                    "{tsc_hz} Hz, {ms} ms: {khz} kHz, error {error}"
                );
            }
        }
    }

    /// Linux's `quick_pit_calibrate`: mode 0 from 0xFFFF on channel 2, then watch the MSB
    /// (read LSB, then MSB) step down, taking the TSC when it changes.
    #[test]
    fn linux_quick_pit_calibrate_sees_the_msb_step_every_256_ticks() {
        let tsc_hz = 2_893_300_000u64;
        let mut rig = Rig::new(tsc_hz);
        rig.at_tsc(5_000_000_000);
        let port_b = rig.inb(PORT_B);
        rig.out(PORT_B, (port_b & !0x02) | 0x01);
        rig.out(CONTROL, 0xB0)
            .out(CHANNEL2, 0xFF)
            .out(CHANNEL2, 0xFF);
        let read_msb = |rig: &mut Rig| {
            let now = rig.tsc + 1500;
            rig.at_tsc(now);
            rig.inb(CHANNEL2);
            let now = rig.tsc + 1500;
            rig.at_tsc(now);
            rig.inb(CHANNEL2)
        };
        read_msb(&mut rig);
        // pit_expect_msb: spin while the MSB is `value`, keeping the TSC of the last read that
        // still saw it.
        let expect_msb = |rig: &mut Rig, value: u8| {
            let mut count = 0;
            let mut tsc = 0;
            while read_msb(rig) == value {
                tsc = rig.tsc;
                count += 1;
                assert!(count < 50_000);
            }
            assert!(count > 5, "MSB {value:#x} seen only {count} times");
            tsc
        };
        let start = expect_msb(&mut rig, 0xFF);
        let mut end = start;
        for step in 1..=200u8 {
            end = expect_msb(&mut rig, 0xFF - step);
        }
        // delta * PIT_TICK_RATE / (i * 256) in kHz.
        let khz = u128::from(end - start) * u128::from(Pit::INPUT_HZ) / (200 * 256 * 1000);
        let error = (khz as f64 - tsc_hz as f64 / 1000.0).abs() / (tsc_hz as f64 / 1000.0);
        assert!(error < 0.001, "{khz} kHz, error {error}");
    }

    /// Channel 0 programmed as Linux's periodic clockevent (`pit_set_periodic`: control word
    /// 0x34, then `PIT_LATCH` = (PIT_TICK_RATE + HZ / 2) / HZ, LSB then MSB).
    fn periodic_edges_over_one_second(hz: u64, tsc_hz: u64, step: u64) -> (u64, u64) {
        let mut rig = Rig::new(tsc_hz);
        let start = 123_456_789_000;
        rig.at_tsc(start);
        let latch = ((Pit::INPUT_HZ + hz / 2) / hz) as u16;
        rig.program(0, 2, latch);
        let start_tick = rig.pit().state.lock().tick;
        let mut total = 0u64;
        let mut tsc = start;
        while tsc < start + tsc_hz {
            tsc = (tsc + step).min(start + tsc_hz);
            total += u64::from(rig.pit().irq0_edges(tsc));
        }
        // Edges at the load tick (write + 1) plus every multiple of the period.
        let end_tick = rig.pit().state.lock().tick;
        let expected = (end_tick - (start_tick + 1)) / u64::from(latch);
        (total, expected)
    }

    #[test]
    fn periodic_irq0_at_hz_1000_and_250() {
        for step in [1_000_000u64, 77_777_777, 3_000_000_000] {
            let (edges, expected) = periodic_edges_over_one_second(1000, 3_000_000_000, step);
            assert_eq!(edges, 1000, "HZ=1000, step {step}");
            assert_eq!(edges, expected);
            // PIT_LATCH 4773 at HZ=250 is 249.98 Hz: 249 edges in the first second.
            let (edges, expected) = periodic_edges_over_one_second(250, 2_500_000_000, step);
            assert_eq!(edges, 249, "HZ=250, step {step}");
            assert_eq!(edges, expected);
        }
    }

    /// Linux's i8253 clockevent (drivers/clocksource/i8253.c): periodic, shutdown, one-shot.
    #[test]
    fn linux_clockevent_sequences() {
        let mut rig = Rig::exact();
        // pit_set_periodic at HZ=1000: 0x34, PIT_LATCH 1193.
        rig.program(0, 2, 1193);
        rig.at(1 + 10 * 1193);
        assert_eq!(rig.edges(), 10);
        // pit_shutdown (6.1): 0x30, then count 0: OUT low, one last edge 0x10000 ticks on.
        rig.out(CONTROL, 0x30).out(CHANNEL0, 0).out(CHANNEL0, 0);
        let shutdown = 1 + 10 * 1193;
        assert_eq!(
            rig.next_irq0(),
            Some((shutdown + 1 + 0x10000) * TSC_PER_TICK)
        );
        rig.at(shutdown + 10 * 0x10000);
        assert_eq!(rig.edges(), 1);
        // Newer kernels write 0x30 again after the count: no edge at all.
        rig.out(CONTROL, 0x30)
            .out(CHANNEL0, 0)
            .out(CHANNEL0, 0)
            .out(CONTROL, 0x30);
        assert_eq!(rig.edges(), 0);
        assert_eq!(rig.next_irq0(), None);
        // pit_set_oneshot: 0x38 (mode 4) raises OUT from mode 0's low: one edge.
        rig.out(CONTROL, 0x38);
        assert_eq!(rig.edges(), 1);
        // pit_next_event(100): the strobe ends 101 ticks after the write.
        let now = shutdown + 10 * 0x10000;
        rig.out(CHANNEL0, 100).out(CHANNEL0, 0);
        assert_eq!(rig.next_irq0(), Some((now + 102) * TSC_PER_TICK));
        rig.at(now + 101);
        assert_eq!(rig.edges(), 0);
        rig.at(now + 102);
        assert_eq!(rig.edges(), 1);
        rig.at(now + 1_000_000);
        assert_eq!(rig.edges(), 0);
    }

    #[test]
    fn next_irq0_wakes_exactly_at_each_edge() {
        let mut rig = Rig::new(2_100_000_000);
        rig.at_tsc(42_000_000);
        rig.program(0, 2, 1193);
        let mut tsc = rig.tsc;
        for _ in 0..50 {
            let next = rig.pit().next_irq0(tsc).unwrap();
            assert!(next > tsc);
            assert_eq!(
                rig.pit().irq0_edges(next - 1),
                0,
                "no edge before the wake-up"
            );
            assert_eq!(rig.pit().irq0_edges(next), 1, "the edge at the wake-up");
            tsc = next;
        }
        // An uncollected edge is due now.
        let next = rig.pit().next_irq0(tsc).unwrap();
        rig.pit().advance(next + 10);
        assert_eq!(rig.pit().next_irq0(next + 20), Some(next + 20));
    }

    #[test]
    fn time_never_goes_backwards() {
        let mut rig = Rig::exact();
        rig.program(0, 0, 100);
        rig.at(50);
        let count = rig.latched(0);
        rig.at(10);
        assert_eq!(rig.latched(0), count);
        rig.at(60);
        assert_eq!(rig.latched(0), count - 10);
    }

    #[test]
    fn stopped_clock_and_extreme_times() {
        let mut rig = Rig::new(0);
        rig.program(0, 2, 2);
        rig.at_tsc(u64::MAX);
        assert_eq!(rig.edges(), 0);
        assert_eq!(rig.pit().next_irq0(u64::MAX), None);
        assert_eq!(rig.latched(0), 2);
        // A 1 Hz TSC makes huge tick numbers; nothing overflows.
        let mut rig = Rig::new(1);
        rig.program(0, 2, 2);
        rig.at_tsc(u64::MAX / 2);
        rig.edges();
        rig.at_tsc(u64::MAX);
        rig.edges();
        rig.pit().next_irq0(u64::MAX);
        rig.program(0, 3, 0);
        rig.program(2, 0, 0);
        rig.out(PORT_B, 1);
        rig.latched(0);
        rig.inb(PORT_B);
    }

    #[test]
    fn hostile_sequences_are_safe_and_consistent() {
        let mut rig = Rig::new(2_000_000_000);
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut events = Vec::new();
        for _ in 0..200_000 {
            let random = next();
            let port =
                [0x3F, 0x40, 0x41, 0x42, 0x43, 0x44, 0x60, 0x61, 0x62][(random % 9) as usize];
            let size = [0, 1, 2, 4, 255][((random >> 8) % 5) as usize];
            let value = (random >> 16) as u32;
            let tsc = rig.tsc + (random >> 40) % 50_000;
            rig.at_tsc(tsc);
            if random & (1 << 60) != 0 {
                rig.bus.write(port, size, value, &mut events);
            } else {
                rig.bus.read(port, size);
            }
            let edges = rig.edges();
            // At most one edge per two ticks (count 2), plus one from a control word.
            assert!(u64::from(edges) <= 50_000 / 2 / 1000 + 2, "{edges} edges");
            if let Some(wake) = rig.next_irq0() {
                assert!(wake > rig.tsc, "edges were just collected");
            }
            for channel in 0..3 {
                rig.pit().output(channel).unwrap();
            }
        }
        assert!(events.is_empty());
    }

    #[test]
    fn every_byte_on_every_port_is_safe() {
        let mut rig = Rig::exact();
        let mut events = Vec::new();
        for byte in 0..=255u8 {
            for port in [0x40, 0x41, 0x42, 0x43, 0x61] {
                for size in [0, 1, 2, 4, 255] {
                    rig.at_tsc(rig.tsc + 700);
                    rig.bus
                        .write(port, size, u32::from(byte) * 0x0101_0101, &mut events);
                    rig.bus.read(port, size);
                }
            }
        }
        let mut pit = Pit::new(EXACT_TSC_HZ);
        let mut port_b = pit.nmi_status_control();
        for port in [0, 0x3F, 0x44, 0x60, 0x62, u16::MAX] {
            for size in [1, 2, 4] {
                assert_eq!(pit.read(port, size) & 0xFF, 0xFF);
                assert_eq!(port_b.read(port, size) & 0xFF, 0xFF);
                pit.write(port, size, u32::MAX, &mut events);
                port_b.write(port, size, u32::MAX, &mut events);
            }
        }
        port_b.advance(1000);
        assert!(events.is_empty());
    }
}
