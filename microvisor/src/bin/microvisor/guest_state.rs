//! The guest CPU state VMX does not switch by itself, switched by the core around every VM
//! entry: CR2, IA32_KERNEL_GS_BASE (SWAPGS), and the debug registers DR0-DR3 and DR6. (DR7 and
//! IA32_DEBUGCTL are switched by VMX with the save/load-debug-controls exit and entry controls;
//! the FPU/SSE state by FXSAVE/FXRSTOR in `guest.rs`; CR8 is the TPR shadow's.)
//!
//! Without this, what one VM writes to these registers is what the next VM entered on the
//! same CPU reads, and a guest's SWAPGS leaves its value in the MSR the core's ring-3 return
//! path swaps in. The debug registers are switched lazily, as KVM and Xen do: a vCPU starts
//! with MOV-DR exiting on, and its first MOV to or from a debug register makes it `debug_live`
//! (exiting off); from then on its DR0-DR3 and DR6 are loaded before each entry and saved after
//! each exit. A vCPU that never touched them cannot read another's (its accesses exit) and its
//! DR7, loaded from its VMCS, enables none of them.
//!
//! All of this runs with interrupts off, between the last check before VM entry and the first
//! action after the exit: nothing in the core reads these registers in between.

use x86_64::registers::model_specific::Msr;

/// IA32_KERNEL_GS_BASE: the GS base SWAPGS exchanges (SDM Vol. 4, table 2-2).
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// What a vCPU keeps of the registers VMX does not switch.
#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchedState {
    /// CR2: the last page-fault address the guest saw.
    pub cr2: u64,
    /// IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// DR0-DR3 (meaningful once `debug_live`).
    pub debug: [u64; 4],
    /// DR6 (meaningful once `debug_live`); its architectural reset value.
    pub dr6: u64,
    /// The guest has touched a debug register: its DR0-DR3 and DR6 are switched at every
    /// entry and exit and MOV-DR exiting is off.
    pub debug_live: bool,
}

impl SwitchedState {
    /// The state a vCPU starts with.
    pub const fn initial() -> SwitchedState {
        SwitchedState {
            cr2: 0,
            kernel_gs_base: 0,
            debug: [0; 4],
            dr6: 0xffff_0ff0,
            debug_live: false,
        }
    }
}

/// What the core had in the switched registers before the entry.
pub struct HostState {
    kernel_gs_base: u64,
}

/// Loads `guest`'s registers right before a VM entry. Returns what [`after_exit`] restores.
///
/// # Safety
/// Interrupts must be off, and nothing may run between this and the VM entry, nor between the
/// exit and [`after_exit`], that uses CR2, IA32_KERNEL_GS_BASE (a return to ring 3 does) or the
/// debug registers.
pub unsafe fn before_entry(guest: &SwitchedState) -> HostState {
    // SAFETY: IA32_KERNEL_GS_BASE exists on every x86-64 CPU; reading it has no effect.
    let host_kgs = unsafe { Msr::new(IA32_KERNEL_GS_BASE).read() };
    if guest.kernel_gs_base != host_kgs {
        // SAFETY: the caller guarantees no ring-3 return (SWAPGS) before `after_exit` puts
        // the core's value back; the core itself never reads this MSR in ring 0.
        unsafe { Msr::new(IA32_KERNEL_GS_BASE).write(guest.kernel_gs_base) };
    }
    // SAFETY: CR2 only holds the last page-fault address; the core reads it only in its #PF
    // handler, and a #PF in the core between here and the entry is fatal anyway.
    unsafe { core::arch::asm!("mov cr2, {}", in(reg) guest.cr2, options(nostack, nomem)) };
    if guest.debug_live {
        let [dr0, dr1, dr2, dr3] = guest.debug;
        // SAFETY: the core uses no hardware breakpoints and DR7 stays 0x400 (all disabled)
        // in VMX root operation after every exit, so these addresses arm nothing in the host.
        unsafe {
            core::arch::asm!(
                "mov dr0, {0}", "mov dr1, {1}", "mov dr2, {2}", "mov dr3, {3}", "mov dr6, {4}",
                in(reg) dr0, in(reg) dr1, in(reg) dr2, in(reg) dr3, in(reg) guest.dr6,
                options(nostack, nomem)
            );
        }
    }
    HostState {
        kernel_gs_base: host_kgs,
    }
}

/// Saves `guest`'s registers right after a VM exit and gives the core its values back.
///
/// # Safety
/// As for [`before_entry`]: called with interrupts still off, right after the exit, with the
/// `host` that call returned.
pub unsafe fn after_exit(guest: &mut SwitchedState, host: HostState) {
    let cr2: u64;
    // SAFETY: reading CR2 has no effect.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nostack, nomem)) };
    guest.cr2 = cr2;
    // SAFETY: as in `before_entry`.
    let kgs = unsafe { Msr::new(IA32_KERNEL_GS_BASE).read() };
    guest.kernel_gs_base = kgs;
    if kgs != host.kernel_gs_base {
        // SAFETY: restores the value the core's ring-3 return path expects to swap in.
        unsafe { Msr::new(IA32_KERNEL_GS_BASE).write(host.kernel_gs_base) };
    }
    if guest.debug_live {
        let (dr0, dr1, dr2, dr3, dr6): (u64, u64, u64, u64, u64);
        // SAFETY: reading debug registers in ring 0 has no effect.
        unsafe {
            core::arch::asm!(
                "mov {0}, dr0", "mov {1}, dr1", "mov {2}, dr2", "mov {3}, dr3", "mov {4}, dr6",
                out(reg) dr0, out(reg) dr1, out(reg) dr2, out(reg) dr3, out(reg) dr6,
                options(nostack, nomem)
            );
        }
        guest.debug = [dr0, dr1, dr2, dr3];
        guest.dr6 = dr6;
    }
}
