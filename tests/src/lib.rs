//! Boot-test catalogue and the pure checks that judge a boot from its serial output.
//!
//! `xtask test` owns the emulators: it boots every [`BootCase`] of [`catalogue()`], records
//! what the kernel printed on COM1 and how the emulator ended ([`Observed`]), and asks
//! [`check`] for the reasons the run does not match the case's [`Expect`]ation (none = pass).
//! Everything here is data and pure functions, so the checks themselves are unit-tested by
//! `cargo test` without an emulator. The serial protocol is specified in
//! `docs/boot-contract.md`.
#![forbid(unsafe_code)]

mod catalogue;
mod check;
mod summary;

pub use catalogue::{Boot, BootCase, Emulator, Expect, ExpectedFailure, Outcome, catalogue};
pub use check::{EmulatorEnd, Observed, check, expected_exit_code};
pub use summary::{find_summary, parse_summary_line};
