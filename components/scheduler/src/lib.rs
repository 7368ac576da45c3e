//! Scheduler domain: vCPU runqueues, the per-CPU current vCPU, vCPU states and time accounting.
//!
//! Placeholder. The scheduler becomes an isolated ring-3 domain in the domains/IPC slice of
//! the project (see `docs/architecture.md`); until then this crate holds no logic.
#![no_std]
#![forbid(unsafe_code)]
