//! Hypercall domain: the guest-facing ABI (VMCALL and the other synchronous guest exits) and
//! multicall batches.
//!
//! Placeholder. The hypercall service becomes an isolated ring-3 domain in the domains/IPC
//! slice of the project (see `docs/architecture.md`); until then this crate holds no logic.
#![no_std]
#![forbid(unsafe_code)]
