//! Domains: isolated ring-3 address spaces with one thread per CPU, loaded from ELF images in
//! the boot bundle, and the synchronous call/reply transport between them.
//!
//! ## Threads and calls
//! A domain has one thread per CPU. A call runs on the calling CPU: the core saves the
//! caller's registers and FPU state, copies the request from the caller's message buffer into
//! the callee's (through the direct map: the core never dereferences an address a domain
//! chose), and resumes the callee's thread for this CPU, all by rewriting the trap frame the
//! system call came in on. The reply travels back the same way. Each CPU keeps a chain of the
//! threads currently inside a call, with the core itself at the bottom when it is the caller
//! (its synthetic clients call in with a ring-0 `int 0x80`).
//!
//! ## Faults
//! An exception in ring 3 is the running domain's failure. The core records a detection
//! (domain, CPU, kind, RIP, in-flight caller, TSC), abandons the domain's threads, releases
//! every lock in its lock table, bumps its generation, and answers the abandoned caller with
//! `PeerRestarted` so the caller's client library can retry an idempotent request. (This is
//! the microreset mechanism; choosing between microreset and microreboot is the recovery
//! manager's policy, which arrives with its domain.) The domain's memory, state region
//! included, is untouched: a microreset keeps state in place.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};
use elf::ElfBytes;
use elf::abi::{PF_W, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use ipc::recovery::{FailureKind, RecoveryOrder};
use microvisor::cmdline::RecoveryMode;
use microvisor::summary::RecoveryReport;
use microvisor_abi::{self as abi, Status, call};
use spin::Mutex;
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as Flags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use crate::console::Console;
use crate::trap::{FxArea, TrapFrame};
use crate::{apic, paging, run};

/// Most domains.
pub const MAX_DOMAINS: usize = 8;
/// Deepest chain of nested calls on one CPU.
const MAX_CHAIN: usize = 8;
/// Kernel-only system call: the core calls a domain (RDI = target, RDX = request length).
const CORE_CALL: u64 = 0x100;
/// Selectors of the user segments (GDT slots 3 and 4, RPL 3).
const USER_DATA: u64 = 0x1b;
const USER_CODE: u64 = 0x23;

/// A thread's saved registers and FPU state.
#[derive(Clone, Copy)]
struct Context {
    frame: TrapFrame,
    fx: FxArea,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ThreadState {
    /// Never ran since the domain was (re)started: enter at the ELF entry point.
    Fresh,
    /// Parked in `REPLY_WAIT`.
    Waiting,
    /// Serving a request (it is in a CPU's chain).
    Busy,
}

#[derive(Clone, Copy)]
struct Thread {
    state: ThreadState,
    context: Context,
    /// Physical address of this thread's message buffer page.
    buffer: u64,
}

/// Why loading a domain failed.
#[derive(Debug)]
pub enum LoadError {
    /// The ELF image does not parse.
    Elf(elf::ParseError),
    /// A segment lies outside the image window or overlaps the fixed regions.
    BadSegment {
        /// Its virtual address.
        vaddr: u64,
        /// Its size in memory.
        size: u64,
    },
    /// The entry point is not inside an executable segment.
    BadEntry(u64),
    /// Out of physical memory.
    OutOfMemory,
    /// The domain index is taken or out of range.
    TooManyDomains,
    /// More than [`MAX_SEGMENTS`] loadable segments.
    TooManySegments,
    /// A page is claimed twice (two segments share it, or a segment overlaps a fixed region).
    PageTaken(u64),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Elf(error) => write!(f, "not a valid ELF image: {error}"),
            Self::BadSegment { vaddr, size } => {
                write!(
                    f,
                    "segment at {vaddr:#x} ({size:#x} bytes) lies outside the image window"
                )
            }
            Self::BadEntry(entry) => {
                write!(f, "entry point {entry:#x} is not in an executable segment")
            }
            Self::OutOfMemory => f.write_str("out of physical memory"),
            Self::TooManyDomains => write!(f, "its domain index is taken or beyond {MAX_DOMAINS}"),
            Self::TooManySegments => write!(f, "more than {MAX_SEGMENTS} loadable segments"),
            Self::PageTaken(page) => write!(
                f,
                "page {page:#x} is claimed twice (segments must not share pages)"
            ),
        }
    }
}

/// A loaded segment, remembered so a microreboot can rewrite it from the pristine image.
#[derive(Clone, Copy, Default)]
struct Segment {
    /// Physical address of the segment's first page (its frames are contiguous).
    phys: u64,
    /// Pages mapped.
    pages: u64,
    /// Offset of the segment's first byte in its first page.
    offset_in_page: u64,
    /// Where its bytes start in the image.
    file_offset: u64,
    /// Bytes that come from the image (the rest of the pages is zero).
    file_size: u64,
}

/// Most loadable segments per image.
const MAX_SEGMENTS: usize = 8;

/// One isolated domain.
pub struct Domain {
    name: &'static str,
    /// The pristine ELF image, as it came in the boot bundle (never written).
    image: &'static [u8],
    /// CRC-32 of `image` taken at boot, checked before every reuse.
    checksum: u32,
    segments: [Segment; MAX_SEGMENTS],
    segment_count: usize,
    generation: u32,
    pml4: u64,
    entry: u64,
    lock_table: u64,
    /// Bit `i` set: this domain may call domain `i`.
    may_call: u32,
    threads: [Thread; abi::MAX_DOMAIN_CPUS],
    failures: u32,
    /// Start reason ([`abi::start`]) for the next fresh thread entered; [`abi::start::JOIN`]
    /// once one thread has run the domain's start routine.
    pending_start: u64,
    /// CPUs the domain has threads for.
    cpus: usize,
    /// Bytes of its state region mapped (the manifest's pages).
    state_bytes: u64,
    /// Its configuration word, given to every fresh thread ([`abi::start::pack`]).
    config: u32,
    /// The recovery manager declared the domain failed: every call to it gets `PeerFailed`.
    failed_for_good: bool,
    /// Detected and not yet recovered: calls to it wait (see [`wait_for_recovery`]).
    recovering: bool,
}

/// The per-CPU chain of threads inside calls; index 0 is the outermost caller.
#[derive(Clone, Copy)]
struct Chain {
    /// `None` = the core.
    entries: [Option<u16>; MAX_CHAIN],
    /// The generation of each entry's domain when it was entered: an entry whose domain has
    /// since been detected failed (it is `recovering`) or restarted (its generation moved on)
    /// is stale, its thread discarded by a recovery on another CPU ([`System::stale_top`]).
    generations: [u32; MAX_CHAIN],
    /// A recovery waiting on the recovery manager's decision: set on the manager's entry.
    pending: [Option<Pending>; MAX_CHAIN],
    depth: usize,
    /// The core's own saved context while it waits for a reply (valid when the chain is
    /// non-empty and starts with the core).
    core_context: Option<Context>,
}

impl Chain {
    /// The entry at the top (the one about to run on `cpu`) starts its deadline at `tsc`. Only
    /// the top entry's is ever read: a caller's starts again when it resumes.
    fn start_deadline(&self, cpu: usize, tsc: u64) {
        if self.depth > 0 {
            TOP_SINCE[cpu].store(tsc, core::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// When the entry running at the top of each CPU's chain last started running (its call's
/// entry, or its resumption): the start of its deadline ([`check_hang`]). The timer tick reads
/// it without the domain table's lock.
static TOP_SINCE: [core::sync::atomic::AtomicU64; abi::MAX_DOMAIN_CPUS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; abi::MAX_DOMAIN_CPUS];

struct System {
    domains: [Option<Domain>; MAX_DOMAINS],
    chains: [Chain; abi::MAX_DOMAIN_CPUS],
    core_buffers: [[u8; abi::MESSAGE_BYTES]; abi::MAX_DOMAIN_CPUS],
}

static SYSTEM: Mutex<System> = Mutex::new(System {
    domains: [const { None }; MAX_DOMAINS],
    chains: [Chain {
        entries: [None; MAX_CHAIN],
        generations: [0; MAX_CHAIN],
        pending: [None; MAX_CHAIN],
        depth: 0,
        core_context: None,
    }; abi::MAX_DOMAIN_CPUS],
    core_buffers: [[0; abi::MESSAGE_BYTES]; abi::MAX_DOMAIN_CPUS],
});

/// Pending notification bits of each domain. Atomics outside the domain table's lock, so an
/// interrupt handler can post without taking it (the interrupted code may hold it).
static NOTIFICATIONS: [core::sync::atomic::AtomicU64; MAX_DOMAINS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MAX_DOMAINS];

/// Deadlines the timer domain programmed, per CPU (TSC; 0 = none).
static DEADLINES: [core::sync::atomic::AtomicU64; abi::MAX_DOMAIN_CPUS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; abi::MAX_DOMAIN_CPUS];
/// Deadlines that passed and were posted to the timer domain.
static DEADLINES_FIRED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Called on every local APIC timer tick of `cpu`: posts `DEADLINE` to the timer domain once
/// its programmed deadline has passed. Safe in interrupt context (atomics only).
pub fn check_deadline(cpu: usize, now: u64) {
    use core::sync::atomic::Ordering;
    let Some(slot) = DEADLINES.get(cpu) else {
        return;
    };
    let deadline = slot.load(Ordering::Acquire);
    if deadline != 0
        && now >= deadline
        && slot
            .compare_exchange(deadline, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    {
        DEADLINES_FIRED.fetch_add(1, Ordering::Relaxed);
        post(TIMER_DOMAIN, abi::notify::DEADLINE);
    }
}

/// The deadline the timer domain programmed for `cpu` (TSC; 0 = none).
pub fn deadline(cpu: usize) -> u64 {
    DEADLINES
        .get(cpu)
        .map_or(0, |slot| slot.load(core::sync::atomic::Ordering::Acquire))
}

/// Whether the timer domain has notification bits waiting.
pub fn timer_notified() -> bool {
    NOTIFICATIONS[usize::from(TIMER_DOMAIN)].load(core::sync::atomic::Ordering::Acquire) != 0
}

/// How many programmed deadlines have fired.
pub fn deadlines_fired() -> u64 {
    DEADLINES_FIRED.load(core::sync::atomic::Ordering::Relaxed)
}

/// Delivers pending notifications from an idle CPU: every domain with pending bits whose
/// thread on this CPU is free is entered with an empty request (the runtime hands the bits to
/// the domain and answers nothing). This is what wakes a domain that nobody calls.
pub fn deliver_notifications() {
    for index in 0..MAX_DOMAINS as u16 {
        if NOTIFICATIONS[usize::from(index)].load(core::sync::atomic::Ordering::Acquire) != 0 {
            let mut reply = [0u8; 8];
            // Busy or recovering domains get their bits at their next entry instead.
            let _ = core_call(index, &[], &mut reply);
        }
    }
}

/// Posts notification `bits` to domain `index` (ignored for an index out of range). Safe to
/// call from interrupt handlers.
pub fn post(index: u16, bits: u64) {
    if let Some(pending) = NOTIFICATIONS.get(usize::from(index)) {
        pending.fetch_or(bits, core::sync::atomic::Ordering::AcqRel);
    }
}

/// The domain index of the recovery manager (`ipc::DomainIndex::RecoveryManager`).
pub const RECOVERY_MANAGER: u16 = 1;
/// The domain index of the timer domain (`ipc::DomainIndex::Timer`).
pub const TIMER_DOMAIN: u16 = 4;

/// A recovery the core started and the recovery manager must decide.
#[derive(Clone, Copy, Debug)]
struct Pending {
    /// The failed domain.
    failed: u16,
    /// TSC at detection.
    detected: u64,
}

/// A failure the core detected in a domain.
#[derive(Clone, Copy, Debug)]
pub struct Detection {
    /// Domain index.
    pub domain: u16,
    /// CPU index.
    pub cpu: usize,
    /// How it was detected: an exception (with its vector), a reported panic, a hang.
    pub kind: FailureKind,
    /// Where it happened.
    pub rip: u64,
    /// Who was waiting on the failed domain (`None` = the core).
    pub caller: Option<u16>,
    /// When (TSC).
    pub tsc: u64,
}

static LAST_DETECTION: Mutex<Option<Detection>> = Mutex::new(None);
static MODE: Mutex<RecoveryMode> = Mutex::new(RecoveryMode::Escalate);
/// Domains declared failed for good so far, and the index of the last one.
static DECLARED_FAILED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static LAST_DECLARED_FAILED: core::sync::atomic::AtomicU16 = core::sync::atomic::AtomicU16::new(0);

/// How many domains the recovery manager declared failed for good so far, and the last one's
/// name: a scenario ends once one of its services is (the system cannot go on without it).
pub fn declared_failed() -> (u32, Option<&'static str>) {
    let count = DECLARED_FAILED.load(Ordering::Acquire);
    let name = (count > 0)
        .then(|| describe(LAST_DECLARED_FAILED.load(Ordering::Acquire)))
        .flatten()
        .map(|(name, _, _)| name);
    (count, name)
}
/// Domain index + 1 armed for a fail-stop at its next request (0: none).
static FAILSTOP_ARMED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Requests the armed domain may still serve before the fail-stop strikes.
static FAILSTOP_SKIP: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// Arms a fail-stop: domain `index` serves `skip` more requests, then the next one it starts
/// serving begins at RIP 0.
pub fn arm_failstop(index: u16, skip: u32) {
    FAILSTOP_SKIP.store(skip, core::sync::atomic::Ordering::Release);
    FAILSTOP_ARMED.store(
        usize::from(index) + 1,
        core::sync::atomic::Ordering::Release,
    );
}

/// Whether the fail-stop armed for `callee` strikes now (consuming one skip otherwise).
fn failstop_strikes(callee: u16) -> bool {
    use core::sync::atomic::Ordering;
    if FAILSTOP_ARMED.load(Ordering::Acquire) != usize::from(callee) + 1 {
        return false;
    }
    if FAILSTOP_SKIP
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |skip| {
            skip.checked_sub(1)
        })
        .is_ok()
    {
        return false;
    }
    FAILSTOP_ARMED
        .compare_exchange(
            usize::from(callee) + 1,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// The domain running on `cpu` (the top of its call chain), if any.
pub fn running_on(cpu: usize) -> Option<u16> {
    SYSTEM.lock().running(cpu)
}

/// `inject=lostreply:memory`: the memory domain's index + 1 while armed (0: not armed).
static LOST_REPLY_ARMED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
/// Per CPU: the domain (index + 1) whose reply on this CPU is lost (it fails as it replies).
static LOSE_REPLY: [core::sync::atomic::AtomicUsize; abi::MAX_DOMAIN_CPUS] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; abi::MAX_DOMAIN_CPUS];

/// `inject=badreply:DOMAIN`: the domain's index + 1 while armed (0: not armed).
static BAD_REPLY_ARMED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Arms the bad-reply fault: domain `index`'s next reply to the core arrives corrupted.
pub fn arm_bad_reply(index: u16) {
    BAD_REPLY_ARMED.store(usize::from(index) + 1, Ordering::Release);
}

/// Arms the lost-reply fault: the memory domain (index `memory`) fails as it replies to its
/// next `EptViolation`, after committing the allocation.
pub fn arm_lost_reply(memory: u16) {
    LOST_REPLY_ARMED.store(usize::from(memory) + 1, Ordering::Release);
}

/// Entering `callee` on `cpu` with the request in `buffer`: if the lost reply is armed for it
/// and this is an EPT violation, this call's reply will be lost.
fn lost_reply_arms(callee: u16, cpu: usize, buffer: u64, length: usize) {
    if LOST_REPLY_ARMED.load(Ordering::Acquire) != usize::from(callee) + 1 {
        return;
    }
    // SAFETY: the callee thread's buffer page; length is at most a page (checked by callers).
    let bytes =
        unsafe { core::slice::from_raw_parts(paging::phys_to_virt(buffer).as_ptr::<u8>(), length) };
    if matches!(
        ipc::decode_request::<ipc::memory::Request>(bytes),
        Ok(ipc::memory::Request::EptViolation { .. })
    ) && LOST_REPLY_ARMED
        .compare_exchange(
            usize::from(callee) + 1,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        LOSE_REPLY[cpu].store(usize::from(callee) + 1, Ordering::Release);
    }
}

/// Sets domain `index`'s configuration word: every start from now on (a restart included)
/// gets it ([`abi::start::pack`]), so a domain that must initialise its state again comes back
/// configured as the core configured it.
pub fn set_config(index: u16, word: u32) {
    if let Some(domain) = SYSTEM.lock().domain(index) {
        domain.config = word;
    }
}

/// Index of the domain called `name`.
pub fn find(name: &str) -> Option<u16> {
    let system = SYSTEM.lock();
    system
        .domains
        .iter()
        .position(|domain| domain.as_ref().is_some_and(|domain| domain.name == name))
        .map(|index| index as u16)
}
static LAST_RECOVERY: Mutex<Option<RecoveryReport<'static>>> = Mutex::new(None);
/// The domain (index + 1) of the last recovery until it has completed a request since (0:
/// none), and the TSC of that recovery's detection: for `until_served`.
static SERVED_PENDING: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
static SERVED_SINCE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `current` completed a request: if it is the first since its recovery, that recovery's
/// `until_served` is now.
fn note_served(current: u16) {
    if SERVED_PENDING.load(Ordering::Acquire) == usize::from(current) + 1
        && SERVED_PENDING
            .compare_exchange(
                usize::from(current) + 1,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        && let Some(report) = LAST_RECOVERY.lock().as_mut()
    {
        report.until_served = Some(apic::tsc() - SERVED_SINCE.load(Ordering::Acquire));
    }
}

/// Sets how failed domains are recovered.
pub fn set_recovery_mode(mode: RecoveryMode) {
    *MODE.lock() = mode;
}

/// The most recent recovery, as the summary reports it.
pub fn recovery_report() -> Option<RecoveryReport<'static>> {
    LAST_RECOVERY.try_lock().and_then(|report| *report)
}

fn mapper_for(pml4: u64) -> OffsetPageTable<'static> {
    let table = paging::phys_to_virt(pml4).as_mut_ptr::<PageTable>();
    // SAFETY: `pml4` is a domain's top-level table, owned by SYSTEM; callers hold the SYSTEM
    // lock, so no two mappers alias it.
    unsafe { OffsetPageTable::new(&mut *table, VirtAddr::new(paging::PHYS_OFFSET)) }
}

/// Maps `pages` fresh zeroed frames at `virt` in the address space `pml4`; returns the
/// physical address of the first (they are contiguous).
fn map_fresh(pml4: u64, virt: u64, pages: u64, flags: Flags) -> Result<u64, LoadError> {
    let block = paging::allocate_zeroed(pages).ok_or(LoadError::OutOfMemory)?;
    let phys = block.as_u64() - paging::PHYS_OFFSET;
    let mut mapper = mapper_for(pml4);
    for index in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt + index * 4096));
        let frame = PhysFrame::containing_address(PhysAddr::new(phys + index * 4096));
        let parents = Flags::PRESENT | Flags::WRITABLE | Flags::USER_ACCESSIBLE;
        // SAFETY: the page is in the domain's lower half, mapped once (layout is fixed and
        // checked); the frame is fresh.
        unsafe {
            mapper.map_to_with_table_flags(
                page,
                frame,
                flags | Flags::PRESENT | Flags::USER_ACCESSIBLE,
                parents,
                &mut paging::Frames,
            )
        }
        .map_err(|_| LoadError::PageTaken(page.start_address().as_u64()))?
        .ignore();
    }
    Ok(phys)
}

/// Loads the ELF `image` as domain `name` at domain index `index`, with threads for `cpus`
/// CPUs, allowed to call the domains whose bits are set in `may_call`, with a state region of
/// `state_pages` pages (all from the manifest).
pub fn load(
    index: u16,
    name: &'static str,
    image: &'static [u8],
    cpus: usize,
    may_call: u32,
    state_pages: u64,
) -> Result<(), LoadError> {
    let elf = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(LoadError::Elf)?;
    let entry = elf.ehdr.e_entry;
    let mut system = SYSTEM.lock();
    if system
        .domains
        .get(usize::from(index))
        .is_none_or(Option::is_some)
    {
        return Err(LoadError::TooManyDomains);
    }
    let pml4_virt = paging::allocate_zeroed(1).ok_or(LoadError::OutOfMemory)?;
    let pml4 = pml4_virt.as_u64() - paging::PHYS_OFFSET;
    paging::share_kernel_half(pml4);

    let mut entry_ok = false;
    let mut segments = [Segment::default(); MAX_SEGMENTS];
    let mut segment_count = 0;
    for segment in elf
        .segments()
        .iter()
        .flat_map(|table| table.iter())
        .filter(|s| s.p_type == PT_LOAD)
    {
        let start = segment.p_vaddr & !0xfff;
        let end = segment.p_vaddr.saturating_add(segment.p_memsz);
        let file_end = segment.p_offset.saturating_add(segment.p_filesz);
        if start < abi::IMAGE_BASE
            || end > abi::HEAP_BASE
            || segment.p_filesz > segment.p_memsz
            || file_end > image.len() as u64
        {
            return Err(LoadError::BadSegment {
                vaddr: segment.p_vaddr,
                size: segment.p_memsz,
            });
        }
        let mut flags = Flags::empty();
        if segment.p_flags & PF_W != 0 {
            flags |= Flags::WRITABLE;
        }
        if segment.p_flags & PF_X == 0 {
            flags |= Flags::NO_EXECUTE;
        } else if (segment.p_vaddr..end).contains(&entry) {
            entry_ok = true;
        }
        let pages = (end - start).div_ceil(4096);
        let phys = map_fresh(pml4, start, pages, flags)?;
        let loaded = Segment {
            phys,
            pages,
            offset_in_page: segment.p_vaddr - start,
            file_offset: segment.p_offset,
            file_size: segment.p_filesz,
        };
        *segments
            .get_mut(segment_count)
            .ok_or(LoadError::TooManySegments)? = loaded;
        segment_count += 1;
        write_segment(image, &loaded);
    }
    if !entry_ok {
        return Err(LoadError::BadEntry(entry));
    }

    let data = Flags::WRITABLE | Flags::NO_EXECUTE;
    let state_pages = state_pages.clamp(1, u64::from(abi::MAX_STATE_PAGES));
    map_fresh(pml4, abi::STATE_BASE, state_pages, data)?;
    let lock_table = map_fresh(pml4, abi::LOCK_TABLE_BASE, 1, data)?;
    let empty = Thread {
        state: ThreadState::Fresh,
        context: Context {
            frame: TrapFrame::default(),
            fx: initial_fx(),
        },
        buffer: 0,
    };
    let mut threads = [empty; abi::MAX_DOMAIN_CPUS];
    for (cpu, thread) in threads
        .iter_mut()
        .enumerate()
        .take(cpus.min(abi::MAX_DOMAIN_CPUS))
    {
        thread.buffer = map_fresh(pml4, abi::message_buffer(cpu), 1, data)?;
        map_fresh(pml4, abi::stack_bottom(cpu), abi::STACK_BYTES / 4096, data)?;
    }
    let checksum = crc32fast::hash(image);
    system.domains[usize::from(index)] = Some(Domain {
        name,
        image,
        checksum,
        segments,
        segment_count,
        generation: 1,
        pml4,
        entry,
        lock_table,
        may_call,
        threads,
        failures: 0,
        pending_start: abi::start::BOOT,
        cpus: cpus.min(abi::MAX_DOMAIN_CPUS),
        state_bytes: state_pages * 4096,
        config: 0,
        failed_for_good: false,
        recovering: false,
    });
    Ok(())
}

/// (Re)writes a segment's frames from the image: zero the pages, copy the file bytes.
fn write_segment(image: &[u8], segment: &Segment) {
    let base = paging::phys_to_virt(segment.phys).as_mut_ptr::<u8>();
    let bytes =
        &image[segment.file_offset as usize..(segment.file_offset + segment.file_size) as usize];
    // SAFETY: the segment's frames were allocated for it at load, `pages` long, and cover
    // `offset_in_page + file_size` bytes (checked at load); the domain is not running.
    unsafe {
        core::ptr::write_bytes(base, 0, (segment.pages * 4096) as usize);
        core::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            base.add(segment.offset_in_page as usize),
            bytes.len(),
        );
    }
}

/// The FXSAVE image of a clean FPU: default control words (FCW 0x37f, MXCSR 0x1f80).
fn initial_fx() -> FxArea {
    let mut area = [0u8; 512];
    area[0..2].copy_from_slice(&0x037f_u16.to_le_bytes());
    area[24..28].copy_from_slice(&0x1f80_u32.to_le_bytes());
    FxArea(area)
}

/// The domain table for the end-of-run summary, if its lock can be had: another CPU may hold
/// it for a moment (a timer tick checking a deadline), or may have been halted holding it.
fn system_for_summary() -> Option<spin::MutexGuard<'static, System>> {
    (0..100_000).find_map(|_| SYSTEM.try_lock())
}

/// Fills `out` with a report of every domain; returns how many.
pub fn reports(out: &mut [microvisor::summary::DomainReport<'static>]) -> usize {
    let Some(system) = system_for_summary() else {
        return 0;
    };
    let mut count = 0;
    for (slot, domain) in out.iter_mut().zip(system.domains.iter().flatten()) {
        *slot = microvisor::summary::DomainReport {
            name: domain.name,
            generation: domain.generation,
            failures: domain.failures,
        };
        count += 1;
    }
    count
}

/// The last detection, as the summary reports it.
pub fn detection_report() -> Option<microvisor::summary::DetectionReport<'static>> {
    let detection = LAST_DETECTION.try_lock().and_then(|detection| *detection)?;
    let system = system_for_summary()?;
    let name_of = |index: u16| {
        system
            .domains
            .get(usize::from(index))
            .and_then(Option::as_ref)
            .map_or("?", |domain| domain.name)
    };
    Some(microvisor::summary::DetectionReport {
        domain: name_of(detection.domain),
        cpu: detection.cpu,
        kind: match detection.kind {
            FailureKind::Exception { .. } => "exception",
            FailureKind::Panic => "panic",
            FailureKind::Hang => "hang",
            FailureKind::MalformedReply => "malformed-reply",
        },
        vector: match detection.kind {
            FailureKind::Exception { vector } => Some(vector),
            _ => None,
        },
        rip: detection.rip,
        caller: detection.caller.map_or("core", name_of),
        tsc: detection.tsc,
    })
}

/// Name and generation of domain `index`.
pub fn describe(index: u16) -> Option<(&'static str, u32, u32)> {
    let system = SYSTEM.lock();
    system
        .domains
        .get(usize::from(index))?
        .as_ref()
        .map(|domain| (domain.name, domain.generation, domain.failures))
}

/// Why a typed call from the core got no decoded answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypedCallError {
    /// The request does not encode within `ipc::MESSAGE_MAX`.
    Encode,
    /// The call failed with this status (a reply that does not decode is the callee's
    /// failure: it is recovered and the call fails with `PeerRestarted`).
    Status(Status),
}

/// Calls domain `target` from the core with a typed `ipc` request and decodes its response.
pub fn typed_call<R: serde::de::DeserializeOwned>(
    target: u16,
    request: &impl serde::Serialize,
) -> Result<ipc::Response<R>, TypedCallError> {
    let mut bytes = [0u8; ipc::MESSAGE_MAX];
    let length = ipc::encode(request, &mut bytes).map_err(|_| TypedCallError::Encode)?;
    let mut reply = [0u8; ipc::MESSAGE_MAX];
    let length = core_call(target, &bytes[..length], &mut reply).map_err(TypedCallError::Status)?;
    match ipc::decode(&reply[..length]) {
        Ok(response) => Ok(response),
        // A reply that does not decode is the domain's failure, detected after the fact: it is
        // recovered, and the caller sees what a failure under its call looks like.
        Err(_) => {
            malformed_reply(target, "its reply does not decode");
            Err(TypedCallError::Status(Status::PeerRestarted))
        }
    }
}

/// Domain `failed` answered the core with a reply the core cannot use (`why`): a failure
/// detected after the fact, while its thread is parked in `REPLY_WAIT`. It is detected (kind
/// `malformed-reply`) and recovered like any other failure: the recovery manager decides
/// (asked with a call from here), then the core applies the order. The caller goes on as if
/// the domain had failed under its call (`PeerRestarted`: it retries).
pub fn malformed_reply(failed: u16, why: &str) {
    let detected = apic::tsc();
    let cpu = crate::cpu::current_index();
    let (rip, generation) = {
        let mut system = SYSTEM.lock();
        let Some(domain) = system.domain(failed) else {
            return;
        };
        if domain.recovering || domain.failed_for_good {
            return;
        }
        domain.recovering = true;
        let rip = domain
            .threads
            .get(cpu)
            .map_or(0, |thread| thread.context.frame.rip);
        let (name, generation) = (domain.name, domain.generation);
        let _ = writeln!(
            Console::lock(),
            "DOMAIN MALFORMED REPLY from {name} on CPU {cpu}: {why}"
        );
        crate::inject::on_detection(failed, detected);
        *LAST_DETECTION.lock() = Some(Detection {
            domain: failed,
            cpu,
            kind: FailureKind::MalformedReply,
            rip,
            caller: None,
            tsc: detected,
        });
        quiesce(&system, cpu, failed);
        (rip, generation)
    };
    let (order, decided_by) = if failed == RECOVERY_MANAGER {
        (RecoveryOrder::Microreboot, "core")
    } else {
        let request = ipc::recovery::Request::DomainFailed(ipc::recovery::Detection {
            domain: ipc::DomainId {
                index: failed,
                generation,
            },
            cpu: cpu as u8,
            kind: FailureKind::MalformedReply,
            rip,
            tsc: detected,
            in_flight: None,
        });
        match typed_call::<ipc::recovery::Reply>(RECOVERY_MANAGER, &request) {
            Ok(Ok(ipc::recovery::Reply::Order(order))) => (order, "recovery-manager"),
            _ => (order_for(*MODE.lock()), "core"),
        }
    };
    let decided = apic::tsc();
    let generation = {
        let mut system = SYSTEM.lock();
        apply(&mut system, failed, order, detected, decided, decided_by);
        system.domain(failed).map_or(0, |domain| domain.generation)
    };
    if let Some(report) = LAST_RECOVERY.lock().as_mut() {
        report.total = apic::tsc() - detected;
    }
    log_recovery(generation);
}

/// Calls domain `target` from the core on this CPU: `request` in, reply into `reply`.
/// Returns the reply length, or the status the call failed with.
pub fn core_call(target: u16, request: &[u8], reply: &mut [u8]) -> Result<usize, Status> {
    let cpu = crate::cpu::current_index();
    if cpu >= abi::MAX_DOMAIN_CPUS || request.len() > abi::MESSAGE_BYTES {
        return Err(Status::BadArgument);
    }
    SYSTEM.lock().core_buffers[cpu][..request.len()].copy_from_slice(request);
    let (status, length): (u64, u64);
    // SAFETY: enters the core's own system-call path, which saves this context and resumes it
    // (with RAX = status, RDX = reply length) when the callee replies; every other register is
    // restored as it was.
    unsafe {
        core::arch::asm!("int 0x80", inout("rax") CORE_CALL => status, in("rdi") u64::from(target),
                         inout("rdx") request.len() as u64 => length, out("r8") _);
    }
    match Status::from_raw(status) {
        Some(Status::Ok) => {
            let length = (length as usize).min(reply.len()).min(abi::MESSAGE_BYTES);
            reply[..length].copy_from_slice(&SYSTEM.lock().core_buffers[cpu][..length]);
            Ok(length)
        }
        Some(status) => Err(status),
        None => Err(Status::BadArgument),
    }
}

fn copy_buffer(from: u64, to: u64, length: usize) {
    // SAFETY: both are message-buffer frames owned by domains (or the same one); the direct
    // map covers them; `length` is at most a page.
    unsafe {
        core::ptr::copy(
            paging::phys_to_virt(from).as_ptr::<u8>(),
            paging::phys_to_virt(to).as_mut_ptr::<u8>(),
            length,
        )
    };
}

fn switch_address_space(pml4: u64) {
    let frame = PhysFrame::containing_address(PhysAddr::new(pml4));
    // SAFETY: every address space shares the core's upper half, so the code, stack and data
    // the core is using stay mapped across the switch.
    unsafe {
        x86_64::registers::control::Cr3::write(frame, x86_64::registers::control::Cr3Flags::empty())
    };
}

impl System {
    fn domain(&mut self, index: u16) -> Option<&mut Domain> {
        self.domains.get_mut(usize::from(index))?.as_mut()
    }

    /// Enters `callee`'s thread on `cpu` with a request of `length` bytes already in its
    /// buffer, by loading its context into `frame`/`fx`.
    fn enter(
        &mut self,
        cpu: usize,
        callee: u16,
        caller: Option<u16>,
        length: usize,
        frame: &mut TrapFrame,
        fx: &mut FxArea,
    ) {
        let generation = self.domain(callee).map_or(0, |domain| domain.generation);
        let chain = &mut self.chains[cpu];
        chain.entries[chain.depth] = Some(callee);
        chain.generations[chain.depth] = generation;
        chain.depth += 1;
        chain.start_deadline(cpu, apic::tsc());
        let domain = self.domain(callee).expect("callee checked by the caller");
        let (pml4, entry, cpus, state_bytes, config) = (
            domain.pml4,
            domain.entry,
            domain.cpus,
            domain.state_bytes,
            domain.config,
        );
        let start_reason = if domain.threads[cpu].state == ThreadState::Fresh {
            core::mem::replace(&mut domain.pending_start, abi::start::JOIN)
        } else {
            abi::start::JOIN
        };
        let thread = &mut domain.threads[cpu];
        let caller_index = caller.map_or(0, u64::from);
        match thread.state {
            ThreadState::Fresh => {
                *frame = TrapFrame {
                    rip: entry,
                    cs: USER_CODE,
                    rflags: 0x202,
                    rsp: abi::stack_top(cpu) - 8,
                    ss: USER_DATA,
                    rdi: cpu as u64,
                    rsi: length as u64,
                    rdx: caller_index,
                    rcx: abi::start::pack(start_reason, REPAIRS.load(Ordering::Acquire), config),
                    r8: abi::entry::pack(cpus as u64, state_bytes),
                    r9: NOTIFICATIONS[usize::from(callee)]
                        .swap(0, core::sync::atomic::Ordering::AcqRel),
                    ..TrapFrame::default()
                };
                *fx = initial_fx();
            }
            _ => {
                *frame = thread.context.frame;
                *fx = thread.context.fx;
                frame.rax = Status::Ok as u64;
                frame.rdx = length as u64;
                frame.r8 = caller_index;
                frame.r9 = NOTIFICATIONS[usize::from(callee)]
                    .swap(0, core::sync::atomic::Ordering::AcqRel);
            }
        }
        thread.state = ThreadState::Busy;
        let buffer = thread.buffer;
        lost_reply_arms(callee, cpu, buffer, length);
        // Fault injection: a fail-stop while serving this request.
        if failstop_strikes(callee) {
            let _ = writeln!(
                Console::lock(),
                "INJECT failstop into domain {callee} on CPU {cpu}: RIP {:#x} := 0",
                frame.rip
            );
            frame.rip = 0;
        }
        // A register, code or stepped fail-stop fault armed for this domain starts stepping it.
        crate::inject::on_enter(callee, cpu, frame);
        switch_address_space(pml4);
    }

    /// Resumes whoever is now at the top of `cpu`'s chain (after the callee above it left),
    /// with the given status and reply length. A caller whose thread was discarded meanwhile
    /// (its domain failed on another CPU: [`Self::stale_top`]) is not resumed: it is popped
    /// too, and its own caller gets `PeerRestarted` instead of the reply.
    fn resume_caller(
        &mut self,
        cpu: usize,
        mut status: Status,
        mut length: usize,
        mut generation: u32,
        frame: &mut TrapFrame,
        fx: &mut FxArea,
    ) {
        while let Some(stale) = self.stale_top(cpu) {
            self.discard_top(cpu, stale);
            status = Status::PeerRestarted;
            length = 0;
            generation = self.domain(stale).map_or(0, |domain| domain.generation);
        }
        let chain = &mut self.chains[cpu];
        let caller = if chain.depth == 0 {
            None
        } else {
            chain.entries[chain.depth - 1]
        };
        match caller {
            None => {
                let context = chain
                    .core_context
                    .take()
                    .expect("the core waits on this CPU");
                *frame = context.frame;
                *fx = context.fx;
                switch_address_space(paging::kernel_cr3());
            }
            Some(index) => {
                // A caller's deadline counts its own time: it starts again as it resumes (a
                // callee that took long, or was recovered, does not make its caller hung).
                chain.start_deadline(cpu, apic::tsc());
                let domain = self.domain(index).expect("callers in a chain exist");
                *frame = domain.threads[cpu].context.frame;
                *fx = domain.threads[cpu].context.fx;
                switch_address_space(domain.pml4);
            }
        }
        frame.rax = status as u64;
        frame.rdx = length as u64;
        frame.r8 = u64::from(generation);
    }

    /// The domain at the top of `cpu`'s chain, if its entry is stale: the domain was detected
    /// failed (on another CPU: this one pops its own failed entry at detection) or has been
    /// restarted since this CPU entered it. Its thread there must not run again.
    fn stale_top(&self, cpu: usize) -> Option<u16> {
        // Without the quiesce repair, threads on other CPUs run on in the failed instance (what
        // the core did before it had quiesce).
        if !repair_enabled(abi::repair::QUIESCE) {
            return None;
        }
        let chain = &self.chains[cpu];
        let top = chain.depth.checked_sub(1)?;
        let index = chain.entries[top]?;
        let domain = self.domains.get(usize::from(index))?.as_ref()?;
        (domain.recovering || domain.generation != chain.generations[top]).then_some(index)
    }

    /// Pops the stale entry of `stale` at the top of `cpu`'s chain. Its thread is left as the
    /// recovery set it (fresh once restarted). If it was the recovery manager deciding a
    /// recovery, that recovery is finished with the default order, as when the manager fails.
    fn discard_top(&mut self, cpu: usize, stale: u16) {
        let chain = &mut self.chains[cpu];
        chain.depth -= 1;
        let pending = chain.pending[chain.depth].take();
        let name = self.domain(stale).map_or("?", |domain| domain.name);
        log::warn!("CPU {cpu} left {name}: its thread there was discarded by a recovery");
        if let Some(pending) = pending {
            let decided = apic::tsc();
            apply(
                self,
                pending.failed,
                order_for(*MODE.lock()),
                pending.detected,
                decided,
                "core",
            );
        }
    }

    /// If the entry at the top of `cpu`'s chain is stale, discards it (and any stale callers
    /// below) and resumes the first live caller with `PeerRestarted`; returns whether it did.
    fn abandon_stale(&mut self, cpu: usize, frame: &mut TrapFrame, fx: &mut FxArea) -> bool {
        if self.stale_top(cpu).is_none() {
            return false;
        }
        self.resume_caller(cpu, Status::PeerRestarted, 0, 0, frame, fx);
        true
    }

    /// The domain running on `cpu`, if a domain (not the core) is at the top of its chain.
    fn running(&self, cpu: usize) -> Option<u16> {
        let chain = &self.chains[cpu];
        if chain.depth == 0 {
            None
        } else {
            chain.entries[chain.depth - 1]
        }
    }
}

/// The system-call gate (`int 0x80`), from a domain or from the core.
pub fn syscall(frame: &mut TrapFrame, fx: &mut FxArea) {
    let cpu = crate::cpu::current_index();
    let mut system = SYSTEM.lock();
    if cpu >= abi::MAX_DOMAIN_CPUS {
        frame.rax = Status::NoSuchTarget as u64;
        return;
    }
    if !frame.in_user_mode() {
        // The core calls a domain.
        if frame.rax != CORE_CALL {
            frame.rax = Status::NoSuchTarget as u64;
            return;
        }
        let (target, length) = (frame.rdi, frame.rdx as usize);
        let Some(buffer) = u16::try_from(target)
            .ok()
            .and_then(|target| system.domain(target))
            .map(|domain| domain.threads[cpu].buffer)
        else {
            frame.rax = Status::NoSuchTarget as u64;
            return;
        };
        if buffer == 0 || length > abi::MESSAGE_BYTES {
            frame.rax = Status::BadArgument as u64;
            return;
        }
        if system
            .domain(target as u16)
            .is_some_and(|domain| domain.failed_for_good)
        {
            frame.rax = Status::PeerFailed as u64;
            return;
        }
        if system
            .domain(target as u16)
            .is_some_and(|domain| domain.recovering)
        {
            wait_for_recovery(&mut system.chains[cpu], cpu, frame);
            return;
        }
        if system
            .domain(target as u16)
            .is_some_and(|domain| domain.threads[cpu].state == ThreadState::Busy)
        {
            frame.rax = Status::Busy as u64;
            return;
        }
        let core_buffer = &system.core_buffers[cpu][..length];
        let target_buffer = paging::phys_to_virt(buffer).as_mut_ptr::<u8>();
        // SAFETY: the callee's buffer frame is a page the core allocated; length <= a page.
        unsafe { core::ptr::copy_nonoverlapping(core_buffer.as_ptr(), target_buffer, length) };
        system.chains[cpu].core_context = Some(Context {
            frame: *frame,
            fx: *fx,
        });
        system.enter(cpu, target as u16, None, length, frame, fx);
        return;
    }

    // A thread discarded by a recovery on another CPU does not get its call served: its
    // caller is resumed instead (its reply, if this was one, is dropped).
    if system.abandon_stale(cpu, frame, fx) {
        return;
    }
    let Some(current) = system.running(cpu) else {
        frame.rax = Status::NoSuchTarget as u64;
        return;
    };
    match frame.rax {
        call::REPLY_WAIT
            if LOSE_REPLY[cpu]
                .compare_exchange(
                    usize::from(current) + 1,
                    0,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok() =>
        {
            // The injected lost reply: the domain fails as it replies (its work is committed,
            // its reply never delivered).
            let _ = writeln!(
                Console::lock(),
                "INJECT lost reply: domain {current} on CPU {cpu} fails as it replies: RIP {:#x} := 0",
                frame.rip
            );
            frame.rip = 0;
        }
        call::REPLY_WAIT => {
            note_served(current);
            let length = frame.rdi;
            let domain = system.domain(current).expect("running domain exists");
            let generation = domain.generation;
            let thread = &mut domain.threads[cpu];
            thread.context = Context {
                frame: *frame,
                fx: *fx,
            };
            thread.state = ThreadState::Waiting;
            let reply_buffer = thread.buffer;
            let chain = &mut system.chains[cpu];
            chain.depth -= 1;
            let length = if length == abi::NO_REPLY {
                0
            } else {
                (length as usize).min(abi::MESSAGE_BYTES)
            };
            // The recovery manager answering a recovery the core asked it to decide.
            if let Some(pending) = chain.pending[chain.depth].take() {
                let order = decode_order(reply_buffer, length);
                execute(&mut system, cpu, pending, order, frame, fx);
                return;
            }
            match system.running(cpu) {
                Some(caller) => {
                    let caller_buffer =
                        system.domain(caller).expect("caller exists").threads[cpu].buffer;
                    copy_buffer(reply_buffer, caller_buffer, length);
                }
                None => {
                    if length > 0
                        && BAD_REPLY_ARMED
                            .compare_exchange(
                                usize::from(current) + 1,
                                0,
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok()
                    {
                        // The injected bad reply: the first byte (the response's tag) becomes
                        // one no decoder accepts.
                        let _ = writeln!(
                            Console::lock(),
                            "INJECT bad reply: domain {current} on CPU {cpu} answers the core with a corrupted reply"
                        );
                        // SAFETY: the replying thread's buffer page; length > 0.
                        unsafe { *paging::phys_to_virt(reply_buffer).as_mut_ptr::<u8>() = 0xff };
                    }
                    let target = &mut system.core_buffers[cpu][..length];
                    // SAFETY: the reply buffer is the callee thread's page; length <= a page.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            paging::phys_to_virt(reply_buffer).as_ptr::<u8>(),
                            target.as_mut_ptr(),
                            length,
                        )
                    };
                }
            }
            system.resume_caller(cpu, Status::Ok, length, generation, frame, fx);
        }
        call::CALL => {
            let (target, expected_generation, length) = (frame.rdi, frame.rsi, frame.rdx as usize);
            let caller = system.domain(current).expect("running domain exists");
            let may_call = caller.may_call;
            let caller_buffer = caller.threads[cpu].buffer;
            let status = match u16::try_from(target)
                .ok()
                .filter(|&t| usize::from(t) < MAX_DOMAINS)
            {
                None => Some(Status::NoSuchTarget),
                Some(t) if may_call & (1 << t) == 0 => Some(Status::NoCapability),
                Some(_) if length > abi::MESSAGE_BYTES => Some(Status::BadArgument),
                Some(t) => match system.domain(t) {
                    None => Some(Status::NoSuchTarget),
                    Some(callee) if u64::from(callee.generation) != expected_generation => {
                        frame.r8 = u64::from(callee.generation);
                        Some(Status::PeerRestarted)
                    }
                    Some(callee) if callee.failed_for_good => Some(Status::PeerFailed),
                    Some(callee) if callee.recovering => {
                        wait_for_recovery(&mut system.chains[cpu], cpu, frame);
                        return;
                    }
                    Some(callee) if callee.threads[cpu].state == ThreadState::Busy => {
                        Some(Status::Busy)
                    }
                    Some(_) => None,
                },
            };
            if let Some(status) = status {
                frame.rax = status as u64;
                return;
            }
            let target = target as u16;
            let caller = system.domain(current).expect("running domain exists");
            caller.threads[cpu].context = Context {
                frame: *frame,
                fx: *fx,
            };
            let callee_buffer = system.domain(target).expect("checked").threads[cpu].buffer;
            copy_buffer(caller_buffer, callee_buffer, length);
            system.enter(cpu, target, Some(current), length, frame, fx);
        }
        call::NOTIFY => {
            let (target, bits) = (frame.rdi, frame.rsi);
            let may_call = system
                .domain(current)
                .expect("running domain exists")
                .may_call;
            frame.rax = match u16::try_from(target)
                .ok()
                .filter(|&t| usize::from(t) < MAX_DOMAINS)
            {
                None => Status::NoSuchTarget as u64,
                Some(t) if may_call & (1 << t) == 0 => Status::NoCapability as u64,
                Some(t) if system.domain(t).is_none() => Status::NoSuchTarget as u64,
                Some(t) => {
                    post(t, bits);
                    Status::Ok as u64
                }
            };
        }
        call::SET_DEADLINE => {
            let (target_cpu, deadline) = (frame.rdi as usize, frame.rsi);
            frame.rax = if current != TIMER_DOMAIN {
                Status::NoCapability as u64
            } else if let Some(slot) = DEADLINES.get(target_cpu) {
                slot.store(deadline, core::sync::atomic::Ordering::Release);
                Status::Ok as u64
            } else {
                Status::BadArgument as u64
            };
        }
        call::INJECT => {
            let (vm, vcpu, vector) = (frame.rdi, frame.rsi, frame.rdx);
            frame.rax = if current != TIMER_DOMAIN {
                Status::NoCapability as u64
            } else if vm > u64::from(u16::MAX) || vcpu > 0xff || !(32..=0xff).contains(&vector) {
                Status::BadArgument as u64
            } else if crate::guest::inject(vm as u16, vcpu as u8, vector as u8) {
                Status::Ok as u64
            } else {
                Status::NoSuchTarget as u64
            };
        }
        call::LOG => {
            let length = (frame.rdi as usize).min(abi::MESSAGE_BYTES);
            let domain = system.domain(current).expect("running domain exists");
            let (name, buffer) = (domain.name, domain.threads[cpu].buffer);
            // SAFETY: the thread's buffer page, read-only here; length <= a page.
            let bytes = unsafe {
                core::slice::from_raw_parts(paging::phys_to_virt(buffer).as_ptr::<u8>(), length)
            };
            let text = core::str::from_utf8(bytes).unwrap_or("<not UTF-8>");
            let printing = apic::tsc();
            let _ = writeln!(Console::lock(), "[cpu{cpu} {name}] {text}");
            // The console's time (the UART's pace, another CPU's line) is not the domain's:
            // its call's deadline moves by as much.
            let since = TOP_SINCE[cpu].load(core::sync::atomic::Ordering::Relaxed)
                + (apic::tsc() - printing);
            system.chains[cpu].start_deadline(cpu, since);
            frame.rax = Status::Ok as u64;
        }
        call::PANIC => {
            let trapped = apic::tsc();
            let length = (frame.rdi as usize).min(abi::MESSAGE_BYTES);
            let domain = system.domain(current).expect("running domain exists");
            let (name, buffer) = (domain.name, domain.threads[cpu].buffer);
            // SAFETY: as for LOG.
            let bytes = unsafe {
                core::slice::from_raw_parts(paging::phys_to_virt(buffer).as_ptr::<u8>(), length)
            };
            let text = core::str::from_utf8(bytes).unwrap_or("<not UTF-8>");
            let _ = writeln!(
                Console::lock(),
                "DOMAIN PANIC in {name} on CPU {cpu}: {text}"
            );
            recover(
                &mut system,
                cpu,
                current,
                FailureKind::Panic,
                trapped,
                frame,
                fx,
            );
        }
        _ => frame.rax = Status::NoSuchTarget as u64,
    }
}

/// An exception in ring 3: the running domain failed.
pub fn fault(frame: &mut TrapFrame, fx: &mut FxArea) {
    let trapped = apic::tsc();
    let cpu = crate::cpu::current_index();
    // A debug trap of a domain the fault injector is single-stepping is not a failure.
    if frame.vector == 1
        && matches!(
            crate::inject::on_debug_trap(cpu, running_on(cpu), frame),
            crate::inject::Step::Resume
        )
    {
        restart_deadline(cpu);
        return;
    }
    let mut system = SYSTEM.lock();
    // A discarded thread (its domain failed on another CPU) faulting is not a new failure.
    if system.abandon_stale(cpu, frame, fx) {
        return;
    }
    let vector = frame.vector as u8;
    let Some(current) = system.running(cpu) else {
        drop(system);
        // Ring 3 with no domain running: the core lost track of its own state.
        panic!(
            "exception {vector} in ring 3 at {:#x} with no domain running on CPU {cpu}",
            frame.rip
        );
    };
    let name = system.domain(current).map_or("?", |domain| domain.name);
    let (mnemonic, _) = microvisor::exception::name(vector).unwrap_or(("?", "?"));
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let _ = writeln!(
        Console::lock(),
        "DOMAIN FAULT in {name} on CPU {cpu}: vector {vector} ({mnemonic}), error code {:#x}, RIP {:#x}, CR2 {cr2:#x}",
        frame.error_code,
        frame.rip
    );
    recover(
        &mut system,
        cpu,
        current,
        FailureKind::Exception { vector },
        trapped,
        frame,
        fx,
    );
}

/// How long a domain may run on a call without answering, from its entry or from its last
/// resumption (after a call of its own returned, or a wait for a recovery), not counting the
/// console's time, before it is declared hung (ms of TSC time)... Healthy calls take
/// microseconds, but under an emulator that follows host time (QEMU's TCG) a debug build's
/// slowest call, the hypercall domain's first start, took 50-60 ms on a loaded 2-core host:
/// the budget keeps a wide margin over that.
pub const HANG_BUDGET_MS: u64 = 500;
/// ...and at least this many TSC ticks. Under bochs the TSC counts instructions, so a budget
/// in time alone would be 200k instructions at the 4 M/s of plain boots; the slowest call of a
/// healthy system is the debug build's first start of the hypercall domain (about 5 M
/// instructions); a release call takes well under 0.5 M.
pub const HANG_BUDGET_MIN_TICKS: u64 = 10_000_000;

/// The deadline of a call, in TSC ticks.
fn hang_budget() -> u64 {
    (HANG_BUDGET_MS * apic::tsc_khz()).max(HANG_BUDGET_MIN_TICKS)
}

/// A timer tick interrupted ring 3 on this CPU: if the domain running there has run past its
/// deadline ([`hang_budget`] since it was entered or last resumed), it is hung (an endless
/// loop, a spin on a lock nobody will release): detected like an exception, and recovered.
/// A domain that keeps calling others in a loop is not caught here: each return restarts its
/// deadline.
pub fn check_hang(frame: &mut TrapFrame, fx: &mut FxArea) {
    let now = apic::tsc();
    let cpu = crate::cpu::current_index();
    if cpu >= abi::MAX_DOMAIN_CPUS {
        return;
    }
    // Every change of the running entry writes its deadline start here too (`start_deadline`).
    let started = TOP_SINCE[cpu].load(core::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(started) >= hang_budget() {
        hung(frame, fx, "past its call's deadline");
    }
}

/// The domain running on this CPU (interrupted in ring 3: `frame`) is hung, as `why` says:
/// detected and recovered like a faulting one.
pub fn hung(frame: &mut TrapFrame, fx: &mut FxArea, why: &str) {
    let now = apic::tsc();
    let cpu = crate::cpu::current_index();
    let mut system = SYSTEM.lock();
    // Nor is a discarded thread that has not stopped yet a hang.
    if system.abandon_stale(cpu, frame, fx) {
        return;
    }
    let Some(current) = system.running(cpu) else {
        return;
    };
    let ran = now.saturating_sub(TOP_SINCE[cpu].load(core::sync::atomic::Ordering::Relaxed));
    let name = system.domain(current).map_or("?", |domain| domain.name);
    let _ = writeln!(
        Console::lock(),
        "DOMAIN HANG in {name} on CPU {cpu}: {why}, running {ran} TSC ticks without answering, RIP {:#x}",
        frame.rip
    );
    recover(&mut system, cpu, current, FailureKind::Hang, now, frame, fx);
}

/// The fault injector single-stepped the call at the top of `cpu`'s chain: the stepping's
/// cost is the injector's, not the domain's, so the call's deadline starts again now.
pub fn restart_deadline(cpu: usize) {
    if cpu >= abi::MAX_DOMAIN_CPUS {
        return;
    }
    SYSTEM.lock().chains[cpu].start_deadline(cpu, apic::tsc());
}

/// A domain failed on `cpu` while serving the call at the top of the chain (the failure
/// trapped into the core at `trapped`, before its report line was printed): record the
/// detection and ask the recovery manager for an order (its reply is handled by
/// [`execute`]). If the manager itself failed, or cannot be asked, the core restarts it and
/// applies the configured default order itself.
fn recover(
    system: &mut System,
    cpu: usize,
    failed: u16,
    kind: FailureKind,
    trapped: u64,
    frame: &mut TrapFrame,
    fx: &mut FxArea,
) {
    let detected = apic::tsc();
    crate::inject::on_detection(failed, trapped);
    let chain = &mut system.chains[cpu];
    chain.depth -= 1;
    let abandoned = chain.pending[chain.depth].take();
    if let Some(domain) = system.domain(failed) {
        domain.recovering = true;
    }
    quiesce(system, cpu, failed);
    let caller = system.running(cpu);
    *LAST_DETECTION.lock() = Some(Detection {
        domain: failed,
        cpu,
        kind,
        rip: frame.rip,
        caller,
        tsc: detected,
    });
    if failed == RECOVERY_MANAGER {
        // The core restarts the recovery manager itself, then finishes the recovery it was
        // deciding (if any) with the default order.
        log::warn!("the recovery manager failed: the core restarts it");
        apply(
            system,
            RECOVERY_MANAGER,
            RecoveryOrder::Microreboot,
            detected,
            detected,
            "core",
        );
        log_recovery(
            system
                .domain(RECOVERY_MANAGER)
                .map_or(0, |manager| manager.generation),
        );
        match abandoned {
            // The manager was deciding another domain's recovery: finish it with the default.
            Some(pending) => execute(system, cpu, pending, None, frame, fx),
            None => {
                let generation = system
                    .domain(RECOVERY_MANAGER)
                    .map_or(0, |manager| manager.generation);
                system.resume_caller(cpu, Status::PeerRestarted, 0, generation, frame, fx);
            }
        }
        return;
    }
    let pending = Pending { failed, detected };
    let manager_ready = system.domain(RECOVERY_MANAGER).is_some_and(|manager| {
        !manager.failed_for_good && manager.threads[cpu].state != ThreadState::Busy
    });
    if !manager_ready {
        execute(system, cpu, pending, None, frame, fx);
        return;
    }
    // Ask the manager: DomainFailed(detection) into its buffer, enter its thread with the
    // pending recovery attached to its chain entry.
    let generation = system.domain(failed).map_or(0, |domain| domain.generation);
    let in_flight = caller.map(|caller| ipc::recovery::InFlight {
        caller: ipc::DomainId {
            index: caller,
            generation: system.domain(caller).map_or(0, |domain| domain.generation),
        },
        operation: 0,
    });
    let request = ipc::recovery::Request::DomainFailed(ipc::recovery::Detection {
        domain: ipc::DomainId {
            index: failed,
            generation,
        },
        cpu: cpu as u8,
        kind,
        rip: frame.rip,
        tsc: detected,
        in_flight,
    });
    let mut bytes = [0u8; ipc::MESSAGE_MAX];
    let Ok(length) = ipc::encode(&request, &mut bytes) else {
        execute(system, cpu, pending, None, frame, fx);
        return;
    };
    let buffer = system
        .domain(RECOVERY_MANAGER)
        .expect("checked above")
        .threads[cpu]
        .buffer;
    // SAFETY: the manager thread's buffer page, owned by the core's domain table; length is
    // at most MESSAGE_MAX, well inside the page.
    unsafe {
        core::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            paging::phys_to_virt(buffer).as_mut_ptr::<u8>(),
            length,
        )
    };
    let chain = &mut system.chains[cpu];
    chain.pending[chain.depth] = Some(pending);
    system.enter(cpu, RECOVERY_MANAGER, None, length, frame, fx);
}

/// The repairs a recovery makes ([`abi::repair`] bits; `repairs=`): the core's own
/// (quiesce, releasing locks) are checked here, and every fresh thread gets the set in RCX.
static REPAIRS: core::sync::atomic::AtomicU64 =
    core::sync::atomic::AtomicU64::new(abi::repair::ALL);

/// Sets the repairs recoveries make (from the command line, before any domain starts).
pub fn set_repairs(repairs: u64) {
    REPAIRS.store(repairs & abi::repair::ALL, Ordering::Release);
}

fn repair_enabled(repair: u64) -> bool {
    REPAIRS.load(Ordering::Acquire) & repair == repair
}

/// Per CPU: the CPU runs ring-3 code (a domain's thread). Cleared on every entry into the core
/// from ring 3, before anything else, and set again on the way back: a recovery waits until no
/// CPU whose chain has the failed domain on top is still running it ([`wait_quiesced`]).
static IN_DOMAIN: [AtomicBool; abi::MAX_DOMAIN_CPUS] =
    [const { AtomicBool::new(false) }; abi::MAX_DOMAIN_CPUS];
/// Per CPU: a recovery on another CPU discarded the thread on top of this CPU's chain; checked
/// on the way back to ring 3 ([`returning_to_domain`]).
static ABANDON: [AtomicBool; abi::MAX_DOMAIN_CPUS] =
    [const { AtomicBool::new(false) }; abi::MAX_DOMAIN_CPUS];

/// Vector of the IPI that makes a CPU leave a domain whose failure another CPU detected.
pub const QUIESCE_VECTOR: u8 = 0xfb;

/// Called on every entry into the core from ring 3, first thing.
pub fn left_domain() {
    if let Some(flag) = IN_DOMAIN.get(crate::cpu::current_index()) {
        flag.store(false, Ordering::SeqCst);
    }
}

/// Called on every way back to ring 3 (`frame` is what the CPU resumes): if a recovery on
/// another CPU discarded the thread about to run, it does not run: its caller is resumed with
/// `PeerRestarted` instead. The flag is set before `ABANDON` is read, and a recovery sets
/// `ABANDON` before it reads the flag, so either this CPU sees the request or the recovery sees
/// it in ring 3 and waits for the IPI to bring it back.
pub fn returning_to_domain(frame: &mut TrapFrame, fx: &mut FxArea) {
    let cpu = crate::cpu::current_index();
    let (Some(in_domain), Some(abandon)) = (IN_DOMAIN.get(cpu), ABANDON.get(cpu)) else {
        return;
    };
    while frame.in_user_mode() {
        in_domain.store(true, Ordering::SeqCst);
        if !abandon.load(Ordering::SeqCst) {
            return;
        }
        in_domain.store(false, Ordering::SeqCst);
        abandon.store(false, Ordering::SeqCst);
        if !SYSTEM.lock().abandon_stale(cpu, frame, fx) {
            // Nothing stale on top (the thread left by itself meanwhile): go on.
            continue;
        }
    }
}

/// `failed` was detected on `cpu`: every other CPU running it (it is on top of that CPU's
/// chain) is told to leave it (`ABANDON` and the quiesce IPI). CPUs where it sits lower in the
/// chain, waiting for a callee, leave it when the callee replies (see `resume_caller`); CPUs
/// that do not use it carry on with their guests.
fn quiesce(system: &System, cpu: usize, failed: u16) {
    if !repair_enabled(abi::repair::QUIESCE) {
        return;
    }
    for (other, chain) in system.chains.iter().enumerate() {
        if other == cpu || chain.depth == 0 || chain.entries[chain.depth - 1] != Some(failed) {
            continue;
        }
        ABANDON[other].store(true, Ordering::SeqCst);
        if let Some(apic_id) = run::apic_id(other) {
            apic::send_to(apic_id, QUIESCE_VECTOR);
        }
    }
}

/// Before a recovery touches `failed` (its threads, locks, image): waits until no other CPU
/// still runs its code. A CPU in ring 3 always takes interrupts (a domain cannot clear IF), so
/// the quiesce IPI brings it into the core within microseconds; a CPU that does not come is a
/// core bug, reported as a failed run.
fn wait_quiesced(system: &System, failed: u16) {
    if !repair_enabled(abi::repair::QUIESCE) {
        return;
    }
    let cpu = crate::cpu::current_index();
    let start = apic::tsc();
    for (other, chain) in system.chains.iter().enumerate() {
        if other == cpu || chain.depth == 0 || chain.entries[chain.depth - 1] != Some(failed) {
            continue;
        }
        while IN_DOMAIN[other].load(Ordering::SeqCst) {
            if apic::tsc().saturating_sub(start) > hang_budget() {
                crate::fail(
                    "quiesce",
                    format_args!("CPU {other} did not leave domain {failed} for its recovery"),
                );
            }
            core::hint::spin_loop();
        }
    }
}

/// A call to a domain under recovery waits: the caller's RIP is moved back over its 2-byte
/// `int 0x80`, so it issues the same call again (registers unchanged) once it runs next,
/// until the recovery that another CPU is carrying out completes. Nothing else stops.
fn wait_for_recovery(chain: &mut Chain, cpu: usize, frame: &mut TrapFrame) {
    frame.rip -= 2;
    // Waiting is not hanging: the waiting caller's deadline starts again.
    chain.start_deadline(cpu, apic::tsc());
    core::hint::spin_loop();
}

/// Reads the recovery manager's answer from its buffer; anything but an order is a
/// malformed reply, answered by failing safe (the default order is applied by the caller's
/// `unwrap_or`).
fn decode_order(buffer: u64, length: usize) -> Option<RecoveryOrder> {
    // SAFETY: the manager thread's buffer page; length is clamped to a page.
    let bytes =
        unsafe { core::slice::from_raw_parts(paging::phys_to_virt(buffer).as_ptr::<u8>(), length) };
    match ipc::decode::<ipc::Response<ipc::recovery::Reply>>(bytes) {
        Ok(Ok(ipc::recovery::Reply::Order(order))) => Some(order),
        _ => {
            log::error!("the recovery manager answered without an order: applying the default");
            None
        }
    }
}

/// Executes the order for a pending recovery and resumes the caller that waited on the
/// failed domain: `PeerRestarted` after a microreset or microreboot, `PeerFailed` if the
/// domain was declared failed.
fn execute(
    system: &mut System,
    cpu: usize,
    pending: Pending,
    order: Option<RecoveryOrder>,
    frame: &mut TrapFrame,
    fx: &mut FxArea,
) {
    let decided = apic::tsc();
    let decided_by = if order.is_some() {
        "recovery-manager"
    } else {
        "core"
    };
    let order = order.unwrap_or_else(|| order_for(*MODE.lock()));
    apply(
        system,
        pending.failed,
        order,
        pending.detected,
        decided,
        decided_by,
    );
    let generation = system
        .domain(pending.failed)
        .map_or(0, |domain| domain.generation);
    let status = if order == RecoveryOrder::Fail {
        Status::PeerFailed
    } else {
        Status::PeerRestarted
    };
    system.resume_caller(cpu, status, 0, generation, frame, fx);
    if let Some(report) = LAST_RECOVERY.lock().as_mut() {
        report.total = apic::tsc() - pending.detected;
    }
    // Logged after the timing is taken: a line on the serial console costs emulated time.
    log_recovery(generation);
}

/// Logs the last recovery.
fn log_recovery(generation: u32) {
    if let Some(report) = LAST_RECOVERY.lock().as_ref() {
        if report.mode == order_name(RecoveryOrder::Fail) {
            log::error!(
                "{} declared failed for good, decided by {}: calls to it get PeerFailed",
                report.domain,
                report.decided_by
            );
        } else {
            log::warn!(
                "{} of {}, decided by {}: generation now {generation}",
                report.mode,
                report.domain,
                report.decided_by
            );
        }
    }
}

/// The order for a domain's first failure under a boot's recovery mode (also what the core
/// applies itself when the recovery manager cannot decide).
pub fn order_for(mode: RecoveryMode) -> RecoveryOrder {
    match mode {
        RecoveryMode::Escalate | RecoveryMode::Microreset => RecoveryOrder::Microreset,
        RecoveryMode::Microreboot => RecoveryOrder::Microreboot,
    }
}

fn order_name(order: RecoveryOrder) -> &'static str {
    match order {
        RecoveryOrder::Microreset => "microreset",
        RecoveryOrder::Microreboot => "microreboot",
        RecoveryOrder::Fail => "fail",
    }
}

/// The recovery mechanism: abandon the domain's threads on every CPU, release its locks,
/// (microreboot) reload code and data from the verified pristine image, bump its generation
/// and set its next start reason; (fail) mark it failed for good. The state region is kept.
fn apply(
    system: &mut System,
    failed: u16,
    order: RecoveryOrder,
    detected: u64,
    decided: u64,
    decided_by: &'static str,
) {
    wait_quiesced(system, failed);
    let Some(domain) = system.domain(failed) else {
        return;
    };
    for thread in &mut domain.threads {
        thread.state = ThreadState::Fresh;
    }
    let discarded = apic::tsc();
    if repair_enabled(abi::repair::RELEASE_LOCKS) {
        // SAFETY: the lock table page belongs to the failed domain, whose threads were just
        // discarded: no lock holder survives, so releasing every lock is what recovery needs.
        unsafe {
            core::ptr::write_bytes(
                paging::phys_to_virt(domain.lock_table).as_mut_ptr::<u8>(),
                0,
                4096,
            )
        };
    }
    let unlocked = apic::tsc();
    if order == RecoveryOrder::Microreboot {
        if crc32fast::hash(domain.image) != domain.checksum {
            let name = domain.name;
            panic!("the pristine image of domain {name} no longer matches its boot checksum");
        }
        for segment in &domain.segments[..domain.segment_count] {
            write_segment(domain.image, segment);
        }
    }
    let reloaded = apic::tsc();
    domain.generation += 1;
    domain.failures += 1;
    domain.recovering = false;
    match order {
        RecoveryOrder::Microreset => domain.pending_start = abi::start::AFTER_MICRORESET,
        RecoveryOrder::Microreboot => domain.pending_start = abi::start::AFTER_MICROREBOOT,
        RecoveryOrder::Fail => {
            domain.failed_for_good = true;
            LAST_DECLARED_FAILED.store(failed, Ordering::Release);
            DECLARED_FAILED.fetch_add(1, Ordering::AcqRel);
        }
    }
    let name = domain.name;
    let done = apic::tsc();
    *LAST_RECOVERY.lock() = Some(RecoveryReport {
        domain: name,
        mode: order_name(order),
        decided_by,
        decide_policy: decided - detected,
        discard_threads: discarded - decided,
        release_locks: unlocked - discarded,
        reload_image: reloaded - unlocked,
        total: done - detected,
        until_served: None,
    });
    if order != RecoveryOrder::Fail {
        SERVED_SINCE.store(detected, Ordering::Release);
        SERVED_PENDING.store(usize::from(failed) + 1, Ordering::Release);
    }
}
