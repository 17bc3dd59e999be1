//! Keyboard input from the hypervisor's serial console to one selected VM at a time: which VM
//! has the input, the escape sequence that switches it, and what the hypervisor says when it
//! does. Pure: the kernel (`kernel/ringzero/src/console_input.rs`) reads the host's COM1 and
//! hands each byte to [`ConsoleSwitch::input`]; this module decides where it goes.
//!
//! The escape character is Ctrl-A (0x01), as in QEMU's `-nographic` mux, GNU screen and
//! minicom, so it is the one people already reach for. The byte after it is a command:
//!
//! | keys | effect |
//! |---|---|
//! | Ctrl-A `n` | input to the next VM that still runs (in configuration order, wrapping) |
//! | Ctrl-A `1`..`9` | input to VM number 1..9 (configuration order) if it still runs |
//! | Ctrl-A `?` or `h` | help: the keys and the VMs with their numbers |
//! | Ctrl-A Ctrl-A | one literal Ctrl-A to the selected VM |
//! | Ctrl-A anything else | ignored (both bytes), with a one-line hint |
//!
//! Why Ctrl-A cannot take anything from a guest: printable text and the usual editing keys
//! (Enter, Backspace, Tab, arrows and other ESC sequences, Ctrl-C, Ctrl-D) never contain the
//! byte 0x01, so they all pass through untouched; the one key it takes, Ctrl-A itself
//! (beginning-of-line in shells), is still reachable by typing it twice. Every byte sequence a
//! guest could want can thus be sent. A prefix with a command byte (rather than a lone key) means
//! a single stray Ctrl-A never switches anything by itself.
//!
//! Input goes to the first VM at start. When the VM holding the input ends, the input moves to
//! the next VM that still runs (announced); when none runs, bytes are dropped.

use crate::vm::Vm;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use ringzero_devices::Uart16550;

/// The escape character: Ctrl-A.
pub const ESCAPE: u8 = 0x01;
/// The reminder at the end of every switch line.
const KEYS_HINT: &str = "Ctrl-A n: next, Ctrl-A ?: help";

/// What one input byte asks the hypervisor to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing (the byte began an escape sequence, or no VM takes input).
    None,
    /// Queue `byte` on VM number `vm`'s console (its COM1 receiver).
    Deliver { vm: usize, byte: u8 },
    /// Print this text on the hypervisor's console (one or more lines, no final newline).
    Say(String),
}

/// One VM as the switch sees it.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    running: bool,
}

/// Who has the console input, and whether an escape sequence has begun.
#[derive(Clone, Debug)]
pub struct ConsoleSwitch {
    targets: Vec<Target>,
    selected: Option<usize>,
    escape_pending: bool,
}

impl ConsoleSwitch {
    /// The switch for VMs named `names`, numbered by their position (VM index 0 is "vm 1" to
    /// the user). Input starts with the first VM; with no VM it goes nowhere.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> ConsoleSwitch {
        let targets: Vec<Target> = names
            .into_iter()
            .map(|name| Target {
                name: name.into(),
                running: true,
            })
            .collect();
        let selected = if targets.is_empty() { None } else { Some(0) };
        ConsoleSwitch {
            targets,
            selected,
            escape_pending: false,
        }
    }

    /// The VM index that has the input, if any VM does.
    pub fn selected(&self) -> Option<usize> {
        self.selected
    }

    /// The line that says where the input goes now (printed at boot and at every switch):
    /// `ringzero: console input -> vm NAME (Ctrl-A n: next, Ctrl-A ?: help)`.
    pub fn announcement(&self) -> String {
        match self.selected {
            Some(index) => format!(
                "ringzero: console input -> vm {} ({KEYS_HINT})",
                self.targets[index].name
            ),
            None => String::from("ringzero: console input -> none (no VM is running)"),
        }
    }

    /// The help text: the keys, then one line per VM with its number and state.
    pub fn help(&self) -> String {
        let mut text = String::from(
            "ringzero: console input keys: Ctrl-A n next VM, Ctrl-A 1..9 VM by number, \
             Ctrl-A Ctrl-A a literal Ctrl-A, Ctrl-A ? this help",
        );
        for (index, target) in self.targets.iter().enumerate() {
            let state = if self.selected == Some(index) {
                "has the input"
            } else if target.running {
                "running"
            } else {
                "ended"
            };
            text.push_str(&format!(
                "\nringzero: console input vm {} {} ({state})",
                index + 1,
                target.name
            ));
        }
        text
    }

    /// One byte typed on the hypervisor's console: where it goes, or what to say.
    pub fn input(&mut self, byte: u8) -> Action {
        if !self.escape_pending {
            if byte == ESCAPE {
                self.escape_pending = true;
                return Action::None;
            }
            return self.deliver(byte);
        }
        self.escape_pending = false;
        match byte {
            ESCAPE => self.deliver(ESCAPE),
            b'n' | b'N' => self.select_next(),
            b'1'..=b'9' => self.select_number(usize::from(byte - b'0')),
            b'?' | b'h' | b'H' => Action::Say(self.help()),
            other => Action::Say(format!(
                "ringzero: console input: Ctrl-A {} is not a command, ignored (Ctrl-A ?: help)",
                printable(other)
            )),
        }
    }

    /// VM `vm` has ended (or cannot take input). If it had the input, the input moves to the
    /// next running VM; returns the announcement to print then.
    pub fn vm_ended(&mut self, vm: usize) -> Option<String> {
        self.vms_ended([vm])
    }

    /// Several VMs have ended at once: all are marked first, so the input moves (at most once)
    /// straight to a VM that still runs; returns the announcement to print then.
    pub fn vms_ended(&mut self, vms: impl IntoIterator<Item = usize>) -> Option<String> {
        for vm in vms {
            if let Some(target) = self.targets.get_mut(vm) {
                target.running = false;
            }
        }
        let selected = self.selected?;
        if self.targets[selected].running {
            return None;
        }
        self.selected = self.next_running_after(selected);
        Some(self.announcement())
    }

    fn deliver(&self, byte: u8) -> Action {
        match self.selected {
            Some(vm) => Action::Deliver { vm, byte },
            None => Action::None,
        }
    }

    /// Ctrl-A n: the next running VM after the selected one (the selected one again when it is
    /// the only one running).
    fn select_next(&mut self) -> Action {
        let from = self
            .selected
            .unwrap_or(self.targets.len().saturating_sub(1));
        self.selected = self.next_running_after(from);
        Action::Say(self.announcement())
    }

    /// Ctrl-A N: VM number N (1-based), if it exists and runs; otherwise the input stays.
    fn select_number(&mut self, number: usize) -> Action {
        let index = number - 1;
        match self.targets.get(index) {
            Some(target) if target.running => {
                self.selected = Some(index);
                Action::Say(self.announcement())
            }
            Some(target) => Action::Say(format!(
                "ringzero: console input: vm {number} ({}) has ended; input stays where it was (Ctrl-A ?: help)",
                target.name
            )),
            None => Action::Say(format!(
                "ringzero: console input: there is no vm {number} ({} configured); input stays where it was",
                self.targets.len()
            )),
        }
    }

    /// The first running VM after `index` in configuration order, wrapping around, `index`
    /// itself last.
    fn next_running_after(&self, index: usize) -> Option<usize> {
        let count = self.targets.len();
        (1..=count)
            .map(|step| (index + step) % count)
            .find(|&candidate| self.targets[candidate].running)
    }
}

/// A byte as a user would name it: the character, or `0xNN` for control and non-ASCII bytes.
fn printable(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", byte as char)
    } else {
        format!("{byte:#04x}")
    }
}

/// Queues `byte` on `vm`'s COM1 receiver (what the guest reads from RBR). Returns false when the
/// VM cannot take it: it has ended, or it has no UART at COM1.
pub fn push_to_console(vm: &mut Vm, byte: u8) -> bool {
    if vm.end.is_some() {
        return false;
    }
    match vm.bus.device_mut::<Uart16550>(Uart16550::COM1) {
        Some(uart) => {
            uart.push_input(byte);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> ConsoleSwitch {
        ConsoleSwitch::new(["alpha", "beta", "gamma"])
    }

    /// Feeds `bytes` and collects the actions.
    fn feed(switch: &mut ConsoleSwitch, bytes: &[u8]) -> Vec<Action> {
        bytes.iter().map(|&byte| switch.input(byte)).collect()
    }

    fn said(action: &Action) -> &str {
        match action {
            Action::Say(text) => text,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn input_goes_to_the_first_vm_at_start() {
        let mut switch = three();
        assert_eq!(switch.selected(), Some(0));
        assert_eq!(
            feed(&mut switch, b"hi\r"),
            [
                Action::Deliver { vm: 0, byte: b'h' },
                Action::Deliver { vm: 0, byte: b'i' },
                Action::Deliver { vm: 0, byte: b'\r' },
            ]
        );
    }

    #[test]
    fn the_boot_announcement_names_the_vm_and_the_keys() {
        assert_eq!(
            three().announcement(),
            "ringzero: console input -> vm alpha (Ctrl-A n: next, Ctrl-A ?: help)"
        );
    }

    #[test]
    fn ctrl_a_n_moves_to_the_next_vm_and_wraps() {
        let mut switch = three();
        let actions = feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(actions[0], Action::None);
        assert_eq!(
            said(&actions[1]),
            "ringzero: console input -> vm beta (Ctrl-A n: next, Ctrl-A ?: help)"
        );
        assert_eq!(switch.input(b'x'), Action::Deliver { vm: 1, byte: b'x' });
        feed(&mut switch, &[ESCAPE, b'N']);
        assert_eq!(switch.selected(), Some(2));
        feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn the_escape_bytes_never_reach_a_vm() {
        let mut switch = three();
        let actions = feed(&mut switch, &[b'a', ESCAPE, b'n', b'b']);
        let delivered: Vec<_> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Deliver { vm, byte } => Some((*vm, *byte)),
                _ => None,
            })
            .collect();
        assert_eq!(delivered, [(0, b'a'), (1, b'b')]);
    }

    #[test]
    fn ctrl_a_ctrl_a_sends_one_literal_ctrl_a() {
        let mut switch = three();
        assert_eq!(
            feed(&mut switch, &[ESCAPE, ESCAPE, b'n']),
            [
                Action::None,
                Action::Deliver {
                    vm: 0,
                    byte: ESCAPE
                },
                // The pair is complete: 'n' is plain text again.
                Action::Deliver { vm: 0, byte: b'n' },
            ]
        );
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn ctrl_a_digit_selects_by_number() {
        let mut switch = three();
        let actions = feed(&mut switch, &[ESCAPE, b'3']);
        assert_eq!(
            said(&actions[1]),
            "ringzero: console input -> vm gamma (Ctrl-A n: next, Ctrl-A ?: help)"
        );
        assert_eq!(switch.selected(), Some(2));
        feed(&mut switch, &[ESCAPE, b'1']);
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn a_number_without_a_vm_leaves_the_input_where_it_was() {
        let mut switch = three();
        let actions = feed(&mut switch, &[ESCAPE, b'7']);
        assert!(said(&actions[1]).contains("there is no vm 7 (3 configured)"));
        assert_eq!(switch.selected(), Some(0));
        // '0' is not a VM number either: an unknown command.
        let actions = feed(&mut switch, &[ESCAPE, b'0']);
        assert!(said(&actions[1]).contains("Ctrl-A '0' is not a command"));
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn a_number_of_an_ended_vm_is_refused() {
        let mut switch = three();
        assert_eq!(switch.vm_ended(1), None, "beta did not have the input");
        let actions = feed(&mut switch, &[ESCAPE, b'2']);
        assert!(said(&actions[1]).contains("vm 2 (beta) has ended"));
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn help_lists_the_keys_and_every_vm_with_its_state() {
        let mut switch = three();
        switch.vm_ended(2);
        for &key in b"?hH" {
            let actions = feed(&mut switch, &[ESCAPE, key]);
            let text = said(&actions[1]);
            assert!(text.starts_with("ringzero: console input keys: Ctrl-A n next VM"));
            assert!(text.contains("\nringzero: console input vm 1 alpha (has the input)"));
            assert!(text.contains("\nringzero: console input vm 2 beta (running)"));
            assert!(text.contains("\nringzero: console input vm 3 gamma (ended)"));
        }
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn an_unknown_command_is_dropped_with_a_hint() {
        let mut switch = three();
        let actions = feed(&mut switch, &[ESCAPE, b'x', ESCAPE, 0x1B, b'y']);
        assert!(said(&actions[1]).contains("Ctrl-A 'x' is not a command, ignored"));
        assert!(said(&actions[3]).contains("Ctrl-A 0x1b is not a command"));
        assert_eq!(actions[4], Action::Deliver { vm: 0, byte: b'y' });
    }

    #[test]
    fn next_skips_vms_that_have_ended() {
        let mut switch = three();
        switch.vm_ended(1);
        feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(switch.selected(), Some(2));
        feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(switch.selected(), Some(0));
    }

    #[test]
    fn next_with_one_running_vm_stays_and_says_so() {
        let mut switch = three();
        switch.vm_ended(1);
        switch.vm_ended(2);
        let actions = feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(
            said(&actions[1]),
            "ringzero: console input -> vm alpha (Ctrl-A n: next, Ctrl-A ?: help)"
        );
    }

    #[test]
    fn when_the_selected_vm_ends_the_input_moves_on_and_is_announced() {
        let mut switch = three();
        feed(&mut switch, &[ESCAPE, b'2']);
        assert_eq!(
            switch.vm_ended(1).as_deref(),
            Some("ringzero: console input -> vm gamma (Ctrl-A n: next, Ctrl-A ?: help)")
        );
        assert_eq!(switch.input(b'z'), Action::Deliver { vm: 2, byte: b'z' });
        // It wraps to the start.
        assert!(switch.vm_ended(2).unwrap().contains("-> vm alpha"));
        // Ending twice says nothing more.
        assert_eq!(switch.vm_ended(2), None);
        assert_eq!(switch.vm_ended(9), None, "no such VM");
    }

    #[test]
    fn vms_ending_together_move_the_input_once_to_one_still_running() {
        let mut switch = three();
        // alpha has the input; alpha and beta end together: straight to gamma, one line.
        assert_eq!(
            switch.vms_ended([0, 1]).as_deref(),
            Some("ringzero: console input -> vm gamma (Ctrl-A n: next, Ctrl-A ?: help)")
        );
        let mut switch = three();
        assert_eq!(
            switch.vms_ended([2, 0, 1]).as_deref(),
            Some("ringzero: console input -> none (no VM is running)")
        );
        let mut switch = three();
        assert_eq!(switch.vms_ended([1, 2]), None, "alpha keeps the input");
        assert_eq!(switch.vms_ended([]), None);
    }

    #[test]
    fn with_every_vm_ended_input_is_dropped_but_commands_still_answer() {
        let mut switch = ConsoleSwitch::new(["only"]);
        assert_eq!(
            switch.vm_ended(0).as_deref(),
            Some("ringzero: console input -> none (no VM is running)")
        );
        assert_eq!(switch.selected(), None);
        assert_eq!(switch.input(b'a'), Action::None);
        assert_eq!(switch.input(ESCAPE), Action::None);
        assert_eq!(
            switch.input(ESCAPE),
            Action::None,
            "literal Ctrl-A to nobody"
        );
        let actions = feed(&mut switch, &[ESCAPE, b'n']);
        assert_eq!(
            said(&actions[1]),
            "ringzero: console input -> none (no VM is running)"
        );
        let actions = feed(&mut switch, &[ESCAPE, b'?']);
        assert!(said(&actions[1]).contains("vm 1 only (ended)"));
    }

    #[test]
    fn no_vms_at_all() {
        let mut switch = ConsoleSwitch::new(Vec::<String>::new());
        assert_eq!(switch.selected(), None);
        assert_eq!(switch.input(b'a'), Action::None);
        let actions = feed(&mut switch, &[ESCAPE, b'n', ESCAPE, b'1']);
        assert!(said(&actions[1]).contains("-> none"));
        assert!(said(&actions[3]).contains("there is no vm 1 (0 configured)"));
    }

    #[test]
    fn every_byte_other_than_ctrl_a_passes_through_unchanged() {
        let mut switch = three();
        for byte in 0..=u8::MAX {
            if byte != ESCAPE {
                assert_eq!(switch.input(byte), Action::Deliver { vm: 0, byte });
            }
        }
    }

    mod delivery {
        use super::super::push_to_console;
        use crate::paging::GuestPaging;
        use crate::vm::{Vm, VmEnd};
        use alloc::vec::Vec;
        use ringzero_devices::{PortBus, Uart16550};
        use ringzero_memory::shadow::{GuestPagingState, ShadowPaging};
        use ringzero_memory::GuestRam;

        fn vm() -> Vm {
            let paging = GuestPaging::Shadow {
                engine: ShadowPaging::new(1),
                visible: GuestPagingState::default(),
            };
            Vm::new("guest", GuestRam::new_lazy(1 << 20), paging, false)
        }

        fn guest_reads(vm: &mut Vm) -> Vec<u8> {
            let mut bytes = Vec::new();
            // LSR.DR (bit 0) while data waits, then RBR.
            while vm.bus.read(Uart16550::COM1 + 5, 1).value & 1 != 0 {
                bytes.push(vm.bus.read(Uart16550::COM1, 1).value as u8);
            }
            bytes
        }

        #[test]
        fn bytes_reach_the_guests_receiver_in_order() {
            let mut vm = vm();
            assert!(push_to_console(&mut vm, b'o'));
            assert!(push_to_console(&mut vm, b'k'));
            assert_eq!(guest_reads(&mut vm), b"ok");
        }

        #[test]
        fn an_ended_vm_takes_nothing() {
            let mut vm = vm();
            vm.end = Some(VmEnd::ExitPort { status: 0 });
            assert!(!push_to_console(&mut vm, b'x'));
        }

        #[test]
        fn a_vm_without_a_uart_takes_nothing() {
            let mut vm = vm();
            vm.bus = PortBus::new();
            assert!(!push_to_console(&mut vm, b'x'));
        }
    }
}
