//! The serial console (COM1, 16550 UART) and the `log` backend that writes to it.
//!
//! Every CPU logs through one lock. A CPU reporting a fatal error must still be heard even if
//! another CPU died holding that lock, so [`Console::lock_for_fatal`] takes it by force after
//! a bounded wait. Interrupt handlers never log (a handler interrupting a lock holder on the
//! same CPU would deadlock).

use core::fmt::{self, Write};
use spin::{Mutex, MutexGuard};
use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550Tty};
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;

/// The console: the UART, if one answered at boot.
pub struct Console {
    uart: Option<Uart16550Tty<PioBackend>>,
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        match &mut self.uart {
            Some(uart) => uart.write_str(text),
            None => Ok(()),
        }
    }
}

static CONSOLE: Mutex<Console> = Mutex::new(Console { uart: None });

impl Console {
    /// Initialises COM1 at 115200 8N1 and installs the logger.
    pub fn init() {
        // 115200 8N1, as GRUB's serial console and the docs say (the crate defaults to 9600).
        let config = Config {
            baud_rate: BaudRate::Baud115200,
            ..Config::DEFAULT
        };
        // SAFETY: COM1's eight I/O ports belong to the console alone from here on.
        let uart = unsafe { Uart16550Tty::new_port(COM1, config) };
        CONSOLE.lock().uart = uart.ok();
        // A second init is a programming error we can tolerate: keep the first logger.
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
    }

    /// Takes the console for ordinary output.
    pub fn lock() -> MutexGuard<'static, Console> {
        CONSOLE.lock()
    }

    /// Takes the console for a fatal report: waits a bounded time for the holder, then
    /// breaks the lock (the holder is halted or dead by then).
    pub fn lock_for_fatal() -> MutexGuard<'static, Console> {
        for _ in 0..10_000_000 {
            if let Some(guard) = CONSOLE.try_lock() {
                return guard;
            }
            core::hint::spin_loop();
        }
        // SAFETY: only reached on the fatal path, after the other CPUs were sent the halt
        // IPI; whoever held the lock will never release it, and nothing else runs the UART.
        unsafe { CONSOLE.force_unlock() };
        CONSOLE.lock()
    }

    /// Waits until the UART has shifted out every byte (LSR.TEMT), so nothing is lost when
    /// the machine stops right after.
    pub fn drain(&mut self) {
        if self.uart.is_none() {
            return;
        }
        let mut line_status: Port<u8> = Port::new(COM1 + 5);
        for _ in 0..1_000_000 {
            // SAFETY: reading the line status register has no side effect.
            if unsafe { line_status.read() } & 0x40 != 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // tar-no-std logs an error for the standard end-of-archive zero block before it
        // recognises it as the end; the domain loader reports real bundle problems itself.
        !metadata.target().starts_with("tar_no_std")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let cpu = crate::cpu::current_index();
        // Once the run is ending the other CPUs are being halted, and one may stop holding the
        // console: the last lines (the injection's outcome) must not wait for it forever.
        let mut console = if crate::run::finishing() {
            Console::lock_for_fatal()
        } else {
            Console::lock()
        };
        let _ = writeln!(console, "[cpu{cpu} {:5}] {}", record.level(), record.args());
    }

    fn flush(&self) {}
}
