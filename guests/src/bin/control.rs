//! The control VM: creates the scenario's AppVMs from the images it holds, serves their block
//! device (a RAM disk) and their pings over shared rings, tears each down when it has finished,
//! and passes only if every AppVM did.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::blockfs::DISK_BLOCKS;
use guests::control::{BUFFERS, Connection, DISK_GFN, Role, backend_gfn, home_cpu, role};
use guests::ring::{self, Backend, block, net};
use guests::{Checksum, GuestMemory};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, enable_interrupts, hypercall, interrupts, layout, print,
    read_u64, tsc, wait_for_event, write_u64,
};

/// `HypercallError::NotFound` as RAX.
const NOT_FOUND: i64 = -7;

/// The timer vector the control VM wakes itself with.
const TICK_VECTOR: u64 = abi::VECTOR_MIN;
/// How often it looks at its AppVMs when nothing else happens (ms of guest time).
const POLL_MS: u64 = 5;

/// One AppVM and the backend state that serves it.
#[derive(Clone, Copy)]
struct AppVm {
    vm: u64,
    role: Role,
    /// The control VM's port for it.
    port: u64,
    /// The control VM's window frame of the ring (its buffers follow).
    gfn: u64,
    /// Host frames granted to it (ring first, then buffers); 0 = none.
    granted: [u64; 1 + BUFFERS],
    /// Its final state (`vm_status`), once it ended.
    ended: Option<i64>,
}

/// Parameters handed to `VM_START` (read by the core from this address).
struct StartParams([u64; 8]);

fn check(what: &str, value: i64) -> Result<u64, ()> {
    if value < 0 {
        print(format_args!("control: {what} failed with {value}"));
        Err(())
    } else {
        Ok(value as u64)
    }
}

/// Populates window frame `gfn` and answers its host frame.
fn populate(gfn: u64) -> Result<u64, ()> {
    check("populate", call2(abi::MEMORY_POPULATE, gfn, 0))
}

/// Creates, connects and starts the AppVM of module `index`.
fn launch(info: &StartInfo, index: usize, params: &mut StartParams) -> Result<AppVm, ()> {
    let module = info.modules[index];
    let name_bytes = module.name.to_le_bytes();
    let length = name_bytes.iter().position(|&b| b == 0).unwrap_or(8);
    let name = core::str::from_utf8(&name_bytes[..length]).unwrap_or("?");
    let cpu = home_cpu(index as u64, info.cpus);
    let vm = check(
        "VM_CREATE",
        hypercall(
            abi::VM_CREATE,
            [
                module.address,
                module.length,
                module.name,
                cpu,
                guests::control::vcpus(name),
                0,
            ],
        ),
    )?;
    let mut app = AppVm {
        vm,
        role: role(name),
        port: 0,
        gfn: backend_gfn(index as u64),
        granted: [0; 1 + BUFFERS],
        ended: None,
    };
    params.0 = [0; 8];
    if app.role != Role::Plain {
        let pages = if app.role == Role::Block {
            1 + BUFFERS
        } else {
            1
        };
        for page in 0..pages {
            let frame = populate(app.gfn + page as u64)?;
            check("GRANT", call2(abi::GRANT, frame, vm))?;
            app.granted[page] = frame;
        }
        ring::init(&mut GuestMemory, app.gfn * 4096);
        app.port = check("EVTCHN_ALLOC", call2(abi::EVTCHN_ALLOC, vm, 0))?;
        let mut buffers = [0; BUFFERS];
        if app.role == Role::Block {
            buffers.copy_from_slice(&app.granted[1..]);
        }
        params.0 = Connection {
            backend_vm: u64::from(info.vm),
            backend_port: app.port,
            ring_frame: app.granted[0],
            buffers,
            work: 0,
        }
        .to_params();
    }
    let at = params.0.as_ptr() as u64;
    check("VM_START", call2(abi::VM_START, vm, at))?;
    print(format_args!(
        "control: started VM {vm} ({name}) on CPU {cpu}{}",
        if app.role == Role::Plain {
            ""
        } else {
            " with a shared ring"
        }
    ));
    Ok(app)
}

/// Serves every request waiting on `app`'s ring; answers whether any was served.
fn serve(app: &AppVm) -> Result<bool, ()> {
    if app.role == Role::Plain {
        return Ok(false);
    }
    let backend = Backend {
        page: app.gfn * 4096,
    };
    let mut served = false;
    loop {
        let request = match backend.pop_request(&mut GuestMemory) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(error) => {
                print(format_args!("control: VM {}'s ring: {error:?}", app.vm));
                return Err(());
            }
        };
        let reply = match app.role {
            Role::Net => net::reply_to(&request),
            Role::Block => match block::serve(&request, DISK_BLOCKS) {
                Err(status) => block::response(request[1], status),
                Ok((disk_block, buffer, write)) => {
                    let disk = (DISK_GFN + disk_block) * 4096;
                    let data = (app.gfn + 1 + buffer) * 4096;
                    let (from, to) = if write { (data, disk) } else { (disk, data) };
                    for word in 0..512 {
                        write_u64(to + word * 8, read_u64(from + word * 8));
                    }
                    block::response(request[1], block::OK)
                }
            },
            Role::Plain => return Ok(false),
        };
        if let Err(error) = backend.push_response(&mut GuestMemory, &reply) {
            print(format_args!("control: VM {}'s ring: {error:?}", app.vm));
            return Err(());
        }
        served = true;
    }
    if served {
        check("EVTCHN_SEND", call2(abi::EVTCHN_SEND, app.port, 0))?;
    }
    Ok(served)
}

/// Takes an ended AppVM down: revokes its grants, closes its port, destroys it, releases the
/// shared pages.
fn tear_down(app: &AppVm) -> Result<(), ()> {
    for &frame in app.granted.iter().filter(|&&frame| frame != 0) {
        check("GRANT_REVOKE", call2(abi::GRANT_REVOKE, frame, app.vm))?;
        check("MEMORY_RELEASE", call2(abi::MEMORY_RELEASE, frame, 0))?;
    }
    // The AppVM's exit closed the channel already (NotFound); close it if it did not.
    let closed = call2(abi::EVTCHN_CLOSE, app.port, 0);
    if app.port != 0 && closed != 0 && closed != NOT_FOUND {
        check("EVTCHN_CLOSE", closed)?;
    }
    check("VM_DESTROY", call2(abi::VM_DESTROY, app.vm, 0))?;
    Ok(())
}

fn main(info: &StartInfo) -> Verdict {
    let failed = Verdict {
        passed: false,
        checksum: 0,
    };
    if !info.privileged || info.module_count == 0 {
        print(format_args!(
            "control: not privileged, or no modules to start"
        ));
        return failed;
    }
    enable_interrupts();
    let at_boot = (info.params[0] as usize).clamp(1, info.module_count);
    let later_ms = info.params[1];
    let start = tsc();
    let tsc_khz = info.tsc_khz.max(1);
    print(format_args!(
        "control: vm {} holds {} images; starts {at_boot} now, the rest after {later_ms} ms",
        info.vm, info.module_count
    ));
    let needs_disk = info.modules[..info.module_count]
        .iter()
        .any(|module| module.name == layout::name_word("blkbench"));
    if needs_disk {
        for block in 0..DISK_BLOCKS {
            if populate(DISK_GFN + block).is_err() {
                return failed;
            }
        }
    }
    let mut params = StartParams([0; 8]);
    let mut apps: [Option<AppVm>; layout::MAX_MODULES] = [None; layout::MAX_MODULES];
    for (index, slot) in apps.iter_mut().enumerate().take(at_boot) {
        match launch(info, index, &mut params) {
            Ok(app) => *slot = Some(app),
            Err(()) => return failed,
        }
    }
    let mut launched = at_boot;
    let mut sum = Checksum::new();
    let mut timer_armed = false;
    let mut seen = interrupts();
    let mut requests = 0u64;
    loop {
        let mut served_any = false;
        for app in apps.iter().flatten().filter(|app| app.ended.is_none()) {
            match serve(app) {
                Ok(true) => {
                    requests += 1;
                    served_any = true;
                }
                Ok(false) => {}
                Err(()) => return failed,
            }
        }
        // The AppVMs' states are looked at when the poll timer fired or nothing else woke
        // this VM (not on every ring request: that would double the hypercalls per request).
        let ticked = interrupts() != seen || !served_any;
        for app in apps
            .iter_mut()
            .flatten()
            .filter(|app| ticked && app.ended.is_none())
        {
            let status = hypercall(abi::VM_STATUS, [app.vm, 0, 0, 0, 0, 0]);
            if status >= abi::vm_status::PASSED {
                print(format_args!(
                    "control: VM {} ended {}",
                    app.vm,
                    if status == abi::vm_status::PASSED {
                        "passed"
                    } else {
                        "NOT passed"
                    }
                ));
                app.ended = Some(status);
                sum.add(app.vm);
                sum.add(status as u64);
                if tear_down(app).is_err() {
                    return failed;
                }
            }
        }
        let elapsed_ms = (tsc() - start) / tsc_khz;
        if launched < info.module_count && elapsed_ms >= later_ms {
            match launch(info, launched, &mut params) {
                Ok(app) => apps[launched] = Some(app),
                Err(()) => return failed,
            }
            launched += 1;
        }
        if launched == info.module_count && apps.iter().flatten().all(|app| app.ended.is_some()) {
            break;
        }
        // Sleep until an AppVM signals or the poll timer fires.
        if interrupts() != seen {
            seen = interrupts();
            timer_armed = false;
        }
        if !timer_armed {
            let deadline = tsc() + POLL_MS * tsc_khz;
            if check(
                "TIMER_ONESHOT",
                call2(abi::TIMER_ONESHOT, deadline, TICK_VECTOR),
            )
            .is_err()
            {
                return failed;
            }
            timer_armed = true;
        }
        if wait_for_event(seen) < 0 {
            print(format_args!("control: EVENT_WAIT refused"));
            return failed;
        }
    }
    let passed = apps
        .iter()
        .flatten()
        .all(|app| app.ended == Some(abi::vm_status::PASSED));
    print(format_args!(
        "control: all {launched} AppVMs ended ({}), {requests} ring batches served",
        if passed {
            "all passed"
        } else {
            "NOT all passed"
        }
    ));
    Verdict {
        passed,
        checksum: sum.0,
    }
}

microvisor_guest_runtime::guest_entry!(main);
