//! The microvisor's host-testable logic: boot memory maps, the physical frame bitmap, the
//! kernel command line, exception naming and the run summary.
//!
//! The trusted core is split in two. This library holds the parts that are pure arithmetic or
//! bookkeeping, so `cargo test` exercises them on the host. The freestanding kernel binary
//! (`src/bin/microvisor`, built only with the `kernel` feature by `cargo xtask build`) holds
//! everything that touches hardware and links this library. Keep hardware access out of here.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod cmdline;
pub mod exception;
pub mod frames;
pub mod gate;
pub mod guest_cpu;
pub mod inject;
pub mod memmap;
pub mod scenario;
pub mod summary;
pub mod vmx;
