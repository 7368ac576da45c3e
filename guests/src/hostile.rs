//! The hostile guest: a malicious VM for isolation tests. It attacks the hypercall ABI with
//! arguments that must be refused (memory it has not got, frames of other VMs, pages it never
//! mapped, control-VM calls, ports it never opened), then with a bounded run of random
//! hypercalls, and checks every answer against what the ABI documents.
//!
//! What it must observe lives here, on plain data: the deterministic checks and their
//! expected codes ([`Check`]), the fixed-seed generator of random calls ([`Xorshift`]), the
//! classification of an answer ([`error_index`], [`Tally`]), what it must undo before it
//! ends ([`Leftovers`]), and what mode 3 must get when it takes every shared resource until
//! refused ([`Resource`], [`Exhaustion`]). The guest binary (`src/bin/hostile.rs`) issues
//! the calls.
//!
//! The ABI it checks against is `ipc::hypercall`'s (numbers, error codes, limits) and
//! `microvisor_abi::guest`'s (the window).

use core::fmt;

use ipc::hypercall::{self, EVENT_PORTS, HypercallError, MULTICALL_MAX};
use ipc::limits::{GUEST_RAM_PAGES, MAX_VMS};
use ipc::quota::Quota;
use microvisor_abi::guest::{WINDOW_FIRST_GFN, WINDOW_PAGES};

use crate::Checksum;

/// The control VM's number in every scenario (`microvisor::scenario::CONTROL_VM`, which this
/// library cannot see: only used as a VM that is not the caller).
pub const CONTROL_VM: u64 = 1;

/// The guest frame after the window's last.
pub const WINDOW_END_GFN: u64 = WINDOW_FIRST_GFN + WINDOW_PAGES;

/// The window page the deterministic checks populate.
pub const POPULATE_GFN: u64 = WINDOW_FIRST_GFN;
/// The window page the populated frame is mapped at again with `MAP_GRANT`, then unmapped.
pub const ALIAS_GFN: u64 = WINDOW_FIRST_GFN + 1;
/// The window page a foreign frame is offered to with `MAP_GRANT` (refused, so it stays free).
pub const FOREIGN_GFN: u64 = WINDOW_FIRST_GFN + 2;
/// A window page nothing ever maps: `UNMAP_GRANT` of it is a `NotFound`.
pub const NEVER_MAPPED_GFN: u64 = WINDOW_END_GFN - 1;
/// The window page mode 1 writes to; nothing ever maps it, so the write is an EPT violation.
pub const FAULT_GFN: u64 = 0x1f0;
/// Guest-physical address of [`FAULT_GFN`].
pub const FAULT_ADDRESS: u64 = FAULT_GFN * 4096;
/// A guest-physical address no VM has memory at (above the identity-mapped 2 MiB).
pub const OUTSIDE_ADDRESS: u64 = 0x30_0000;

/// Window pages the random calls name (from the window's start): well below the pages the
/// deterministic checks keep unmapped ([`FAULT_GFN`], [`NEVER_MAPPED_GFN`]).
pub const RANDOM_WINDOW_PAGES: u64 = 0x80;
/// Frames on either side of its own populated frame scanned for a foreign one.
pub const SCAN_RADIUS: u64 = 256;

// The random calls name window pages below the ones the checks keep unmapped, and the
// address outside memory lies past the identity-mapped 2 MiB.
const _: () = {
    assert!(FAULT_GFN >= WINDOW_FIRST_GFN + RANDOM_WINDOW_PAGES);
    assert!(NEVER_MAPPED_GFN >= WINDOW_FIRST_GFN + RANDOM_WINDOW_PAGES);
    assert!(OUTSIDE_ADDRESS >= WINDOW_END_GFN * 4096);
};

/// What `params[0]` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 0: run every check, exit with the verdict.
    Check,
    /// 1: run every check, print the verdict, then write to an unmapped window page (an EPT
    /// violation: the core must stop this VM and only it).
    Fault,
    /// 2: run every check, print the verdict, then read an MSR (guests have none: the
    /// hypercall domain refuses and the core must stop this VM and only it).
    Msr,
    /// 3: take every shared resource until refused (frames by populate, grants, event
    /// channels, far-future timers): each refusal must be `QuotaExceeded`, never
    /// `NoResources`, and it must have got exactly its quota (the AppVM default), whatever
    /// the other VMs do; hold them a while, then exit passed.
    Exhaust,
}

/// The vendor string the virtual CPU reports (CPUID leaf 0: EBX, EDX, ECX).
pub const VENDOR: &[u8; 12] = b"MicrovisorVM";

/// Whether CPUID leaf 0's EBX, ECX, EDX spell [`VENDOR`].
pub fn vendor_matches(ebx: u32, ecx: u32, edx: u32) -> bool {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&ebx.to_le_bytes());
    bytes[4..8].copy_from_slice(&edx.to_le_bytes());
    bytes[8..].copy_from_slice(&ecx.to_le_bytes());
    &bytes == VENDOR
}

impl Mode {
    /// The mode `params[0]` names, if any.
    pub const fn from_param(param: u64) -> Option<Mode> {
        match param {
            0 => Some(Mode::Check),
            1 => Some(Mode::Fault),
            2 => Some(Mode::Msr),
            3 => Some(Mode::Exhaust),
            _ => None,
        }
    }

    /// Its parameter value.
    pub const fn param(self) -> u64 {
        match self {
            Mode::Check => 0,
            Mode::Fault => 1,
            Mode::Msr => 2,
            Mode::Exhaust => 3,
        }
    }
}

/// Hypercall error kinds (`HypercallError::ALL`).
pub const ERRORS: usize = HypercallError::ALL.len();

/// The error index (`0..ERRORS`, code order: `HypercallError::ALL`) of a hypercall answer, if
/// it is an error code.
pub const fn error_index(result: i64) -> Option<usize> {
    if result <= -1 && result >= -(ERRORS as i64) {
        Some((-result - 1) as usize)
    } else {
        None
    }
}

/// Whether a hypercall answer is one the ABI allows: a value (>= 0) or an error code.
pub const fn is_valid_result(result: i64) -> bool {
    result >= 0 || error_index(result).is_some()
}

/// What a deterministic check must observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// This error code.
    Code(i64),
    /// Success with 0.
    Zero,
    /// A frame number (> 0); folded into the checksum as 1, since frames differ per run.
    Frame,
}

impl Expected {
    /// Whether `result` is what was expected.
    pub const fn accepts(self, result: i64) -> bool {
        match self {
            Expected::Code(code) => result == code,
            Expected::Zero => result == 0,
            Expected::Frame => result > 0,
        }
    }

    /// The word the checksum folds in for `result` (a frame counts as 1).
    pub const fn fold(self, result: i64) -> u64 {
        match self {
            Expected::Frame if result > 0 => 1,
            _ => result as u64,
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Expected::Code(code) => match error_index(code) {
                Some(index) => write!(f, "{code} ({:?})", HypercallError::ALL[index]),
                None => write!(f, "{code}"),
            },
            Expected::Zero => f.write_str("0"),
            Expected::Frame => f.write_str("a frame (> 0)"),
        }
    }
}

/// What a check needs before it can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing.
    Nothing,
    /// The frame [`Check::PopulateWindow`] answered.
    OwnFrame,
    /// A frame of another VM (found by scanning around its own frame).
    ForeignFrame,
}

/// The deterministic checks, in the order the guest runs them. How each is issued is the
/// guest binary's; what it must answer is [`Check::expected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `CONSOLE_WRITE(OUTSIDE_ADDRESS, 8)`: memory the VM has not got.
    ConsoleOutsideMemory,
    /// `CONSOLE_WRITE(its buffer, 0)`.
    ConsoleEmpty,
    /// `CONSOLE_WRITE(its buffer, CONSOLE_MAX + 1)`.
    ConsoleTooLong,
    /// `CONSOLE_WRITE(its buffer, 8, 1)`: an unused argument not 0.
    ConsoleUnusedArgument,
    /// `MEMORY_POPULATE(0x10)`: below the window (its own RAM).
    PopulateBelowWindow,
    /// `MEMORY_POPULATE(WINDOW_END_GFN)`: past the window.
    PopulatePastWindow,
    /// `MEMORY_POPULATE(u64::MAX)`.
    PopulateHugeGfn,
    /// `MEMORY_POPULATE(POPULATE_GFN)`: the one valid populate; answers its frame.
    PopulateWindow,
    /// `MEMORY_POPULATE(POPULATE_GFN)` again: the guest frame is mapped already.
    PopulateSameGfn,
    /// `MAP_GRANT(foreign frame, FOREIGN_GFN)`.
    MapForeign,
    /// `MEMORY_RELEASE(foreign frame)`.
    ReleaseForeign,
    /// `GRANT(foreign frame, its own VM)`: sharing another VM's frame with itself.
    GrantForeign,
    /// `GRANT_REVOKE(foreign frame, the frame's owner)`: ending a share it did not make (the
    /// peer must be another VM than the caller, else the call is an `InvalidArgument`).
    RevokeForeign,
    /// `MAP_GRANT(own frame, ALIAS_GFN)`.
    MapOwnAlias,
    /// `UNMAP_GRANT(ALIAS_GFN)`.
    UnmapAlias,
    /// `UNMAP_GRANT(ALIAS_GFN)` again: a double unmap.
    UnmapAliasAgain,
    /// `UNMAP_GRANT(NEVER_MAPPED_GFN)`.
    UnmapNeverMapped,
    /// `UNMAP_GRANT(POPULATE_GFN)`: mapped, but by populate, not by a grant.
    UnmapPopulated,
    /// `VM_CREATE` of a plausible image: only the control VM may.
    VmCreate,
    /// `VM_START(its VM + 1, 0)`.
    VmStart,
    /// `VM_STATUS(CONTROL_VM)`.
    VmStatus,
    /// `VM_DESTROY(CONTROL_VM)`.
    VmDestroy,
    /// `EVTCHN_SEND(5)`: a port it never opened.
    SendUnopened,
    /// `EVTCHN_BIND(unoffered_peer(vm), 1)`: a port nobody offered it.
    BindUnoffered,
    /// `EVTCHN_CLOSE(62)`: a port it never opened.
    CloseUnopened,
}

impl Check {
    /// Every check, in running order.
    pub const ALL: [Check; 25] = [
        Check::ConsoleOutsideMemory,
        Check::ConsoleEmpty,
        Check::ConsoleTooLong,
        Check::ConsoleUnusedArgument,
        Check::PopulateBelowWindow,
        Check::PopulatePastWindow,
        Check::PopulateHugeGfn,
        Check::PopulateWindow,
        Check::PopulateSameGfn,
        Check::MapForeign,
        Check::ReleaseForeign,
        Check::GrantForeign,
        Check::RevokeForeign,
        Check::MapOwnAlias,
        Check::UnmapAlias,
        Check::UnmapAliasAgain,
        Check::UnmapNeverMapped,
        Check::UnmapPopulated,
        Check::VmCreate,
        Check::VmStart,
        Check::VmStatus,
        Check::VmDestroy,
        Check::SendUnopened,
        Check::BindUnoffered,
        Check::CloseUnopened,
    ];

    /// What the call must answer.
    pub const fn expected(self) -> Expected {
        match self {
            Check::ConsoleOutsideMemory
            | Check::ConsoleEmpty
            | Check::ConsoleTooLong
            | Check::ConsoleUnusedArgument
            | Check::PopulateBelowWindow
            | Check::PopulatePastWindow
            | Check::PopulateHugeGfn => {
                Expected::Code(HypercallError::InvalidArgument.guest_code())
            }
            Check::PopulateWindow => Expected::Frame,
            Check::PopulateSameGfn => Expected::Code(HypercallError::InUse.guest_code()),
            Check::MapForeign
            | Check::ReleaseForeign
            | Check::GrantForeign
            | Check::RevokeForeign
            | Check::VmCreate
            | Check::VmStart
            | Check::VmStatus
            | Check::VmDestroy => Expected::Code(HypercallError::PermissionDenied.guest_code()),
            Check::MapOwnAlias | Check::UnmapAlias => Expected::Zero,
            Check::UnmapAliasAgain
            | Check::UnmapNeverMapped
            | Check::UnmapPopulated
            | Check::SendUnopened
            | Check::BindUnoffered
            | Check::CloseUnopened => Expected::Code(HypercallError::NotFound.guest_code()),
        }
    }

    /// What it needs to run.
    pub const fn needs(self) -> Needs {
        match self {
            Check::PopulateSameGfn
            | Check::MapOwnAlias
            | Check::UnmapAlias
            | Check::UnmapAliasAgain
            | Check::UnmapPopulated => Needs::OwnFrame,
            Check::MapForeign
            | Check::ReleaseForeign
            | Check::GrantForeign
            | Check::RevokeForeign => Needs::ForeignFrame,
            _ => Needs::Nothing,
        }
    }

    /// A short name for the console.
    pub const fn name(self) -> &'static str {
        match self {
            Check::ConsoleOutsideMemory => "console write outside memory",
            Check::ConsoleEmpty => "empty console write",
            Check::ConsoleTooLong => "console write over CONSOLE_MAX",
            Check::ConsoleUnusedArgument => "console write with an unused argument",
            Check::PopulateBelowWindow => "populate below the window",
            Check::PopulatePastWindow => "populate past the window",
            Check::PopulateHugeGfn => "populate at gfn u64::MAX",
            Check::PopulateWindow => "populate in the window",
            Check::PopulateSameGfn => "populate the same gfn again",
            Check::MapForeign => "map a foreign frame",
            Check::ReleaseForeign => "release a foreign frame",
            Check::GrantForeign => "grant a foreign frame to itself",
            Check::RevokeForeign => "revoke a foreign frame's share",
            Check::MapOwnAlias => "map its own frame again",
            Check::UnmapAlias => "unmap the alias",
            Check::UnmapAliasAgain => "unmap the alias again",
            Check::UnmapNeverMapped => "unmap a page never mapped",
            Check::UnmapPopulated => "unmap a populated page",
            Check::VmCreate => "VM_CREATE",
            Check::VmStart => "VM_START",
            Check::VmStatus => "VM_STATUS",
            Check::VmDestroy => "VM_DESTROY",
            Check::SendUnopened => "send on an unopened port",
            Check::BindUnoffered => "bind to a port nobody offered",
            Check::CloseUnopened => "close an unopened port",
        }
    }
}

/// A VM that never offered this one a port: the highest VM number (never reached within a
/// run), or the one below it for a VM that has that number itself.
pub const fn unoffered_peer(vm: u16) -> u64 {
    let max_vms = MAX_VMS as u64;
    if vm as u64 == max_vms - 1 {
        max_vms - 2
    } else {
        max_vms - 1
    }
}

/// The owner in a `QUERY_FRAME` answer (bits 0..16; `0xffff` when free); `None` for an error.
pub const fn query_owner(query: i64) -> Option<u16> {
    if query < 0 { None } else { Some(query as u16) }
}

/// The owner of a frame that is another VM's and shared with nobody (reference count 1, so it
/// cannot be shared with this VM either), from its `QUERY_FRAME` answer.
pub const fn foreign_owner(query: i64, vm: u16) -> Option<u16> {
    let refcount = (query >> 16) as u16;
    match query_owner(query) {
        Some(owner) if owner != vm && owner != u16::MAX && refcount == 1 => Some(owner),
        _ => None,
    }
}

/// Whether a `QUERY_FRAME` answer says `vm` owns the frame.
pub const fn owned_by(query: i64, vm: u16) -> bool {
    matches!(query_owner(query), Some(owner) if owner == vm)
}

/// The frames scanned for a foreign one: `own ± 1`, `own ± 2`, ... up to [`SCAN_RADIUS`],
/// nearest first, without `own` and without wrapping around.
pub fn scan_order(own: u64) -> impl Iterator<Item = u64> {
    (1..=SCAN_RADIUS).flat_map(move |distance| {
        [own.checked_add(distance), own.checked_sub(distance)]
            .into_iter()
            .flatten()
    })
}

/// The fixed seed of the random calls ("hostile!" in ASCII).
pub const RANDOM_SEED: u64 = 0x2165_6c69_7473_6f68;
/// Random calls per run.
pub const RANDOM_CALLS: u64 = 400;
/// Random numbers are drawn from `0..=HIGHEST_NUMBER` (most past `VM_DESTROY` do not exist).
pub const HIGHEST_NUMBER: u64 = 40;

/// Numbers the random calls never issue: `VM_EXIT` would end the guest, `YIELD` and
/// `EVENT_WAIT` would park it (nothing wakes it), and `CONSOLE_WRITE` would spam the shared
/// console. Each is covered by the deterministic checks or by the other guests instead. The
/// calls that take shared resources (`MEMORY_POPULATE`, `TIMER_ONESHOT`, `GRANT`,
/// `EVTCHN_ALLOC`) are issued: quotas (`ipc::quota`) bound what this VM can take to its own
/// reservation, so however many it takes, the other VMs keep theirs.
pub const SKIPPED: [u64; 4] = [
    hypercall::YIELD,
    hypercall::CONSOLE_WRITE,
    hypercall::VM_EXIT,
    hypercall::EVENT_WAIT,
];

/// How many of a random call's six arguments are drawn (the rest are 0), so that calls get
/// past the "unused arguments must be 0" check often enough to reach deeper paths.
const ARITIES: [usize; 8] = [0, 1, 1, 2, 2, 2, 3, 6];

/// Values that are too large for any argument.
const HUGE: [u64; 6] = [
    u64::MAX,
    1 << 63,
    1 << 32,
    u32::MAX as u64,
    i64::MAX as u64,
    u64::MAX - 4095,
];

/// Guest frames at and around the window's edges.
const EDGE_GFNS: [u64; 5] = [
    0,
    WINDOW_FIRST_GFN - 1,
    WINDOW_END_GFN,
    1 << 32,
    u32::MAX as u64,
];

/// What the random arguments aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    /// Its VM number.
    pub vm: u16,
    /// Its populated frame.
    pub own_frame: u64,
    /// Another VM's frame, if one was found.
    pub foreign_frame: Option<u64>,
    /// Guest-physical address of its batch entries (`MULTICALL_MAX` × number, arg0, arg1).
    pub batch_entries: u64,
    /// Guest-physical address of its batch results (`MULTICALL_MAX` i64s).
    pub batch_results: u64,
}

/// One random hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomCall {
    /// RAX.
    pub number: u64,
    /// RDI, RSI, RDX, R10, R8, R9.
    pub args: [u64; 6],
}

/// The xorshift64 generator of the random calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xorshift {
    state: u64,
}

impl Xorshift {
    /// A generator seeded with `seed` (0, which xorshift cannot leave, becomes
    /// [`RANDOM_SEED`]).
    pub const fn new(seed: u64) -> Xorshift {
        Xorshift {
            state: if seed == 0 { RANDOM_SEED } else { seed },
        }
    }

    /// The next word.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// A number below `bound` (> 0).
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// One of `choices`.
    fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// A hypercall number in `0..=HIGHEST_NUMBER`, never one of [`SKIPPED`].
    pub fn number(&mut self) -> u64 {
        loop {
            let number = self.below(HIGHEST_NUMBER + 1);
            if !SKIPPED.contains(&number) {
                return number;
            }
        }
    }

    /// One argument: 0, a small number, a window page, a window edge, its own frame, the
    /// foreign frame, a VM number, a huge value or any word.
    pub fn argument(&mut self, targets: &Targets) -> u64 {
        let vm = u64::from(targets.vm);
        match self.below(9) {
            0 => 0,
            1 => self.below(16),
            2 => WINDOW_FIRST_GFN + self.below(RANDOM_WINDOW_PAGES),
            3 => self.pick(&EDGE_GFNS),
            4 => targets.own_frame,
            5 => targets.foreign_frame.unwrap_or(targets.own_frame),
            6 => self.pick(&[
                vm,
                vm + 1,
                vm.wrapping_sub(1),
                0,
                CONTROL_VM,
                u64::from(MAX_VMS) - 1,
                u64::from(MAX_VMS),
                0xffff,
            ]),
            7 => self.pick(&HUGE),
            _ => self.next_u64(),
        }
    }

    /// One random call. A `MULTICALL` always names its own entry and result buffers (a
    /// random result address would let the core write over its code or stack), with a count
    /// of 1 to `MULTICALL_MAX + 1`; neither a `MAP_GRANT` nor a `MEMORY_POPULATE` ever maps
    /// [`FAULT_GFN`] (mode 1 needs it unmapped).
    pub fn call(&mut self, targets: &Targets) -> RandomCall {
        let number = self.number();
        let arity = self.pick(&ARITIES);
        let mut args = [0u64; 6];
        for arg in args.iter_mut().take(arity) {
            *arg = self.argument(targets);
        }
        if number == hypercall::MULTICALL {
            args[0] = targets.batch_entries;
            args[1] = 1 + self.below(MULTICALL_MAX as u64 + 1);
            args[2] = targets.batch_results;
        }
        if number == hypercall::MAP_GRANT && args[1] == FAULT_GFN {
            args[1] = ALIAS_GFN;
        }
        if number == hypercall::MEMORY_POPULATE && args[0] == FAULT_GFN {
            args[0] = ALIAS_GFN;
        }
        RandomCall { number, args }
    }

    /// The entries of a random batch: (number, arg0, arg1) each, numbers as for
    /// [`Self::number`] (a `MULTICALL` among them is refused as nested).
    pub fn batch(&mut self, targets: &Targets) -> [[u64; 3]; MULTICALL_MAX] {
        let mut entries = [[0u64; 3]; MULTICALL_MAX];
        for entry in entries.iter_mut() {
            entry[0] = self.number();
            let arity = self.below(3) as usize;
            for arg in entry[1..].iter_mut().take(arity) {
                *arg = self.argument(targets);
            }
        }
        entries
    }
}

/// Whether a call with this number may change who holds frame arg0 (release or share it),
/// so that arg0 must never be one of its own RAM frames: releasing one frees the page its
/// code or stack lives in while it still uses it (inside a batch the core does not even
/// unmap it), and sharing one leaves it allocated after the VM ends. The guest replaces such
/// an argument with its populated frame (see [`guarded_frame`]).
pub const fn changes_frame(number: u64) -> bool {
    number == hypercall::MEMORY_RELEASE || number == hypercall::GRANT
}

/// The frame argument to use instead of `frame` for a call that [`changes_frame`]: its
/// populated frame when `frame` is another frame it owns (`query` is `QUERY_FRAME(frame)`),
/// else `frame`.
pub const fn guarded_frame(frame: u64, query: i64, targets: &Targets) -> u64 {
    if frame != targets.own_frame && owned_by(query, targets.vm) {
        targets.own_frame
    } else {
        frame
    }
}

/// The answers of the random calls, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Answers >= 0.
    pub values: u64,
    /// Error codes, by index (code order).
    pub errors: [u64; ERRORS],
    /// Answers that are neither (each a mismatch).
    pub invalid: u64,
}

impl Tally {
    /// Counts one answer; returns whether it is valid.
    pub fn record(&mut self, result: i64) -> bool {
        if result >= 0 {
            self.values += 1;
            return true;
        }
        match error_index(result) {
            Some(index) => {
                self.errors[index] += 1;
                true
            }
            None => {
                self.invalid += 1;
                false
            }
        }
    }

    /// Answers counted.
    pub fn total(&self) -> u64 {
        self.values + self.errors.iter().sum::<u64>() + self.invalid
    }

    /// Folds the counts in: values, each error kind, invalid.
    pub fn fold_into(&self, sum: &mut Checksum) {
        sum.add(self.values);
        for &count in &self.errors {
            sum.add(count);
        }
        sum.add(self.invalid);
    }
}

/// What the random calls left behind that outlives the VM unless it is undone: shares of
/// its frame (they keep the frame allocated after the VM ends) and event-channel ports (the
/// channel table is shared by all VMs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Bit `p`: its populated frame is shared with VM `p`.
    pub shared_with: u64,
    /// Bit `p`: it holds port `p`.
    pub ports: u64,
}

impl Leftovers {
    /// Notes one completed call (`result` is what it answered).
    pub fn note(&mut self, number: u64, arg0: u64, arg1: u64, result: i64, own_frame: u64) {
        let peer_bit = if arg1 < u64::from(MAX_VMS) {
            1u64 << arg1
        } else {
            0
        };
        let port_bit = |port: u64| {
            if (1..u64::from(EVENT_PORTS)).contains(&port) {
                1u64 << port
            } else {
                0
            }
        };
        match number {
            hypercall::GRANT if result == 0 && arg0 == own_frame => self.shared_with |= peer_bit,
            hypercall::GRANT_REVOKE if result == 0 && arg0 == own_frame => {
                self.shared_with &= !peer_bit
            }
            hypercall::EVTCHN_ALLOC | hypercall::EVTCHN_BIND if result > 0 => {
                self.ports |= port_bit(result as u64)
            }
            hypercall::EVTCHN_CLOSE if result == 0 => self.ports &= !port_bit(arg0),
            _ => {}
        }
    }

    /// The calls that undo them: `GRANT_REVOKE(own_frame, peer)` per share, then
    /// `EVTCHN_CLOSE(port)` per port.
    pub fn undo(&self, own_frame: u64) -> impl Iterator<Item = (u64, [u64; 2])> {
        let revokes =
            bits(self.shared_with).map(move |peer| (hypercall::GRANT_REVOKE, [own_frame, peer]));
        let closes = bits(self.ports).map(|port| (hypercall::EVTCHN_CLOSE, [port, 0]));
        revokes.chain(closes)
    }
}

/// The set bits of `mask`, lowest first.
fn bits(mask: u64) -> impl Iterator<Item = u64> {
    (0..64).filter(move |bit| mask & (1 << bit) != 0)
}

/// What mode 3 takes until refused, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Frames: `MEMORY_POPULATE` of window pages ([`EXHAUST_GFNS`]), after it backed every
    /// page of its guest RAM (so no later touch of its own memory needs a frame).
    Frames,
    /// Share records: `GRANT` of its populated frames to [`unoffered_peer`].
    Grants,
    /// Event channels: `EVTCHN_ALLOC` offered to [`unoffered_peer`].
    EventPorts,
    /// One-shot timers: `TIMER_ONESHOT` at [`FAR_FUTURE`] (they never fire while it runs).
    Timers,
}

impl Resource {
    /// Every resource, in the order mode 3 takes them.
    pub const ALL: [Resource; 4] = [
        Resource::Frames,
        Resource::Grants,
        Resource::EventPorts,
        Resource::Timers,
    ];

    /// A short name for the console.
    pub const fn name(self) -> &'static str {
        match self {
            Resource::Frames => "frames",
            Resource::Grants => "grants",
            Resource::EventPorts => "ports",
            Resource::Timers => "timers",
        }
    }

    /// How many mode 3 must get before the refusal, with `quota` and every page of its guest
    /// RAM backed first.
    pub const fn expected(self, quota: &Quota) -> u64 {
        match self {
            Resource::Frames => (quota.frames as u64).saturating_sub(GUEST_RAM_PAGES as u64),
            Resource::Grants => quota.grants as u64,
            Resource::EventPorts => quota.event_ports as u64,
            Resource::Timers => quota.timers as u64,
        }
    }
}

/// The quota mode 3 expects to hold: the one every scenario VM gets.
pub const EXHAUST_QUOTA: Quota = Quota::APP_VM;

/// The window pages mode 3 populates: clear of the pages the checks and mode 1 use.
pub const EXHAUST_GFNS: core::ops::Range<u64> = WINDOW_FIRST_GFN + 0x10..FAULT_GFN;

/// The deadline of mode 3's timers (TSC): centuries away at any clock rate.
pub const FAR_FUTURE: u64 = 1 << 62;

/// How long mode 3 holds what it took (ms of guest time, yielding), so the other VMs run
/// beside an exhausted VM; `params[1]` overrides it.
pub const HOLD_MS: u64 = 200;

// There are window pages for every frame of the quota and one more (the one refused), all
// inside the window.
const _: () =
    assert!(EXHAUST_GFNS.end - EXHAUST_GFNS.start > Resource::Frames.expected(&EXHAUST_QUOTA));
const _: () = assert!(EXHAUST_GFNS.start >= WINDOW_FIRST_GFN && EXHAUST_GFNS.end <= WINDOW_END_GFN);

/// The guest-physical address mode 3 reads to back RAM page `page` (in the page's middle, so
/// never the null pointer).
pub const fn ram_probe(page: u64) -> u64 {
    page * 4096 + 0x800
}

/// What mode 3 got of one resource, and the answer that stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// How many it got.
    pub count: u64,
    /// The refusal (an error code).
    pub refusal: i64,
}

impl Taken {
    /// Whether it got exactly `expected` and was then refused for its own quota.
    pub const fn as_expected(&self, expected: u64) -> bool {
        self.count == expected && self.refusal == HypercallError::QuotaExceeded.guest_code()
    }
}

/// Mode 3's summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhaustion {
    /// Its VM number.
    pub vm: u16,
    /// Per [`Resource::ALL`].
    pub taken: [Taken; 4],
    /// Every refusal `QuotaExceeded` after exactly its quota, and still refused after the hold.
    pub passed: bool,
}

impl Exhaustion {
    /// Whether every resource was taken exactly to `quota` and then refused `QuotaExceeded`.
    pub fn all_as_expected(taken: &[Taken; 4], quota: &Quota) -> bool {
        Resource::ALL
            .iter()
            .zip(taken)
            .all(|(resource, taken)| taken.as_expected(resource.expected(quota)))
    }
}

impl fmt::Display for Exhaustion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hostile: vm {} mode 3:", self.vm)?;
        for (resource, taken) in Resource::ALL.iter().zip(&self.taken) {
            write!(f, " {} {}", taken.count, resource.name())?;
        }
        let refused = if self
            .taken
            .iter()
            .all(|taken| taken.refusal == HypercallError::QuotaExceeded.guest_code())
        {
            "QuotaExceeded"
        } else {
            "other refusal"
        };
        write!(
            f,
            ", {refused}, {}",
            if self.passed { "passed" } else { "FAILED" }
        )
    }
}

/// The guest's summary line (what scenarios grep for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Its VM number.
    pub vm: u16,
    /// `params[0]`.
    pub mode: u64,
    /// Deterministic checks run (the foreign-frame ones included).
    pub checks: u64,
    /// Random calls issued.
    pub random_calls: u64,
    /// Foreign-frame checks run.
    pub foreign_checks: u64,
    /// No mismatch.
    pub passed: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hostile: vm {} mode {}: {} checks, {} random calls, {} foreign-frame checks, {}",
            self.vm,
            self.mode,
            self.checks,
            self.random_calls,
            self.foreign_checks,
            if self.passed { "passed" } else { "FAILED" }
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vendor_check_reads_ebx_edx_ecx() {
        let word = |text: &[u8]| u32::from_le_bytes([text[0], text[1], text[2], text[3]]);
        assert!(vendor_matches(word(b"Micr"), word(b"orVM"), word(b"ovis")));
        assert!(!vendor_matches(word(b"Micr"), word(b"ovis"), word(b"orVM")));
        assert_eq!(Mode::from_param(2), Some(Mode::Msr));
        assert_eq!(Mode::Msr.param(), 2);
    }

    extern crate std;

    use std::format;
    use std::vec::Vec;

    use ipc::hypercall::CONSOLE_MAX;

    use super::*;

    const TARGETS: Targets = Targets {
        vm: 3,
        own_frame: 0x4_0123,
        foreign_frame: Some(0x4_0456),
        batch_entries: 0x3_f000,
        batch_results: 0x3_f200,
    };

    #[test]
    fn codes_are_the_documented_ones() {
        // docs/hypercall-abi.md, "Error codes".
        let codes = HypercallError::ALL.map(HypercallError::guest_code);
        assert_eq!(codes, [-1, -2, -3, -4, -5, -6, -7, -8, -9, -10, -11, -12]);
        assert_eq!(HypercallError::QuotaExceeded.guest_code(), -11);
        assert_eq!(HypercallError::InvalidArgument.guest_code(), -3);
        assert_eq!(HypercallError::PermissionDenied.guest_code(), -5);
        assert_eq!(HypercallError::InUse.guest_code(), -6);
        assert_eq!(HypercallError::NotFound.guest_code(), -7);
        for (index, &code) in codes.iter().enumerate() {
            assert_eq!(code, -(index as i64) - 1);
        }
    }

    #[test]
    fn classifier_accepts_every_code_and_value_and_nothing_else() {
        for (index, error) in HypercallError::ALL.into_iter().enumerate() {
            let code = error.guest_code();
            assert_eq!(error_index(code), Some(index));
            assert!(is_valid_result(code));
        }
        for value in [0, 1, 0x4_0123, i64::MAX] {
            assert_eq!(error_index(value), None);
            assert!(is_valid_result(value));
        }
        for bad in [-13, -14, -100, i64::MIN, i64::MIN + 1] {
            assert_eq!(error_index(bad), None);
            assert!(!is_valid_result(bad), "{bad}");
        }
    }

    #[test]
    fn expected_codes_match_the_abi() {
        use Check::*;
        let expect = |check: Check| check.expected();
        for check in [
            ConsoleOutsideMemory,
            ConsoleEmpty,
            ConsoleTooLong,
            ConsoleUnusedArgument,
            PopulateBelowWindow,
            PopulatePastWindow,
            PopulateHugeGfn,
        ] {
            assert_eq!(expect(check), Expected::Code(-3), "{}", check.name());
        }
        assert_eq!(expect(PopulateWindow), Expected::Frame);
        assert_eq!(expect(PopulateSameGfn), Expected::Code(-6));
        for check in [
            MapForeign,
            ReleaseForeign,
            GrantForeign,
            RevokeForeign,
            VmCreate,
            VmStart,
            VmStatus,
            VmDestroy,
        ] {
            assert_eq!(expect(check), Expected::Code(-5), "{}", check.name());
        }
        assert_eq!(expect(MapOwnAlias), Expected::Zero);
        assert_eq!(expect(UnmapAlias), Expected::Zero);
        for check in [
            UnmapAliasAgain,
            UnmapNeverMapped,
            UnmapPopulated,
            SendUnopened,
            BindUnoffered,
            CloseUnopened,
        ] {
            assert_eq!(expect(check), Expected::Code(-7), "{}", check.name());
        }
        // Every expected code is one of the ABI's.
        for check in Check::ALL {
            if let Expected::Code(code) = check.expected() {
                assert!(error_index(code).is_some());
            }
        }
    }

    #[test]
    fn checks_are_listed_once_with_their_needs() {
        for (index, check) in Check::ALL.iter().enumerate() {
            assert!(!Check::ALL[..index].contains(check));
            assert!(
                !Check::ALL[..index]
                    .iter()
                    .any(|other| other.name() == check.name())
            );
        }
        let count = |needs| Check::ALL.iter().filter(|c| c.needs() == needs).count();
        assert_eq!(count(Needs::ForeignFrame), 4);
        assert_eq!(count(Needs::OwnFrame), 5);
        // The frame is populated before anything needs it.
        let populate = Check::ALL
            .iter()
            .position(|&c| c == Check::PopulateWindow)
            .unwrap();
        assert!(
            Check::ALL[..populate]
                .iter()
                .all(|c| c.needs() == Needs::Nothing)
        );
        // The alias is mapped before it is unmapped.
        let position = |check| Check::ALL.iter().position(|&c| c == check).unwrap();
        assert!(position(Check::MapOwnAlias) < position(Check::UnmapAlias));
        assert!(position(Check::UnmapAlias) < position(Check::UnmapAliasAgain));
    }

    #[test]
    fn expectations_accept_and_fold() {
        assert!(Expected::Code(-7).accepts(-7));
        assert!(!Expected::Code(-7).accepts(0));
        assert!(Expected::Zero.accepts(0));
        assert!(!Expected::Zero.accepts(-5));
        assert!(Expected::Frame.accepts(0x4_0123));
        assert!(!Expected::Frame.accepts(0));
        assert!(!Expected::Frame.accepts(-4));
        assert_eq!(Expected::Frame.fold(0x4_0123), 1);
        assert_eq!(Expected::Frame.fold(-4), (-4i64) as u64);
        assert_eq!(Expected::Code(-7).fold(-7), (-7i64) as u64);
        assert_eq!(format!("{}", Expected::Code(-5)), "-5 (PermissionDenied)");
        assert_eq!(format!("{}", Expected::Frame), "a frame (> 0)");
    }

    #[test]
    fn window_pages_are_apart() {
        let used = [
            POPULATE_GFN,
            ALIAS_GFN,
            FOREIGN_GFN,
            NEVER_MAPPED_GFN,
            FAULT_GFN,
        ];
        for (index, gfn) in used.iter().enumerate() {
            assert!((WINDOW_FIRST_GFN..WINDOW_END_GFN).contains(gfn));
            assert!(!used[..index].contains(gfn));
        }
        assert_eq!(FAULT_ADDRESS, 0x1f_0000);
    }

    #[test]
    fn modes_round_trip() {
        assert_eq!(Mode::from_param(0), Some(Mode::Check));
        assert_eq!(Mode::from_param(1), Some(Mode::Fault));
        assert_eq!(Mode::from_param(2), Some(Mode::Msr));
        assert_eq!(Mode::from_param(3), Some(Mode::Exhaust));
        assert_eq!(Mode::from_param(4), None);
        assert_eq!(Mode::from_param(u64::MAX), None);
        for mode in [Mode::Check, Mode::Fault, Mode::Msr, Mode::Exhaust] {
            assert_eq!(Mode::from_param(mode.param()), Some(mode));
        }
    }

    #[test]
    fn query_answers_are_unpacked() {
        // owner 2, reference count 1, kind Ram (1), validated: another VM's private frame.
        let private = 0x101_0001_0002;
        assert_eq!(foreign_owner(private, 3), Some(2));
        assert_eq!(foreign_owner(private, 2), None);
        assert!(owned_by(private, 2));
        assert!(!owned_by(private, 3));
        // Shared (reference count 2): perhaps with the caller, so not used.
        assert_eq!(foreign_owner(0x102_0002_0002, 3), None);
        // Free.
        assert_eq!(foreign_owner(0xffff, 3), None);
        assert!(!owned_by(0xffff, 3));
        // Errors.
        assert_eq!(
            foreign_owner(HypercallError::InvalidArgument.guest_code(), 3),
            None
        );
        assert!(!owned_by(HypercallError::InvalidArgument.guest_code(), 3));
        assert_eq!(query_owner(-1), None);
    }

    #[test]
    fn the_scan_goes_outwards_without_wrapping() {
        let order: Vec<u64> = scan_order(1000).collect();
        assert_eq!(order.len() as u64, 2 * SCAN_RADIUS);
        assert_eq!(&order[..4], &[1001, 999, 1002, 998]);
        assert!(!order.contains(&1000));
        assert!(order.contains(&(1000 + SCAN_RADIUS)) && order.contains(&(1000 - SCAN_RADIUS)));
        let low: Vec<u64> = scan_order(3).collect();
        assert_eq!(low.len() as u64, SCAN_RADIUS + 3);
        assert!(low.contains(&0) && !low.contains(&3));
        assert_eq!(scan_order(u64::MAX).count() as u64, SCAN_RADIUS);
    }

    #[test]
    fn unoffered_peers_are_other_vms() {
        for vm in 0..MAX_VMS {
            let peer = unoffered_peer(vm);
            assert_ne!(peer, u64::from(vm));
            assert!(peer < u64::from(MAX_VMS));
        }
    }

    #[test]
    fn the_generator_is_fixed_and_skips_what_it_must() {
        let mut first = Xorshift::new(RANDOM_SEED);
        let mut second = Xorshift::new(RANDOM_SEED);
        let mut seen = [false; HIGHEST_NUMBER as usize + 1];
        for _ in 0..20_000 {
            let number = first.number();
            assert_eq!(number, second.number());
            assert!(number <= HIGHEST_NUMBER);
            assert!(!SKIPPED.contains(&number), "{number}");
            seen[number as usize] = true;
        }
        for (number, &was_seen) in seen.iter().enumerate() {
            assert_eq!(was_seen, !SKIPPED.contains(&(number as u64)), "{number}");
        }
        assert_eq!(Xorshift::new(0), Xorshift::new(RANDOM_SEED));
        assert_ne!(Xorshift::new(1).next_u64(), Xorshift::new(2).next_u64());
    }

    #[test]
    fn random_calls_mix_their_arguments() {
        let mut random = Xorshift::new(RANDOM_SEED);
        let calls: Vec<RandomCall> = (0..RANDOM_CALLS).map(|_| random.call(&TARGETS)).collect();
        let args = || calls.iter().flat_map(|call| call.args);
        assert!(calls.iter().all(|call| !SKIPPED.contains(&call.number)));
        assert!(args().any(|arg| arg == TARGETS.own_frame));
        assert!(args().any(|arg| Some(arg) == TARGETS.foreign_frame));
        assert!(args().any(|arg| (WINDOW_FIRST_GFN..WINDOW_END_GFN).contains(&arg)));
        assert!(args().any(|arg| arg == u64::MAX));
        assert!(args().any(|arg| arg == u64::from(TARGETS.vm)));
        assert!(args().any(|arg| (1..16).contains(&arg)));
        // Some calls leave every argument 0, some fill all six.
        assert!(calls.iter().any(|call| call.args == [0; 6]));
        assert!(
            calls
                .iter()
                .any(|call| call.args.iter().all(|&arg| arg != 0))
        );
        // Enough deep calls: a quarter at least have arguments 2..6 all 0.
        let short = calls
            .iter()
            .filter(|call| call.args[2..].iter().all(|&arg| arg == 0))
            .count();
        assert!(short > calls.len() / 4, "{short}");
        let batches: Vec<&RandomCall> = calls
            .iter()
            .filter(|call| call.number == hypercall::MULTICALL)
            .collect();
        assert!(!batches.is_empty());
        for batch in batches {
            assert_eq!(batch.args[0], TARGETS.batch_entries);
            assert_eq!(batch.args[2], TARGETS.batch_results);
            assert!((1..=MULTICALL_MAX as u64 + 1).contains(&batch.args[1]));
        }
    }

    #[test]
    fn random_calls_never_map_the_fault_page() {
        // A frame that happens to equal the fault page's number.
        let targets = Targets {
            own_frame: FAULT_GFN,
            foreign_frame: Some(FAULT_GFN),
            ..TARGETS
        };
        let mut random = Xorshift::new(RANDOM_SEED);
        let (mut maps, mut populates) = (0, 0);
        for _ in 0..20_000 {
            let call = random.call(&targets);
            if call.number == hypercall::MAP_GRANT {
                maps += 1;
                assert_ne!(call.args[1], FAULT_GFN);
            }
            if call.number == hypercall::MEMORY_POPULATE {
                populates += 1;
                assert_ne!(call.args[0], FAULT_GFN);
            }
        }
        assert!(maps > 0 && populates > 0);
    }

    #[test]
    fn random_calls_take_shared_resources_too() {
        // The calls that exhaust shared resources are no longer skipped: quotas contain them.
        let mut random = Xorshift::new(RANDOM_SEED);
        let calls: Vec<RandomCall> = (0..RANDOM_CALLS).map(|_| random.call(&TARGETS)).collect();
        for number in [
            hypercall::MEMORY_POPULATE,
            hypercall::TIMER_ONESHOT,
            hypercall::GRANT,
            hypercall::EVTCHN_ALLOC,
        ] {
            assert!(!SKIPPED.contains(&number));
            assert!(calls.iter().any(|call| call.number == number), "{number}");
        }
        // Some populates name a window page (and so may take a frame).
        let mut random = Xorshift::new(RANDOM_SEED);
        let calls: Vec<RandomCall> = (0..20_000).map(|_| random.call(&TARGETS)).collect();
        assert!(calls.iter().any(|call| {
            call.number == hypercall::MEMORY_POPULATE
                && (WINDOW_FIRST_GFN..WINDOW_END_GFN).contains(&call.args[0])
                && call.args[1..].iter().all(|&arg| arg == 0)
        }));
    }

    #[test]
    fn exhaustion_expects_the_app_vm_quota() {
        let quota = EXHAUST_QUOTA;
        assert_eq!(quota, Quota::APP_VM);
        let expected = Resource::ALL.map(|resource| resource.expected(&quota));
        assert_eq!(
            expected,
            [
                u64::from(quota.frames) - u64::from(GUEST_RAM_PAGES),
                u64::from(quota.grants),
                u64::from(quota.event_ports),
                u64::from(quota.timers),
            ]
        );
        assert!(expected.iter().all(|&count| count > 0));
        let exceeded = HypercallError::QuotaExceeded.guest_code();
        let exact = expected.map(|count| Taken {
            count,
            refusal: exceeded,
        });
        assert!(Exhaustion::all_as_expected(&exact, &quota));
        // One short, or refused for the pool instead of its quota: not what quotas promise.
        let mut short = exact;
        short[0].count -= 1;
        assert!(!Exhaustion::all_as_expected(&short, &quota));
        let mut pool = exact;
        pool[3].refusal = HypercallError::NoResources.guest_code();
        assert!(!Exhaustion::all_as_expected(&pool, &quota));
        // Its pages: clear of the checks' and mode 1's, inside the window.
        for gfn in [
            POPULATE_GFN,
            ALIAS_GFN,
            FOREIGN_GFN,
            NEVER_MAPPED_GFN,
            FAULT_GFN,
        ] {
            assert!(!EXHAUST_GFNS.contains(&gfn), "{gfn:#x}");
        }
        // RAM probes: one per page, never the null pointer.
        assert_eq!(ram_probe(0), 0x800);
        assert_eq!(ram_probe(63) >> 12, 63);
    }

    #[test]
    fn the_exhaustion_line_is_pinned() {
        let exceeded = HypercallError::QuotaExceeded.guest_code();
        let taken = [32, 8, 4, 8].map(|count| Taken {
            count,
            refusal: exceeded,
        });
        let line = Exhaustion {
            vm: 7,
            taken,
            passed: true,
        };
        assert_eq!(
            format!("{line}"),
            "hostile: vm 7 mode 3: 32 frames 8 grants 4 ports 8 timers, QuotaExceeded, passed"
        );
        let mut refused = taken;
        refused[1].refusal = HypercallError::NoResources.guest_code();
        let longest = Exhaustion {
            vm: u16::MAX,
            taken: refused.map(|taken| Taken {
                count: 999,
                ..taken
            }),
            passed: false,
        };
        let text = format!("{longest}");
        assert!(text.ends_with("other refusal, FAILED"), "{text}");
        assert!(text.len() <= CONSOLE_MAX, "{}", text.len());
    }

    #[test]
    fn batches_hold_allowed_numbers_and_two_arguments() {
        let mut random = Xorshift::new(RANDOM_SEED);
        for _ in 0..200 {
            for [number, ..] in random.batch(&TARGETS) {
                assert!(number <= HIGHEST_NUMBER && !SKIPPED.contains(&number));
            }
        }
    }

    #[test]
    fn own_ram_frames_are_never_released_or_shared() {
        let own_ram = 0x101_0001_0003; // owned by VM 3
        let foreign = 0x101_0001_0002;
        assert!(changes_frame(hypercall::MEMORY_RELEASE) && changes_frame(hypercall::GRANT));
        assert!(!changes_frame(hypercall::MAP_GRANT) && !changes_frame(hypercall::QUERY_FRAME));
        assert_eq!(
            guarded_frame(0x4_0100, own_ram, &TARGETS),
            TARGETS.own_frame
        );
        assert_eq!(
            guarded_frame(TARGETS.own_frame, own_ram, &TARGETS),
            TARGETS.own_frame
        );
        assert_eq!(guarded_frame(0x4_0100, foreign, &TARGETS), 0x4_0100);
        assert_eq!(guarded_frame(0x4_0100, 0xffff, &TARGETS), 0x4_0100);
        assert_eq!(
            guarded_frame(
                u64::MAX,
                HypercallError::InvalidArgument.guest_code(),
                &TARGETS
            ),
            u64::MAX
        );
    }

    #[test]
    fn tallies_count_by_kind() {
        let mut tally = Tally::default();
        for result in [0, 5, -1, -7, -7, -10] {
            assert!(tally.record(result));
        }
        assert!(!tally.record(-13));
        assert!(!tally.record(i64::MIN));
        assert_eq!(tally.values, 2);
        assert_eq!(tally.errors, [1, 0, 0, 0, 0, 0, 2, 0, 0, 1, 0, 0]);
        assert_eq!(tally.invalid, 2);
        assert_eq!(tally.total(), 8);
        let mut sum = Checksum::new();
        tally.fold_into(&mut sum);
        let mut other = Tally::default();
        other.record(0);
        let mut other_sum = Checksum::new();
        other.fold_into(&mut other_sum);
        assert_ne!(sum, other_sum);
    }

    #[test]
    fn leftovers_are_undone() {
        let own = TARGETS.own_frame;
        let mut left = Leftovers::default();
        left.note(hypercall::GRANT, own, 5, 0, own);
        left.note(hypercall::GRANT, own, 7, 0, own);
        left.note(
            hypercall::GRANT,
            own,
            9,
            HypercallError::InUse.guest_code(),
            own,
        );
        left.note(hypercall::GRANT, 0x99, 11, 0, own);
        left.note(hypercall::GRANT, own, u64::from(MAX_VMS), 0, own);
        left.note(hypercall::GRANT_REVOKE, own, 7, 0, own);
        left.note(hypercall::EVTCHN_ALLOC, 5, 0, 1, own);
        left.note(hypercall::EVTCHN_ALLOC, 5, 0, 2, own);
        left.note(hypercall::EVTCHN_BIND, 6, 1, 3, own);
        left.note(
            hypercall::EVTCHN_ALLOC,
            5,
            0,
            HypercallError::NoResources.guest_code(),
            own,
        );
        left.note(hypercall::EVTCHN_CLOSE, 2, 0, 0, own);
        left.note(
            hypercall::EVTCHN_CLOSE,
            3,
            0,
            HypercallError::NotFound.guest_code(),
            own,
        );
        let undo: Vec<(u64, [u64; 2])> = left.undo(own).collect();
        assert_eq!(
            undo,
            [
                (hypercall::GRANT_REVOKE, [own, 5]),
                (hypercall::EVTCHN_CLOSE, [1, 0]),
                (hypercall::EVTCHN_CLOSE, [3, 0]),
            ]
        );
        assert_eq!(Leftovers::default().undo(own).count(), 0);
    }

    #[test]
    fn the_summary_line_is_pinned() {
        let summary = Summary {
            vm: 4,
            mode: 0,
            checks: 25,
            random_calls: RANDOM_CALLS,
            foreign_checks: 4,
            passed: true,
        };
        assert_eq!(
            format!("{summary}"),
            "hostile: vm 4 mode 0: 25 checks, 400 random calls, 4 foreign-frame checks, passed"
        );
        let failed = Summary {
            mode: 1,
            foreign_checks: 0,
            checks: 21,
            passed: false,
            ..summary
        };
        assert_eq!(
            format!("{failed}"),
            "hostile: vm 4 mode 1: 21 checks, 400 random calls, 0 foreign-frame checks, FAILED"
        );
        // One console line (CONSOLE_MAX bytes) even at its longest.
        let longest = Summary {
            vm: u16::MAX,
            mode: 1,
            ..failed
        };
        assert!(format!("{longest}").len() <= CONSOLE_MAX);
    }
}
