//! The probe domain: a ring-3 test domain that echoes, or misbehaves on request, so the boot
//! tests can show that a domain's faults stay its own.
//!
//! Request byte 0 picks the behaviour: 0 echo, 1 write into the core's image, 2 write into
//! physical memory through the core's direct map, 3 write into its own code, 4 jump to
//! address 0 (fail-stop), 5 panic, 6 call domain `request[1]` (which it has no capability
//! for, unless the manifest says so), 7 log a line, 8 count (add one to a counter in its data
//! segment and answer it: a microreset keeps the counter, a microreboot restarts it), 9 notify
//! domain `request[1]` and answer the status, 10 spin forever (a thread that stays inside the
//! domain, for the check that a recovery on another CPU takes it out).
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU32, Ordering};
use microvisor_runtime::{Context, Service, probe};

/// Requests of kind 8 served since the domain's data was last loaded.
static COUNTER: AtomicU32 = AtomicU32::new(0);

struct Probe;

impl Service for Probe {
    fn serve(context: &mut Context, caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        match request.first().copied().unwrap_or(0) {
            1 => probe::write_u64(0xffff_ffff_8010_0000, 0xdead),
            2 => probe::write_u64(0xffff_8000_0010_0000, 0xdead),
            3 => probe::write_u64(0x40_1000, 0xdead),
            4 => probe::jump_to(0),
            5 => panic!("probe asked to panic by domain {caller}"),
            6 => {
                let target = u16::from(request.get(1).copied().unwrap_or(0));
                let status = match context.call(target, 1, &[0], reply) {
                    Ok(_) => 0,
                    Err(failed) => failed.status as u8,
                };
                reply[0] = status;
                return 1;
            }
            9 => {
                let target = u16::from(request.get(1).copied().unwrap_or(0));
                reply[0] = match context.notify(target, 1) {
                    Ok(()) => 0,
                    Err(status) => status as u8,
                };
                return 1;
            }
            8 => {
                let count = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
                reply[..4].copy_from_slice(&count.to_le_bytes());
                return 4;
            }
            10 => loop {
                core::hint::spin_loop();
            },
            7 => context.log(format_args!(
                "probe on CPU {} says hello to domain {caller}",
                context.cpu()
            )),
            _ => {}
        }
        let length = request.len().min(reply.len());
        reply[..length].copy_from_slice(&request[..length]);
        length
    }
}

microvisor_runtime::domain_entry!(Probe);
