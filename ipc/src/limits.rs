//! System-wide bounds every domain agrees on. They size the fixed arrays in the components'
//! state regions and the range checks of the hypercall dispatcher; changing one changes the
//! layout of preserved state, so a microreboot onto an image built with other limits must
//! rebuild state instead of reintegrating it.

/// Physical CPUs the system serves (per-CPU runqueues, timer heaps, service threads).
pub const MAX_CPUS: usize = 8;

/// vCPU records the scheduler holds, over all VMs.
pub const MAX_VCPUS: usize = 32;

/// VMs, which are also the owners the memory domain accounts frames to (`0..MAX_VMS`).
pub const MAX_VMS: u16 = 64;

/// vCPUs one VM may have (`vcpu` numbers `0..MAX_VCPUS_PER_VM`).
pub const MAX_VCPUS_PER_VM: u16 = 8;

/// Frames in the memory domain's pool: the physical RAM guests are given (the core reserves
/// that many contiguous frames and places the pool on them).
pub const POOL_FRAMES: usize = 1024;

/// Pages of RAM at guest-physical 0 every VM has (the guest boot contract's `RAM_PAGES`). They
/// are demand-zero: the core backs the pages it writes at creation, and the memory domain
/// backs any other on the guest's first touch (an EPT violation, `memory::Request::EptViolation`).
pub const GUEST_RAM_PAGES: u32 = 64;

/// Share records the memory domain holds (one frame shared with one VM), over all VMs: the
/// capacity the VMs' grant quotas are reserved from ([`crate::quota`]).
pub const SHARES: usize = 128;

/// Event-channel records the hypercall domain holds, over all VMs: the capacity the VMs'
/// event-port quotas are reserved from ([`crate::quota`]).
pub const CHANNELS: usize = 64;

/// Timers one CPU's heap in the timer domain holds. A VM's vCPUs may arm all its timers on
/// one CPU, so the VMs' timer quotas are reserved from one heap's worth (less the host's
/// reserve, [`crate::quota::TIMER_HOST_RESERVE`]), not from all CPUs' together.
pub const TIMERS_PER_CPU: usize = 128;
