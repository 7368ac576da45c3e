//! Guest VMs: creation from a guest kernel image, EPT built only from frames the memory
//! domain handed out and the core checked, and the per-CPU loop that runs the vCPUs the
//! scheduler domain picks, turning their VM exits into messages.
//!
//! Mechanism, not policy: which vCPU runs next is the scheduler domain's answer to `PickNext`;
//! what a hypercall does is the hypercall domain's; whether a VM may map a frame is the memory
//! domain's (`MayMap`), checked again here against the pool's bounds before any EPT entry is
//! written. The core keeps, per VM, the one record it must own: which host frame backs each
//! guest frame (the EPT itself).
//!
//! A VM has 1 to `MAX_VCPUS` vCPUs sharing its EPT. vCPUs are pinned to a home CPU (their
//! VMCS stays loaded there, built on that CPU at the first run; a VM's vCPUs are spread over
//! the CPUs from its first home); a CPU runs every vCPU the scheduler queues on it, so more
//! vCPUs than CPUs work. An EPT entry removed while the VM may run elsewhere is shot down:
//! every other CPU inside a guest is made to exit and flushes (INVEPT) before it enters again.
//! A slice ends at a VMX-preemption-timer exit ([`QUANTUM_MS`]), a yield, a HLT or the
//! vCPU's exit. The guest's FPU/SSE state is switched with FXSAVE/FXRSTOR around every entry.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

use elf::ElfBytes;
use elf::abi::PT_LOAD;
use elf::endian::LittleEndian;
use ipc::hypercall::{self as hc, HypercallError};
use ipc::memory::{self, FrameNumber};
use ipc::scheduler::{self, VcpuId};
use microvisor::guest_cpu::{
    CR4_GUEST_HOST_MASK as CR4_OWNED, CR4_GUEST_VIEW, TprGate, VTPR_OFFSET, tpr_gate,
};
use microvisor_abi::guest::{self as layout, StartInfo};
use spin::Mutex;
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::{GsBase, Msr};

use crate::vm::{self, GuestRegisters, read_msr, vmread, vmwrite};
use crate::{apic, domain, guest_state, paging};

// The memory domain backs guest RAM on demand up to the boot contract's RAM size.
const _: () = assert!(ipc::limits::GUEST_RAM_PAGES as u64 == layout::RAM_PAGES);

/// VMs the core runs at once.
pub const MAX_VMS: usize = 8;
/// vCPUs one VM may have.
const VCPUS: usize = layout::MAX_VCPUS as usize;
/// Guest frames the EPT covers: the identity-mapped first 2 MiB.
const GUEST_FRAMES: usize = 512;
/// Length of a vCPU's time slice.
pub const QUANTUM_MS: u64 = 10;

const SCHEDULER: u16 = 2;
const MEMORY: u16 = 3;
const HYPERCALL: u16 = 5;

// VMCS fields beyond the ones `vm` names (SDM Vol. 3D, Appendix B).
const GUEST_IA32_EFER: u64 = 0x2806;
const HOST_IA32_EFER: u64 = 0x2c02;
const GUEST_PREEMPTION_TIMER: u64 = 0x482e;
const GUEST_PHYSICAL_ADDRESS: u64 = 0x2400;
const EXIT_QUALIFICATION: u64 = 0x6400;
const EXIT_INTERRUPTION_INFO: u64 = 0x4404;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_EFER: u32 = 0xc000_0080;
const ENTRY_INTERRUPTION_INFO: u64 = 0x4016;
const IDT_VECTORING_INFO: u64 = 0x4408;
/// Primary processor-based control: exit as soon as the guest can take an interrupt.
const INTERRUPT_WINDOW_EXITING: u64 = 1 << 2;
/// Primary processor-based control: MOV to or from a debug register exits.
const MOV_DR_EXITING: u64 = 1 << 23;
const VIRTUAL_APIC_PAGE: u64 = 0x2012;
const TPR_THRESHOLD: u64 = 0x401c;
const CR4_GUEST_HOST_MASK: u64 = 0x6002;
const CR4_READ_SHADOW: u64 = 0x6006;
const GUEST_IA32_DEBUGCTL: u64 = 0x2802;
/// The largest image VM_CREATE accepts (it is staged in the core before loading).
const IMAGE_STAGE_BYTES: usize = 128 * 1024;

// Exit reasons (SDM Vol. 3D, Appendix C).
const EXIT_EXCEPTION: u32 = 0;
const EXIT_EXTERNAL_INTERRUPT: u32 = 1;
const EXIT_TRIPLE_FAULT: u32 = 2;
const EXIT_INTERRUPT_WINDOW: u32 = 7;
const EXIT_CPUID: u32 = 10;
const EXIT_CR_ACCESS: u32 = 28;
const EXIT_DR_ACCESS: u32 = 29;
const EXIT_TPR_BELOW_THRESHOLD: u32 = 43;
const EXIT_HLT: u32 = 12;
const EXIT_VMCALL: u32 = 18;
const EXIT_IO: u32 = 30;
const EXIT_RDMSR: u32 = 31;
const EXIT_WRMSR: u32 = 32;
const EXIT_EPT_VIOLATION: u32 = 48;
const EXIT_PREEMPTION_TIMER: u32 = 52;

/// How a guest's run ended, as the summary names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Still running (or never finished).
    Unfinished,
    /// The guest's own checks passed.
    Passed,
    /// The guest's own checks failed.
    Failed,
    /// The core stopped it (a fault, a forbidden exit).
    Stopped,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Unfinished => "unfinished",
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::Stopped => "stopped",
        }
    }
}

/// One VM.
struct Vm {
    id: u16,
    guest: &'static str,
    /// The control VM: may create, start, query and destroy VMs.
    privileged: bool,
    /// Its vCPU was handed to the scheduler (VM_START, or created started).
    started: bool,
    /// VM_DESTROY removed it (its record stays for the summary).
    destroyed: bool,
    /// Host frame number backing each guest frame (0 = not mapped).
    frames: [u32; GUEST_FRAMES],
    /// Guest frames mapped with MAP_GRANT (bit per frame).
    granted: [u64; GUEST_FRAMES / 64],
    /// Bit per guest frame: a vCPU (or the core for it) is backing the page on demand, so a
    /// sibling touching it meanwhile waits rather than send a second `EptViolation`.
    backing: [u64; GUEST_FRAMES / 64],
    /// Physical address of the EPT's page table for guest frames 0..512.
    ept_table: u64,
    ept_pointer: u64,
    verdict: Verdict,
    checksum: u64,
    /// The longest stretch without service the guest measured (µs; 0: none), reported with
    /// its verdict (`VM_EXIT`'s third argument, vCPU 0's).
    longest_gap_us: u64,
    stop_reason: &'static str,
    exits: u64,
    hypercalls: u64,
    retries: u64,
    /// Guest RAM pages backed on first touch (EPT violations the memory domain answered).
    demand_pages: u64,
    created_tsc: u64,
    run_tsc: u64,
    /// Its vCPUs (the first `vcpu_count`).
    vcpus: [Vcpu; VCPUS],
    vcpu_count: u8,
    /// A vCPU exited with a failed verdict.
    vcpu_failed: bool,
}

impl Vm {
    /// Whether host frame `frame` is mapped in this VM through `MAP_GRANT`.
    fn maps_as_grant(&self, frame: u64) -> bool {
        (0..GUEST_FRAMES).any(|gfn| {
            u64::from(self.frames[gfn]) == frame && self.granted[gfn / 64] & (1 << (gfn % 64)) != 0
        })
    }
}

/// One vCPU: its VMCS and everything the core saves across its exits.
#[derive(Clone, Copy)]
struct Vcpu {
    home_cpu: u8,
    vmcs: u64,
    /// VMLAUNCH done (the VMCS is built and active on the home CPU).
    launched: bool,
    registers: GuestRegisters,
    fpu: FpuArea,
    /// The multicall batch number (advanced when a batch completes).
    batch: u32,
    entry: u64,
    /// Interrupt-window exiting is on (a vector waits for the guest to enable interrupts).
    window_exiting: bool,
    /// It called VM_EXIT.
    exited: bool,
    /// CR2, KERNEL_GS_BASE and the debug registers, which VMX does not switch.
    switched: guest_state::SwitchedState,
    /// Physical address of its virtual-APIC page (the TPR shadow: its CR8).
    virtual_apic: u64,
}

/// An FXSAVE area.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct FpuArea([u8; 512]);

impl FpuArea {
    /// The state after FNINIT with SSE exceptions masked (MXCSR 0x1f80, FCW 0x37f).
    const fn initial() -> FpuArea {
        let mut bytes = [0u8; 512];
        bytes[0] = 0x7f;
        bytes[1] = 0x03;
        bytes[24] = 0x80;
        bytes[25] = 0x1f;
        FpuArea(bytes)
    }

    fn save(&mut self) {
        // SAFETY: FXSAVE writes 512 bytes into this 16-byte aligned area.
        unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) self.0.as_mut_ptr(), options(nostack)) };
    }

    fn restore(&self) {
        // SAFETY: the area holds a state FXSAVE wrote or `initial` (valid MXCSR).
        unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) self.0.as_ptr(), options(nostack)) };
    }
}

/// The pool of frames guests get (placed in the memory domain by [`configure_pool`]).
#[derive(Clone, Copy)]
struct Pool {
    base: u32,
    frames: u32,
}

struct Table {
    vms: [Option<Vm>; MAX_VMS],
    pool: Option<Pool>,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    vms: [const { None }; MAX_VMS],
    pool: None,
});
/// Application processors run guests while this is set.
static RUNNING: AtomicBool = AtomicBool::new(false);
/// Per VM slot: its VM number + 1 (0 = free), readable without the table lock (virtual
/// interrupts are raised from a system call of the timer domain).
static SLOT_IDS: [AtomicU32; MAX_VMS] = [const { AtomicU32::new(0) }; MAX_VMS];
/// Per VM slot: how many vCPUs it has.
static SLOT_VCPUS: [AtomicU8; MAX_VMS] = [const { AtomicU8::new(0) }; MAX_VMS];
/// Per VM slot and vCPU: the vCPU's home CPU.
static SLOT_HOMES: [[AtomicU8; VCPUS]; MAX_VMS] =
    [const { [const { AtomicU8::new(0) }; VCPUS] }; MAX_VMS];
/// Per VM slot and vCPU: pending virtual interrupt vectors (a 256-bit request register).
static PENDING: [[[AtomicU64; 4]; VCPUS]; MAX_VMS] =
    [const { [const { [const { AtomicU64::new(0) }; 4] }; VCPUS] }; MAX_VMS];
/// Per VM slot and vCPU: a virtual interrupt arrived; the vCPU's home CPU must wake it
/// (scheduler `Wake`).
static WAKE: [[AtomicBool; VCPUS]; MAX_VMS] =
    [const { [const { AtomicBool::new(false) }; VCPUS] }; MAX_VMS];
/// Per VM slot: the VM was stopped; its vCPUs running elsewhere must not enter again.
static ENDED: [AtomicBool; MAX_VMS] = [const { AtomicBool::new(false) }; MAX_VMS];
/// Per CPU: between the last check before a VM entry and the end of the exit (EPT-derived
/// translations may be in use).
static IN_GUEST: [AtomicBool; crate::cpu::MAX_CPUS] =
    [const { AtomicBool::new(false) }; crate::cpu::MAX_CPUS];
/// Per CPU: an EPT entry was removed elsewhere: INVEPT before the next VM entry.
static NEED_INVEPT: [AtomicBool; crate::cpu::MAX_CPUS] =
    [const { AtomicBool::new(false) }; crate::cpu::MAX_CPUS];
/// Per CPU: something may have become runnable here; do not sleep.
static KICKED: [AtomicBool; crate::cpu::MAX_CPUS] =
    [const { AtomicBool::new(false) }; crate::cpu::MAX_CPUS];
/// The next number VM_CREATE hands out (numbers are never reused within a run).
static NEXT_VM: AtomicU16 = AtomicU16::new(microvisor::scenario::FIRST_VM);
/// Serialises MAP_GRANT (check, then EPT entry) against GRANT_REVOKE (no mapping, then
/// unshare), so a revoked frame cannot be mapped in between.
static GRANT_LOCK: Mutex<()> = Mutex::new(());
/// Where VM_CREATE copies an image out of the control VM before loading it.
static IMAGE_STAGE: Mutex<[u8; IMAGE_STAGE_BYTES]> = Mutex::new([0; IMAGE_STAGE_BYTES]);

/// The VMCS active on each CPU (physical address; 0 = none).
static CURRENT_VMCS: [AtomicU64; crate::cpu::MAX_CPUS] =
    [const { AtomicU64::new(0) }; crate::cpu::MAX_CPUS];

/// Why a VM could not be created.
#[derive(Clone, Copy, Debug)]
pub enum CreateError {
    /// No VM slot or no pool.
    NoSlot,
    /// The memory domain did not give a frame the core could accept.
    Memory(&'static str),
    /// The guest image is not a loadable ELF for the guest layout.
    Image(&'static str),
    /// The scheduler refused the vCPU.
    Scheduler,
    /// Out of core memory for the VMCS or EPT.
    OutOfMemory,
    /// A service failed under the creation (it is recovered): nothing was kept; try again.
    Interrupted,
    /// Its quota could not be reserved (it does not fit beside the other VMs' quotas).
    Quota(crate::quota::QuotaError),
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoSlot => f.write_str("no free VM slot (or no guest memory pool)"),
            Self::Memory(why) => write!(f, "guest memory: {why}"),
            Self::Image(why) => write!(f, "guest image: {why}"),
            Self::Scheduler => f.write_str("the scheduler refused its vCPU"),
            Self::OutOfMemory => f.write_str("out of core memory for the VMCS or EPT"),
            Self::Interrupted => f.write_str("a service failed under it; try again"),
            Self::Quota(why) => write!(f, "quota: {why}"),
        }
    }
}

impl From<crate::quota::QuotaError> for CreateError {
    /// A reservation cut short by a recovery is retried like any interrupted creation.
    fn from(error: crate::quota::QuotaError) -> Self {
        match error {
            crate::quota::QuotaError::Interrupted => CreateError::Interrupted,
            other => CreateError::Quota(other),
        }
    }
}

// The quota defaults are sized for this table (`ipc::quota::SIZED_FOR_VMS`). No vCPU or
// multicall quota is needed: every vCPU the table can hold fits the scheduler's records and
// the hypercall domain's multicall logs (one per vCPU), and only the core creates vCPUs.
const _: () = assert!(MAX_VMS as u32 <= ipc::quota::SIZED_FOR_VMS);
const _: () = assert!(MAX_VMS * VCPUS <= ipc::limits::MAX_VCPUS);

fn call<R: serde::de::DeserializeOwned>(
    target: u16,
    request: &impl serde::Serialize,
) -> Result<R, microvisor_abi::Status> {
    match domain::typed_call::<R>(target, request) {
        Ok(Ok(reply)) => Ok(reply),
        Err(domain::TypedCallError::Status(status)) => Err(status),
        _ => Err(microvisor_abi::Status::BadArgument),
    }
}

fn memory_call(request: memory::Request) -> Result<memory::Reply, microvisor_abi::Status> {
    call(MEMORY, &request)
}

fn scheduler_call(request: scheduler::Request) -> Result<scheduler::Reply, microvisor_abi::Status> {
    call(SCHEDULER, &request)
}

/// Reserves the guest RAM pool (contiguous, 2 MiB aligned) and places the memory domain's
/// frame table on it. Call once, after the domains are up and before anything allocates.
pub fn configure_pool() -> Result<(), &'static str> {
    let frames = ipc::limits::POOL_FRAMES as u64;
    let virt = paging::allocate_zeroed(frames).ok_or("no room for the guest RAM pool")?;
    let base = ((virt.as_u64() - paging::PHYS_OFFSET) >> 12) as u32;
    // Its configuration word from now on: a memory domain initialised again keeps the pool here.
    crate::domain::set_config(MEMORY, base);
    let request = memory::Request::Configure {
        base: FrameNumber(base),
    };
    match memory_call(request) {
        Ok(memory::Reply::Done) => {
            TABLE.lock().pool = Some(Pool {
                base,
                frames: frames as u32,
            });
            log::info!(
                "guest RAM pool: {} frames at {:#x} placed in the memory domain",
                frames,
                u64::from(base) << 12
            );
            Ok(())
        }
        _ => Err("the memory domain refused the pool"),
    }
}

/// Whether `frame` lies in the pool (a frame outside it is never mapped, whatever the memory
/// domain says).
pub fn in_pool(frame: u32) -> bool {
    TABLE
        .lock()
        .pool
        .is_some_and(|pool| frame >= pool.base && frame - pool.base < pool.frames)
}

/// The core's check before any EPT entry: the frame is in the pool and the memory domain says
/// `vm` may map it.
fn validate(vm: u16, frame: u32) -> Result<(), HypercallError> {
    if !in_pool(frame) {
        return Err(HypercallError::InvalidArgument);
    }
    let request = memory::Request::MayMap {
        frame: FrameNumber(frame),
        vm,
    };
    // `MayMap` is idempotent: if the memory domain failed under it (and was recovered by the
    // time the call returns), ask once more rather than fail the caller's whole operation.
    match memory_call(request).or_else(|_| memory_call(request)) {
        Ok(memory::Reply::Done) => Ok(()),
        Ok(_) => Err(HypercallError::PermissionDenied),
        Err(_) => Err(HypercallError::Internal),
    }
}

/// Takes a fresh frame for `vm` from the memory domain, checks it, scrubs it and marks it
/// validated.
fn new_frame(vm: u16) -> Result<u32, CreateError> {
    let frame = match memory_call(memory::Request::Allocate { owner: vm }) {
        Ok(memory::Reply::Allocated(frame)) => frame.0,
        Ok(_) => return Err(CreateError::Memory("the memory domain has no frame")),
        // Failed and recovered under the call (or being recovered): try again later.
        Err(_) => return Err(CreateError::Interrupted),
    };
    validate(vm, frame)
        .map_err(|_| CreateError::Memory("the memory domain answered a frame outside the pool"))?;
    scrub(frame);
    let _ = memory_call(memory::Request::Validate {
        frame: FrameNumber(frame),
    });
    Ok(frame)
}

fn frame_ptr(frame: u32) -> *mut u8 {
    paging::phys_to_virt(u64::from(frame) << 12).as_mut_ptr::<u8>()
}

fn scrub(frame: u32) {
    // SAFETY: a pool frame the memory domain just gave this VM: no EPT maps it yet and the
    // direct map covers it.
    unsafe { core::ptr::write_bytes(frame_ptr(frame), 0, 4096) };
}

/// Writes EPT entry `gfn` of `vm` (0 = unmap).
fn set_ept(vm: &mut Vm, gfn: usize, frame: u32) {
    const RWX: u64 = 0b111;
    const WRITE_BACK: u64 = 6 << 3;
    vm.frames[gfn] = frame;
    let entry = if frame == 0 {
        0
    } else {
        (u64::from(frame) << 12) | RWX | WRITE_BACK
    };
    let table = paging::phys_to_virt(vm.ept_table).as_mut_ptr::<u64>();
    // SAFETY: the VM's EPT page table, 512 entries; `gfn` < 512.
    unsafe { table.add(gfn).write_volatile(entry) };
}

/// Flushes EPT-derived translations on this CPU (after an unmap).
fn invept() {
    let descriptor = [0u64; 2];
    // SAFETY: INVEPT all-context (type 2) in VMX root operation; the descriptor is ignored.
    unsafe {
        core::arch::asm!("invept {}, [{}]", in(reg) 2u64, in(reg) descriptor.as_ptr(),
                         options(nostack));
    }
}

/// After EPT entries of the VM in `slot` were removed: flushes this CPU, and makes every other
/// CPU that may hold the VM's translations (the homes of its vCPUs) flush before its next VM
/// entry, waiting for each that is inside a guest now to leave it (a kick IPI exits it).
/// Called with no lock held.
fn shoot_down(slot: usize) {
    invept();
    let me = crate::cpu::current_index();
    let count = usize::from(SLOT_VCPUS[slot].load(Ordering::Relaxed)).min(VCPUS);
    let mut targets = 0u64;
    for home in &SLOT_HOMES[slot][..count] {
        let cpu = usize::from(home.load(Ordering::Relaxed));
        if cpu != me && cpu < crate::cpu::MAX_CPUS {
            targets |= 1 << cpu;
        }
    }
    if targets == 0 {
        return;
    }
    for cpu in (0..crate::cpu::MAX_CPUS).filter(|cpu| targets & (1 << cpu) != 0) {
        NEED_INVEPT[cpu].store(true, Ordering::SeqCst);
        send_kick(cpu);
    }
    for cpu in (0..crate::cpu::MAX_CPUS).filter(|cpu| targets & (1 << cpu) != 0) {
        while IN_GUEST[cpu].load(Ordering::SeqCst) && NEED_INVEPT[cpu].load(Ordering::SeqCst) {
            core::hint::spin_loop();
        }
    }
}

/// Walks guest-physical `gpa..gpa + length` of `vm` page by page (within mapped frames),
/// calling `copy(host pointer, offset into the range, chunk length)` for each piece.
fn walk_guest(
    vm: &Vm,
    gpa: u64,
    length: usize,
    mut copy: impl FnMut(*mut u8, usize, usize),
) -> Result<(), HypercallError> {
    let mut done = 0;
    while done < length {
        let address = gpa
            .checked_add(done as u64)
            .ok_or(HypercallError::InvalidArgument)?;
        let frame = *vm
            .frames
            .get((address >> 12) as usize)
            .ok_or(HypercallError::InvalidArgument)?;
        if frame == 0 {
            return Err(HypercallError::InvalidArgument);
        }
        let offset = (address & 0xfff) as usize;
        let chunk = (4096 - offset).min(length - done);
        // SAFETY: `frame` backs this guest frame of the VM (checked when it was mapped);
        // `offset + chunk` stays inside it.
        copy(unsafe { frame_ptr(frame).add(offset) }, done, chunk);
        done += chunk;
    }
    Ok(())
}

/// Copies `bytes` to guest-physical `gpa` of `vm`.
fn write_guest(vm: &Vm, gpa: u64, bytes: &[u8]) -> Result<(), HypercallError> {
    walk_guest(vm, gpa, bytes.len(), |host, done, chunk| {
        // SAFETY: `host` has `chunk` bytes of a guest frame; the source is `bytes`.
        unsafe { core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), host, chunk) }
    })
}

/// Copies guest-physical `gpa` of `vm` into `bytes`.
fn read_guest(vm: &Vm, gpa: u64, bytes: &mut [u8]) -> Result<(), HypercallError> {
    walk_guest(vm, gpa, bytes.len(), |host, done, chunk| {
        // SAFETY: as in `write_guest`, the other way round.
        unsafe { core::ptr::copy_nonoverlapping(host, bytes[done..].as_mut_ptr(), chunk) }
    })
}

/// What a VM is built from.
pub struct VmConfig<'a> {
    /// Its number (memory owner and hypercall identity).
    pub id: u16,
    /// The guest kernel's name (for the summary).
    pub guest: &'static str,
    /// The guest kernel (an ELF linked for the guest layout).
    pub image: &'a [u8],
    /// The CPU its vCPU 0 is pinned to (vCPU `n` to the `n`th CPU after it, wrapping).
    pub home_cpu: u8,
    /// How many vCPUs it has (1 to `MAX_VCPUS`).
    pub vcpus: u8,
    /// Its start parameters.
    pub params: [u64; layout::PARAMS],
    /// The control VM.
    pub privileged: bool,
    /// Guest images copied into its RAM as boot modules: (name, ELF).
    pub modules: &'a [(&'static str, &'a [u8])],
    /// Hand its vCPU to the scheduler now (else at VM_START).
    pub start: bool,
    /// Its share of the services' resources, reserved before anything is taken for it and
    /// given back when its memory is released (`crate::quota`).
    pub quota: ipc::quota::Quota,
}

/// Allocates a VM number for VM_CREATE (never reused within a run).
fn next_vm_number() -> u16 {
    NEXT_VM.fetch_add(1, Ordering::AcqRel)
}

/// Creates a VM from `config` with one vCPU homed on `config.home_cpu`.
pub fn create_vm(config: &VmConfig<'_>) -> Result<(), CreateError> {
    let VmConfig {
        id,
        guest,
        image,
        home_cpu,
        params,
        privileged,
        modules,
        start,
        vcpus,
        quota,
    } = *config;
    if vcpus == 0 || usize::from(vcpus) > VCPUS {
        return Err(CreateError::Image("vCPU count out of range"));
    }
    {
        let table = TABLE.lock();
        if table.pool.is_none() {
            return Err(CreateError::NoSlot);
        }
        if !table.vms.iter().any(Option::is_none) {
            return Err(CreateError::NoSlot);
        }
        if slot_of(&table, id).is_some() {
            return Err(CreateError::NoSlot);
        }
    }
    NEXT_VM.fetch_max(id.saturating_add(1), Ordering::AcqRel);
    if usize::from(home_cpu) >= crate::run::cpus_registered() {
        return Err(CreateError::Image("home CPU out of range"));
    }
    let elf = ElfBytes::<LittleEndian>::minimal_parse(image)
        .map_err(|_| CreateError::Image("not an ELF file"))?;
    let entry = elf.ehdr.e_entry;
    if !(layout::IMAGE_BASE..layout::IMAGE_END).contains(&entry) {
        return Err(CreateError::Image("entry point outside the image area"));
    }
    let segments = elf
        .segments()
        .ok_or(CreateError::Image("no program headers"))?;

    // EPT: PML4 -> PDPT -> PD -> one page table for guest frames 0..512.
    let (pml4, pml4_ptr) = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?;
    let (pdpt, pdpt_ptr) = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?;
    let (pd, pd_ptr) = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?;
    let (pt, _) = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?;
    let cpus = crate::run::cpus_registered().max(1);
    let mut vcpu_states = [Vcpu {
        home_cpu,
        vmcs: 0,
        launched: false,
        registers: GuestRegisters {
            rdi: layout::START_INFO,
            ..GuestRegisters::default()
        },
        fpu: FpuArea::initial(),
        batch: 0,
        entry,
        window_exiting: false,
        exited: false,
        switched: guest_state::SwitchedState::initial(),
        virtual_apic: 0,
    }; VCPUS];
    for (index, vcpu) in vcpu_states.iter_mut().enumerate().take(usize::from(vcpus)) {
        vcpu.vmcs = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?.0;
        // Its own virtual-APIC page: CR8 reads and writes land there, zeroed (TPR 0).
        vcpu.virtual_apic = vm::allocate(1).map_err(|_| CreateError::OutOfMemory)?.0;
        vcpu.home_cpu = ((usize::from(home_cpu) + index) % cpus) as u8;
        vcpu.registers.rsi = index as u64;
    }
    // SAFETY: fresh zeroed pages viewed as 512-entry tables.
    unsafe {
        *(pml4_ptr as *mut u64) = pdpt | 0b111;
        *(pdpt_ptr as *mut u64) = pd | 0b111;
        *(pd_ptr as *mut u64) = pt | 0b111;
    }
    let mut vm = Vm {
        id,
        guest,
        privileged,
        started: false,
        destroyed: false,
        frames: [0; GUEST_FRAMES],
        granted: [0; GUEST_FRAMES / 64],
        backing: [0; GUEST_FRAMES / 64],
        ept_table: pt,
        // Write-back EPT structures, 4-level walk (SDM Vol. 3C, 24.6.11).
        ept_pointer: pml4 | 6 | (3 << 3),
        verdict: Verdict::Unfinished,
        checksum: 0,
        longest_gap_us: 0,
        stop_reason: "",
        exits: 0,
        hypercalls: 0,
        retries: 0,
        demand_pages: 0,
        created_tsc: apic::tsc(),
        run_tsc: 0,
        vcpus: vcpu_states,
        vcpu_count: vcpus,
        vcpu_failed: false,
    };
    // Its quota first: every frame taken for it from here on is charged to it.
    crate::quota::reserve(id, &quota)?;
    // Any failure from here returns the frames taken so far, and the quota.
    let built = build_memory(&mut vm, &elf, &segments, params, modules);
    if let Err(error) = built {
        release_frames(&mut vm);
        crate::quota::release(id);
        return Err(error);
    }
    let backed_pages = vm.frames.iter().filter(|&&frame| frame != 0).count();
    let slot = {
        let mut table = TABLE.lock();
        let Some(slot) = table.vms.iter().position(Option::is_none) else {
            drop(table);
            release_frames(&mut vm);
            crate::quota::release(id);
            return Err(CreateError::NoSlot);
        };
        for (index, vcpu) in vm.vcpus.iter().enumerate() {
            PENDING[slot][index]
                .iter()
                .for_each(|word| word.store(0, Ordering::Relaxed));
            WAKE[slot][index].store(false, Ordering::Relaxed);
            SLOT_HOMES[slot][index].store(vcpu.home_cpu, Ordering::Relaxed);
        }
        SLOT_VCPUS[slot].store(vcpus, Ordering::Relaxed);
        ENDED[slot].store(false, Ordering::Relaxed);
        SLOT_IDS[slot].store(u32::from(id) + 1, Ordering::Release);
        table.vms[slot] = Some(vm);
        slot
    };
    log::info!(
        "VM {id} created: guest {guest}{}, {} KiB demand-zero RAM ({} pages backed at creation), {vcpus} vCPU(s) from CPU {home_cpu}",
        if privileged { " (control VM)" } else { "" },
        layout::RAM_PAGES * 4,
        backed_pages
    );
    if start {
        start_vm(slot, None).map_err(|_| CreateError::Scheduler)?;
    }
    Ok(())
}

/// Gives a VM under construction its RAM, boot structures, image and modules.
fn build_memory(
    vm: &mut Vm,
    elf: &ElfBytes<'_, LittleEndian>,
    segments: &elf::segment::SegmentTable<'_, LittleEndian>,
    params: [u64; layout::PARAMS],
    modules: &[(&'static str, &[u8])],
) -> Result<(), CreateError> {
    // Guest RAM is demand-zero: the core backs the pages it writes now (boot structures,
    // image, modules); the memory domain backs the rest (stack, bss) on the guest's first
    // touch of each page.
    back_for_build(vm, layout::PML4, 0x3000)?;
    back_for_build(vm, layout::GDT, 24)?;
    back_for_build(vm, layout::START_INFO, layout::start_info::WORDS as u64 * 8)?;
    // Boot modules: each from a page boundary of the module area.
    let mut table = [layout::Module::default(); layout::MAX_MODULES];
    if modules.len() > layout::MAX_MODULES {
        return Err(CreateError::Image("too many boot modules"));
    }
    let mut cursor = layout::MODULES_BASE;
    for (index, (name, bytes)) in modules.iter().enumerate() {
        let pages = (bytes.len() as u64).div_ceil(4096);
        if cursor + pages * 4096 > layout::MODULES_END {
            return Err(CreateError::Image("the boot modules do not fit"));
        }
        back_for_build(vm, cursor, pages * 4096)?;
        write_guest(vm, cursor, bytes).map_err(|_| CreateError::Image("cannot copy a module"))?;
        table[index] = layout::Module {
            name: layout::name_word(name),
            address: cursor,
            length: bytes.len() as u64,
        };
        cursor += pages * 4096;
    }
    // Guest page tables: an identity map of the first 2 MiB with one large page.
    let words = |address: u64, values: &[u64]| {
        let mut bytes = [0u8; 64];
        for (chunk, value) in bytes.chunks_exact_mut(8).zip(values) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        write_guest(vm, address, &bytes[..values.len() * 8])
    };
    let written = words(layout::PML4, &[(layout::PML4 + 0x1000) | 0x7])
        .and(words(
            layout::PML4 + 0x1000,
            &[(layout::PML4 + 0x2000) | 0x7],
        ))
        .and(words(layout::PML4 + 0x2000, &[0x83]))
        .and(words(
            layout::GDT,
            &[0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff],
        ));
    let info = StartInfo {
        vm: vm.id,
        vcpu: 0,
        vcpus: u16::from(vm.vcpu_count),
        ram_bytes: layout::RAM_PAGES * 4096,
        cpus: crate::run::cpus_registered() as u64,
        privileged: vm.privileged,
        params,
        modules: table,
        module_count: modules.len(),
        tsc_khz: apic::tsc_khz(),
    };
    written
        .and(write_start_info(vm, &info))
        .map_err(|_| CreateError::Image("cannot write the boot structures"))?;
    for segment in segments.iter().filter(|segment| segment.p_type == PT_LOAD) {
        let start = segment.p_paddr;
        let end = start
            .checked_add(segment.p_memsz)
            .ok_or(CreateError::Image("segment size overflows"))?;
        if start < layout::IMAGE_BASE || end > layout::IMAGE_END {
            return Err(CreateError::Image("a segment lies outside the image area"));
        }
        let data = elf
            .segment_data(&segment)
            .map_err(|_| CreateError::Image("segment data out of the file"))?;
        if data.len() as u64 > segment.p_memsz {
            return Err(CreateError::Image(
                "segment file size exceeds its memory size",
            ));
        }
        back_for_build(vm, start, data.len() as u64)?;
        write_guest(vm, start, data).map_err(|_| CreateError::Image("cannot copy a segment"))?;
    }
    Ok(())
}

/// Backs every unbacked page of `gpa..gpa + length` of a VM under construction with a fresh
/// frame (the core is about to write there).
fn back_for_build(vm: &mut Vm, gpa: u64, length: u64) -> Result<(), CreateError> {
    if length == 0 {
        return Ok(());
    }
    let last = gpa
        .checked_add(length - 1)
        .ok_or(CreateError::Image("an area overflows"))?;
    for gfn in gpa >> 12..=last >> 12 {
        let gfn = usize::try_from(gfn)
            .ok()
            .filter(|&gfn| gfn < GUEST_FRAMES)
            .ok_or(CreateError::Image("an area lies beyond guest memory"))?;
        if vm.frames[gfn] == 0 {
            let frame = new_frame(vm.id)?;
            set_ept(vm, gfn, frame);
        }
    }
    Ok(())
}

/// What backing a guest page on demand came to.
enum Demand {
    /// The page is backed (now, or it already was).
    Backed,
    /// The memory domain failed under the request and was recovered: touch the page again.
    Interrupted,
    /// The memory domain refused: the page is not the VM's RAM, or no frame is left.
    Refused(memory::Error),
}

/// Serves a touch of guest frame `gfn` with no EPT entry, by the VM in `slot` or by the core on
/// its behalf: an EPT violation as a message to the memory domain, which answers a new frame
/// for demand-zero RAM or refuses. The frame is checked (in the pool, `MayMap`), scrubbed and
/// mapped here; the guest's access is retried (RIP is not advanced).
fn back_page(slot: usize, vm_id: u16, gfn: u64) -> Demand {
    let Some(page) = usize::try_from(gfn)
        .ok()
        .filter(|&page| page < GUEST_FRAMES)
    else {
        return Demand::Refused(memory::Error::NotGuestRam);
    };
    let (word, bit) = (page / 64, 1u64 << (page % 64));
    {
        let mut table = TABLE.lock();
        let Some(vm) = table.vms[slot].as_mut() else {
            return Demand::Refused(memory::Error::NotGuestRam);
        };
        if vm.frames[page] != 0 {
            return Demand::Backed;
        }
        // A sibling vCPU is backing this very page: touch it again once it is done. One
        // violation per page at a time, so a repeated `EptViolation` is always a retry after
        // a lost reply (the memory domain then answers the same frame).
        if vm.backing[word] & bit != 0 {
            return Demand::Interrupted;
        }
        vm.backing[word] |= bit;
    }
    let demand = back_new_page(slot, vm_id, page);
    if let Some(vm) = TABLE.lock().vms[slot].as_mut() {
        vm.backing[word] &= !bit;
    }
    demand
}

/// [`back_page`] once this CPU alone is backing guest frame `gfn`.
fn back_new_page(slot: usize, vm_id: u16, gfn: usize) -> Demand {
    let backed = |table: &Table| {
        table.vms[slot]
            .as_ref()
            .is_some_and(|vm| vm.frames[gfn] != 0)
    };
    // A sibling vCPU stopped the VM (its memory is being released): back nothing more.
    if ENDED[slot].load(Ordering::Acquire) {
        return Demand::Refused(memory::Error::NotGuestRam);
    }
    let request = memory::Request::EptViolation {
        vm: vm_id,
        gfn: gfn as u32,
    };
    let frame = match memory_call(request) {
        Ok(memory::Reply::Allocated(frame)) => frame.0,
        Ok(memory::Reply::Error(error)) => return Demand::Refused(error),
        Ok(_) => return Demand::Refused(memory::Error::Inconsistent),
        Err(_) => return Demand::Interrupted,
    };
    if validate(vm_id, frame).is_err() {
        // Not the guest's fault: the memory domain answered a frame that is not the VM's to
        // map (outside the pool, or owned by another VM). A failure of the memory domain,
        // detected by its reply: recovered, and the guest touches the page again.
        log::error!(
            "VM {vm_id}: the memory domain backed guest frame {gfn:#x} with frame {frame:#x}, \
             which fails the core's check"
        );
        crate::domain::malformed_reply(
            MEMORY,
            "it backed a guest page with a frame the VM may not map",
        );
        return Demand::Interrupted;
    }
    scrub(frame);
    let _ = memory_call(memory::Request::Validate {
        frame: FrameNumber(frame),
    });
    let mut table = TABLE.lock();
    if !backed(&table)
        && let Some(vm) = table.vms[slot].as_mut()
    {
        set_ept(vm, gfn, frame);
        vm.demand_pages += 1;
        return Demand::Backed;
    }
    // Backed meanwhile, or the VM is gone: the new frame is not needed.
    drop(table);
    let _ = memory_call(memory::Request::Free {
        frame: FrameNumber(frame),
        owner: vm_id,
    });
    Demand::Backed
}

/// Backs the guest RAM pages of `gpa..gpa + length` the core is about to read or write for a
/// hypercall of the VM in `slot` (a guest may hand the core a buffer it never touched). Pages
/// outside guest RAM are left to the copy's own check. `Ok(false)`: a service failed under
/// it, issue the hypercall again.
fn back_for_hypercall(
    slot: usize,
    vm_id: u16,
    gpa: u64,
    length: usize,
) -> Result<bool, HypercallError> {
    if length == 0 {
        return Ok(true);
    }
    let last = gpa
        .checked_add(length as u64 - 1)
        .ok_or(HypercallError::InvalidArgument)?;
    for gfn in (gpa >> 12..=last >> 12).take_while(|&gfn| gfn < layout::RAM_PAGES) {
        match back_page(slot, vm_id, gfn) {
            Demand::Backed => {}
            Demand::Interrupted => return Ok(false),
            Demand::Refused(_) => return Err(HypercallError::NoResources),
        }
    }
    Ok(true)
}

/// Writes the start information words at `layout::START_INFO`.
fn write_start_info(vm: &Vm, info: &StartInfo) -> Result<(), HypercallError> {
    let mut bytes = [0u8; layout::start_info::WORDS * 8];
    for (chunk, value) in bytes.chunks_exact_mut(8).zip(info.to_words()) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    write_guest(vm, layout::START_INFO, &bytes)
}

/// Returns every frame a VM (under construction, or not yet started) holds.
fn release_frames(vm: &mut Vm) {
    for gfn in 0..GUEST_FRAMES {
        let frame = vm.frames[gfn];
        if frame != 0 && vm.granted[gfn / 64] & (1 << (gfn % 64)) == 0 {
            let _ = memory_call(memory::Request::Free {
                frame: FrameNumber(frame),
                owner: vm.id,
            });
        }
        if frame != 0 {
            set_ept(vm, gfn, 0);
        }
    }
    vm.granted = [0; GUEST_FRAMES / 64];
}

/// Starts the VM in `slot`: optionally new start parameters, then its vCPU goes to the
/// scheduler.
fn start_vm(slot: usize, params: Option<[u64; layout::PARAMS]>) -> Result<(), HypercallError> {
    let (id, homes, count) = {
        let mut table = TABLE.lock();
        let vm = table.vms[slot].as_mut().ok_or(HypercallError::NotFound)?;
        if vm.started || vm.destroyed {
            return Err(HypercallError::InUse);
        }
        if let Some(params) = params {
            let mut bytes = [0u8; layout::PARAMS * 8];
            for (chunk, value) in bytes.chunks_exact_mut(8).zip(params) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            let at = layout::START_INFO + layout::start_info::PARAMS as u64 * 8;
            write_guest(vm, at, &bytes)?;
        }
        vm.started = true;
        vm.created_tsc = apic::tsc();
        (
            vm.id,
            vm.vcpus.map(|vcpu| vcpu.home_cpu),
            usize::from(vm.vcpu_count),
        )
    };
    for (index, &home_cpu) in homes.iter().enumerate().take(count) {
        let vcpu = VcpuId {
            vm: id,
            vcpu: index as u16,
        };
        if !matches!(
            scheduler_call(scheduler::Request::CreateVcpu { vcpu, home_cpu }),
            Ok(scheduler::Reply::Done)
        ) {
            for created in 0..index {
                let vcpu = VcpuId {
                    vm: id,
                    vcpu: created as u16,
                };
                let _ = scheduler_call(scheduler::Request::DestroyVcpu { vcpu });
            }
            if let Some(vm) = TABLE.lock().vms[slot].as_mut() {
                vm.started = false;
            }
            return Err(HypercallError::Internal);
        }
    }
    for &home_cpu in homes.iter().take(count) {
        kick(usize::from(home_cpu));
    }
    Ok(())
}

/// Raises virtual interrupt `vector` in vCPU `vcpu` of VM `vm` (the timer domain's `INJECT`):
/// pending until the vCPU can take it; its home CPU wakes it if it is blocked. Lock-free (runs
/// in a system call). Returns whether the VM exists.
pub fn inject(vm: u16, vcpu: u8, vector: u8) -> bool {
    let Some(slot) = SLOT_IDS
        .iter()
        .position(|id| id.load(Ordering::Acquire) == u32::from(vm) + 1)
    else {
        return false;
    };
    if vcpu >= SLOT_VCPUS[slot].load(Ordering::Relaxed) {
        return false;
    }
    let vcpu = usize::from(vcpu);
    PENDING[slot][vcpu][usize::from(vector / 64)].fetch_or(1 << (vector % 64), Ordering::AcqRel);
    WAKE[slot][vcpu].store(true, Ordering::Release);
    kick(usize::from(SLOT_HOMES[slot][vcpu].load(Ordering::Relaxed)));
    true
}

/// Tells `cpu` that it may have work: it does not go to sleep, and is interrupted if it is
/// asleep.
fn kick(cpu: usize) {
    if let Some(flag) = KICKED.get(cpu) {
        flag.store(true, Ordering::Release);
    }
    if cpu != crate::cpu::current_index() {
        send_kick(cpu);
    }
}

/// The kick IPI to CPU index `cpu` alone: it ends a HLT, and a CPU inside a guest exits.
fn send_kick(cpu: usize) {
    if let Some(apic_id) = crate::run::apic_id(cpu) {
        apic::send_to(apic_id, crate::trap::KICK_VECTOR);
    }
}

/// Kicks every other CPU (after an event-channel send: the woken vCPU may live anywhere).
fn kick_others() {
    let me = crate::cpu::current_index();
    for (cpu, flag) in KICKED.iter().enumerate() {
        if cpu != me {
            flag.store(true, Ordering::Release);
        }
    }
    apic::send_to_others(crate::trap::KICK_VECTOR);
}

/// Timer-related work on this CPU between guest entries: a passed deadline becomes the timer
/// domain's `DEADLINE` notification, delivered at once (it expires the timers and raises
/// their virtual interrupts).
fn service_timers(cpu: usize) {
    domain::check_deadline(cpu, apic::tsc());
    if domain::timer_notified() {
        domain::deliver_notifications();
    }
}

/// Wakes (scheduler `Wake`) the vCPUs homed here that got a virtual interrupt.
fn wake_local(cpu: usize) {
    for slot in 0..MAX_VMS {
        let id = SLOT_IDS[slot].load(Ordering::Acquire);
        if id == 0 {
            continue;
        }
        for index in 0..usize::from(SLOT_VCPUS[slot].load(Ordering::Relaxed)).min(VCPUS) {
            if usize::from(SLOT_HOMES[slot][index].load(Ordering::Relaxed)) != cpu
                || !WAKE[slot][index].swap(false, Ordering::AcqRel)
            {
                continue;
            }
            let vcpu = VcpuId {
                vm: (id - 1) as u16,
                vcpu: index as u16,
            };
            if scheduler_call(scheduler::Request::Wake { vcpu }).is_err() {
                // The scheduler is being recovered: try again next time round.
                WAKE[slot][index].store(true, Ordering::Release);
            }
        }
    }
}

/// The highest pending virtual interrupt of vCPU `vcpu` of the VM in `slot`.
fn highest_pending(slot: usize, vcpu: usize) -> Option<u8> {
    (0..4).rev().find_map(|word| {
        let bits = PENDING[slot][vcpu][word].load(Ordering::Acquire);
        (bits != 0).then(|| (word * 64 + 63 - bits.leading_zeros() as usize) as u8)
    })
}

/// Before a VM entry: injects the highest pending vector if the guest can take it now, else
/// asks for an exit as soon as it can (interrupt-window exiting).
fn prepare_injection(slot: usize, vcpu: usize, state: &mut Vcpu) -> Result<(), vm::GuestError> {
    let mut threshold = 0;
    let want_window = match highest_pending(slot, vcpu) {
        None => false,
        Some(vector) => {
            // The guest's CR8 (its virtual TPR) may mask the vector: then the guest's lowering
            // it below the vector's class exits (TPR below threshold) and it is injected then.
            let vtpr_address = paging::phys_to_virt(state.virtual_apic + VTPR_OFFSET as u64);
            // SAFETY: the vCPU's own virtual-APIC page, mapped in the direct map.
            let vtpr = unsafe { vtpr_address.as_ptr::<u32>().read_volatile() } as u8;
            let interrupts_on = vmread(vm::GUEST_RFLAGS) & (1 << 9) != 0;
            // Blocking by STI or MOV SS.
            let blocked = vmread(vm::GUEST_INTERRUPTIBILITY) & 0b11 != 0;
            if let TprGate::Masked { threshold: class } = tpr_gate(vector, vtpr) {
                threshold = class;
                false
            } else if interrupts_on && !blocked {
                PENDING[slot][vcpu][usize::from(vector / 64)]
                    .fetch_and(!(1 << (vector % 64)), Ordering::AcqRel);
                // Valid, external interrupt (type 0), the vector.
                vmwrite(ENTRY_INTERRUPTION_INFO, (1 << 31) | u64::from(vector))?;
                false
            } else {
                true
            }
        }
    };
    vmwrite(TPR_THRESHOLD, u64::from(threshold))?;
    if want_window != state.window_exiting {
        let primary = vmread(vm::PROC_BASED_CONTROLS);
        let primary = if want_window {
            primary | INTERRUPT_WINDOW_EXITING
        } else {
            primary & !INTERRUPT_WINDOW_EXITING
        };
        vmwrite(vm::PROC_BASED_CONTROLS, primary)?;
        state.window_exiting = want_window;
    }
    Ok(())
}

/// Builds the VMCS of vCPU `index` on its home CPU (host state is this CPU's).
fn build_vmcs(vcpu: &Vcpu, index: u16, ept_pointer: u64) -> Result<(), vm::GuestError> {
    use microvisor::vmx::{VmxBasic, adjust_controls};
    use vm::GuestError::Unsupported;
    let basic = VmxBasic::from_msr(read_msr(vm::IA32_VMX_BASIC));
    // Secondary: EPT (bit 1), WBINVD exiting (6). RDTSCP (3), INVPCID (12) and XSAVES (20)
    // stay off: those instructions raise #UD in the guest.
    let secondary = adjust_controls((1 << 1) | (1 << 6), read_msr(vm::IA32_VMX_PROCBASED_CTLS2))
        .map_err(|_| Unsupported("EPT and WBINVD exiting"))?;
    // Pin-based: external-interrupt exiting (bit 0), VMX-preemption timer (bit 6).
    let pin = adjust_controls(1 | (1 << 6), read_msr(vm::IA32_VMX_TRUE_PINBASED_CTLS))
        .map_err(|_| Unsupported("the VMX-preemption timer"))?;
    // Primary: HLT exiting (7), MWAIT exiting (10), RDPMC exiting (11), use TPR shadow (21:
    // CR8 is the vCPU's virtual-APIC page, never the real TPR), MOV-DR exiting (23, until the
    // guest first touches a debug register: see `guest_state`), unconditional I/O exiting
    // (24), MONITOR exiting (29), secondary controls (31). CR8-load/store exiting (19, 20)
    // are off. MSR bitmaps are off, so every RDMSR/WRMSR exits.
    let primary = adjust_controls(
        (1 << 7)
            | (1 << 10)
            | (1 << 11)
            | (1 << 21)
            | (1 << 24)
            | (1 << 29)
            | (1 << 31)
            | MOV_DR_EXITING as u32,
        read_msr(vm::IA32_VMX_TRUE_PROCBASED_CTLS),
    )
    .map_err(|_| Unsupported("HLT, MWAIT, RDPMC, MOV-DR, I/O exiting and the TPR shadow"))?;
    // Exit: save debug controls (2: the guest's DR7 and DEBUGCTL), 64-bit host (9), load
    // IA32_EFER (21).
    let exit = adjust_controls(
        (1 << 2) | (1 << 9) | (1 << 21),
        read_msr(vm::IA32_VMX_TRUE_EXIT_CTLS),
    )
    .map_err(|_| Unsupported("saving debug controls and loading EFER on exit"))?;
    // Entry: load debug controls (2), IA-32e mode guest (9), load IA32_EFER (15).
    let entry = adjust_controls(
        (1 << 2) | (1 << 9) | (1 << 15),
        read_msr(vm::IA32_VMX_TRUE_ENTRY_CTLS),
    )
    .map_err(|_| Unsupported("64-bit guests"))?;

    // SAFETY: the VMCS page is this vCPU's, zeroed at creation; its first 4 bytes take the
    // revision identifier before VMCLEAR.
    unsafe {
        (paging::phys_to_virt(vcpu.vmcs).as_mut_ptr::<u32>()).write(basic.revision);
    }
    let failed: u8;
    // SAFETY: VMCLEAR then VMPTRLD of the vCPU's VMCS region; VMX root operation.
    unsafe {
        core::arch::asm!("vmclear [{address}]", "vmptrld [{address}]", "setna {failed}",
                         address = in(reg) &vcpu.vmcs, failed = out(reg_byte) failed,
                         options(nostack));
    }
    if failed != 0 {
        return Err(vm::GuestError::VmcsAccess(0));
    }
    vmwrite(vm::PIN_BASED_CONTROLS, u64::from(pin))?;
    vmwrite(vm::PROC_BASED_CONTROLS, u64::from(primary))?;
    vmwrite(vm::SECONDARY_CONTROLS, u64::from(secondary))?;
    vmwrite(vm::EXIT_CONTROLS, u64::from(exit))?;
    vmwrite(vm::ENTRY_CONTROLS, u64::from(entry))?;
    // Every guest exception exits: the core stops a guest that faults.
    vmwrite(vm::EXCEPTION_BITMAP, 0xffff_ffff)?;
    vmwrite(vm::EPT_POINTER, ept_pointer)?;
    vmwrite(vm::VMCS_LINK_POINTER, u64::MAX)?;
    // CR8: the TPR shadow in the vCPU's own page, no threshold until a vector waits on it.
    vmwrite(VIRTUAL_APIC_PAGE, vcpu.virtual_apic)?;
    vmwrite(TPR_THRESHOLD, 0)?;
    // CR4: the core owns every bit the virtual CPU does not offer; the guest reads them as
    // its starting view (no VMXE) and a write that changes one exits.
    vmwrite(CR4_GUEST_HOST_MASK, CR4_OWNED)?;
    vmwrite(CR4_READ_SHADOW, CR4_GUEST_VIEW)?;

    // Host state: this CPU.
    let (gdtr, idtr) = (
        x86_64::instructions::tables::sgdt(),
        x86_64::instructions::tables::sidt(),
    );
    vmwrite(vm::HOST_CR0, Cr0::read_raw())?;
    vmwrite(vm::HOST_CR3, Cr3::read().0.start_address().as_u64())?;
    vmwrite(vm::HOST_CR4, Cr4::read_raw())?;
    vmwrite(vm::HOST_CS_SELECTOR, 0x08)?;
    vmwrite(vm::HOST_SS_SELECTOR, 0x10)?;
    vmwrite(vm::HOST_DS_SELECTOR, 0x10)?;
    vmwrite(vm::HOST_ES_SELECTOR, 0x10)?;
    vmwrite(vm::HOST_FS_SELECTOR, 0)?;
    vmwrite(vm::HOST_GS_SELECTOR, 0)?;
    vmwrite(vm::HOST_TR_SELECTOR, 0x28)?;
    vmwrite(vm::HOST_FS_BASE, 0)?;
    vmwrite(vm::HOST_GS_BASE, GsBase::read().as_u64())?;
    vmwrite(vm::HOST_TR_BASE, crate::cpu::tss_base())?;
    vmwrite(vm::HOST_GDTR_BASE, gdtr.base.as_u64())?;
    vmwrite(vm::HOST_IDTR_BASE, idtr.base.as_u64())?;
    vmwrite(vm::HOST_SYSENTER_CS, 0)?;
    vmwrite(vm::HOST_SYSENTER_ESP, 0)?;
    vmwrite(vm::HOST_SYSENTER_EIP, 0)?;
    // SAFETY: IA32_EFER exists on every x86-64 CPU.
    vmwrite(HOST_IA32_EFER, unsafe { Msr::new(IA32_EFER).read() })?;
    vmwrite(vm::HOST_RIP, vm::vmx_exit_stub as *const () as u64)?;

    // Guest state: 64-bit mode, paging on the guest's identity map, interrupts off.
    let fixed0 = read_msr(vm::IA32_VMX_CR0_FIXED0);
    let fixed1 = read_msr(vm::IA32_VMX_CR0_FIXED1);
    // PE, MP, ET, NE, WP, PG.
    let cr0 = (fixed0 | 0x8001_0033) & fixed1;
    vmwrite(vm::GUEST_CR0, cr0)?;
    vmwrite(vm::GUEST_CR3, layout::PML4)?;
    // PAE, OSFXSR, OSXMMEXCPT, plus the fixed bits (VMXE).
    vmwrite(vm::GUEST_CR4, read_msr(vm::IA32_VMX_CR4_FIXED0) | 0x620)?;
    // LME, LMA.
    vmwrite(GUEST_IA32_EFER, 0x500)?;
    for segment in 0..8u64 {
        // ES, CS, SS, DS, FS, GS, LDTR, TR.
        let (selector, limit, access) = match segment {
            1 => (0x08, 0xffff_ffff, 0xa09b), // CS: 64-bit code, present, accessed
            6 => (0, 0, 0x1_0000),            // LDTR: unusable
            7 => (0x18, 0x67, 0x8b),          // TR: present, busy 64-bit TSS
            _ => (0x10, 0xffff_ffff, 0xc093), // data: present, read-write, accessed
        };
        vmwrite(vm::GUEST_ES_SELECTOR + segment * 2, selector)?;
        vmwrite(vm::GUEST_ES_BASE + segment * 2, 0)?;
        vmwrite(vm::GUEST_ES_LIMIT + segment * 2, limit)?;
        vmwrite(vm::GUEST_ES_ACCESS + segment * 2, access)?;
    }
    vmwrite(vm::GUEST_GDTR_BASE, layout::GDT)?;
    vmwrite(vm::GUEST_GDTR_LIMIT, 23)?;
    vmwrite(vm::GUEST_IDTR_BASE, 0)?;
    vmwrite(vm::GUEST_IDTR_LIMIT, 0)?;
    vmwrite(vm::GUEST_DR7, 0x400)?;
    vmwrite(GUEST_IA32_DEBUGCTL, 0)?;
    // As if `_start` had been called: RSP + 8 is 16-byte aligned (System V ABI).
    vmwrite(vm::GUEST_RSP, layout::stack_top(index) - 8)?;
    vmwrite(vm::GUEST_RIP, vcpu.entry)?;
    vmwrite(vm::GUEST_RFLAGS, 0x2)?;
    vmwrite(vm::GUEST_INTERRUPTIBILITY, 0)?;
    vmwrite(vm::GUEST_ACTIVITY, 0)?;
    Ok(())
}

/// What the exit handler wants next.
enum Next {
    /// Enter the same vCPU again.
    Resume,
    /// End the slice; ask the scheduler what runs next.
    Deschedule,
    /// The vCPU is finished (its verdict is recorded); end the slice.
    Finished,
}

/// The preemption timer's rate: it counts TSC >> IA32_VMX_MISC[4:0].
fn preemption_shift() -> u64 {
    read_msr(IA32_VMX_MISC) & 0x1f
}

/// Finds VM `id`'s slot.
fn slot_of(table: &Table, id: u16) -> Option<usize> {
    table
        .vms
        .iter()
        .position(|vm| vm.as_ref().is_some_and(|vm| vm.id == id))
}

/// Runs one slice of vCPU `vcpu` on this CPU.
fn run_slice(cpu: usize, vcpu: VcpuId) {
    let (slot, mut state, ept_pointer) = {
        let table = TABLE.lock();
        let Some(slot) = slot_of(&table, vcpu.vm) else {
            drop(table);
            log::error!("the scheduler picked vCPU {vcpu:?} of no VM: removing it");
            let _ = scheduler_call(scheduler::Request::DestroyVcpu { vcpu });
            return;
        };
        let vm = table.vms[slot].as_ref().expect("slot found above");
        let Some(state) = vm
            .vcpus
            .get(usize::from(vcpu.vcpu))
            .filter(|_| vcpu.vcpu < u16::from(vm.vcpu_count))
        else {
            drop(table);
            log::error!(
                "the scheduler picked vCPU {vcpu:?}, which its VM has not got: removing it"
            );
            let _ = scheduler_call(scheduler::Request::DestroyVcpu { vcpu });
            return;
        };
        (slot, *state, vm.ept_pointer)
    };
    let index = usize::from(vcpu.vcpu);
    if usize::from(state.home_cpu) != cpu {
        log::error!(
            "the scheduler picked vCPU {vcpu:?} on CPU {cpu}, its VMCS lives on CPU {}",
            state.home_cpu
        );
        stop(slot, vcpu, "picked on a CPU other than its home");
        return;
    }
    if !state.launched {
        if let Err(error) = build_vmcs(&state, vcpu.vcpu, ept_pointer) {
            log::error!("VM {}: cannot build its VMCS: {error}", vcpu.vm);
            stop(slot, vcpu, "its VMCS could not be built");
            return;
        }
        CURRENT_VMCS[cpu].store(state.vmcs, Ordering::Relaxed);
    } else if CURRENT_VMCS[cpu].load(Ordering::Relaxed) != state.vmcs {
        let failed: u8;
        // SAFETY: VMPTRLD of this vCPU's VMCS, launched on this CPU before.
        unsafe {
            core::arch::asm!("vmptrld [{address}]", "setna {failed}",
                             address = in(reg) &state.vmcs, failed = out(reg_byte) failed,
                             options(nostack));
        }
        if failed != 0 {
            stop(slot, vcpu, "VMPTRLD failed");
            return;
        }
        CURRENT_VMCS[cpu].store(state.vmcs, Ordering::Relaxed);
    }
    let quantum = (apic::tsc_khz() * QUANTUM_MS).max(1);
    let shift = preemption_shift();
    let mut exits = 0u64;
    let mut retried = 0u64;
    let started = apic::tsc();
    let next = loop {
        // A sibling vCPU's fault stopped the VM: do not enter it again.
        if ENDED[slot].load(Ordering::Acquire) {
            break Ok(Next::Finished);
        }
        service_timers(cpu);
        // A vCPU of this CPU was woken (an event, a timer): let the scheduler choose again
        // now rather than at the end of the quantum.
        if exits > 0 && KICKED[cpu].swap(false, Ordering::AcqRel) {
            break Ok(Next::Deschedule);
        }
        // What is left of the quantum, whatever the exits in between took; the slice also
        // stops at this CPU's next timer deadline, so guest timers fire on time.
        let now = apic::tsc();
        let left = quantum.saturating_sub(now - started);
        if left == 0 {
            break Ok(Next::Deschedule);
        }
        let until = match domain::deadline(cpu) {
            0 => left,
            deadline => left.min(deadline.saturating_sub(now).max(1)),
        };
        let ticks = (until >> shift).clamp(1, u64::from(u32::MAX));
        if vmwrite(GUEST_PREEMPTION_TIMER, ticks).is_err() {
            break Err("the preemption timer cannot be set");
        }
        if prepare_injection(slot, index, &mut state).is_err() {
            break Err("a virtual interrupt cannot be injected");
        }
        let mut host_fpu = FpuArea::initial();
        let entry_failed = x86_64::instructions::interrupts::without_interrupts(|| {
            // Announce the entry, then honour any shootdown posted before it (see
            // `shoot_down`): either that CPU sees IN_GUEST and waits for this one to exit, or
            // this one sees its request and flushes first.
            IN_GUEST[cpu].store(true, Ordering::SeqCst);
            if NEED_INVEPT[cpu].swap(false, Ordering::SeqCst) {
                invept();
            }
            host_fpu.save();
            state.fpu.restore();
            crate::inject::before_vm_entry(cpu);
            // SAFETY: interrupts are off from here to `after_exit`, and nothing in between
            // returns to ring 3 or uses CR2 or the debug registers.
            let host = unsafe { guest_state::before_entry(&state.switched) };
            // SAFETY: the vCPU's VMCS is current and complete; `vmx_enter` saves and restores
            // the host's callee-saved registers and returns after the next VM exit.
            let failed = unsafe { vm::vmx_enter(&mut state.registers, u64::from(state.launched)) };
            // SAFETY: right after the exit (or the failed entry), interrupts still off.
            unsafe { guest_state::after_exit(&mut state.switched, host) };
            state.fpu.save();
            host_fpu.restore();
            IN_GUEST[cpu].store(false, Ordering::SeqCst);
            failed
        });
        if entry_failed != 0 {
            log::error!(
                "VM {}: VM entry failed, VM-instruction error {}",
                vcpu.vm,
                vmread(vm::VM_INSTRUCTION_ERROR)
            );
            break Err("VM entry failed");
        }
        state.launched = true;
        exits += 1;
        // A fault armed against the core counts VM exits, then steps the core's handling.
        crate::inject::after_vm_exit(cpu);
        // A virtual interrupt the core injected whose delivery the exit cut short (an EPT
        // violation on a stack page not backed yet, while the CPU pushed the frame): raise it
        // again, so it is delivered at a later entry instead of lost.
        let vectoring = vmread(IDT_VECTORING_INFO);
        if vectoring & (1 << 31) != 0 && (vectoring >> 8) & 0b111 == 0 {
            let vector = (vectoring & 0xff) as u8;
            PENDING[slot][index][usize::from(vector / 64)]
                .fetch_or(1 << (vector % 64), Ordering::AcqRel);
        }
        let reason = (vmread(vm::EXIT_REASON) & 0xffff) as u32;
        let handled = match reason {
            // The quantum's end is checked at the top of the loop; an earlier expiry was a
            // timer deadline, served there too.
            // A TPR-below-threshold exit: the guest lowered its CR8 under a waiting vector,
            // which the next entry injects.
            EXIT_EXTERNAL_INTERRUPT
            | EXIT_PREEMPTION_TIMER
            | EXIT_INTERRUPT_WINDOW
            | EXIT_TPR_BELOW_THRESHOLD => Ok(Next::Resume),
            // The guest's first MOV to or from a debug register: from now on its debug
            // registers are switched at every entry and exit, and the instruction runs again
            // without exiting (see `guest_state`).
            EXIT_DR_ACCESS => {
                state.switched.debug_live = true;
                let primary = vmread(vm::PROC_BASED_CONTROLS) & !MOV_DR_EXITING;
                vmwrite(vm::PROC_BASED_CONTROLS, primary)
                    .map(|()| Next::Resume)
                    .map_err(|_| "MOV-DR exiting cannot be turned off")
            }
            // Only a MOV to CR4 that changes a bit the core owns exits here (no CR0 mask, no
            // CR3 exiting, CR8 is the TPR shadow's).
            EXIT_CR_ACCESS => {
                log::warn!(
                    "VM {}: control-register write refused (qualification {:#x}, RIP {:#x})",
                    vcpu.vm,
                    vmread(EXIT_QUALIFICATION),
                    vmread(vm::GUEST_RIP)
                );
                Err("it changed a CR4 bit the virtual CPU does not offer")
            }
            reason if microvisor::guest_cpu::is_cache_flush(reason) => {
                advance_rip();
                Ok(Next::Resume)
            }
            EXIT_HLT => {
                advance_rip();
                // HLT as a message to the scheduler: the vCPU gives its CPU up.
                let _ = scheduler_call(scheduler::Request::Yield { cpu: cpu as u8 });
                Ok(Next::Deschedule)
            }
            EXIT_VMCALL => handle_vmcall(cpu, slot, vcpu, &mut state),
            EXIT_EPT_VIOLATION => {
                let gpa = vmread(GUEST_PHYSICAL_ADDRESS);
                match back_page(slot, vcpu.vm, gpa >> 12) {
                    Demand::Backed => Ok(Next::Resume),
                    Demand::Interrupted => {
                        retried += 1;
                        Ok(Next::Resume)
                    }
                    Demand::Refused(error) => {
                        log::warn!(
                            "VM {}: EPT violation at guest-physical {gpa:#x} (qualification \
                             {:#x}, RIP {:#x}) refused by the memory domain: {error:?}",
                            vcpu.vm,
                            vmread(EXIT_QUALIFICATION),
                            vmread(vm::GUEST_RIP)
                        );
                        Err(match error {
                            memory::Error::OutOfFrames => {
                                "no frame left to back its RAM (EPT violation)"
                            }
                            _ => "it touched guest-physical memory it has not got (EPT violation)",
                        })
                    }
                }
            }
            EXIT_EXCEPTION => {
                log::warn!(
                    "VM {}: exception {} at RIP {:#x}",
                    vcpu.vm,
                    vmread(EXIT_INTERRUPTION_INFO) & 0xff,
                    vmread(vm::GUEST_RIP)
                );
                Err(microvisor::guest_cpu::exception_reason(
                    (vmread(EXIT_INTERRUPTION_INFO) & 0xff) as u8,
                ))
            }
            EXIT_TRIPLE_FAULT => Err("triple fault"),
            EXIT_CPUID | EXIT_IO | EXIT_RDMSR | EXIT_WRMSR => {
                handle_instruction(cpu, vcpu, &mut state, reason)
            }
            // An instruction the virtual CPU does not offer (named), or any other exit.
            _ => match microvisor::guest_cpu::refused_instruction(reason) {
                Some(why) => {
                    log::warn!(
                        "VM {}: instruction exit {reason} at RIP {:#x} refused",
                        vcpu.vm,
                        vmread(vm::GUEST_RIP)
                    );
                    Err(why)
                }
                None => {
                    log::warn!("VM {}: unexpected VM exit {reason}", vcpu.vm);
                    Err("unexpected VM exit")
                }
            },
        };
        match handled {
            Ok(Next::Resume) => {}
            other => break other,
        }
    };
    let used = apic::tsc() - started;
    {
        let mut table = TABLE.lock();
        if let Some(vm) = table.vms[slot].as_mut() {
            vm.vcpus[index] = state;
            vm.exits += exits;
            vm.retries += retried;
        }
    }
    match next {
        Ok(Next::Deschedule) | Ok(Next::Resume) => {
            let _ = scheduler_call(scheduler::Request::Account {
                cpu: cpu as u8,
                ticks: used,
            });
        }
        Ok(Next::Finished) => {}
        Err(reason) => stop(slot, vcpu, reason),
    }
}

fn advance_rip() {
    let rip = vmread(vm::GUEST_RIP) + vmread(vm::EXIT_INSTRUCTION_LENGTH);
    let _ = vmwrite(vm::GUEST_RIP, rip);
}

/// Stops a VM the core will not run again, and removes its vCPU from the scheduler.
fn stop(slot: usize, vcpu: VcpuId, reason: &'static str) {
    if ENDED[slot].swap(true, Ordering::AcqRel) {
        // A sibling vCPU stopped the VM already.
        let _ = scheduler_call(scheduler::Request::DestroyVcpu { vcpu });
        return;
    }
    log::warn!("VM {} stopped by the core: {reason}", vcpu.vm);
    let count = SLOT_VCPUS[slot].load(Ordering::Relaxed);
    for index in 0..u16::from(count) {
        let vcpu = VcpuId {
            vm: vcpu.vm,
            vcpu: index,
        };
        let _ = scheduler_call(scheduler::Request::DestroyVcpu { vcpu });
    }
    let mut table = TABLE.lock();
    if let Some(vm) = table.vms[slot].as_mut() {
        vm.verdict = Verdict::Stopped;
        vm.stop_reason = reason;
        vm.run_tsc = apic::tsc() - vm.created_tsc;
    }
    drop(table);
    release_memory(slot);
}

/// Returns a finished VM's frames to the memory domain and clears its EPT: first every EPT
/// entry, then a shootdown (a sibling vCPU may still be inside the guest on another CPU), and
/// only then the frames; then drops its quota in every domain (`crate::quota::release`).
fn release_memory(slot: usize) {
    let vm_id = {
        let mut table = TABLE.lock();
        let Some(vm) = table.vms[slot].as_mut() else {
            return;
        };
        let table = paging::phys_to_virt(vm.ept_table).as_mut_ptr::<u64>();
        for gfn in 0..GUEST_FRAMES {
            // SAFETY: the VM's EPT page table, 512 entries.
            unsafe { table.add(gfn).write_volatile(0) };
        }
        vm.id
    };
    shoot_down(slot);
    for gfn in 0..GUEST_FRAMES {
        let (id, frame, granted) = {
            let mut table = TABLE.lock();
            let Some(vm) = table.vms[slot].as_mut() else {
                return;
            };
            let frame = vm.frames[gfn];
            if frame == 0 {
                continue;
            }
            let granted = vm.granted[gfn / 64] & (1 << (gfn % 64)) != 0;
            vm.granted[gfn / 64] &= !(1 << (gfn % 64));
            set_ept(vm, gfn, 0);
            (vm.id, frame, granted)
        };
        if !granted {
            // A frame still shared with another VM stays allocated (StillShared).
            let _ = memory_call(memory::Request::Free {
                frame: FrameNumber(frame),
                owner: id,
            });
        }
    }
    // Its quota last: its channels and timers go with it, and its limits drop to 0, so a
    // sibling vCPU's call still in flight can take nothing more.
    crate::quota::release(vm_id);
}

/// Sends a request to the hypercall domain; `None` when it must be retried (a service
/// restarted under it).
fn forward(request: &hc::Request) -> Option<hc::Reply> {
    match call::<hc::Reply>(HYPERCALL, request) {
        Ok(hc::Reply::Incomplete) => None,
        Ok(reply) => Some(reply),
        Err(microvisor_abi::Status::PeerRestarted) => None,
        Err(_) => Some(hc::Reply::Error(HypercallError::Internal)),
    }
}

/// The guest frame an EPT-changing call names, checked: inside the window and unmapped.
fn free_window_gfn(slot: usize, gfn: u64) -> Result<usize, HypercallError> {
    let window = layout::WINDOW_FIRST_GFN..layout::WINDOW_FIRST_GFN + layout::WINDOW_PAGES;
    if !window.contains(&gfn) {
        return Err(HypercallError::InvalidArgument);
    }
    let table = TABLE.lock();
    let vm = table.vms[slot].as_ref().ok_or(HypercallError::BadVcpu)?;
    if vm.frames[gfn as usize] != 0 {
        return Err(HypercallError::InUse);
    }
    Ok(gfn as usize)
}

/// Maps `frame` at `gfn` of the VM in `slot` after the core's own check.
fn map(slot: usize, vm_id: u16, gfn: usize, frame: u32, grant: bool) -> Result<(), HypercallError> {
    validate(vm_id, frame)?;
    let mut table = TABLE.lock();
    let vm = table.vms[slot].as_mut().ok_or(HypercallError::BadVcpu)?;
    if vm.frames[gfn] != 0 {
        return Err(HypercallError::InUse);
    }
    set_ept(vm, gfn, frame);
    if grant {
        vm.granted[gfn / 64] |= 1 << (gfn % 64);
    }
    Ok(())
}

/// Serves a VMCALL: the result goes into RAX and RIP advances only when the call completed.
fn handle_vmcall(
    cpu: usize,
    slot: usize,
    vcpu: VcpuId,
    state: &mut Vcpu,
) -> Result<Next, &'static str> {
    let registers = state.registers;
    let number = registers.rax;
    let args = [
        registers.rdi,
        registers.rsi,
        registers.rdx,
        registers.r10,
        registers.r8,
        registers.r9,
    ];
    let plain = hc::Request::Hypercall {
        cpu: cpu as u8,
        vm: vcpu.vm,
        vcpu: vcpu.vcpu,
        number,
        args,
    };
    let outcome: Option<(i64, Next)> = match number {
        hc::CONSOLE_WRITE => console(cpu, slot, vcpu, &args),
        hc::MULTICALL => multicall(cpu, slot, vcpu, state, &args),
        hc::MEMORY_POPULATE => match free_window_gfn(slot, args[0]) {
            Err(error) => Some((error.guest_code(), Next::Resume)),
            Ok(gfn) => forward(&plain).map(|reply| match reply {
                hc::Reply::Complete { value } => {
                    let frame = value as u32;
                    match map(slot, vcpu.vm, gfn, frame, false) {
                        Ok(()) => {
                            scrub(frame);
                            let _ = memory_call(memory::Request::Validate {
                                frame: FrameNumber(frame),
                            });
                            (value, Next::Resume)
                        }
                        Err(error) => {
                            log::error!(
                                "VM {}: populate answered frame {frame:#x}, which fails the core's check",
                                vcpu.vm
                            );
                            (error.guest_code(), Next::Resume)
                        }
                    }
                }
                other => reply_value(other),
            }),
        },
        hc::MEMORY_RELEASE => {
            // Unmap first, so the guest cannot touch the frame once it is free; put it back
            // if the release is refused.
            let aliased = TABLE.lock().vms[slot]
                .as_ref()
                .is_some_and(|vm| vm.maps_as_grant(args[0]));
            let unmapped = {
                let mut table = TABLE.lock();
                table.vms[slot].as_mut().filter(|_| !aliased).and_then(|vm| {
                    let gfn = (0..GUEST_FRAMES).find(|&gfn| {
                        vm.frames[gfn] != 0
                            && u64::from(vm.frames[gfn]) == args[0]
                            && vm.granted[gfn / 64] & (1 << (gfn % 64)) == 0
                    })?;
                    set_ept(vm, gfn, 0);
                    Some(gfn)
                })
            };
            if unmapped.is_some() {
                shoot_down(slot);
            }
            // Still mapped elsewhere in this VM (a MAP_GRANT alias): freeing it would leave
            // that mapping pointing at a free frame.
            let result = if aliased {
                Some((HypercallError::InUse.guest_code(), Next::Resume))
            } else {
                forward(&plain).map(reply_value)
            };
            let released = matches!(result, Some((0, _)));
            if let (Some(gfn), false) = (unmapped, released) {
                let mut table = TABLE.lock();
                if let Some(vm) = table.vms[slot].as_mut() {
                    set_ept(vm, gfn, args[0] as u32);
                }
            }
            result
        }
        hc::MAP_GRANT => match free_window_gfn(slot, args[1]) {
            Err(error) => Some((error.guest_code(), Next::Resume)),
            Ok(gfn) => forward(&plain).map(|reply| match reply {
                // Checked and mapped under the grant lock (see GRANT_LOCK).
                hc::Reply::Complete { .. } => {
                    let _grants = GRANT_LOCK.lock();
                    match map(slot, vcpu.vm, gfn, args[0] as u32, true) {
                        Ok(()) => (0, Next::Resume),
                        Err(error) => (error.guest_code(), Next::Resume),
                    }
                }
                other => reply_value(other),
            }),
        },
        hc::UNMAP_GRANT => {
            let mapped = {
                let table = TABLE.lock();
                table.vms[slot].as_ref().is_some_and(|vm| {
                    let gfn = args[0] as usize;
                    args[0] < GUEST_FRAMES as u64
                        && vm.frames[gfn] != 0
                        && vm.granted[gfn / 64] & (1 << (gfn % 64)) != 0
                })
            };
            if !mapped {
                Some((HypercallError::NotFound.guest_code(), Next::Resume))
            } else {
                forward(&plain).map(|reply| match reply {
                    hc::Reply::Complete { .. } => {
                        let mut table = TABLE.lock();
                        if let Some(vm) = table.vms[slot].as_mut() {
                            let gfn = args[0] as usize;
                            vm.granted[gfn / 64] &= !(1 << (gfn % 64));
                            set_ept(vm, gfn, 0);
                        }
                        drop(table);
                        shoot_down(slot);
                        (0, Next::Resume)
                    }
                    other => reply_value(other),
                })
            }
        }
        hc::VM_EXIT => forward(&plain).map(|reply| match reply {
            hc::Reply::Blocked => {
                // This vCPU is done; the VM ends with its last vCPU (passed only if every
                // vCPU passed; the checksum is vCPU 0's).
                state.exited = true;
                let mut table = TABLE.lock();
                let mut ended = false;
                if let Some(vm) = table.vms[slot].as_mut() {
                    vm.vcpu_failed |= args[0] != 0;
                    if vcpu.vcpu == 0 {
                        vm.checksum = args[1];
                        vm.longest_gap_us = args[2];
                    }
                    // Marked in the table now (not only when the slice ends), so the last
                    // vCPU to exit, on whichever CPU, sees every other one exited.
                    vm.vcpus[usize::from(vcpu.vcpu)].exited = true;
                    ended = vm.vcpus[..usize::from(vm.vcpu_count)]
                        .iter()
                        .all(|other| other.exited);
                    if ended {
                        vm.verdict = if vm.vcpu_failed {
                            Verdict::Failed
                        } else {
                            Verdict::Passed
                        };
                        vm.run_tsc = apic::tsc() - vm.created_tsc;
                        log::info!(
                            "VM {} ({}) exited: {}, checksum {:#018x}",
                            vm.id,
                            vm.guest,
                            vm.verdict.name(),
                            vm.checksum
                        );
                    }
                }
                drop(table);
                if ended {
                    release_memory(slot);
                }
                (0, Next::Finished)
            }
            other => reply_value(other),
        }),
        hc::EVENT_WAIT if highest_pending(slot, usize::from(vcpu.vcpu)).is_some() && args.iter().all(|&a| a == 0) => {
            // A virtual interrupt is waiting: it is the event; do not block.
            Some((0, Next::Resume))
        }
        hc::EVTCHN_SEND => forward(&plain).map(|reply| {
            if matches!(reply, hc::Reply::Complete { .. }) {
                // The peer's vCPU may have been woken on another CPU.
                kick_others();
            }
            reply_value(reply)
        }),
        hc::GRANT_REVOKE => {
            let _grants = GRANT_LOCK.lock();
            if peer_maps(args[1], args[0]) {
                Some((HypercallError::InUse.guest_code(), Next::Resume))
            } else {
                forward(&plain).map(reply_value)
            }
        }
        // `None`: a service failed under VM_CREATE; the control VM issues it again.
        hc::VM_CREATE | hc::VM_START | hc::VM_STATUS | hc::VM_DESTROY => {
            control(slot, number, &args).map(|value| (value, Next::Resume))
        }
        _ => forward(&plain).map(reply_value),
    };
    let mut table = TABLE.lock();
    let vm = table.vms[slot].as_mut().ok_or("its VM vanished")?;
    match outcome {
        Some((value, next)) => {
            vm.hypercalls += 1;
            drop(table);
            state.registers.rax = value as u64;
            advance_rip();
            Ok(next)
        }
        None => {
            // Not completed: RIP stays on the VMCALL, the guest issues it again.
            vm.retries += 1;
            Ok(Next::Resume)
        }
    }
}

/// Whether VM `peer` has host frame `frame` mapped as a granted page.
fn peer_maps(peer: u64, frame: u64) -> bool {
    let table = TABLE.lock();
    table
        .vms
        .iter()
        .flatten()
        .any(|vm| u64::from(vm.id) == peer && vm.maps_as_grant(frame))
}

/// The control VM's calls, served by the core (it owns VMX): RAX, or `None` when the call
/// must be issued again (a service failed under it and was recovered).
fn control(slot: usize, number: u64, args: &[u64; 6]) -> Option<i64> {
    let result = (|| -> Result<Option<i64>, HypercallError> {
        let (vm_id, privileged) = TABLE.lock().vms[slot]
            .as_ref()
            .map_or((0, false), |vm| (vm.id, vm.privileged));
        if !privileged {
            return Err(HypercallError::PermissionDenied);
        }
        let used = match number {
            hc::VM_CREATE => 6,
            hc::VM_START => 2,
            _ => 1,
        };
        if args[used..].iter().any(|&arg| arg != 0) {
            return Err(HypercallError::InvalidArgument);
        }
        if number == hc::VM_CREATE {
            return vm_create(slot, args);
        }
        let done = |value: i64| Ok(Some(value));
        let target = {
            let table = TABLE.lock();
            let target = u16::try_from(args[0])
                .ok()
                .and_then(|id| slot_of(&table, id))
                .ok_or(HypercallError::NotFound)?;
            if target == slot {
                return Err(HypercallError::InvalidArgument);
            }
            target
        };
        match number {
            hc::VM_START => {
                let mut params = [0u64; layout::PARAMS];
                if args[1] != 0 {
                    let mut bytes = [0u8; layout::PARAMS * 8];
                    if !back_for_hypercall(slot, vm_id, args[1], bytes.len())? {
                        return Ok(None);
                    }
                    {
                        let table = TABLE.lock();
                        let vm = table.vms[slot].as_ref().ok_or(HypercallError::BadVcpu)?;
                        read_guest(vm, args[1], &mut bytes)?;
                    }
                    for (param, chunk) in params.iter_mut().zip(bytes.chunks_exact(8)) {
                        *param = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
                    }
                }
                start_vm(target, Some(params)).and_then(|()| done(0))
            }
            hc::VM_STATUS => {
                let table = TABLE.lock();
                let vm = table.vms[target].as_ref().ok_or(HypercallError::NotFound)?;
                done(match vm.verdict {
                    Verdict::Unfinished if !vm.started => hc::vm_status::CREATED,
                    Verdict::Unfinished => hc::vm_status::RUNNING,
                    Verdict::Passed => hc::vm_status::PASSED,
                    Verdict::Failed => hc::vm_status::FAILED,
                    Verdict::Stopped => hc::vm_status::STOPPED,
                })
            }
            _ => {
                {
                    let mut table = TABLE.lock();
                    let vm = table.vms[target].as_mut().ok_or(HypercallError::NotFound)?;
                    if vm.destroyed {
                        return Err(HypercallError::NotFound);
                    }
                    if vm.started && vm.verdict == Verdict::Unfinished {
                        return Err(HypercallError::InUse);
                    }
                    vm.destroyed = true;
                }
                release_memory(target);
                log::info!("VM {} destroyed by the control VM", args[0]);
                done(0)
            }
        }
    })();
    result.unwrap_or_else(|error| Some(error.guest_code()))
}

/// VM_CREATE: reads the quota record (arg5) and stages the image out of the control VM's
/// memory, then builds a VM from it (its quota reserved first, in `create_vm`).
fn vm_create(slot: usize, args: &[u64; 6]) -> Result<Option<i64>, HypercallError> {
    let length = usize::try_from(args[1]).map_err(|_| HypercallError::InvalidArgument)?;
    if length == 0 || length > IMAGE_STAGE_BYTES {
        return Err(HypercallError::InvalidArgument);
    }
    let home_cpu = u8::try_from(args[3])
        .ok()
        .filter(|&cpu| usize::from(cpu) < crate::run::cpus_registered())
        .ok_or(HypercallError::InvalidArgument)?;
    // arg4: vCPUs, 0 meaning 1.
    let vcpus = match args[4] {
        0 => 1,
        count => u8::try_from(count)
            .ok()
            .filter(|&count| usize::from(count) <= VCPUS)
            .ok_or(HypercallError::InvalidArgument)?,
    };
    let vm_id = TABLE.lock().vms[slot]
        .as_ref()
        .ok_or(HypercallError::BadVcpu)?
        .id;
    // arg5: its quota record, 0 meaning the AppVM default.
    let quota = if args[5] == 0 {
        ipc::quota::Quota::APP_VM
    } else {
        let mut record = [0u8; crate::quota::RECORD_BYTES];
        if !back_for_hypercall(slot, vm_id, args[5], record.len())? {
            return Ok(None);
        }
        {
            let table = TABLE.lock();
            let vm = table.vms[slot].as_ref().ok_or(HypercallError::BadVcpu)?;
            read_guest(vm, args[5], &mut record)?;
        }
        crate::quota::from_record(&record).ok_or(HypercallError::InvalidArgument)?
    };
    if !back_for_hypercall(slot, vm_id, args[0], length)? {
        return Ok(None);
    }
    let mut stage = IMAGE_STAGE.lock();
    {
        let table = TABLE.lock();
        let vm = table.vms[slot].as_ref().ok_or(HypercallError::BadVcpu)?;
        read_guest(vm, args[0], &mut stage[..length])?;
    }
    let id = next_vm_number();
    let config = VmConfig {
        id,
        guest: microvisor::scenario::guest_name(args[2]),
        image: &stage[..length],
        home_cpu,
        params: [0; layout::PARAMS],
        privileged: false,
        modules: &[],
        start: false,
        vcpus,
        quota,
    };
    match create_vm(&config) {
        Ok(()) => Ok(Some(i64::from(id))),
        Err(CreateError::Interrupted) => {
            log::warn!("VM_CREATE interrupted by a service failure: the control VM retries it");
            Ok(None)
        }
        Err(error) => {
            log::warn!("VM_CREATE from the control VM refused: {error}");
            Err(match error {
                CreateError::Image(_) => HypercallError::InvalidArgument,
                CreateError::Scheduler => HypercallError::Internal,
                CreateError::Quota(crate::quota::QuotaError::Unavailable(_)) => {
                    HypercallError::QuotaUnavailable
                }
                CreateError::Quota(_) => HypercallError::Internal,
                _ => HypercallError::NoResources,
            })
        }
    }
}

/// CPUID, port I/O, RDMSR, WRMSR: a message to the hypercall domain, whose answer the guest
/// sees. RIP advances only once the answer came (a recovery in between repeats the exit).
fn handle_instruction(
    cpu: usize,
    vcpu: VcpuId,
    state: &mut Vcpu,
    reason: u32,
) -> Result<Next, &'static str> {
    let registers = &mut state.registers;
    let qualification = vmread(EXIT_QUALIFICATION);
    let exit = match reason {
        EXIT_CPUID => hc::GuestExit::Cpuid {
            leaf: registers.rax as u32,
            subleaf: registers.rcx as u32,
        },
        EXIT_IO => {
            // Size - 1 in bits 0..3, IN in bit 3, string (INS/OUTS) in bit 4, port 16..32.
            if qualification & (1 << 4) != 0 {
                return Err("string port I/O (INS/OUTS) is not served");
            }
            let size = (qualification & 7) as u8 + 1;
            let port = (qualification >> 16) as u16;
            if qualification & (1 << 3) != 0 {
                hc::GuestExit::PortIn { port, size }
            } else {
                hc::GuestExit::PortOut {
                    port,
                    size,
                    value: registers.rax as u32,
                }
            }
        }
        EXIT_RDMSR => hc::GuestExit::ReadMsr {
            msr: registers.rcx as u32,
        },
        _ => hc::GuestExit::WriteMsr {
            msr: registers.rcx as u32,
            value: (registers.rdx << 32) | (registers.rax & 0xffff_ffff),
        },
    };
    let request = hc::Request::Exit {
        cpu: cpu as u8,
        vm: vcpu.vm,
        vcpu: vcpu.vcpu,
        exit,
    };
    let Some(reply) = forward(&request) else {
        // A service restarted under it: the guest executes the instruction again.
        return Ok(Next::Resume);
    };
    let answer = match reply {
        hc::Reply::Exit(answer) => answer,
        _ => return Err("the hypercall domain did not answer an instruction exit"),
    };
    match (exit, answer) {
        (hc::GuestExit::Cpuid { .. }, hc::ExitAnswer::Cpuid([eax, ebx, ecx, edx])) => {
            registers.rax = u64::from(eax);
            registers.rbx = u64::from(ebx);
            registers.rcx = u64::from(ecx);
            registers.rdx = u64::from(edx);
        }
        (hc::GuestExit::PortIn { size, .. }, hc::ExitAnswer::Value(value)) => {
            let mask = (1u64 << (u32::from(size) * 8)) - 1;
            // IN to AL/AX leaves the rest of RAX; IN to EAX zeroes the upper half.
            registers.rax = if size == 4 {
                value & mask
            } else {
                (registers.rax & !mask) | (value & mask)
            };
        }
        (hc::GuestExit::ReadMsr { .. }, hc::ExitAnswer::Value(value)) => {
            registers.rax = value & 0xffff_ffff;
            registers.rdx = value >> 32;
        }
        (hc::GuestExit::PortOut { .. } | hc::GuestExit::WriteMsr { .. }, hc::ExitAnswer::Done) => {}
        (_, hc::ExitAnswer::Refuse) => {
            log::warn!(
                "VM {}: {exit:?} at RIP {:#x} refused by the hypercall domain",
                vcpu.vm,
                vmread(vm::GUEST_RIP)
            );
            return Err("the hypercall domain refused a CPUID, port or MSR access");
        }
        _ => return Err("the hypercall domain's answer does not fit the instruction"),
    }
    advance_rip();
    Ok(Next::Resume)
}

/// RAX and what comes next for a reply to a single hypercall.
fn reply_value(reply: hc::Reply) -> (i64, Next) {
    match reply {
        hc::Reply::Complete { value } => (value, Next::Resume),
        hc::Reply::Error(error) => (error.guest_code(), Next::Resume),
        hc::Reply::Blocked => (0, Next::Deschedule),
        // Not an answer to a single hypercall: the hypercall domain misbehaved.
        hc::Reply::Incomplete | hc::Reply::Multicall(_) | hc::Reply::Exit(_) => {
            (HypercallError::Internal.guest_code(), Next::Resume)
        }
    }
}

fn console(cpu: usize, slot: usize, vcpu: VcpuId, args: &[u64; 6]) -> Option<(i64, Next)> {
    let refuse = |error: HypercallError| Some((error.guest_code(), Next::Resume));
    let length = args[1] as usize;
    if args[2..].iter().any(|&arg| arg != 0) || length == 0 || length > hc::CONSOLE_MAX {
        return refuse(HypercallError::InvalidArgument);
    }
    let mut bytes = [0u8; hc::CONSOLE_MAX];
    match back_for_hypercall(slot, vcpu.vm, args[0], length) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(error) => return refuse(error),
    }
    {
        let table = TABLE.lock();
        let Some(vm) = table.vms[slot].as_ref() else {
            return refuse(HypercallError::BadVcpu);
        };
        if let Err(error) = read_guest(vm, args[0], &mut bytes[..length]) {
            return refuse(error);
        }
    }
    let request = hc::Request::Console {
        cpu: cpu as u8,
        vm: vcpu.vm,
        vcpu: vcpu.vcpu,
        text: heapless::Vec::from_slice(&bytes[..length]).unwrap_or_default(),
    };
    forward(&request).map(reply_value)
}

/// MULTICALL: arg0 = guest-physical address of the entries (number, arg0, arg1: three u64
/// each), arg1 = count (1 to `MULTICALL_MAX`), arg2 = where the per-entry results go (one i64
/// each: the value, or the error code).
fn multicall(
    cpu: usize,
    slot: usize,
    vcpu: VcpuId,
    state: &mut Vcpu,
    args: &[u64; 6],
) -> Option<(i64, Next)> {
    let refuse = |error: HypercallError| Some((error.guest_code(), Next::Resume));
    let count = args[1] as usize;
    if args[3..].iter().any(|&arg| arg != 0) || count == 0 || count > hc::MULTICALL_MAX {
        return refuse(HypercallError::InvalidArgument);
    }
    let mut raw = [0u8; hc::MULTICALL_MAX * 24];
    for (address, length) in [(args[0], count * 24), (args[2], count * 8)] {
        match back_for_hypercall(slot, vcpu.vm, address, length) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => return refuse(error),
        }
    }
    {
        let table = TABLE.lock();
        let Some(vm) = table.vms[slot].as_ref() else {
            return refuse(HypercallError::BadVcpu);
        };
        if let Err(error) = read_guest(vm, args[0], &mut raw[..count * 24]) {
            return refuse(error);
        }
        // The results must be writable before anything runs.
        let mut probe = [0u8; hc::MULTICALL_MAX * 8];
        if let Err(error) = read_guest(vm, args[2], &mut probe[..count * 8]) {
            return refuse(error);
        }
    }
    let word = |index: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&raw[index * 8..index * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    let mut entries = heapless::Vec::<hc::MulticallEntry, { hc::MULTICALL_MAX }>::new();
    for index in 0..count {
        let number = word(index * 3);
        // Populate and release change the EPT, which only the core writes, one call at a
        // time: a guest's batch may not carry them.
        if number == hc::MEMORY_POPULATE || number == hc::MEMORY_RELEASE {
            return refuse(HypercallError::InvalidArgument);
        }
        let _ = entries.push(hc::MulticallEntry {
            // An out-of-range number stays out of range (refused as BadNumber).
            number: u16::try_from(number).unwrap_or(u16::MAX),
            args: [word(index * 3 + 1), word(index * 3 + 2)],
        });
    }
    let request = hc::Request::Multicall {
        cpu: cpu as u8,
        vm: vcpu.vm,
        vcpu: vcpu.vcpu,
        batch: state.batch,
        entries,
    };
    match forward(&request)? {
        hc::Reply::Multicall(outcomes) => {
            let mut results = [0u8; hc::MULTICALL_MAX * 8];
            for (chunk, outcome) in results.chunks_exact_mut(8).zip(outcomes.iter()) {
                let value = match outcome {
                    hc::EntryOutcome::Complete(value) => *value,
                    hc::EntryOutcome::Error(error) => error.guest_code(),
                };
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            state.batch = state.batch.wrapping_add(1);
            let table = TABLE.lock();
            let written = table.vms[slot]
                .as_ref()
                .map(|vm| write_guest(vm, args[2], &results[..count * 8]));
            match written {
                Some(Ok(())) => Some((0, Next::Resume)),
                _ => refuse(HypercallError::InvalidArgument),
            }
        }
        other => Some(reply_value(other)),
    }
}

/// Whether every started VM has ended.
pub fn all_finished() -> bool {
    TABLE
        .lock()
        .vms
        .iter()
        .flatten()
        .filter(|vm| vm.started)
        .all(|vm| vm.verdict != Verdict::Unfinished)
}

/// Asks the scheduler what runs on `cpu` and runs one slice of it.
fn step(cpu: usize) {
    service_timers(cpu);
    wake_local(cpu);
    // A kick from now on means: look again before sleeping.
    KICKED[cpu].store(false, Ordering::Release);
    let picked = scheduler_call(scheduler::Request::PickNext { cpu: cpu as u8 });
    match picked {
        Ok(scheduler::Reply::Current(Some(vcpu))) => run_slice(cpu, vcpu),
        // Nothing to run here (or the scheduler is being recovered).
        _ => {
            domain::deliver_notifications();
            idle(cpu);
        }
    }
}

/// Waits for work: until this CPU's next timer deadline if it is near (spinning, so it is
/// met to the TSC), else until an interrupt (the tick, or a kick from another CPU).
fn idle(cpu: usize) {
    let tick = apic::tsc_khz().max(1) * 1000 / apic::TIMER_HZ;
    let deadline = domain::deadline(cpu);
    if deadline != 0 && deadline.saturating_sub(apic::tsc()) < tick {
        while apic::tsc() < deadline && !KICKED[cpu].load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        return;
    }
    x86_64::instructions::interrupts::disable();
    if KICKED[cpu].load(Ordering::Acquire) {
        x86_64::instructions::interrupts::enable();
    } else {
        // STI; HLT: a kick arriving after the check still ends the HLT.
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}

/// An application processor's guest loop: run what the scheduler picks until the scenario
/// ends.
pub fn run_cpu(cpu: usize) {
    while RUNNING.load(Ordering::Acquire) {
        step(cpu);
    }
}

/// Whether application processors should enter [`run_cpu`].
pub fn running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

/// Runs the created VMs on every CPU until all have ended or `budget_tsc` has passed; the
/// bootstrap processor takes part. Returns whether all ended.
pub fn run_all(budget_tsc: u64) -> bool {
    let start = apic::tsc();
    RUNNING.store(true, Ordering::Release);
    let cpu = crate::cpu::current_index();
    // A service declared failed meanwhile ends the scenario (the caller says so).
    let (declared, _) = crate::domain::declared_failed();
    while !all_finished()
        && apic::tsc() - start < budget_tsc
        && crate::domain::declared_failed().0 == declared
    {
        step(cpu);
    }
    RUNNING.store(false, Ordering::Release);
    all_finished()
}

/// Frames the VMs hold (mapped in some VM's EPT, counted once at the VM that owns it: a
/// granted mapping is another VM's frame) and frames the memory domain counts in use; `None`
/// if it does not answer.
pub fn frame_accounting() -> Option<(u32, u32)> {
    let held = {
        let table = TABLE.lock();
        table
            .vms
            .iter()
            .flatten()
            .map(|vm| {
                (0..GUEST_FRAMES)
                    .filter(|&gfn| {
                        vm.frames[gfn] != 0 && vm.granted[gfn / 64] & (1 << (gfn % 64)) == 0
                    })
                    .count() as u32
            })
            .sum()
    };
    match memory_call(memory::Request::Stats) {
        Ok(memory::Reply::Stats(stats)) => Some((held, stats.total - stats.free)),
        _ => None,
    }
}

/// Fills `reports` with the VMs' outcomes; returns how many. With `wait`, waits for the VM
/// table (a CPU may still be finishing a slice); without, tries for a bounded while and gives
/// up (0) if it stays busy, for the summary of a failing run, which must not hang (this CPU
/// may hold the lock itself).
pub fn reports(reports: &mut [microvisor::summary::VmReport<'static>], wait: bool) -> usize {
    const TRIES: u32 = 1_000_000;
    let table = if wait {
        TABLE.lock()
    } else {
        match (0..TRIES).find_map(|_| {
            let table = TABLE.try_lock();
            if table.is_none() {
                core::hint::spin_loop();
            }
            table
        }) {
            Some(table) => table,
            None => return 0,
        }
    };
    let mut count = 0;
    for (vm, report) in table.vms.iter().flatten().zip(reports.iter_mut()) {
        *report = microvisor::summary::VmReport {
            vm: vm.id,
            guest: vm.guest,
            vcpus: vm.vcpu_count,
            verdict: vm.verdict.name(),
            checksum: vm.checksum,
            exits: vm.exits,
            hypercalls: vm.hypercalls,
            retries: vm.retries,
            demand_pages: vm.demand_pages,
            run_tsc: vm.run_tsc,
            created_tsc: vm.created_tsc,
            stop_reason: vm.stop_reason,
            longest_gap_us: (vm.longest_gap_us != 0).then_some(vm.longest_gap_us),
        };
        count += 1;
    }
    count
}
