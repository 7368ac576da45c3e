//! The UnixBench-like guest: hypercall- and memory-heavy rounds, each result checked against
//! `guests::unixbench`, reported as a verdict and a checksum.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::unixbench::{
    ALIAS_OFFSET, DEFAULT_ROUNDS, EPILOGUE, PAGE_WORDS, POPULATE_SLOTS, expected_round, golden,
};
use guests::{Checksum, pattern};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, hypercall, layout, print, read_u64, tsc, write_u64,
};

/// A multicall batch in guest memory: (number, arg0, arg1) per entry, then the results.
struct Batch {
    entries: [[u64; 3]; 4],
    results: [i64; 4],
}

fn main(info: &StartInfo) -> Verdict {
    let rounds = match info.params[0] {
        0 => DEFAULT_ROUNDS,
        rounds => rounds,
    };
    print(format_args!(
        "unixbench: vm {} starts {rounds} rounds",
        info.vm
    ));
    let mut sum = Checksum::new();
    let mut mismatches = demand_zero_mismatches();
    for round in 0..rounds {
        let observed = run_round(round);
        let expected = expected_round(info.vm, round);
        for (step, (&seen, &wanted)) in observed.iter().zip(expected.iter()).enumerate() {
            sum.add(seen as u64);
            if seen != wanted {
                mismatches += 1;
                print(format_args!(
                    "unixbench: round {round} step {step}: got {seen:#x}, expected {wanted:#x}"
                ));
            }
        }
    }
    let epilogue = [
        hypercall(999, [0; 6]),
        hypercall(abi::NULL, [0, 0, 0, 0, 0, 1]),
    ];
    for (&seen, &wanted) in epilogue.iter().zip(EPILOGUE.iter()) {
        sum.add(seen as u64);
        if seen != wanted {
            mismatches += 1;
            print(format_args!(
                "unixbench: refused call got {seen}, expected {wanted}"
            ));
        }
    }
    let passed = mismatches == 0 && sum.0 == golden(info.vm, rounds);
    print(format_args!(
        "unixbench: vm {} {} after {rounds} rounds, checksum {:#018x}",
        info.vm,
        if passed { "passed" } else { "FAILED" },
        sum.0
    ));
    Verdict {
        passed,
        checksum: sum.0,
    }
}

/// One round; returns the observations in the order of `expected_round`.
fn run_round(round: u64) -> [i64; 16] {
    let mut seen = [0i64; 16];
    seen[0] = hypercall(abi::NULL, [0; 6]);
    let gfn = layout::WINDOW_FIRST_GFN + round % POPULATE_SLOTS;
    let frame = call2(abi::MEMORY_POPULATE, gfn, 0);
    seen[1] = if frame > 0 { 1 } else { frame };
    if frame <= 0 {
        return seen;
    }
    let page = gfn * 4096;
    for index in 0..PAGE_WORDS {
        write_u64(page + index * 8, pattern(round, index));
    }
    seen[2] = page_sum(page) as i64;
    seen[3] = call2(abi::QUERY_FRAME, frame as u64, 0);
    let alias = layout::WINDOW_FIRST_GFN + ALIAS_OFFSET;
    seen[4] = call2(abi::MAP_GRANT, frame as u64, alias);
    seen[5] = if seen[4] == 0 {
        page_sum(alias * 4096) as i64
    } else {
        0
    };
    seen[6] = call2(abi::UNMAP_GRANT, alias, 0);
    seen[7] = call2(abi::UNMAP_GRANT, alias, 0);
    let mut batch = Batch {
        entries: [
            [abi::NULL, 0, 0],
            [abi::QUERY_FRAME, frame as u64, 0],
            [abi::QUERY_FRAME, 0, 0],
            [abi::MULTICALL, 0, 0],
        ],
        results: [i64::MIN; 4],
    };
    seen[8] = hypercall(
        abi::MULTICALL,
        [
            batch.entries.as_ptr() as u64,
            batch.entries.len() as u64,
            batch.results.as_mut_ptr() as u64,
            0,
            0,
            0,
        ],
    );
    // The core wrote the results into guest memory behind the compiler's back.
    let results = batch.results.as_ptr() as u64;
    for (index, slot) in seen[9..13].iter_mut().enumerate() {
        *slot = read_u64(results + index as u64 * 8) as i64;
    }
    core::hint::black_box(&mut batch);
    // Interrupts stay off in this guest: the vector stays pending and is never taken.
    let timer = call2(
        abi::TIMER_ONESHOT,
        tsc() + 1_000_000,
        abi::VECTOR_MIN + round % 8,
    );
    seen[13] = if timer >= 0 { 1 } else { timer };
    seen[14] = call2(abi::MEMORY_RELEASE, frame as u64, 0);
    seen[15] = hypercall(abi::YIELD, [0; 6]);
    seen
}

/// RAM above the image is demand-zero: the first touch of each page is an EPT violation the
/// memory domain answers with a fresh frame. Checks that such pages read as zero and keep what
/// is written, and that the core backs an untouched page it writes for a hypercall (the
/// results of a multicall). Returns the mismatches (each printed).
fn demand_zero_mismatches() -> u64 {
    const PAGES: u64 = 4;
    let mut mismatches = 0;
    let mut expect = |what: &str, seen: u64, wanted: u64| {
        if seen != wanted {
            mismatches += 1;
            print(format_args!(
                "unixbench: demand-zero RAM: {what}: got {seen:#x}, expected {wanted:#x}"
            ));
        }
    };
    for page in 0..PAGES {
        let address = layout::IMAGE_END + page * 4096;
        expect("first word", read_u64(address), 0);
        expect("last word", read_u64(address + 4088), 0);
        write_u64(address + 8 * page, pattern(page, page));
    }
    for page in 0..PAGES {
        let address = layout::IMAGE_END + page * 4096;
        expect(
            "written word",
            read_u64(address + 8 * page),
            pattern(page, page),
        );
    }
    // A multicall whose results land on a page the guest never touched.
    let entries = [[abi::NULL, 0, 0]];
    let results = layout::IMAGE_END + PAGES * 4096 + 16;
    let status = hypercall(
        abi::MULTICALL,
        [entries.as_ptr() as u64, 1, results, 0, 0, 0],
    );
    core::hint::black_box(&entries);
    expect("multicall into an untouched page", status as u64, 0);
    expect("its result", read_u64(results), 0);
    expect("the word before it", read_u64(results - 8), 0);
    mismatches
}

fn page_sum(address: u64) -> u64 {
    (0..PAGE_WORDS).fold(0u64, |sum, index| {
        sum.wrapping_add(read_u64(address + index * 8))
    })
}

microvisor_guest_runtime::guest_entry!(main);
