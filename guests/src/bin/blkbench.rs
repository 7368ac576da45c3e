//! The BlkBench-like guest: creates, copies, reads, overwrites and removes multi-KiB files
//! with pseudo-random contents on the control VM's shared-ring block device, compares every
//! word read back with what was written, and checks the checksum against
//! `guests::blockfs::golden`.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::GuestMemory;
use guests::blockfs::{self, Block, BlockDevice, DISK_BLOCKS, run_workload};
use guests::control::{BUFFER_GFN, BUFFERS, Connection, RING_GFN};
use guests::ring::{Frontend, block};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, print, read_u64, wait_for_event, write_u64,
};

/// Rounds of the workload when the control VM gives none.
const DEFAULT_ROUNDS: u64 = 3;

/// The block device: one request at a time over the ring, data through buffer 0.
struct RingDisk {
    front: Frontend,
    port: u64,
    next_id: u64,
    requests: u64,
}

impl RingDisk {
    /// Sends one request and waits for its response; answers the status.
    fn transfer(&mut self, op: u64, block_number: u64) -> Result<(), i64> {
        let id = self.next_id;
        self.next_id += 1;
        self.requests += 1;
        let request = block::request(op, id, block_number, 0);
        if self.front.push_request(&mut GuestMemory, &request).is_err() {
            return Err(block::BAD_BUFFER);
        }
        if call2(abi::EVTCHN_SEND, self.port, 0) < 0 {
            return Err(block::BAD_OP);
        }
        loop {
            match self.front.pop_response(&mut GuestMemory) {
                Ok(Some(response)) => {
                    let (answered, status) = block::parse_response(&response);
                    if answered != id {
                        return Err(block::BAD_OP);
                    }
                    return if status == block::OK {
                        Ok(())
                    } else {
                        Err(status)
                    };
                }
                Ok(None) => {
                    // No interrupts in this guest: the count stays 0.
                    if wait_for_event(0) < 0 {
                        return Err(block::BAD_OP);
                    }
                }
                Err(_) => return Err(block::BAD_OP),
            }
        }
    }
}

impl BlockDevice for RingDisk {
    fn read_block(&mut self, block_number: u64, data: &mut Block) -> Result<(), i64> {
        self.transfer(block::READ, block_number)?;
        for (index, word) in data.iter_mut().enumerate() {
            *word = read_u64(BUFFER_GFN * 4096 + index as u64 * 8);
        }
        Ok(())
    }

    fn write_block(&mut self, block_number: u64, data: &Block) -> Result<(), i64> {
        for (index, &word) in data.iter().enumerate() {
            write_u64(BUFFER_GFN * 4096 + index as u64 * 8, word);
        }
        self.transfer(block::WRITE, block_number)
    }

    fn blocks(&self) -> u64 {
        DISK_BLOCKS
    }
}

fn main(info: &StartInfo) -> Verdict {
    let failed = Verdict {
        passed: false,
        checksum: 0,
    };
    let Some(connection) = Connection::from_params(&info.params) else {
        print(format_args!("blkbench: vm {} has no block device", info.vm));
        return failed;
    };
    let mut mapped = 0;
    for (page, frame) in [connection.ring_frame]
        .into_iter()
        .chain(connection.buffers)
        .enumerate()
        .take(1 + BUFFERS)
    {
        if call2(abi::MAP_GRANT, frame, RING_GFN + page as u64) != 0 {
            print(format_args!(
                "blkbench: cannot map granted frame {frame:#x}"
            ));
            return failed;
        }
        mapped += 1;
    }
    let port = call2(
        abi::EVTCHN_BIND,
        connection.backend_vm,
        connection.backend_port,
    );
    if port <= 0 {
        print(format_args!(
            "blkbench: cannot bind the backend's port ({port})"
        ));
        return failed;
    }
    let rounds = match connection.work {
        0 => DEFAULT_ROUNDS,
        rounds => rounds,
    };
    print(format_args!(
        "blkbench: vm {} runs {rounds} rounds on a {DISK_BLOCKS}-block disk of VM {}",
        info.vm, connection.backend_vm
    ));
    let mut disk = RingDisk {
        front: Frontend {
            page: RING_GFN * 4096,
        },
        port: port as u64,
        next_id: 1,
        requests: 0,
    };
    let result = run_workload(&mut disk, rounds);
    for page in 0..mapped {
        let _ = call2(abi::UNMAP_GRANT, RING_GFN + page, 0);
    }
    match result {
        Ok(report) => {
            let passed = report.mismatches == 0 && report.checksum == blockfs::golden(rounds);
            print(format_args!(
                "blkbench: vm {} {}: {} files, {} blocks written, {} read, {} mismatches, {} requests, checksum {:#018x}",
                info.vm,
                if passed { "passed" } else { "FAILED" },
                report.files_created,
                report.blocks_written,
                report.blocks_read,
                report.mismatches,
                disk.requests,
                report.checksum
            ));
            Verdict {
                passed,
                checksum: report.checksum,
            }
        }
        Err(error) => {
            print(format_args!("blkbench: vm {} FAILED: {error:?}", info.vm));
            failed
        }
    }
}

microvisor_guest_runtime::guest_entry!(main);
