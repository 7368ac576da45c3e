//! Guest kernels: the control VM and the self-checking workloads (UnixBench-, BlkBench- and
//! NetBench-like).
//!
//! Placeholder. Guests need VMX in the core and the hypercall ABI, which arrive with the VMX
//! slice (see `docs/architecture.md`); until then this crate holds no logic.
#![no_std]
#![forbid(unsafe_code)]
