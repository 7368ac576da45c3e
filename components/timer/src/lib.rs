//! Timer domain: per-CPU software timer heaps, recurring system timers and APIC timer
//! programming requests.
//!
//! Placeholder. The timer service becomes an isolated ring-3 domain in the domains/IPC slice
//! of the project (see `docs/architecture.md`); until then this crate holds no logic.
#![no_std]
#![forbid(unsafe_code)]
