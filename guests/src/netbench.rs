//! The NetBench-like accounting: a guest pings the control VM every millisecond of its own
//! time (TSC) over a [`ring`](crate::ring) and checks every echo; this module keeps the books,
//! the guest does the I/O.
//!
//! # Windows and drops
//!
//! Guest time from the start TSC is cut into one-second windows of [`PINGS_PER_WINDOW`] pings.
//! Ping `seq` falls due at `start + seq` milliseconds ([`Tracker::pings_due`]); the guest
//! sends every ping that has fallen due, catching up after a stall, and records each with
//! [`Tracker::sent`] even if the ring was full and the ping had to be dropped: a ping that
//! was due and never answered is exactly what this benchmark measures.
//!
//! A reply counts in the window it *arrives* in, compared with the pings due in that window
//! ([`PINGS_PER_WINDOW`]). A reply that is a little late (its ping near the end of one window,
//! the reply early in the next) therefore moves one count forward; in steady state every
//! window gains as many as it loses. A window is a *drop window* when it received fewer than
//! [`DROP_PERMILLE`] / 1000 of its due pings' worth of replies. Only complete windows (those
//! that ended before the time passed to [`Tracker::report`]) are judged, so the final, partial
//! window is never flagged for being partial.
//!
//! # Threat model
//!
//! The responder is untrusted: a reply to a ping never sent (or too old to remember, more than
//! [`HISTORY`] pings back), a second reply to the same ping, or one whose time stamp, echo or
//! reserved words are wrong is counted as a bad reply and otherwise ignored.

use crate::ring::{Message, net};
use crate::{Checksum, pattern};

/// Pings per window (one per millisecond, one-second windows).
pub const PINGS_PER_WINDOW: u64 = 1000;
/// Milliseconds between pings.
pub const PERIOD_MS: u64 = 1;
/// Milliseconds per window.
pub const WINDOW_MS: u64 = PINGS_PER_WINDOW * PERIOD_MS;
/// Windows a [`Tracker`] accounts for (pings past them are refused).
pub const MAX_WINDOWS: u64 = 64;
/// A window with fewer replies than this, in thousandths of its due pings, is a drop window.
pub const DROP_PERMILLE: u64 = 900;
/// Pings a [`Tracker`] remembers: a reply to an older ping is unknown.
pub const HISTORY: u64 = 1024;

/// Index of [`pattern`] words used for ping payloads.
const PAYLOAD_INDEX: u64 = 0x6e65_7462; // "netb"

/// The window guest time `now` falls in, for a run started at `start` on a TSC of `tsc_khz`
/// ticks per millisecond (times before `start` are window 0).
pub fn window_of(now: u64, start: u64, tsc_khz: u64) -> u64 {
    now.saturating_sub(start) / tsc_khz.saturating_mul(WINDOW_MS).max(1)
}

/// The payload of ping `seq`.
pub fn payload(seq: u64) -> u64 {
    pattern(seq, PAYLOAD_INDEX)
}

/// The checksum of a run in which pings `0..pings` were each answered once, in order.
pub fn golden(pings: u64) -> u64 {
    let mut sum = Checksum::new();
    for seq in 0..pings {
        sum.add(seq);
        sum.add(net::echo(payload(seq)));
    }
    sum.0
}

/// Why a ping could not be recorded or a reply was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// [`Tracker::sent`] with a sequence number other than the next one (the caller's fault).
    OutOfOrder,
    /// Pings past [`MAX_WINDOWS`] windows (the caller's fault).
    TooLong,
    /// A reply to a ping not sent yet, or older than [`HISTORY`] pings (the responder's).
    Unknown,
    /// A second reply to the same ping (the responder's fault).
    Duplicate,
    /// A reply whose time stamp, echo or reserved words are wrong (the responder's fault).
    Garbled,
}

/// What a run observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetReport {
    /// Pings recorded as sent.
    pub sent: u64,
    /// Good replies.
    pub replied: u64,
    /// Replies refused (unknown, duplicate or garbled).
    pub bad_replies: u64,
    /// Complete windows judged.
    pub windows: u64,
    /// Complete windows that received fewer than [`DROP_PERMILLE`] of their due pings.
    pub drop_windows: u64,
    /// The lowest replies-to-due ratio of a complete window, in thousandths (capped at 1000;
    /// 1000 when no window is complete).
    pub worst_window_ratio_permille: u64,
    /// [`Checksum`] of each good reply's sequence number and echo, in arrival order.
    pub checksum: u64,
    /// The longest time without a good reply while pings were due (from the start to the
    /// first reply, between two replies, or from the last reply to the time of the report),
    /// in microseconds of guest time: the service interruption the guest saw.
    pub longest_gap_us: u64,
}

/// The books of one run; about 9 KiB, no heap.
#[derive(Debug, Clone)]
pub struct Tracker {
    start: u64,
    tsc_khz: u64,
    next_seq: u64,
    sent_at: [u64; HISTORY as usize],
    answered: [u64; HISTORY as usize / 64],
    replied_in: [u64; MAX_WINDOWS as usize],
    replied: u64,
    bad_replies: u64,
    checksum: Checksum,
    /// When the last good reply arrived (`start` before the first).
    last_reply: u64,
    /// The longest time between good replies so far (TSC ticks).
    longest_gap: u64,
}

impl Tracker {
    /// Books for a run starting at TSC `start` on a TSC of `tsc_khz` ticks per millisecond.
    pub fn new(start: u64, tsc_khz: u64) -> Tracker {
        Tracker {
            start,
            tsc_khz,
            next_seq: 0,
            sent_at: [0; HISTORY as usize],
            answered: [0; HISTORY as usize / 64],
            replied_in: [0; MAX_WINDOWS as usize],
            replied: 0,
            bad_replies: 0,
            checksum: Checksum::new(),
            last_reply: start,
            longest_gap: 0,
        }
    }

    /// The sequence number the next ping must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pings due by guest time `now` (ping `seq` is due at `start + seq` milliseconds), up to
    /// the [`MAX_WINDOWS`] windows the books hold: send while `next_seq() < pings_due(now)`.
    pub fn pings_due(&self, now: u64) -> u64 {
        let limit = MAX_WINDOWS * PINGS_PER_WINDOW;
        if now < self.start {
            return 0;
        }
        let period = self.tsc_khz.saturating_mul(PERIOD_MS).max(1);
        ((now - self.start) / period).saturating_add(1).min(limit)
    }

    /// Records ping `seq` as sent at `now` and returns the message to push.
    pub fn sent(&mut self, seq: u64, now: u64) -> Result<Message, NetError> {
        if seq != self.next_seq {
            return Err(NetError::OutOfOrder);
        }
        if seq >= MAX_WINDOWS * PINGS_PER_WINDOW {
            return Err(NetError::TooLong);
        }
        let slot = seq % HISTORY;
        self.sent_at[slot as usize] = now;
        self.answered[(slot / 64) as usize] &= !(1 << (slot % 64));
        self.next_seq += 1;
        Ok(net::ping(seq, now, payload(seq)))
    }

    /// Checks a reply arriving at `now` and books it in `now`'s window; a refused reply is
    /// counted as bad and changes nothing else.
    pub fn replied(&mut self, reply: &Message, now: u64) -> Result<(), NetError> {
        let result = self.check(reply);
        match result {
            Ok(slot) => {
                self.answered[(slot / 64) as usize] |= 1 << (slot % 64);
                self.replied += 1;
                let window = window_of(now, self.start, self.tsc_khz);
                if let Some(count) = self.replied_in.get_mut(window as usize) {
                    *count += 1;
                }
                self.checksum.add(reply[0]);
                self.checksum.add(reply[2]);
                self.longest_gap = self.longest_gap.max(now.saturating_sub(self.last_reply));
                self.last_reply = self.last_reply.max(now);
            }
            Err(_) => self.bad_replies += 1,
        }
        result.map(|_| ())
    }

    /// The reply's history slot, if it answers a remembered, unanswered ping correctly.
    fn check(&self, reply: &Message) -> Result<u64, NetError> {
        let seq = reply[0];
        if seq >= self.next_seq || self.next_seq - seq > HISTORY {
            return Err(NetError::Unknown);
        }
        let slot = seq % HISTORY;
        if self.answered[(slot / 64) as usize] & 1 << (slot % 64) != 0 {
            return Err(NetError::Duplicate);
        }
        let expected = net::reply_to(&net::ping(seq, self.sent_at[slot as usize], payload(seq)));
        if *reply != expected {
            return Err(NetError::Garbled);
        }
        Ok(slot)
    }

    /// The run so far, judging the windows complete by guest time `now`.
    pub fn report(&self, now: u64) -> NetReport {
        let complete = window_of(now, self.start, self.tsc_khz).min(MAX_WINDOWS);
        let ratios = self.replied_in[..complete as usize]
            .iter()
            .map(|&replies| (replies * 1000 / PINGS_PER_WINDOW).min(1000));
        NetReport {
            sent: self.next_seq,
            replied: self.replied,
            bad_replies: self.bad_replies,
            windows: complete,
            drop_windows: ratios
                .clone()
                .filter(|&ratio| ratio < DROP_PERMILLE)
                .count() as u64,
            worst_window_ratio_permille: ratios.min().unwrap_or(1000),
            checksum: self.checksum.0,
            longest_gap_us: self
                .longest_gap
                .max(now.saturating_sub(self.last_reply))
                .saturating_mul(1000)
                / self.tsc_khz.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks per millisecond of the simulated TSC.
    const KHZ: u64 = 1000;
    /// TSC at the start of the simulated runs.
    const START: u64 = 123_456;

    fn at(ms: u64) -> u64 {
        START + ms * KHZ
    }

    /// Runs `ms` milliseconds: each millisecond, first the replies that `arrival` (ping
    /// number to arrival millisecond, `None` for lost) places there, in ping order, then the
    /// pings that fell due. Replies arrive at most 1024 ms after their ping.
    fn simulate(ms: u64, arrival: impl Fn(u64) -> Option<u64>) -> Tracker {
        let mut tracker = Tracker::new(START, KHZ);
        for now in 0..ms {
            for seq in now.saturating_sub(1024)..tracker.next_seq() {
                if arrival(seq) == Some(now) {
                    let ping = net::ping(seq, at(seq), payload(seq));
                    tracker.replied(&net::reply_to(&ping), at(now)).unwrap();
                }
            }
            while tracker.next_seq() < tracker.pings_due(at(now)) {
                let seq = tracker.next_seq();
                assert_eq!(tracker.sent(seq, at(now)).unwrap()[0], seq);
            }
        }
        tracker
    }

    #[test]
    fn windows_are_whole_seconds_of_guest_time() {
        assert_eq!(window_of(START, START, KHZ), 0);
        assert_eq!(window_of(at(999) + KHZ - 1, START, KHZ), 0);
        assert_eq!(window_of(at(1000), START, KHZ), 1);
        assert_eq!(window_of(at(5432), START, KHZ), 5);
        assert_eq!(window_of(START - 1, START, KHZ), 0);
        let tracker = Tracker::new(START, KHZ);
        assert_eq!(tracker.pings_due(START - 1), 0);
        assert_eq!(tracker.pings_due(START), 1);
        assert_eq!(tracker.pings_due(at(2) - 1), 2);
        assert_eq!(tracker.pings_due(u64::MAX), MAX_WINDOWS * PINGS_PER_WINDOW);
    }

    #[test]
    fn steady_replies_drop_nothing() {
        let tracker = simulate(5500, |seq| Some(seq + 1));
        let report = tracker.report(at(5500));
        assert_eq!(report.sent, 5500);
        assert_eq!(report.replied, 5499);
        assert_eq!(report.bad_replies, 0);
        assert_eq!(report.windows, 5);
        assert_eq!(report.drop_windows, 0);
        // Window 0 loses its last reply to window 1; the others gain one and lose one.
        assert_eq!(report.worst_window_ratio_permille, 999);
        assert_eq!(report.checksum, golden(5499));
        // A reply every millisecond, the first one 1 ms after the start.
        assert_eq!(report.longest_gap_us, 1000);
    }

    #[test]
    fn a_300_ms_gap_flags_its_window() {
        let lost = 1200..1500;
        let tracker = simulate(4000, |seq| {
            Some(seq + 1).filter(|arrival| !lost.contains(arrival))
        });
        let report = tracker.report(at(4000));
        assert_eq!(report.windows, 4);
        assert_eq!(report.drop_windows, 1);
        assert_eq!(report.worst_window_ratio_permille, 700);
        assert_eq!(report.replied, 3999 - 300);
        // The last reply before the gap arrived at 1199 ms, the next at 1500 ms.
        assert_eq!(report.longest_gap_us, 301_000);
        // Silence at the end counts too, up to the time of the report.
        assert_eq!(tracker.report(at(4500)).longest_gap_us, 501_000);
    }

    #[test]
    fn late_replies_count_where_they_arrive() {
        // Pings 900..1000 answered at 1050 ms: window 0 has exactly 90%, not a drop.
        let late_from = |first: u64| {
            move |seq| {
                Some(if (first..1000).contains(&seq) {
                    1050
                } else {
                    seq + 1
                })
            }
        };
        let report = simulate(3000, late_from(900)).report(at(3000));
        assert_eq!((report.windows, report.drop_windows), (3, 0));
        assert_eq!(report.worst_window_ratio_permille, 900);
        assert_eq!(report.replied, 2999);
        // One more late reply and window 0 drops; window 1, which received them, does not.
        let report = simulate(3000, late_from(899)).report(at(3000));
        assert_eq!(
            (report.drop_windows, report.worst_window_ratio_permille),
            (1, 899)
        );
        // Replies are booked in arrival order, so the checksum differs from the in-order one.
        assert_ne!(report.checksum, golden(2999));
    }

    #[test]
    fn the_partial_last_window_is_not_judged() {
        // Window 1 is 500 ms old and has seen only 10 replies.
        let tracker = simulate(1500, |seq| Some(seq + 1).filter(|&arrival| arrival < 1010));
        let report = tracker.report(at(1500));
        assert_eq!((report.windows, report.drop_windows), (1, 0));
        // Once it is complete, it is judged.
        let report = tracker.report(at(2000));
        assert_eq!(
            (
                report.windows,
                report.drop_windows,
                report.worst_window_ratio_permille
            ),
            (2, 1, 10)
        );
    }

    #[test]
    fn bad_replies_are_counted_not_trusted() {
        let mut tracker = Tracker::new(START, KHZ);
        let ping0 = tracker.sent(0, at(0)).unwrap();
        let ping1 = tracker.sent(1, at(1)).unwrap();
        let good0 = net::reply_to(&ping0);
        let mut bad_echo = good0;
        bad_echo[2] ^= 1;
        let mut bad_time = good0;
        bad_time[1] += 1;
        let mut bad_reserved = good0;
        bad_reserved[5] = 1;
        let not_sent = net::reply_to(&net::ping(2, at(2), payload(2)));
        assert_eq!(tracker.replied(&ping0, at(1)), Err(NetError::Garbled)); // not echoed
        assert_eq!(tracker.replied(&bad_echo, at(1)), Err(NetError::Garbled));
        assert_eq!(tracker.replied(&bad_time, at(1)), Err(NetError::Garbled));
        assert_eq!(
            tracker.replied(&bad_reserved, at(1)),
            Err(NetError::Garbled)
        );
        assert_eq!(tracker.replied(&not_sent, at(1)), Err(NetError::Unknown));
        tracker.replied(&good0, at(2)).unwrap();
        assert_eq!(tracker.replied(&good0, at(2)), Err(NetError::Duplicate));
        tracker.replied(&net::reply_to(&ping1), at(3)).unwrap();
        let report = tracker.report(at(3));
        assert_eq!((report.sent, report.replied, report.bad_replies), (2, 2, 6));
        assert_eq!(report.checksum, golden(2));
    }

    #[test]
    fn replies_older_than_the_history_are_unknown() {
        let mut tracker = Tracker::new(START, KHZ);
        let first = tracker.sent(0, at(0)).unwrap();
        for seq in 1..HISTORY {
            tracker.sent(seq, at(seq)).unwrap();
        }
        let mut still_known = tracker.clone();
        still_known
            .replied(&net::reply_to(&first), at(HISTORY))
            .unwrap();
        tracker.sent(HISTORY, at(HISTORY)).unwrap();
        assert_eq!(
            tracker.replied(&net::reply_to(&first), at(HISTORY)),
            Err(NetError::Unknown)
        );
    }

    #[test]
    fn pings_must_be_sent_in_order_and_within_the_books() {
        let mut tracker = Tracker::new(START, KHZ);
        assert_eq!(tracker.sent(1, at(0)), Err(NetError::OutOfOrder));
        let ping = tracker.sent(0, at(0)).unwrap();
        assert_eq!(ping, net::ping(0, at(0), payload(0)));
        assert_eq!(tracker.sent(0, at(0)), Err(NetError::OutOfOrder));
        let last = MAX_WINDOWS * PINGS_PER_WINDOW;
        for seq in 1..last {
            tracker.sent(seq, at(seq)).unwrap();
        }
        assert_eq!(tracker.sent(last, at(last)), Err(NetError::TooLong));
        // Replies after the last window still count, but in no window.
        let reply = net::reply_to(&net::ping(last - 1, at(last - 1), payload(last - 1)));
        tracker.replied(&reply, at(last + 5000)).unwrap();
        let report = tracker.report(at(last + 5000));
        assert_eq!(
            (report.replied, report.windows, report.drop_windows),
            (1, MAX_WINDOWS, MAX_WINDOWS)
        );
    }
}
