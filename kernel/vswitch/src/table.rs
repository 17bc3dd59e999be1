//! The MAC learning table: which port a source address was last seen on, with ageing and a
//! size bound. See: IEEE 802.1Q-2018 8.7 (the learning process) and 8.8.3 (dynamic filtering
//! entries, aged out after the ageing time, default 300 s, table 8-6).
//!
//! Only learned (dynamic) entries live here; the addresses of VM ports are pinned by the
//! switch and never enter the table. Time is whatever monotonic `u64` the caller passes
//! (milliseconds, TSC ticks...): the ageing time is in the same unit. A timestamp older than
//! an entry's (time going backwards) gives that entry an age of zero rather than a panic.

use alloc::collections::BTreeMap;

use crate::{MacAddress, PortId};

#[derive(Clone, Copy, Debug)]
struct Entry {
    port: PortId,
    last_seen: u64,
    /// Key in `by_refresh`: entries are ordered by when they were last refreshed.
    order: u64,
}

/// Counters of the learning table, switch-wide.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// New entries (an address not in the table was learned).
    pub learned: u64,
    /// Entries removed because they were not refreshed within the ageing time.
    pub aged: u64,
    /// Entries removed to make room (the table was full): the least recently refreshed goes.
    pub evicted: u64,
    /// An address seen on a different port than its entry named (the station moved).
    pub moved: u64,
}

/// A bounded learning table: at most `capacity` entries, each forgotten `ageing_time` after it
/// was last refreshed. Every operation is O(log capacity).
#[derive(Debug)]
pub struct MacTable {
    entries: BTreeMap<MacAddress, Entry>,
    /// Refresh order -> address: the first is the least recently refreshed (the oldest while
    /// time is monotonic), the one eviction and ageing look at.
    by_refresh: BTreeMap<u64, MacAddress>,
    next_order: u64,
    capacity: usize,
    ageing_time: u64,
    stats: TableStats,
}

impl MacTable {
    /// An empty table. `capacity` 0 disables learning (every unicast floods).
    pub fn new(capacity: usize, ageing_time: u64) -> MacTable {
        MacTable {
            entries: BTreeMap::new(),
            by_refresh: BTreeMap::new(),
            next_order: 0,
            capacity,
            ageing_time,
            stats: TableStats::default(),
        }
    }

    fn expired(&self, entry: &Entry, now: u64) -> bool {
        now.saturating_sub(entry.last_seen) >= self.ageing_time
    }

    /// Records that `mac` was seen as a source on `port` at `now`: refreshes its entry (moving
    /// it when the port changed) or adds one, evicting the least recently refreshed entry when
    /// the table is full. The caller has checked that `mac` is a valid source.
    pub fn learn(&mut self, mac: MacAddress, port: PortId, now: u64) {
        if self.capacity == 0 {
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        if let Some(entry) = self.entries.get_mut(&mac) {
            if entry.port != port {
                entry.port = port;
                self.stats.moved += 1;
            }
            entry.last_seen = now;
            self.by_refresh.remove(&entry.order);
            entry.order = order;
            self.by_refresh.insert(order, mac);
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_refresh.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
            self.stats.evicted += 1;
        }
        self.entries.insert(
            mac,
            Entry {
                port,
                last_seen: now,
                order,
            },
        );
        self.by_refresh.insert(order, mac);
        self.stats.learned += 1;
    }

    /// The port `mac` was learned on, unless its entry has aged out by `now`.
    pub fn lookup(&self, mac: MacAddress, now: u64) -> Option<PortId> {
        let entry = self.entries.get(&mac)?;
        (!self.expired(entry, now)).then_some(entry.port)
    }

    /// Removes the entries not refreshed within the ageing time before `now`; returns how
    /// many. Walks from the least recently refreshed and stops at the first live entry.
    pub fn age(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while let Some((&order, &mac)) = self.by_refresh.first_key_value() {
            match self.entries.get(&mac) {
                Some(entry) if !self.expired(entry, now) => break,
                _ => {}
            }
            self.by_refresh.remove(&order);
            self.entries.remove(&mac);
            removed += 1;
        }
        self.stats.aged += removed as u64;
        removed
    }

    /// Forgets `mac` (it was given to a VM port, which pins it).
    pub fn forget(&mut self, mac: MacAddress) {
        if let Some(entry) = self.entries.remove(&mac) {
            self.by_refresh.remove(&entry.order);
        }
    }

    /// Forgets every address learned on `port` (the port was removed).
    pub fn forget_port(&mut self, port: PortId) {
        let by_refresh = &mut self.by_refresh;
        self.entries.retain(|_, entry| {
            let keep = entry.port != port;
            if !keep {
                by_refresh.remove(&entry.order);
            }
            keep
        });
    }

    /// Entries in the table (some may be expired and not yet aged out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Is the table empty?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// The counters.
    pub fn stats(&self) -> &TableStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddress {
        MacAddress([0x02, 0, 0, 0, 0, n])
    }
    fn port(n: u16) -> PortId {
        PortId::for_tests(n)
    }

    #[test]
    fn learn_lookup_move() {
        let mut table = MacTable::new(4, 100);
        table.learn(mac(1), port(0), 0);
        assert_eq!(table.lookup(mac(1), 10), Some(port(0)));
        assert_eq!(table.lookup(mac(2), 10), None);
        table.learn(mac(1), port(1), 20);
        assert_eq!(table.lookup(mac(1), 20), Some(port(1)));
        assert_eq!(table.stats().learned, 1);
        assert_eq!(table.stats().moved, 1);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn ageing() {
        let mut table = MacTable::new(4, 100);
        table.learn(mac(1), port(0), 0);
        table.learn(mac(2), port(0), 50);
        assert_eq!(table.lookup(mac(1), 99), Some(port(0)));
        // Expired entries are not found even before `age` removes them.
        assert_eq!(table.lookup(mac(1), 100), None);
        assert_eq!(table.age(120), 1);
        assert_eq!(table.len(), 1);
        // A refresh restarts the clock.
        table.learn(mac(2), port(0), 140);
        assert_eq!(table.age(200), 0);
        assert_eq!(table.age(240), 1);
        assert!(table.is_empty());
        assert_eq!(table.stats().aged, 2);
    }

    #[test]
    fn time_going_backwards_does_not_panic() {
        let mut table = MacTable::new(4, 100);
        table.learn(mac(1), port(0), 1000);
        assert_eq!(table.lookup(mac(1), 5), Some(port(0)));
        assert_eq!(table.age(5), 0);
    }

    #[test]
    fn size_bound_evicts_least_recently_refreshed() {
        let mut table = MacTable::new(3, 1000);
        for n in 1..=3 {
            table.learn(mac(n), port(0), u64::from(n));
        }
        // Refresh 1: now 2 is the oldest.
        table.learn(mac(1), port(0), 10);
        table.learn(mac(4), port(0), 11);
        assert_eq!(table.len(), 3);
        assert_eq!(table.lookup(mac(2), 11), None);
        assert_eq!(table.lookup(mac(1), 11), Some(port(0)));
        assert_eq!(table.lookup(mac(4), 11), Some(port(0)));
        assert_eq!(table.stats().evicted, 1);
        for n in 10..100 {
            table.learn(mac(n), port(1), 20);
            assert!(table.len() <= 3);
        }
        assert_eq!(table.stats().evicted, 91);
    }

    #[test]
    fn zero_capacity_learns_nothing() {
        let mut table = MacTable::new(0, 1000);
        table.learn(mac(1), port(0), 0);
        assert_eq!(table.lookup(mac(1), 0), None);
    }

    #[test]
    fn forget() {
        let mut table = MacTable::new(8, 1000);
        table.learn(mac(1), port(0), 0);
        table.learn(mac(2), port(1), 0);
        table.learn(mac(3), port(1), 0);
        table.forget_port(port(1));
        assert_eq!(table.len(), 1);
        table.forget(mac(1));
        assert!(table.is_empty());
        assert_eq!(table.age(u64::MAX), 0);
    }
}
