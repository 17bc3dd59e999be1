//! Per-VM exit statistics: how many exits of each reason and how many TSC cycles the
//! hypervisor spent handling them (from the exit to the next entry).

use crate::exit::Reason;
use alloc::string::String;
use core::fmt::Write;

/// Count and handling cycles of one reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonStats {
    pub count: u64,
    pub cycles: u64,
}

/// The statistics of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    reasons: [ReasonStats; Reason::ALL.len()],
    /// Cycles spent in the guest (entry to exit).
    pub guest_cycles: u64,
    /// Accesses to ports no device owns.
    pub unowned_port_accesses: u64,
}

impl ExitStats {
    pub fn record(&mut self, reason: Reason, handling_cycles: u64) {
        let entry = &mut self.reasons[reason.index()];
        entry.count += 1;
        entry.cycles += handling_cycles;
    }

    pub fn get(&self, reason: Reason) -> ReasonStats {
        self.reasons[reason.index()]
    }

    /// TSC cycles spent handling every exit so far.
    pub fn total_cycles(&self) -> u64 {
        self.reasons.iter().map(|entry| entry.cycles).sum()
    }

    pub fn total_exits(&self) -> u64 {
        self.reasons.iter().map(|entry| entry.count).sum()
    }

    /// Exits the guest's own instructions caused, and their cycles: every exit except those of
    /// the host's making (a host interrupt, the interrupt window, the preemption timer), whose
    /// number depends on the host's timer and the other VMs, not on the guest.
    pub fn guest_caused(&self) -> ReasonStats {
        let mut total = ReasonStats::default();
        for reason in Reason::ALL {
            if !reason.made_by_the_host() {
                let entry = self.get(reason);
                total.count += entry.count;
                total.cycles += entry.cycles;
            }
        }
        total
    }

    /// The table printed when a VM ends, one line per reason that occurred:
    /// `  reason             count   cycles   avg`.
    pub fn table(&self) -> String {
        let mut table = String::new();
        let _ = writeln!(
            table,
            "  {:<18} {:>10} {:>14} {:>10}",
            "exit reason", "count", "cycles", "avg"
        );
        for reason in Reason::ALL {
            let entry = self.get(reason);
            if entry.count == 0 {
                continue;
            }
            let _ = writeln!(
                table,
                "  {:<18} {:>10} {:>14} {:>10}",
                reason.name(),
                entry.count,
                entry.cycles,
                entry.cycles / entry.count
            );
        }
        let _ = write!(
            table,
            "  {:<18} {:>10} {:>14}\n  guest cycles {}, unowned port accesses {}",
            "total",
            self.total_exits(),
            self.reasons.iter().map(|entry| entry.cycles).sum::<u64>(),
            self.guest_cycles,
            self.unowned_port_accesses
        );
        table
    }
}

/// How many exits [`RecentExits`] keeps.
pub const RECENT_EXITS: usize = 16;

/// One exit as [`RecentExits`] keeps it: why, where, and one number that tells more (the
/// guest-physical address of a nested page fault, the port of an I/O exit, the MSR of an MSR
/// exit, else 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecentExit {
    pub reason: Reason,
    pub rip: u64,
    pub detail: u64,
}

/// A vCPU's flight recorder: its last [`RECENT_EXITS`] exits, oldest first when read, so a
/// guest that dies (a triple fault says nothing of why) leaves a trail in the report.
#[derive(Clone, Debug, Default)]
pub struct RecentExits {
    ring: [Option<RecentExit>; RECENT_EXITS],
    next: usize,
}

impl RecentExits {
    pub fn record(&mut self, exit: RecentExit) {
        self.ring[self.next] = Some(exit);
        self.next = (self.next + 1) % RECENT_EXITS;
    }

    /// The exits kept, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &RecentExit> {
        self.ring[self.next..]
            .iter()
            .chain(&self.ring[..self.next])
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_table() {
        let mut stats = ExitStats::default();
        stats.record(Reason::Cpuid, 100);
        stats.record(Reason::Cpuid, 300);
        stats.record(Reason::Io, 50);
        assert_eq!(
            stats.get(Reason::Cpuid),
            ReasonStats {
                count: 2,
                cycles: 400
            }
        );
        assert_eq!(stats.total_exits(), 3);
        let table = stats.table();
        assert!(table.contains("cpuid"), "{table}");
        assert!(table.contains("200"), "{table}");
        assert!(!table.contains("msr-read"), "{table}");
    }

    #[test]
    fn the_flight_recorder_keeps_the_last_exits_oldest_first() {
        let mut recent = RecentExits::default();
        assert_eq!(recent.iter().count(), 0);
        for rip in 0..(RECENT_EXITS as u64 + 3) {
            recent.record(RecentExit {
                reason: Reason::Halt,
                rip,
                detail: 0,
            });
        }
        let rips: Vec<u64> = recent.iter().map(|exit| exit.rip).collect();
        let expected: Vec<u64> = (3..RECENT_EXITS as u64 + 3).collect();
        assert_eq!(rips, expected);
    }
}
