//! The control VM's side of the system: how it places AppVMs and what it tells each one
//! about the backend that serves it.
//!
//! The control VM (`src/bin/control.rs`) holds guest images as boot modules. For each AppVM it
//! creates (`VM_CREATE`), it prepares the shared pages the AppVM's workload needs (a ring
//! page, and for a block device four data buffers), grants them to the new VM, allocates an
//! event-channel port the VM may bind, and starts it (`VM_START`) with a [`Connection`] as its
//! start parameters. The AppVM maps the granted pages at fixed window frames ([`RING_GFN`],
//! [`BUFFER_GFN`]), binds the port, and talks over the ring.

/// What an AppVM does, by its image's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A workload that needs no backend (the UnixBench-like one).
    Plain,
    /// The BlkBench-like workload: a block device served by the control VM.
    Block,
    /// The NetBench-like workload: pings echoed by the control VM.
    Net,
}

/// The role of the image called `name`.
pub fn role(name: &str) -> Role {
    match name {
        "blkbench" => Role::Block,
        "netbench" => Role::Net,
        _ => Role::Plain,
    }
}

/// The vCPUs the control VM gives an AppVM running the image called `name` (`VM_CREATE`
/// arg4): the SMP workload gets two, every other one.
pub fn vcpus(name: &str) -> u64 {
    match name {
        "smpbench" => 2,
        _ => 1,
    }
}

/// Where an AppVM maps its ring page (a guest frame number in its window).
pub const RING_GFN: u64 = 0x1f0;
/// Where an AppVM maps its first block data buffer (the others follow).
pub const BUFFER_GFN: u64 = 0x1f1;
/// Data buffers of a block connection.
pub const BUFFERS: usize = 4;

/// The start parameters of an AppVM with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// The control VM's number.
    pub backend_vm: u64,
    /// The control VM's port, allocated for this AppVM to bind.
    pub backend_port: u64,
    /// The ring page (a host frame the control VM granted).
    pub ring_frame: u64,
    /// Data buffers (host frames granted), block connections only (0 otherwise).
    pub buffers: [u64; BUFFERS],
    /// The workload's own parameter (rounds, pings; 0 = its default).
    pub work: u64,
}

impl Connection {
    /// The eight start parameters.
    pub fn to_params(&self) -> [u64; 8] {
        let [b0, b1, b2, b3] = self.buffers;
        [
            self.backend_vm,
            self.backend_port,
            self.ring_frame,
            b0,
            b1,
            b2,
            b3,
            self.work,
        ]
    }

    /// Reads the parameters back; `None` if they cannot describe a connection.
    pub fn from_params(params: &[u64; 8]) -> Option<Connection> {
        let connection = Connection {
            backend_vm: params[0],
            backend_port: params[1],
            ring_frame: params[2],
            buffers: [params[3], params[4], params[5], params[6]],
            work: params[7],
        };
        let port_ok = (1..63).contains(&connection.backend_port);
        (connection.backend_vm != 0 && port_ok && connection.ring_frame != 0).then_some(connection)
    }
}

/// The home CPU of the `index`-th AppVM on `cpus` CPUs: round-robin, starting after the
/// control VM's CPU 0.
pub fn home_cpu(index: u64, cpus: u64) -> u64 {
    (index + 1) % cpus.max(1)
}

/// The control VM's own window frame for the ring of its `index`-th AppVM (its buffers
/// follow); its RAM disk takes the frames before [`BACKEND_GFN`].
pub fn backend_gfn(index: u64) -> u64 {
    BACKEND_GFN + index * 8
}

/// The first window frame the control VM uses for connections.
pub const BACKEND_GFN: u64 = 0x140;
/// The control VM's RAM disk: window frames from here, one per block.
pub const DISK_GFN: u64 = 0x100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_round_trip_and_reject_nonsense() {
        let connection = Connection {
            backend_vm: 1,
            backend_port: 3,
            ring_frame: 0x1_2345,
            buffers: [5, 6, 7, 8],
            work: 2000,
        };
        assert_eq!(
            Connection::from_params(&connection.to_params()),
            Some(connection)
        );
        assert_eq!(Connection::from_params(&[0; 8]), None);
        let mut bad = connection.to_params();
        bad[1] = 63;
        assert_eq!(Connection::from_params(&bad), None);
    }

    #[test]
    fn roles_and_placement() {
        assert_eq!(role("blkbench"), Role::Block);
        assert_eq!(role("netbench"), Role::Net);
        assert_eq!(role("unixbench"), Role::Plain);
        assert_eq!(vcpus("smpbench"), 2);
        assert_eq!(vcpus("unixbench"), 1);
        assert_eq!(home_cpu(0, 2), 1);
        assert_eq!(home_cpu(1, 2), 0);
        assert_eq!(home_cpu(2, 4), 3);
        assert_eq!(home_cpu(5, 0), 0);
    }

    #[test]
    fn backend_frames_stay_in_the_window_and_clear_of_the_disk() {
        const { assert!(DISK_GFN + crate::blockfs::DISK_BLOCKS <= BACKEND_GFN) };
        for index in 0..crate::blockfs::DISK_BLOCKS.min(4) {
            assert!(backend_gfn(index) >= BACKEND_GFN);
            assert!(backend_gfn(index) + 1 + BUFFERS as u64 <= 0x200);
        }
    }
}
