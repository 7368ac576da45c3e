//! Helpers shared by the interface modules' tests.

use core::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{MESSAGE_MAX, Operation, WireError, decode, decode_request, encode};

/// A deterministic xorshift64 generator for the bounded fuzz loops.
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    /// The next pseudo-random value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Encodes `value`, checks it against the pinned `expected` bytes, and checks it decodes back.
///
/// To pin a new message: write `&[]` as `expected`, run the tests with `IPC_PRINT_GOLDEN=1`
/// (`-- --nocapture`), check the printed bytes by hand against the postcard spec, and paste
/// them. Without the variable an empty `expected` fails like any other mismatch.
#[track_caller]
pub fn assert_golden<T>(value: &T, expected: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut buffer = [0u8; MESSAGE_MAX];
    let length = encode(value, &mut buffer).expect("golden value encodes");
    if expected.is_empty() && std::env::var_os("IPC_PRINT_GOLDEN").is_some() {
        let caller = core::panic::Location::caller();
        println!(
            "GOLDEN {}:{} {:?}",
            caller.file(),
            caller.line(),
            &buffer[..length]
        );
        return;
    }
    assert_eq!(
        &buffer[..length],
        expected,
        "wire format of {value:?} changed: never reorder variants or fields, append only"
    );
    assert_eq!(decode::<T>(expected).as_ref(), Ok(value));
}

/// Checks a request's golden bytes and that its first byte is its operation tag.
#[track_caller]
pub fn assert_golden_request<Q>(request: &Q, expected: &[u8])
where
    Q: Operation + PartialEq + Debug,
{
    assert_golden(request, expected);
    if expected.is_empty() {
        return;
    }
    assert_eq!(u16::from(expected[0]), request.tag());
    assert_eq!(decode_request::<Q>(expected).as_ref(), Ok(request));
}

/// Checks that `value` (meant to be the largest value of its type) fits the message buffer.
pub fn assert_fits<T: Serialize + Debug>(value: &T) {
    let mut buffer = [0u8; MESSAGE_MAX];
    let length = encode(value, &mut buffer);
    assert!(
        length.is_ok(),
        "{value:?} does not fit MESSAGE_MAX: {length:?}"
    );
}

/// Every strict prefix of a valid request is `Truncated`, a trailing byte is `TrailingBytes`,
/// and the tag one past the last operation is `UnknownOperation`.
pub fn assert_rejects_damage<Q>(request: &Q)
where
    Q: Operation + PartialEq + Debug,
{
    let mut buffer = [0u8; MESSAGE_MAX + 1];
    let length = encode(request, &mut buffer).unwrap();
    for cut in 0..length {
        assert_eq!(
            decode_request::<Q>(&buffer[..cut]),
            Err(WireError::Truncated),
            "prefix {cut} of {request:?}"
        );
    }
    assert_eq!(
        decode_request::<Q>(&buffer[..length + 1]),
        Err(WireError::TrailingBytes)
    );
    let mut unknown = [0u8; 2];
    let tag_length = encode(&u32::from(Q::OPERATION_COUNT), &mut unknown).unwrap();
    assert_eq!(
        decode_request::<Q>(&unknown[..tag_length]),
        Err(WireError::UnknownOperation)
    );
}

/// The bounded fuzz loop: 10 000 pseudo-random byte strings, some of them a valid encoding
/// with one byte flipped, must decode to `Ok` or `Err`, never panic.
pub fn fuzz_decode<Q>(seed: u64, samples: &[Q])
where
    Q: Operation + Debug,
{
    let mut random = XorShift::new(seed);
    for round in 0..10_000u32 {
        let mut bytes = [0u8; MESSAGE_MAX + 4];
        let length = if round % 2 == 0 && !samples.is_empty() {
            let sample = &samples[(random.next() % samples.len() as u64) as usize];
            let length = encode(sample, &mut bytes).unwrap();
            let position = (random.next() % length as u64) as usize;
            bytes[position] ^= 1 << (random.next() % 8);
            length
        } else {
            let length = (random.next() % (MESSAGE_MAX as u64 + 4)) as usize;
            for byte in bytes.iter_mut().take(length) {
                *byte = random.next() as u8;
            }
            length
        };
        let _ = decode_request::<Q>(&bytes[..length]);
        let _ = decode::<Q::Reply>(&bytes[..length]);
    }
}
