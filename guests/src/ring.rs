//! A one-page, single-producer/single-consumer request/response ring (Xen style), shared by a
//! guest (the *frontend*) and the control VM (the *backend*), and the block and net message
//! formats carried over it.
//!
//! # Page layout (u64 words from the page's base address)
//!
//! | words                              | contents                                          |
//! |------------------------------------|---------------------------------------------------|
//! | 0                                  | `req_prod`: requests the frontend has produced    |
//! | 1                                  | `req_cons`: requests the backend has consumed     |
//! | 2                                  | `rsp_prod`: responses the backend has produced    |
//! | 3                                  | `rsp_cons`: responses the frontend has consumed   |
//! | 4..8                               | reserved, zero                                    |
//! | 8..8 + SLOTS * SLOT_WORDS          | request slots                                     |
//! | then SLOTS * SLOT_WORDS words      | response slots                                    |
//!
//! The counters run freely (they are never reduced modulo [`SLOTS`]); message `n` lives in slot
//! `n % SLOTS`. Every request is answered by exactly one response, so at all times
//! `rsp_cons <= rsp_prod <= req_cons <= req_prod <= rsp_cons + SLOTS`: at most [`SLOTS`]
//! requests are outstanding, which also guarantees a free response slot for each one.
//!
//! # Threat model
//!
//! The peer is untrusted and may write anything into the page at any time. Every operation
//! reads all four counters and checks the inequality above; a state that breaks it is
//! [`RingError::Corrupt`], never a panic, and slot addresses are always reduced modulo
//! [`SLOTS`], so no access leaves the page whatever the counters say.
//!
//! # Ordering
//!
//! A side writes a message's words before the counter that publishes it, and reads the peer's
//! counter before the message words; [`Memory`] accesses are volatile and x86 keeps stores in
//! order with stores and loads with loads, so no fence is needed. Each side reads the counters
//! the peer advances in the order that keeps a concurrent advance from looking like corruption
//! (the frontend reads `rsp_prod` before `req_cons`; the backend `req_prod` before `rsp_cons`).

/// Guest memory, accessed by aligned 8-byte words at guest-physical byte addresses.
pub trait Memory {
    /// Reads the word at `address` (8-byte aligned).
    fn read(&self, address: u64) -> u64;
    /// Writes the word at `address` (8-byte aligned).
    fn write(&mut self, address: u64, value: u64);
}

/// Slots in each direction.
pub const SLOTS: u64 = 16;
/// Words per message.
pub const SLOT_WORDS: u64 = 8;
/// One request or response.
pub type Message = [u64; SLOT_WORDS as usize];

/// Word offset of the header counters.
const REQ_PROD: u64 = 0;
const REQ_CONS: u64 = 1;
const RSP_PROD: u64 = 2;
const RSP_CONS: u64 = 3;
/// Words of the header (counters and reserved words).
const HEADER_WORDS: u64 = 8;
/// Word offset of the first request slot.
const REQUESTS: u64 = HEADER_WORDS;
/// Word offset of the first response slot.
const RESPONSES: u64 = REQUESTS + SLOTS * SLOT_WORDS;
/// Bytes of the page the ring uses (all within one 4 KiB page).
pub const RING_BYTES: u64 = (RESPONSES + SLOTS * SLOT_WORDS) * 8;
const _: () = assert!(RING_BYTES <= 4096, "the ring must fit in its page");

/// Why a ring operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// No free slot: the caller retries after the peer has made progress (recoverable).
    Full,
    /// The backend tried to respond with no consumed request left to answer (the caller's
    /// fault).
    NothingToAnswer,
    /// The counters break the ring's invariant: the peer wrote garbage (the peer's fault).
    Corrupt,
}

/// Zeroes the header of the ring at `page`: both directions empty.
pub fn init<M: Memory + ?Sized>(mem: &mut M, page: u64) {
    for word in 0..HEADER_WORDS {
        mem.write(page + word * 8, 0);
    }
}

/// A snapshot of the four counters, checked against the invariant.
#[derive(Debug, Clone, Copy)]
struct Counters {
    req_prod: u64,
    req_cons: u64,
    rsp_prod: u64,
    rsp_cons: u64,
}

impl Counters {
    /// Checks `rsp_cons <= rsp_prod <= req_cons <= req_prod <= rsp_cons + SLOTS` (with
    /// wrapping differences, so the free-running counters may even wrap around u64).
    fn checked(self) -> Result<Counters, RingError> {
        let unconsumed_responses = self.rsp_prod.wrapping_sub(self.rsp_cons);
        let in_service = self.req_cons.wrapping_sub(self.rsp_prod);
        let unconsumed_requests = self.req_prod.wrapping_sub(self.req_cons);
        if unconsumed_responses > SLOTS || in_service > SLOTS || unconsumed_requests > SLOTS {
            return Err(RingError::Corrupt);
        }
        if unconsumed_responses + in_service + unconsumed_requests > SLOTS {
            return Err(RingError::Corrupt);
        }
        Ok(self)
    }
}

fn counter<M: Memory + ?Sized>(mem: &M, page: u64, which: u64) -> u64 {
    mem.read(page + which * 8)
}

fn read_slot<M: Memory + ?Sized>(mem: &M, page: u64, base: u64, index: u64) -> Message {
    let first = page + (base + (index % SLOTS) * SLOT_WORDS) * 8;
    let mut message = [0; SLOT_WORDS as usize];
    for (word, value) in (0..).zip(message.iter_mut()) {
        *value = mem.read(first + word * 8);
    }
    message
}

fn write_slot<M: Memory + ?Sized>(mem: &mut M, page: u64, base: u64, index: u64, msg: &Message) {
    let first = page + (base + (index % SLOTS) * SLOT_WORDS) * 8;
    for (word, value) in (0..).zip(msg.iter()) {
        mem.write(first + word * 8, *value);
    }
}

/// The guest's end: produces requests, consumes responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frontend {
    /// Guest-physical address of the ring page.
    pub page: u64,
}

impl Frontend {
    fn counters<M: Memory + ?Sized>(&self, mem: &M) -> Result<Counters, RingError> {
        // The backend advances req_cons before rsp_prod: read rsp_prod first.
        let rsp_prod = counter(mem, self.page, RSP_PROD);
        let req_cons = counter(mem, self.page, REQ_CONS);
        Counters {
            req_prod: counter(mem, self.page, REQ_PROD),
            req_cons,
            rsp_prod,
            rsp_cons: counter(mem, self.page, RSP_CONS),
        }
        .checked()
    }

    /// Queues `msg` as the next request; [`RingError::Full`] when [`SLOTS`] requests are
    /// outstanding (produced but not yet answered and consumed).
    pub fn push_request<M: Memory + ?Sized>(
        &self,
        mem: &mut M,
        msg: &Message,
    ) -> Result<(), RingError> {
        let counters = self.counters(mem)?;
        if counters.req_prod.wrapping_sub(counters.rsp_cons) >= SLOTS {
            return Err(RingError::Full);
        }
        write_slot(mem, self.page, REQUESTS, counters.req_prod, msg);
        mem.write(self.page + REQ_PROD * 8, counters.req_prod.wrapping_add(1));
        Ok(())
    }

    /// Takes the next response, if the backend has produced one.
    pub fn pop_response<M: Memory + ?Sized>(
        &self,
        mem: &mut M,
    ) -> Result<Option<Message>, RingError> {
        let counters = self.counters(mem)?;
        if counters.rsp_cons == counters.rsp_prod {
            return Ok(None);
        }
        let message = read_slot(mem, self.page, RESPONSES, counters.rsp_cons);
        mem.write(self.page + RSP_CONS * 8, counters.rsp_cons.wrapping_add(1));
        Ok(Some(message))
    }
}

/// The control VM's end: consumes requests, produces responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Address of the ring page (in the backend's view of memory).
    pub page: u64,
}

impl Backend {
    fn counters<M: Memory + ?Sized>(&self, mem: &M) -> Result<Counters, RingError> {
        // The frontend advances rsp_cons before req_prod: read req_prod first.
        let req_prod = counter(mem, self.page, REQ_PROD);
        let rsp_cons = counter(mem, self.page, RSP_CONS);
        Counters {
            req_prod,
            req_cons: counter(mem, self.page, REQ_CONS),
            rsp_prod: counter(mem, self.page, RSP_PROD),
            rsp_cons,
        }
        .checked()
    }

    /// Takes the next request, if the frontend has produced one.
    pub fn pop_request<M: Memory + ?Sized>(
        &self,
        mem: &mut M,
    ) -> Result<Option<Message>, RingError> {
        let counters = self.counters(mem)?;
        if counters.req_cons == counters.req_prod {
            return Ok(None);
        }
        let message = read_slot(mem, self.page, REQUESTS, counters.req_cons);
        mem.write(self.page + REQ_CONS * 8, counters.req_cons.wrapping_add(1));
        Ok(Some(message))
    }

    /// Publishes the response to the oldest consumed, unanswered request;
    /// [`RingError::NothingToAnswer`] when every consumed request has been answered.
    pub fn push_response<M: Memory + ?Sized>(
        &self,
        mem: &mut M,
        msg: &Message,
    ) -> Result<(), RingError> {
        let counters = self.counters(mem)?;
        if counters.rsp_prod == counters.req_cons {
            return Err(RingError::NothingToAnswer);
        }
        write_slot(mem, self.page, RESPONSES, counters.rsp_prod, msg);
        mem.write(self.page + RSP_PROD * 8, counters.rsp_prod.wrapping_add(1));
        Ok(())
    }
}

/// The block protocol: a guest reads and writes 4 KiB blocks of the control VM's RAM disk
/// through [`BUFFERS`] shared data pages.
///
/// Request `[op, id, block, buffer, 0, 0, 0, 0]`: `op` is [`READ`] (disk block to data page
/// `buffer`) or [`WRITE`] (data page to disk block); `id` is echoed back. Response
/// `[id, status, 0, ...]` with `status` [`OK`] or a negative error code. The reserved words
/// are ignored.
pub mod block {
    use super::Message;

    /// Read a disk block into a data page.
    pub const READ: u64 = 1;
    /// Write a data page to a disk block.
    pub const WRITE: u64 = 2;
    /// Bytes per block (one page).
    pub const BLOCK_BYTES: u64 = 4096;
    /// Shared data pages a request may name.
    pub const BUFFERS: u64 = 4;

    /// Status: done.
    pub const OK: i64 = 0;
    /// Status: `op` is neither [`READ`] nor [`WRITE`].
    pub const BAD_OP: i64 = -1;
    /// Status: `block` is past the end of the disk.
    pub const BAD_BLOCK: i64 = -2;
    /// Status: `buffer` is not below [`BUFFERS`].
    pub const BAD_BUFFER: i64 = -3;

    /// Builds a request.
    pub fn request(op: u64, id: u64, block: u64, buffer: u64) -> Message {
        [op, id, block, buffer, 0, 0, 0, 0]
    }

    /// Builds a response.
    pub fn response(id: u64, status: i64) -> Message {
        [id, status as u64, 0, 0, 0, 0, 0, 0]
    }

    /// Splits a response into `(id, status)`.
    pub fn parse_response(response: &Message) -> (u64, i64) {
        (response[0], response[1] as i64)
    }

    /// Validates a request against a disk of `disk_blocks` blocks: `(block, buffer, write)`
    /// to carry out, or the status to answer with. The data copy is the caller's.
    pub fn serve(request: &Message, disk_blocks: u64) -> Result<(u64, u64, bool), i64> {
        let [op, _id, block, buffer, ..] = *request;
        let write = match op {
            READ => false,
            WRITE => true,
            _ => return Err(BAD_OP),
        };
        if block >= disk_blocks {
            return Err(BAD_BLOCK);
        }
        if buffer >= BUFFERS {
            return Err(BAD_BUFFER);
        }
        Ok((block, buffer, write))
    }
}

/// The net protocol: ping and echo.
///
/// Ping `[seq, sent_at, payload, 0, ...]`; reply `[seq, sent_at, echo(payload), 0, ...]`, so
/// the sender can match it to its ping, time it and check it was really processed.
pub mod net {
    use super::Message;

    /// Rotation of [`echo`].
    const ECHO_ROTATE: u32 = 23;
    /// Xor constant of [`echo`].
    const ECHO_XOR: u64 = 0x5bd1_e995_6a09_e667;

    /// Builds a ping.
    pub fn ping(seq: u64, sent_at: u64, payload: u64) -> Message {
        [seq, sent_at, payload, 0, 0, 0, 0, 0]
    }

    /// The echo of a payload: a bijective mix (rotate, then xor), so no payload echoes to
    /// itself by accident of a lazy responder copying it back, and each echo is unique.
    pub fn echo(payload: u64) -> u64 {
        payload.rotate_left(ECHO_ROTATE) ^ ECHO_XOR
    }

    /// The reply a correct responder sends to `request` (reserved words are not echoed).
    pub fn reply_to(request: &Message) -> Message {
        [request[0], request[1], echo(request[2]), 0, 0, 0, 0, 0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two pages of fake guest memory; the ring lives in the second, so any stray access
    /// outside it panics on the bounds check or shows up in the first page.
    struct Ram([u64; 1024]);

    const PAGE: u64 = 0x1000;

    impl Memory for Ram {
        fn read(&self, address: u64) -> u64 {
            assert_eq!(address % 8, 0);
            assert!(
                (PAGE..PAGE + 4096).contains(&address),
                "read outside the page"
            );
            self.0[(address / 8) as usize]
        }
        fn write(&mut self, address: u64, value: u64) {
            assert_eq!(address % 8, 0);
            assert!(
                (PAGE..PAGE + 4096).contains(&address),
                "write outside the page"
            );
            self.0[(address / 8) as usize] = value;
        }
    }

    fn ring() -> (Ram, Frontend, Backend) {
        let mut ram = Ram([0xdead; 1024]);
        init(&mut ram, PAGE);
        (ram, Frontend { page: PAGE }, Backend { page: PAGE })
    }

    fn message(n: u64) -> Message {
        core::array::from_fn(|word| n * 100 + word as u64)
    }

    fn set(ram: &mut Ram, which: u64, value: u64) {
        ram.write(PAGE + which * 8, value);
    }

    #[test]
    fn a_request_and_its_response_round_trip() {
        let (mut ram, front, back) = ring();
        assert_eq!(back.pop_request(&mut ram), Ok(None));
        assert_eq!(front.pop_response(&mut ram), Ok(None));
        front.push_request(&mut ram, &message(1)).unwrap();
        assert_eq!(front.pop_response(&mut ram), Ok(None));
        assert_eq!(back.pop_request(&mut ram), Ok(Some(message(1))));
        assert_eq!(back.pop_request(&mut ram), Ok(None));
        back.push_response(&mut ram, &message(2)).unwrap();
        assert_eq!(front.pop_response(&mut ram), Ok(Some(message(2))));
        assert_eq!(front.pop_response(&mut ram), Ok(None));
    }

    #[test]
    fn messages_keep_order_across_many_wraps() {
        let (mut ram, front, back) = ring();
        let mut sent = 0;
        let mut received = 0;
        // Uneven batches so the slot index wraps at every offset.
        for batch in 0..200u64 {
            let count = batch % SLOTS + 1;
            for _ in 0..count {
                front.push_request(&mut ram, &message(sent)).unwrap();
                sent += 1;
            }
            while let Some(request) = back.pop_request(&mut ram).unwrap() {
                back.push_response(&mut ram, &[request[0] + 1; 8]).unwrap();
            }
            while let Some(response) = front.pop_response(&mut ram).unwrap() {
                assert_eq!(response, [received * 100 + 1; 8]);
                received += 1;
            }
        }
        assert_eq!(sent, received);
        assert!(sent > 50 * SLOTS);
    }

    #[test]
    fn counters_near_u64_max_wrap_cleanly() {
        let (mut ram, front, back) = ring();
        for which in 0..4 {
            set(&mut ram, which, u64::MAX - 2);
        }
        for n in 0..8 {
            front.push_request(&mut ram, &message(n)).unwrap();
            let request = back.pop_request(&mut ram).unwrap().unwrap();
            back.push_response(&mut ram, &request).unwrap();
            assert_eq!(front.pop_response(&mut ram), Ok(Some(message(n))));
        }
        assert_eq!(ram.read(PAGE), 5);
    }

    #[test]
    fn at_most_slots_requests_are_outstanding() {
        let (mut ram, front, back) = ring();
        for n in 0..SLOTS {
            front.push_request(&mut ram, &message(n)).unwrap();
        }
        assert_eq!(
            front.push_request(&mut ram, &message(99)),
            Err(RingError::Full)
        );
        // Consuming a request is not enough: its response slot is still owed.
        back.pop_request(&mut ram).unwrap().unwrap();
        assert_eq!(
            front.push_request(&mut ram, &message(99)),
            Err(RingError::Full)
        );
        back.push_response(&mut ram, &message(0)).unwrap();
        assert_eq!(
            front.push_request(&mut ram, &message(99)),
            Err(RingError::Full)
        );
        front.pop_response(&mut ram).unwrap().unwrap();
        front.push_request(&mut ram, &message(SLOTS)).unwrap();
        assert_eq!(
            front.push_request(&mut ram, &message(99)),
            Err(RingError::Full)
        );
    }

    #[test]
    fn a_response_needs_a_consumed_request() {
        let (mut ram, front, back) = ring();
        assert_eq!(
            back.push_response(&mut ram, &message(0)),
            Err(RingError::NothingToAnswer)
        );
        front.push_request(&mut ram, &message(0)).unwrap();
        // Produced but not consumed yet.
        assert_eq!(
            back.push_response(&mut ram, &message(0)),
            Err(RingError::NothingToAnswer)
        );
        back.pop_request(&mut ram).unwrap().unwrap();
        back.push_response(&mut ram, &message(0)).unwrap();
        assert_eq!(
            back.push_response(&mut ram, &message(0)),
            Err(RingError::NothingToAnswer)
        );
    }

    #[test]
    fn impossible_counters_are_corrupt_on_both_sides() {
        // (req_prod, req_cons, rsp_prod, rsp_cons)
        let cases = [
            (SLOTS + 1, 0, 0, 0),             // producer too far ahead
            (5, 6, 0, 0),                     // request consumer ahead of producer
            (5, 3, 4, 0),                     // more responses than consumed requests
            (5, 5, 2, 3),                     // response consumer ahead of producer
            (u64::MAX, 0, 0, 0),              // wildly out of range
            (100 + SLOTS + 1, 110, 105, 100), // outstanding window too wide
        ];
        for (req_prod, req_cons, rsp_prod, rsp_cons) in cases {
            let (mut ram, front, back) = ring();
            set(&mut ram, REQ_PROD, req_prod);
            set(&mut ram, REQ_CONS, req_cons);
            set(&mut ram, RSP_PROD, rsp_prod);
            set(&mut ram, RSP_CONS, rsp_cons);
            let before = ram.0;
            assert_eq!(
                front.push_request(&mut ram, &message(1)),
                Err(RingError::Corrupt)
            );
            assert_eq!(front.pop_response(&mut ram), Err(RingError::Corrupt));
            assert_eq!(back.pop_request(&mut ram), Err(RingError::Corrupt));
            assert_eq!(
                back.push_response(&mut ram, &message(1)),
                Err(RingError::Corrupt)
            );
            assert!(ram.0 == before, "a corrupt ring was written to");
        }
    }

    #[test]
    fn a_full_but_valid_ring_is_not_corrupt() {
        let (mut ram, front, back) = ring();
        set(&mut ram, REQ_PROD, 100 + SLOTS);
        set(&mut ram, REQ_CONS, 110);
        set(&mut ram, RSP_PROD, 105);
        set(&mut ram, RSP_CONS, 100);
        assert_eq!(
            front.push_request(&mut ram, &message(1)),
            Err(RingError::Full)
        );
        assert!(back.pop_request(&mut ram).unwrap().is_some());
        back.push_response(&mut ram, &message(1)).unwrap();
        assert!(front.pop_response(&mut ram).unwrap().is_some());
    }

    #[test]
    fn block_requests_are_validated() {
        let read = block::request(block::READ, 7, 31, 3);
        assert_eq!(block::serve(&read, 32), Ok((31, 3, false)));
        let write = block::request(block::WRITE, 8, 0, 0);
        assert_eq!(block::serve(&write, 32), Ok((0, 0, true)));
        assert_eq!(
            block::serve(&block::request(0, 1, 0, 0), 32),
            Err(block::BAD_OP)
        );
        assert_eq!(
            block::serve(&block::request(3, 1, 0, 0), 32),
            Err(block::BAD_OP)
        );
        let past_end = block::request(block::READ, 1, 32, 0);
        assert_eq!(block::serve(&past_end, 32), Err(block::BAD_BLOCK));
        let bad_buffer = block::request(block::WRITE, 1, 0, block::BUFFERS);
        assert_eq!(block::serve(&bad_buffer, 32), Err(block::BAD_BUFFER));
        let response = block::response(7, block::BAD_BLOCK);
        assert_eq!(block::parse_response(&response), (7, block::BAD_BLOCK));
    }

    #[test]
    fn echo_is_invertible_and_never_the_identity_on_samples() {
        for seed in 0..1000 {
            let payload = crate::pattern(seed, 1);
            let echoed = net::echo(payload);
            assert_ne!(echoed, payload);
            assert_eq!((echoed ^ 0x5bd1_e995_6a09_e667).rotate_right(23), payload);
        }
        let ping = net::ping(4, 1234, 0xabcd);
        assert_eq!(
            net::reply_to(&ping),
            [4, 1234, net::echo(0xabcd), 0, 0, 0, 0, 0]
        );
        let mut dirty = ping;
        dirty[7] = 9;
        assert_eq!(net::reply_to(&dirty), net::reply_to(&ping));
    }
}
