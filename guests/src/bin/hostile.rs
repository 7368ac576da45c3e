//! The hostile guest: a malicious VM for isolation tests. It issues hypercalls that must be
//! refused and a fixed-seed run of random ones, checks every answer against
//! `guests::hostile`, and reports a verdict; in mode 1 it then touches a window page it never
//! mapped, which must get it (and only it) stopped by the core. Mode 3 instead takes every
//! shared resource until refused and checks it got exactly its quota.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::hostile::{
    ALIAS_GFN, CONTROL_VM, Check, EXHAUST_GFNS, EXHAUST_QUOTA, Exhaustion, FAR_FUTURE,
    FAULT_ADDRESS, FOREIGN_GFN, HOLD_MS, Leftovers, Mode, NEVER_MAPPED_GFN, Needs, OUTSIDE_ADDRESS,
    POPULATE_GFN, RANDOM_CALLS, RANDOM_SEED, Resource, Summary, Taken, Tally, Targets,
    WINDOW_END_GFN, Xorshift, changes_frame, foreign_owner, guarded_frame, ram_probe, scan_order,
    unoffered_peer,
};
use guests::{Checksum, hostile};
use microvisor_guest_runtime::abi::{CONSOLE_MAX, MULTICALL_MAX};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, cpuid, hypercall, layout, port_in8, port_out8, print, read_msr,
    read_u64, tsc, write_u64,
};

/// What the deterministic checks have learnt so far.
struct Context {
    vm: u16,
    /// Guest-physical address of a readable buffer (for the console checks).
    text: u64,
    /// The frame `PopulateWindow` answered.
    own_frame: Option<u64>,
    /// Another VM's unshared frame and its owner.
    foreign: Option<(u64, u16)>,
}

/// A multicall batch in guest memory: (number, arg0, arg1) per entry, then the results.
struct Batch {
    entries: [[u64; 3]; MULTICALL_MAX],
    results: [i64; MULTICALL_MAX],
}

/// Whether an answer is one the ABI allows (>= 0, or a `HypercallError` code).
fn valid(result: i64) -> bool {
    result >= 0 || abi::HypercallError::from_guest_code(result).is_some()
}

fn main(info: &StartInfo) -> Verdict {
    let vm = info.vm;
    let Some(mode) = Mode::from_param(info.params[0]) else {
        print(format_args!(
            "hostile: vm {vm}: unknown mode {} (0 checks, 1 then faults, 2 then reads an MSR, \
             3 exhausts its quota)",
            info.params[0]
        ));
        return Verdict {
            passed: false,
            checksum: 0,
        };
    };
    print(format_args!(
        "hostile: vm {vm} starts, mode {}",
        mode.param()
    ));
    if mode == Mode::Exhaust {
        return exhaust(info);
    }
    let mut sum = Checksum::new();
    let mut mismatches = 0u64;

    // Readable and long enough for every length tried: only the arguments are wrong.
    let text = [b'!'; 2 * CONSOLE_MAX];
    core::hint::black_box(&text);
    let mut context = Context {
        vm,
        text: text.as_ptr() as u64,
        own_frame: None,
        foreign: None,
    };
    let mut checks = 0u64;
    let mut foreign_checks = 0u64;
    let mut scanned = false;
    let mut skipped = 0u64;
    for (index, check) in Check::ALL.into_iter().enumerate() {
        if check.needs() == Needs::ForeignFrame && !scanned {
            scanned = true;
            context.foreign = context.own_frame.and_then(|own| find_foreign(vm, own));
            match (context.own_frame, context.foreign) {
                (Some(own), None) => print(format_args!(
                    "hostile: no unshared frame of another VM near frame {own:#x}: \
                     foreign-frame checks skipped"
                )),
                (_, Some((frame, owner))) => print(format_args!(
                    "hostile: frame {frame:#x} belongs to vm {owner}"
                )),
                (None, None) => print(format_args!(
                    "hostile: no populated frame to scan around: foreign-frame checks skipped"
                )),
            }
        }
        let ready = match check.needs() {
            Needs::Nothing => true,
            Needs::OwnFrame => context.own_frame.is_some(),
            Needs::ForeignFrame => context.foreign.is_some(),
        };
        if !ready {
            skipped += u64::from(check.needs() == Needs::OwnFrame);
            continue;
        }
        let result = perform(check, &mut context);
        checks += 1;
        foreign_checks += u64::from(check.needs() == Needs::ForeignFrame);
        let expected = check.expected();
        sum.add(index as u64);
        sum.add(expected.fold(result));
        if !expected.accepts(result) {
            mismatches += 1;
            print(format_args!(
                "hostile: {}: got {result}, expected {expected}",
                check.name()
            ));
        }
    }
    if skipped > 0 {
        print(format_args!(
            "hostile: no populated frame: {skipped} checks that need it skipped"
        ));
    }
    sum.add(foreign_checks);

    let random_calls = match context.own_frame {
        Some(own_frame) => {
            let (calls, invalid) = random_run(&context, own_frame, &mut sum);
            mismatches += invalid;
            calls
        }
        None => 0,
    };

    // Instructions the hypercall domain serves: the virtual CPU's identity, an empty I/O
    // space (reads all ones, writes absorbed).
    let [_, ebx, ecx, edx] = cpuid(0, 0);
    let hypervisor_bit = cpuid(1, 0)[2] >> 31;
    port_out8(0x80, 0x42);
    let port = port_in8(0x60);
    for (what, ok) in [
        ("CPUID vendor", hostile::vendor_matches(ebx, ecx, edx)),
        ("CPUID hypervisor bit", hypervisor_bit == 1),
        ("IN from an empty port", port == 0xff),
    ] {
        checks += 1;
        sum.add(u64::from(ok));
        if !ok {
            mismatches += 1;
            print(format_args!("hostile: {what}: unexpected answer"));
        }
    }

    let passed = mismatches == 0;
    print(format_args!(
        "{}",
        Summary {
            vm,
            mode: mode.param(),
            checks,
            random_calls,
            foreign_checks,
            passed,
        }
    ));
    if mode == Mode::Msr {
        print(format_args!("hostile: vm {vm} reads MSR 0x10"));
        let value = read_msr(0x10);
        print(format_args!(
            "hostile: vm {vm}: RDMSR returned {value:#x}: the core did not stop it"
        ));
        return Verdict {
            passed: false,
            checksum: sum.0,
        };
    }
    if mode == Mode::Fault {
        print(format_args!(
            "hostile: vm {vm} writes to unmapped {FAULT_ADDRESS:#x}"
        ));
        write_u64(FAULT_ADDRESS, sum.0);
        print(format_args!(
            "hostile: vm {vm}: the write to {FAULT_ADDRESS:#x} returned: the core did not stop it"
        ));
        return Verdict {
            passed: false,
            checksum: sum.0,
        };
    }
    Verdict {
        passed,
        checksum: sum.0,
    }
}

/// Issues one deterministic check; returns RAX.
fn perform(check: Check, context: &mut Context) -> i64 {
    let vm = u64::from(context.vm);
    let own = context.own_frame.unwrap_or(0);
    let (foreign, owner) = context
        .foreign
        .map_or((0, 0), |(frame, owner)| (frame, u64::from(owner)));
    match check {
        Check::ConsoleOutsideMemory => call2(abi::CONSOLE_WRITE, OUTSIDE_ADDRESS, 8),
        Check::ConsoleEmpty => call2(abi::CONSOLE_WRITE, context.text, 0),
        Check::ConsoleTooLong => call2(abi::CONSOLE_WRITE, context.text, CONSOLE_MAX as u64 + 1),
        Check::ConsoleUnusedArgument => {
            hypercall(abi::CONSOLE_WRITE, [context.text, 8, 1, 0, 0, 0])
        }
        Check::PopulateBelowWindow => call2(abi::MEMORY_POPULATE, 0x10, 0),
        Check::PopulatePastWindow => call2(abi::MEMORY_POPULATE, WINDOW_END_GFN, 0),
        Check::PopulateHugeGfn => call2(abi::MEMORY_POPULATE, u64::MAX, 0),
        Check::PopulateWindow => {
            let frame = call2(abi::MEMORY_POPULATE, POPULATE_GFN, 0);
            if frame > 0 {
                context.own_frame = Some(frame as u64);
            }
            frame
        }
        Check::PopulateSameGfn => call2(abi::MEMORY_POPULATE, POPULATE_GFN, 0),
        Check::MapForeign => call2(abi::MAP_GRANT, foreign, FOREIGN_GFN),
        Check::ReleaseForeign => call2(abi::MEMORY_RELEASE, foreign, 0),
        Check::GrantForeign => call2(abi::GRANT, foreign, vm),
        Check::RevokeForeign => call2(abi::GRANT_REVOKE, foreign, owner),
        Check::MapOwnAlias => call2(abi::MAP_GRANT, own, ALIAS_GFN),
        Check::UnmapAlias | Check::UnmapAliasAgain => call2(abi::UNMAP_GRANT, ALIAS_GFN, 0),
        Check::UnmapNeverMapped => call2(abi::UNMAP_GRANT, NEVER_MAPPED_GFN, 0),
        Check::UnmapPopulated => call2(abi::UNMAP_GRANT, POPULATE_GFN, 0),
        Check::VmCreate => hypercall(
            abi::VM_CREATE,
            [
                layout::MODULES_BASE,
                4096,
                layout::name_word("hostile"),
                0,
                0,
                0,
            ],
        ),
        Check::VmStart => call2(abi::VM_START, vm + 1, 0),
        Check::VmStatus => call2(abi::VM_STATUS, CONTROL_VM, 0),
        Check::VmDestroy => call2(abi::VM_DESTROY, CONTROL_VM, 0),
        Check::SendUnopened => call2(abi::EVTCHN_SEND, 5, 0),
        Check::BindUnoffered => call2(abi::EVTCHN_BIND, unoffered_peer(context.vm), 1),
        Check::CloseUnopened => call2(abi::EVTCHN_CLOSE, 62, 0),
    }
}

/// The nearest frame around `own` that another VM owns and shares with nobody, with its
/// owner. Frames outside the pool answer errors and are passed over.
fn find_foreign(vm: u16, own: u64) -> Option<(u64, u16)> {
    scan_order(own).find_map(|frame| {
        foreign_owner(call2(abi::QUERY_FRAME, frame, 0), vm).map(|owner| (frame, owner))
    })
}

/// The random calls, then undoing what they left behind. Returns the number of random calls
/// and of answers the ABI does not allow (each printed).
fn random_run(context: &Context, own_frame: u64, sum: &mut Checksum) -> (u64, u64) {
    let mut batch = Batch {
        entries: [[0; 3]; MULTICALL_MAX],
        results: [i64::MIN; MULTICALL_MAX],
    };
    let targets = Targets {
        vm: context.vm,
        own_frame,
        foreign_frame: context.foreign.map(|(frame, _)| frame),
        batch_entries: batch.entries.as_ptr() as u64,
        batch_results: batch.results.as_mut_ptr() as u64,
    };
    let mut random = Xorshift::new(RANDOM_SEED);
    let mut tally = Tally::default();
    let mut entry_tally = Tally::default();
    let mut leftovers = Leftovers::default();
    let mut invalid = 0u64;
    for index in 0..RANDOM_CALLS {
        let mut call = random.call(&targets);
        if changes_frame(call.number) {
            call.args[0] = guard(call.args[0], &targets);
        }
        let count = if call.number == abi::MULTICALL {
            let mut entries = random.batch(&targets);
            for entry in entries.iter_mut() {
                if changes_frame(entry[0]) {
                    entry[1] = guard(entry[1], &targets);
                }
            }
            batch.entries = entries;
            batch.results = [i64::MIN; MULTICALL_MAX];
            // The core reads the entries and writes the results behind the compiler's back.
            core::hint::black_box(&mut batch);
            call.args[1]
        } else {
            0
        };
        let result = hypercall(call.number, call.args);
        tally.record(result);
        if !valid(result) {
            invalid += 1;
            print(format_args!(
                "hostile: random call {index}: number {} args {:x?} answered {result}",
                call.number, call.args
            ));
            continue;
        }
        leftovers.note(call.number, call.args[0], call.args[1], result, own_frame);
        if call.number == abi::MULTICALL && result == 0 {
            let results = batch.results.as_ptr() as u64;
            for (slot, entry) in batch.entries.iter().enumerate().take(count as usize) {
                let outcome = read_u64(results + slot as u64 * 8) as i64;
                entry_tally.record(outcome);
                if !valid(outcome) {
                    invalid += 1;
                    print(format_args!(
                        "hostile: random call {index} entry {slot}: number {} answered {outcome}",
                        entry[0]
                    ));
                    continue;
                }
                leftovers.note(entry[0], entry[1], entry[2], outcome, own_frame);
            }
        }
    }
    core::hint::black_box(&mut batch);
    tally.fold_into(sum);
    entry_tally.fold_into(sum);
    sum.add(RANDOM_CALLS);
    for (what, tally) in [("calls", &tally), ("batch entries", &entry_tally)] {
        print(format_args!(
            "hostile: random {what}: {} values, errors {:?}, {} invalid",
            tally.values, tally.errors, tally.invalid
        ));
    }

    // Shares of its frame would keep it allocated after the VM ends; ports hold records of
    // the channel table every VM shares.
    for (number, [arg0, arg1]) in leftovers.undo(own_frame) {
        let result = call2(number, arg0, arg1);
        if result != 0 {
            print(format_args!(
                "hostile: undoing number {number} ({arg0:#x}, {arg1}) answered {result}"
            ));
        }
        if !valid(result) {
            invalid += 1;
        }
    }
    (RANDOM_CALLS, invalid)
}

/// The most window frames mode 3 may hold (one per page it populates).
const EXHAUST_PAGES: usize = (EXHAUST_GFNS.end - EXHAUST_GFNS.start) as usize;

/// Calls `take` until it answers an error (or `limit` times); returns the count of successes
/// and the error (0 if none came).
fn take_until_refused(limit: u64, mut take: impl FnMut(u64) -> i64) -> Taken {
    for count in 0..limit {
        let result = take(count);
        if result < 0 {
            return Taken {
                count,
                refusal: result,
            };
        }
    }
    Taken {
        count: limit,
        refusal: 0,
    }
}

/// Mode 3: backs all of its RAM, then takes frames (populate), share records (grants of
/// those frames), event channels and far-future timers until each is refused; every refusal
/// must be `QuotaExceeded` after exactly its quota (`guests::hostile::EXHAUST_QUOTA`), however
/// many other VMs exhaust theirs at the same time. It holds them for `params[1]` ms (default
/// `HOLD_MS`) of guest time, yielding so other VMs run, checks they are still refused and
/// that a released frame can be taken again, revokes its grants (a shared frame would outlive
/// the VM) and passes. Its channels and timers go when its quota is dropped at its end.
fn exhaust(info: &StartInfo) -> Verdict {
    let vm = info.vm;
    let peer = unoffered_peer(vm);
    let exceeded = abi::HypercallError::QuotaExceeded.guest_code();
    // Every page of its RAM backed now: no later first touch (a deeper stack) needs a frame.
    for page in 0..u64::from(ipc::limits::GUEST_RAM_PAGES) {
        core::hint::black_box(read_u64(ram_probe(page)));
    }
    let mut frames = [0u64; EXHAUST_PAGES];
    let populated = take_until_refused(EXHAUST_PAGES as u64, |index| {
        let frame = call2(abi::MEMORY_POPULATE, EXHAUST_GFNS.start + index, 0);
        if frame > 0 {
            frames[index as usize] = frame as u64;
        }
        frame
    });
    let held = &frames[..populated.count as usize];
    let granted = take_until_refused(held.len() as u64, |index| {
        call2(abi::GRANT, held[index as usize], peer)
    });
    let ports = take_until_refused(u64::from(abi::EVENT_PORTS), |_| {
        call2(abi::EVTCHN_ALLOC, peer, 0)
    });
    let timers = take_until_refused(256, |_| {
        call2(abi::TIMER_ONESHOT, FAR_FUTURE, abi::VECTOR_MIN)
    });
    let taken = [populated, granted, ports, timers];
    for (resource, taken) in Resource::ALL.iter().zip(&taken) {
        print(format_args!(
            "hostile: vm {vm} took {} {} (quota {}), then {}",
            taken.count,
            resource.name(),
            resource.expected(&EXHAUST_QUOTA),
            taken.refusal
        ));
    }
    let mut passed = Exhaustion::all_as_expected(&taken, &EXHAUST_QUOTA);

    // Hold everything while the other VMs run.
    let hold_ms = match info.params[1] {
        0 => HOLD_MS,
        ms => ms,
    };
    let start = tsc();
    while tsc().wrapping_sub(start) < hold_ms.saturating_mul(info.tsc_khz.max(1)) {
        hypercall(abi::YIELD, [0; 6]);
    }

    // Still held: one more of each is still refused for its quota.
    let next_gfn = EXHAUST_GFNS.start + populated.count;
    let spare_frame = held.get(granted.count as usize).copied().unwrap_or(0);
    let again = [
        (
            "populate",
            if next_gfn < EXHAUST_GFNS.end {
                call2(abi::MEMORY_POPULATE, next_gfn, 0)
            } else {
                exceeded
            },
        ),
        ("grant", call2(abi::GRANT, spare_frame, peer)),
        ("port", call2(abi::EVTCHN_ALLOC, peer, 0)),
        (
            "timer",
            call2(abi::TIMER_ONESHOT, FAR_FUTURE, abi::VECTOR_MIN),
        ),
    ];
    for (what, result) in again {
        if result != exceeded {
            passed = false;
            print(format_args!(
                "hostile: vm {vm}: another {what} after the hold answered {result}"
            ));
        }
    }
    // The quota counts what is held now: a released frame can be taken again.
    if let Some(&last) = held.last() {
        let gfn = EXHAUST_GFNS.start + populated.count - 1;
        let released = call2(abi::MEMORY_RELEASE, last, 0);
        let repopulated = call2(abi::MEMORY_POPULATE, gfn, 0);
        if released != 0 || repopulated <= 0 {
            passed = false;
            print(format_args!(
                "hostile: vm {vm}: release then populate answered {released}, {repopulated}"
            ));
        }
    }
    for &frame in &held[..granted.count as usize] {
        let revoked = call2(abi::GRANT_REVOKE, frame, peer);
        if revoked != 0 {
            passed = false;
            print(format_args!(
                "hostile: vm {vm}: revoking its grant of {frame:#x} answered {revoked}"
            ));
        }
    }
    print(format_args!("{}", Exhaustion { vm, taken, passed }));
    let mut sum = Checksum::new();
    for taken in &taken {
        sum.add(taken.count);
        sum.add(taken.refusal as u64);
    }
    Verdict {
        passed,
        checksum: sum.0,
    }
}

/// The frame a release or share may name: never another of its own frames (its RAM).
fn guard(frame: u64, targets: &Targets) -> u64 {
    if frame == targets.own_frame {
        return frame;
    }
    guarded_frame(frame, call2(abi::QUERY_FRAME, frame, 0), targets)
}

microvisor_guest_runtime::guest_entry!(main);
