//! The guest boot contract: where the core puts a guest kernel, its page tables and its start
//! information in guest-physical memory, and the state a vCPU starts in.
//!
//! A guest kernel is an ELF linked at [`IMAGE_BASE`] (the guest runtime's `guest.ld`). The
//! core gives the VM [`RAM_PAGES`] pages of RAM at guest-physical 0, writes an identity map of
//! the first 2 MiB (one 2 MiB page, PML4 at [`PML4`]), a flat 64-bit GDT at [`GDT`] and the
//! [`StartInfo`] words at [`START_INFO`], copies the image's `PT_LOAD` segments to their
//! physical addresses, and enters `_start` in 64-bit mode with RDI = [`START_INFO`],
//! RSI = the vCPU's number, RSP = [`stack_top`]`(vcpu)` - 8 (as after a call), interrupts
//! off. Every vCPU of the VM enters `_start` that way, sharing the VM's memory. Guest-physical pages [`WINDOW_FIRST_GFN`] up to 2 MiB
//! are the window where the guest asks for more memory or maps granted pages; touching a
//! window page that is not mapped is an EPT violation the memory domain answers.

/// Pages of RAM a VM starts with (guest-physical `0..RAM_PAGES * 4096`).
pub const RAM_PAGES: u64 = 64;
/// Guest-physical address of the PML4 (the PDPT and PD follow, one page each).
pub const PML4: u64 = 0x1000;
/// Guest-physical address of the GDT: null, 64-bit code (selector 0x08), data (0x10).
pub const GDT: u64 = 0x4000;
/// Guest-physical address of the start information (see [`StartInfo`]).
pub const START_INFO: u64 = 0x5000;
/// Guest-physical address the image is linked at.
pub const IMAGE_BASE: u64 = 0x1_0000;
/// The image (code, data, bss) must end below this address; the stack lies above it.
pub const IMAGE_END: u64 = 0x3_0000;
/// Initial RSP of vCPU 0: the top of RAM (see [`stack_top`]).
pub const STACK_TOP: u64 = RAM_PAGES * 4096;
/// The most vCPUs a VM has.
pub const MAX_VCPUS: u16 = 4;
/// Bytes of stack each vCPU after the first starts with: vCPU `n` starts at
/// [`stack_top`]`(n)`, `n` stacks of this size below the top of RAM.
pub const VCPU_STACK_BYTES: u64 = 0x2000;

/// The top of vCPU `vcpu`'s initial stack (it is entered with RSP = this - 8).
pub const fn stack_top(vcpu: u16) -> u64 {
    STACK_TOP - vcpu as u64 * VCPU_STACK_BYTES
}
/// First guest frame number of the window for populated and granted pages.
pub const WINDOW_FIRST_GFN: u64 = 0x100;
/// Pages in the window (up to the end of the identity-mapped 2 MiB).
pub const WINDOW_PAGES: u64 = 0x100;

/// Identifies a start-information page.
pub const START_MAGIC: u64 = 0x0074_7365_7567_766d; // "mvguest", little-endian

/// Parameters a scenario passes to a guest ([`StartInfo::params`]).
pub const PARAMS: usize = 8;

/// Where the core puts the guest images a control VM holds (its boot modules): RAM from here
/// up to [`MODULES_END`], after the stack.
pub const MODULES_BASE: u64 = STACK_TOP;
/// The end of the module area (the window starts there).
pub const MODULES_END: u64 = WINDOW_FIRST_GFN * 4096;
/// The most modules a VM is given.
pub const MAX_MODULES: usize = 4;

/// One boot module: a guest image the VM holds in its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Module {
    /// Its name, up to 8 ASCII bytes, little-endian in the word (see [`name_word`]).
    pub name: u64,
    /// Guest-physical address of its first byte.
    pub address: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// A name of up to 8 bytes as one word (little-endian, zero padded); longer names are cut.
pub const fn name_word(name: &str) -> u64 {
    let bytes = name.as_bytes();
    let mut word = 0u64;
    let mut index = 0;
    while index < bytes.len() && index < 8 {
        word |= (bytes[index] as u64) << (8 * index);
        index += 1;
    }
    word
}

/// Word offsets (in u64s) of the start information at [`START_INFO`].
pub mod start_info {
    /// [`START_MAGIC`](super::START_MAGIC).
    pub const MAGIC: usize = 0;
    /// The VM's number (its memory owner and hypercall identity).
    pub const VM: usize = 1;
    /// How many vCPUs the VM has (1 to [`MAX_VCPUS`](super::MAX_VCPUS)); every one enters
    /// `_start` with RDI = the start information and RSI = its own number.
    pub const VCPUS: usize = 2;
    /// Bytes of RAM at guest-physical 0.
    pub const RAM_BYTES: usize = 3;
    /// Physical CPUs in the system.
    pub const CPUS: usize = 4;
    /// 1 for the privileged control VM.
    pub const PRIVILEGED: usize = 5;
    /// How many boot modules follow at [`MODULE_TABLE`].
    pub const MODULE_COUNT: usize = 6;
    /// TSC ticks per millisecond (guest time; under bochs, instructions per ms).
    pub const TSC_KHZ: usize = 7;
    /// Scenario parameters, [`PARAMS`](super::PARAMS) words.
    pub const PARAMS: usize = 8;
    /// The module table: name, address, length per module, [`MAX_MODULES`](super::MAX_MODULES)
    /// entries.
    pub const MODULE_TABLE: usize = PARAMS + super::PARAMS;
    /// Words in the page the core fills.
    pub const WORDS: usize = MODULE_TABLE + 3 * super::MAX_MODULES;
}

/// The start information, as a guest reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartInfo {
    /// The VM's number.
    pub vm: u16,
    /// This vCPU's number (not in the words: the guest runtime takes it from RSI at entry).
    pub vcpu: u16,
    /// vCPUs the VM has.
    pub vcpus: u16,
    /// Bytes of RAM.
    pub ram_bytes: u64,
    /// Physical CPUs.
    pub cpus: u64,
    /// Whether this is the control VM.
    pub privileged: bool,
    /// Scenario parameters.
    pub params: [u64; PARAMS],
    /// Boot modules (the first `module_count` are valid).
    pub modules: [Module; MAX_MODULES],
    /// How many modules there are.
    pub module_count: usize,
    /// TSC ticks per millisecond.
    pub tsc_khz: u64,
}

impl StartInfo {
    /// The words the core writes at [`START_INFO`].
    pub fn to_words(&self) -> [u64; start_info::WORDS] {
        let mut words = [0; start_info::WORDS];
        words[start_info::MAGIC] = START_MAGIC;
        words[start_info::VM] = u64::from(self.vm);
        words[start_info::VCPUS] = u64::from(self.vcpus);
        words[start_info::RAM_BYTES] = self.ram_bytes;
        words[start_info::CPUS] = self.cpus;
        words[start_info::PRIVILEGED] = u64::from(self.privileged);
        words[start_info::PARAMS..start_info::MODULE_TABLE].copy_from_slice(&self.params);
        words[start_info::MODULE_COUNT] = self.module_count.min(MAX_MODULES) as u64;
        words[start_info::TSC_KHZ] = self.tsc_khz;
        for (index, module) in self.modules.iter().enumerate() {
            let at = start_info::MODULE_TABLE + 3 * index;
            words[at..at + 3].copy_from_slice(&[module.name, module.address, module.length]);
        }
        words
    }

    /// Reads the words back; `None` without the magic or with out-of-range numbers.
    pub fn from_words(words: &[u64; start_info::WORDS]) -> Option<StartInfo> {
        if words[start_info::MAGIC] != START_MAGIC {
            return None;
        }
        let mut params = [0; PARAMS];
        params.copy_from_slice(&words[start_info::PARAMS..start_info::MODULE_TABLE]);
        let module_count = usize::try_from(words[start_info::MODULE_COUNT]).ok()?;
        if module_count > MAX_MODULES {
            return None;
        }
        let mut modules = [Module::default(); MAX_MODULES];
        for (index, module) in modules.iter_mut().enumerate().take(module_count) {
            let at = start_info::MODULE_TABLE + 3 * index;
            *module = Module {
                name: words[at],
                address: words[at + 1],
                length: words[at + 2],
            };
        }
        Some(StartInfo {
            vm: u16::try_from(words[start_info::VM]).ok()?,
            vcpu: 0,
            vcpus: u16::try_from(words[start_info::VCPUS])
                .ok()
                .filter(|vcpus| (1..=MAX_VCPUS).contains(vcpus))?,
            ram_bytes: words[start_info::RAM_BYTES],
            cpus: words[start_info::CPUS],
            privileged: words[start_info::PRIVILEGED] == 1,
            params,
            modules,
            module_count,
            tsc_khz: words[start_info::TSC_KHZ],
        })
    }
}

// The layout's pieces do not overlap and the window ends at the identity map's 2 MiB.
const _: () = {
    assert!(PML4 + 3 * 4096 <= GDT);
    assert!(START_INFO + (start_info::WORDS as u64) * 8 <= IMAGE_BASE);
    assert!(IMAGE_BASE < IMAGE_END && IMAGE_END < STACK_TOP);
    assert!(IMAGE_END + 0x6000 <= stack_top(MAX_VCPUS));
    assert!(STACK_TOP <= WINDOW_FIRST_GFN * 4096);
    assert!(MODULES_BASE.is_multiple_of(4096) && MODULES_BASE < MODULES_END);
    assert!(START_INFO + (start_info::WORDS as u64) * 8 <= IMAGE_BASE);
    assert!((WINDOW_FIRST_GFN + WINDOW_PAGES) * 4096 == 2 << 20);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_round_trips() {
        let info = StartInfo {
            vm: 3,
            vcpu: 0,
            vcpus: 2,
            ram_bytes: RAM_PAGES * 4096,
            cpus: 4,
            privileged: false,
            params: [1, 2, 3, 4, 5, 6, 7, 8],
            modules: [
                Module {
                    name: name_word("netbench"),
                    address: MODULES_BASE,
                    length: 1234,
                },
                Module::default(),
                Module::default(),
                Module::default(),
            ],
            module_count: 1,
            tsc_khz: 4000,
        };
        assert_eq!(name_word("ab"), 0x6261);
        assert_eq!(name_word("longer than eight"), name_word("longer t"));
        assert_eq!(StartInfo::from_words(&info.to_words()), Some(info));
        let mut bad = info.to_words();
        bad[start_info::MAGIC] ^= 1;
        assert_eq!(StartInfo::from_words(&bad), None);
        let mut bad = info.to_words();
        bad[start_info::VM] = 1 << 20;
        assert_eq!(StartInfo::from_words(&bad), None);
        let mut bad = info.to_words();
        bad[start_info::MODULE_COUNT] = MAX_MODULES as u64 + 1;
        assert_eq!(StartInfo::from_words(&bad), None);
        for vcpus in [0, u64::from(MAX_VCPUS) + 1] {
            let mut bad = info.to_words();
            bad[start_info::VCPUS] = vcpus;
            assert_eq!(StartInfo::from_words(&bad), None);
        }
    }
}
