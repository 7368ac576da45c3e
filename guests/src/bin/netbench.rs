//! The NetBench-like guest: pings the control VM every millisecond of guest time over a
//! shared ring, checks every echo, and reports every one-second window in which replies
//! dropped by more than 10% (the service interruption a recovery causes).
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::GuestMemory;
use guests::control::{Connection, RING_GFN};
use guests::netbench::{self, PERIOD_MS, Tracker};
use guests::ring::Frontend;
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, enable_interrupts, interrupts, print, tsc, wait_for_event,
};

/// Pings when the control VM gives no count: 1.2 s of guest time, so that netbench pings
/// through the third AppVM's whole life in `3appvm` (created at 400 ms, done by about 700 ms)
/// with a margin, and one whole one-second window is measured.
const DEFAULT_PINGS: u64 = 1200;
/// How long to wait for late replies after the last ping (ms).
const GRACE_MS: u64 = 500;

fn main(info: &StartInfo) -> Verdict {
    let failed = Verdict {
        passed: false,
        checksum: 0,
    };
    let Some(connection) = Connection::from_params(&info.params) else {
        print(format_args!("netbench: vm {} has no ring", info.vm));
        return failed;
    };
    if call2(abi::MAP_GRANT, connection.ring_frame, RING_GFN) != 0 {
        print(format_args!("netbench: cannot map the ring"));
        return failed;
    }
    let port = call2(
        abi::EVTCHN_BIND,
        connection.backend_vm,
        connection.backend_port,
    );
    if port <= 0 {
        print(format_args!(
            "netbench: cannot bind the backend's port ({port})"
        ));
        return failed;
    }
    let pings = match connection.work {
        0 => DEFAULT_PINGS,
        pings => pings,
    };
    let tsc_khz = info.tsc_khz.max(1);
    print(format_args!(
        "netbench: vm {} pings VM {} every {PERIOD_MS} ms, {pings} times",
        info.vm, connection.backend_vm
    ));
    enable_interrupts();
    let front = Frontend {
        page: RING_GFN * 4096,
    };
    let start = tsc();
    let mut tracker = Tracker::new(start, tsc_khz);
    let last_due = start + pings * PERIOD_MS * tsc_khz;
    let give_up = last_due + GRACE_MS * tsc_khz;
    let (mut timer_armed, mut seen) = (false, interrupts());
    let (mut ring_errors, mut pushed_total) = (0u64, 0u64);
    loop {
        let now = tsc();
        let due = tracker.pings_due(now).min(pings);
        let mut pushed = false;
        while tracker.next_seq() < due {
            match tracker.sent(tracker.next_seq(), now) {
                // A full ring drops the ping: it stays unanswered, as on a real link.
                Ok(ping) => {
                    if front.push_request(&mut GuestMemory, &ping).is_ok() {
                        pushed = true;
                        pushed_total += 1;
                    }
                }
                Err(_) => return failed,
            }
        }
        if pushed && call2(abi::EVTCHN_SEND, port as u64, 0) < 0 {
            return failed;
        }
        loop {
            match front.pop_response(&mut GuestMemory) {
                Ok(Some(reply)) => {
                    // A bad reply is booked in the tracker's report.
                    let _ = tracker.replied(&reply, tsc());
                }
                Ok(None) => break,
                Err(_) => {
                    ring_errors += 1;
                    break;
                }
            }
        }
        let report = tracker.report(now.min(last_due));
        if (tracker.next_seq() >= pings && report.replied + report.bad_replies >= pushed_total)
            || now >= give_up
            || ring_errors > 0
        {
            break;
        }
        if interrupts() != seen {
            seen = interrupts();
            timer_armed = false;
        }
        if !timer_armed {
            let next = if tracker.next_seq() < pings {
                start + tracker.next_seq() * PERIOD_MS * tsc_khz
            } else {
                now + 5 * tsc_khz
            };
            if call2(abi::TIMER_ONESHOT, next.max(now + 1), abi::VECTOR_MIN) < 0 {
                return failed;
            }
            timer_armed = true;
        }
        if wait_for_event(seen) < 0 {
            return failed;
        }
    }
    let end = tsc().min(last_due);
    let report = tracker.report(end);
    microvisor_guest_runtime::report_longest_gap_us(report.longest_gap_us);
    // Every ping that reached the ring must come back, correct; pings a full ring dropped
    // (the backend stalled, e.g. while it was being recovered) are the service interruption
    // this benchmark reports, not a failure. With none dropped the checksum is the golden one.
    let dropped = report.sent - pushed_total;
    let passed = report.sent == pings
        && report.replied == pushed_total
        && pushed_total > 0
        && report.bad_replies == 0
        && ring_errors == 0
        && (dropped > 0 || report.checksum == netbench::golden(pings));
    print(format_args!(
        "netbench: vm {} {}: {} pings, {} dropped (ring full), {} replies, {} bad, {} windows, {} with >10% drop (worst {} per mille), longest gap {} us",
        info.vm,
        if passed { "passed" } else { "FAILED" },
        report.sent,
        dropped,
        report.replied,
        report.bad_replies,
        report.windows,
        report.drop_windows,
        report.worst_window_ratio_permille,
        report.longest_gap_us
    ));
    let _ = call2(abi::UNMAP_GRANT, RING_GFN, 0);
    Verdict {
        passed,
        checksum: report.checksum,
    }
}

microvisor_guest_runtime::guest_entry!(main);
