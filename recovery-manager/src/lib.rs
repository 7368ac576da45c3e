//! Recovery manager: the policy that decides how a failed domain comes back (microreset,
//! microreboot, or declared failed), with escalation and a restart rate limit.
//!
//! Design rules:
//! - Policy only: the core detects failures and executes orders; this crate only decides.
//!   It runs as its own ring-3 domain and talks to the core through `ipc::recovery`.
//! - Its state is plain data in the domain's state region (zerocopy), so a microreboot of the
//!   recovery manager itself keeps the failure history: escalation survives its own restart.
//! - Escalation (the architecture brief, "Recovery"): a domain's first failure in a window gets
//!   the configured first order; another failure within the window escalates to a
//!   microreboot; one more declares the domain failed. Independently, at most
//!   `max_in_window` recoveries per window (rate limit).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use ipc::recovery::{Detection, RecoveryOrder, Reply, Request};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Domains the history covers (domain indices 0..16).
pub const MAX_DOMAINS: usize = 16;

/// One domain's recent failures.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct History {
    /// TSC of the first failure of the current window.
    pub window_start: u64,
    /// Failures in the current window.
    pub in_window: u32,
    /// Failures since boot.
    pub total: u32,
}

/// The recovery manager's whole state.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PolicyState {
    /// Order for a first failure: 0 microreset, 1 microreboot, 2 fail.
    pub first: u32,
    /// At most this many recoveries per window (0: no limit).
    pub max_in_window: u32,
    /// Escalation window in TSC ticks (0: no escalation).
    pub window_tsc: u64,
    /// Per-domain history, by domain index.
    pub history: [History; MAX_DOMAINS],
}

fn order_code(order: RecoveryOrder) -> u32 {
    match order {
        RecoveryOrder::Microreset => 0,
        RecoveryOrder::Microreboot => 1,
        RecoveryOrder::Fail => 2,
    }
}

fn order_from(code: u32) -> RecoveryOrder {
    match code {
        0 => RecoveryOrder::Microreset,
        1 => RecoveryOrder::Microreboot,
        _ => RecoveryOrder::Fail,
    }
}

impl PolicyState {
    /// Boot (and re-initialisation): microreset first, no escalation, no limit, no history.
    pub fn init(&mut self) {
        self.first = 0;
        self.max_in_window = 0;
        self.window_tsc = 0;
        self.history = [History::default(); MAX_DOMAINS];
    }

    /// Initialises the state with the policy of the core's configuration word
    /// ([`ipc::recovery::policy_word`]): at boot, and when a restart finds the state unusable.
    pub fn init_configured(&mut self, word: u32) {
        self.init();
        let (first, window, max) = ipc::recovery::policy_of_word(word);
        self.first = order_code(first);
        self.window_tsc = window;
        self.max_in_window = max;
    }

    /// Whether the state is usable: the order code is known. (Any history is acceptable.)
    pub fn validate(&self) -> bool {
        self.first <= 2
    }

    /// Serves one request.
    pub fn handle(&mut self, request: Request) -> Reply {
        match request {
            Request::Configure {
                first,
                escalation_window_tsc,
                max_in_window,
            } => {
                self.first = order_code(first);
                self.window_tsc = escalation_window_tsc;
                self.max_in_window = max_in_window;
                Reply::Acknowledged
            }
            Request::DomainFailed(detection) => Reply::Order(self.decide(&detection)),
            Request::Recovered { .. } => Reply::Acknowledged,
            Request::Forget { domain } => match self.history.get_mut(usize::from(domain.index)) {
                Some(history) => {
                    history.window_start = 0;
                    history.in_window = 0;
                    Reply::Acknowledged
                }
                None => Reply::Error(ipc::recovery::Error::UnknownDomain),
            },
        }
    }

    /// Decides the order for one detection and records it.
    pub fn decide(&mut self, detection: &Detection) -> RecoveryOrder {
        let index = usize::from(detection.domain.index);
        let Some(history) = self.history.get_mut(index) else {
            return RecoveryOrder::Fail;
        };
        let window = self.window_tsc;
        // Without an escalation window, the rate limit counts over the whole run.
        let fresh_window = history.in_window == 0
            || window != 0 && detection.tsc.saturating_sub(history.window_start) > window;
        if fresh_window {
            history.window_start = detection.tsc;
            history.in_window = 0;
        }
        history.in_window += 1;
        history.total = history.total.saturating_add(1);
        if self.max_in_window != 0 && history.in_window > self.max_in_window {
            return RecoveryOrder::Fail;
        }
        let first = order_from(self.first);
        if window == 0 {
            return first;
        }
        match (history.in_window, first) {
            (1, order) => order,
            (2, RecoveryOrder::Microreset) => RecoveryOrder::Microreboot,
            (2, RecoveryOrder::Microreboot) => RecoveryOrder::Microreboot,
            _ => RecoveryOrder::Fail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::recovery::FailureKind;
    use ipc::{DomainId, DomainIndex};
    use zerocopy::FromZeros;

    fn failure(domain: DomainIndex, tsc: u64) -> Detection {
        Detection {
            domain: DomainId::new(domain, 1),
            cpu: 0,
            kind: FailureKind::Exception { vector: 14 },
            rip: 0x40_1000,
            tsc,
            in_flight: None,
        }
    }

    fn configured(first: RecoveryOrder, window: u64, max: u32) -> PolicyState {
        let mut state = PolicyState::new_zeroed();
        state.init();
        assert_eq!(
            state.handle(Request::Configure {
                first,
                escalation_window_tsc: window,
                max_in_window: max
            }),
            Reply::Acknowledged
        );
        state
    }

    #[test]
    fn without_escalation_every_failure_gets_the_first_order() {
        let mut state = configured(RecoveryOrder::Microreboot, 0, 0);
        for tsc in 0..20 {
            assert_eq!(
                state.decide(&failure(DomainIndex::Memory, tsc)),
                RecoveryOrder::Microreboot
            );
        }
        assert_eq!(state.history[DomainIndex::Memory as usize].total, 20);
    }

    #[test]
    fn escalates_within_the_window_and_forgets_after_it() {
        let mut state = configured(RecoveryOrder::Microreset, 1000, 0);
        let memory = DomainIndex::Memory;
        assert_eq!(
            state.decide(&failure(memory, 10)),
            RecoveryOrder::Microreset
        );
        assert_eq!(
            state.decide(&failure(memory, 500)),
            RecoveryOrder::Microreboot
        );
        assert_eq!(state.decide(&failure(memory, 900)), RecoveryOrder::Fail);
        // Another domain has its own history.
        assert_eq!(
            state.decide(&failure(DomainIndex::Timer, 901)),
            RecoveryOrder::Microreset
        );
        // Long after, a new window starts.
        assert_eq!(
            state.decide(&failure(memory, 5000)),
            RecoveryOrder::Microreset
        );
    }

    #[test]
    fn rate_limit_fails_a_domain_that_restarts_too_often() {
        let mut state = configured(RecoveryOrder::Microreset, u64::MAX, 3);
        state.window_tsc = u64::MAX;
        // Escalation on (window), but make the limit bite first by checking counts.
        let mut state_no_escalation = configured(RecoveryOrder::Microreset, 0, 3);
        for tsc in 0..3 {
            assert_eq!(
                state_no_escalation.decide(&failure(DomainIndex::Hypercall, tsc)),
                RecoveryOrder::Microreset
            );
        }
        assert_eq!(
            state_no_escalation.decide(&failure(DomainIndex::Hypercall, 3)),
            RecoveryOrder::Fail
        );
        assert_eq!(
            state.decide(&failure(DomainIndex::Hypercall, 0)),
            RecoveryOrder::Microreset
        );
    }

    #[test]
    fn an_unknown_domain_is_failed_and_corrupt_state_is_caught() {
        let mut state = configured(RecoveryOrder::Microreset, 0, 0);
        let mut detection = failure(DomainIndex::Memory, 0);
        detection.domain = DomainId {
            index: 999,
            generation: 1,
        };
        assert_eq!(state.decide(&detection), RecoveryOrder::Fail);
        assert!(state.validate());
        state.first = 7;
        assert!(!state.validate());
    }

    #[test]
    fn a_manager_initialised_again_keeps_the_configured_policy() {
        let mut state = PolicyState::new_zeroed();
        let word = ipc::recovery::policy_word(RecoveryOrder::Microreset, 5 << 20, 0);
        state.init_configured(word);
        let memory = DomainIndex::Memory;
        assert_eq!(state.decide(&failure(memory, 1)), RecoveryOrder::Microreset);
        assert_eq!(
            state.decide(&failure(memory, 2)),
            RecoveryOrder::Microreboot
        );
        assert_eq!(state.decide(&failure(memory, 3)), RecoveryOrder::Fail);
        // The word 0 is the plain boot default.
        state.init_configured(0);
        assert_eq!(
            (state.first, state.window_tsc, state.max_in_window),
            (0, 0, 0)
        );
    }

    #[test]
    fn forgotten_failures_do_not_escalate() {
        let mut state = configured(RecoveryOrder::Microreset, 1000, 0);
        let memory = DomainIndex::Memory;
        assert_eq!(state.decide(&failure(memory, 1)), RecoveryOrder::Microreset);
        assert_eq!(
            state.decide(&failure(memory, 2)),
            RecoveryOrder::Microreboot
        );
        let forget = Request::Forget {
            domain: DomainId::new(memory, 3),
        };
        assert_eq!(state.handle(forget), Reply::Acknowledged);
        // Within the same window, but the history started again.
        assert_eq!(state.decide(&failure(memory, 3)), RecoveryOrder::Microreset);
        assert_eq!(state.history[memory as usize].total, 3);
        let unknown = Request::Forget {
            domain: DomainId {
                index: 999,
                generation: 1,
            },
        };
        assert_eq!(
            state.handle(unknown),
            Reply::Error(ipc::recovery::Error::UnknownDomain)
        );
    }

    #[test]
    fn other_requests_are_acknowledged() {
        let mut state = configured(RecoveryOrder::Microreset, 0, 0);
        let recovered = Request::Recovered {
            domain: DomainId::new(DomainIndex::Memory, 2),
            order: RecoveryOrder::Microreset,
            tsc_total: 5,
        };
        assert_eq!(state.handle(recovered), Reply::Acknowledged);
        assert_eq!(
            state.handle(Request::DomainFailed(failure(DomainIndex::Memory, 0))),
            Reply::Order(RecoveryOrder::Microreset)
        );
    }
}
