//! The wire format: postcard, bounded by [`MESSAGE_MAX`], strict about trailing bytes.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::call::Operation;

/// Size of each service thread's fixed message buffer: no request or reply may encode to
/// more. Every message type's largest value is tested to fit.
pub const MESSAGE_MAX: usize = 256;

/// Why bytes could not be turned into a message or a message into bytes.
///
/// Who is at fault: the *sender* of the bytes for every decoding error; the *encoding side*
/// (its own buffer or message) for the two encoding errors. None is retryable with the same
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// The input (decoding) or the encoding (encoding) is longer than [`MESSAGE_MAX`].
    Oversized,
    /// Encoding: the caller's buffer is shorter than the encoding (and than `MESSAGE_MAX`).
    BufferTooSmall,
    /// Decoding: the bytes end before the message does.
    Truncated,
    /// Decoding: the bytes are not a valid encoding of the expected type (bad varint, bad
    /// enum tag inside the message, bad `bool`/`Option` byte, a collection over its bound).
    Malformed,
    /// Decoding a request: the leading operation tag names no operation of the interface.
    UnknownOperation,
    /// Decoding: a complete message is followed by more bytes.
    TrailingBytes,
}

/// Encodes `value` into `buffer` and returns the encoding's length.
///
/// Never writes more than [`MESSAGE_MAX`] bytes, whatever the buffer's size.
pub fn encode<T: Serialize + ?Sized>(value: &T, buffer: &mut [u8]) -> Result<usize, WireError> {
    let limit = buffer.len().min(MESSAGE_MAX);
    let window = buffer.get_mut(..limit).ok_or(WireError::BufferTooSmall)?;
    match postcard::to_slice(value, window) {
        Ok(bytes) => Ok(bytes.len()),
        Err(postcard::Error::SerializeBufferFull) if limit == MESSAGE_MAX => {
            Err(WireError::Oversized)
        }
        Err(postcard::Error::SerializeBufferFull) => Err(WireError::BufferTooSmall),
        Err(_) => Err(WireError::Malformed),
    }
}

/// Decodes exactly one `T` from `bytes`: input over [`MESSAGE_MAX`] and bytes left over after
/// the value are errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MESSAGE_MAX {
        return Err(WireError::Oversized);
    }
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, _)) => Err(WireError::TrailingBytes),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(WireError::Truncated),
        Err(_) => Err(WireError::Malformed),
    }
}

/// Decodes a request of interface `Q`, telling an unknown operation (a leading tag at or past
/// [`Operation::OPERATION_COUNT`]) apart from other malformed input, so the receiver can
/// answer [`crate::CallError::UnknownOperation`].
pub fn decode_request<Q: Operation>(bytes: &[u8]) -> Result<Q, WireError> {
    if bytes.len() > MESSAGE_MAX {
        return Err(WireError::Oversized);
    }
    let tag = leading_varint(bytes)?;
    if tag >= u32::from(Q::OPERATION_COUNT) {
        return Err(WireError::UnknownOperation);
    }
    decode(bytes)
}

/// Reads the postcard varint (LEB128, at most 5 bytes for a `u32`) that starts an enum.
fn leading_varint(bytes: &[u8]) -> Result<u32, WireError> {
    let mut value: u32 = 0;
    for (position, byte) in bytes.iter().take(5).enumerate() {
        let payload = u32::from(byte & 0x7f);
        let shift = 7 * position as u32;
        if position == 4 && payload > 0x0f {
            return Err(WireError::Malformed);
        }
        value |= payload << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    if bytes.len() < 5 {
        Err(WireError::Truncated)
    } else {
        Err(WireError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler;
    use crate::test_support::XorShift;

    #[test]
    fn encode_refuses_small_buffers_and_oversized_values() {
        let mut small = [0u8; 2];
        assert_eq!(
            encode(&u64::MAX, &mut small),
            Err(WireError::BufferTooSmall)
        );
        let mut buffer = [0u8; 1024];
        // A length byte and 64 × one byte fit …
        assert_eq!(encode(&[7u32; 64][..], &mut buffer), Ok(65));
        // … 64 × five bytes do not fit MESSAGE_MAX, even in a larger buffer.
        assert_eq!(
            encode(&[u32::MAX; 64][..], &mut buffer),
            Err(WireError::Oversized)
        );
    }

    #[test]
    fn decode_rejects_trailing_truncated_oversized() {
        assert_eq!(decode::<u8>(&[5]), Ok(5));
        assert_eq!(decode::<u8>(&[5, 0]), Err(WireError::TrailingBytes));
        assert_eq!(decode::<u32>(&[0x80]), Err(WireError::Truncated));
        assert_eq!(decode::<u32>(&[]), Err(WireError::Truncated));
        assert_eq!(
            decode::<u32>(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(WireError::Malformed)
        );
        assert_eq!(decode::<bool>(&[2]), Err(WireError::Malformed));
        assert_eq!(
            decode::<u8>(&[0u8; MESSAGE_MAX + 1]),
            Err(WireError::Oversized)
        );
    }

    #[test]
    fn leading_varint_reads_multi_byte_tags() {
        assert_eq!(leading_varint(&[0x05]), Ok(5));
        assert_eq!(leading_varint(&[0x80, 0x01]), Ok(128));
        assert_eq!(leading_varint(&[0x80]), Err(WireError::Truncated));
        assert_eq!(leading_varint(&[]), Err(WireError::Truncated));
        assert_eq!(
            leading_varint(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Ok(u32::MAX)
        );
        assert_eq!(
            leading_varint(&[0xff, 0xff, 0xff, 0xff, 0x10]),
            Err(WireError::Malformed)
        );
        assert_eq!(
            leading_varint(&[0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn unknown_operation_is_told_apart_from_malformed() {
        let count = scheduler::Request::OPERATION_COUNT as u8;
        assert_eq!(
            decode_request::<scheduler::Request>(&[count]),
            Err(WireError::UnknownOperation)
        );
        assert_eq!(
            decode_request::<scheduler::Request>(&[0x80, 0x01]),
            Err(WireError::UnknownOperation)
        );
        // Known operation, missing body.
        assert_eq!(
            decode_request::<scheduler::Request>(&[0]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            decode_request::<scheduler::Request>(&[]),
            Err(WireError::Truncated)
        );
        // The same unknown tag through plain `decode` is only "malformed".
        assert_eq!(
            decode::<scheduler::Request>(&[count]),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let mut random = XorShift::new(0x1234_5678_9abc_def1);
        let mut accepted = 0u32;
        for _ in 0..10_000 {
            let mut bytes = [0u8; MESSAGE_MAX + 8];
            let length = (random.next() % (MESSAGE_MAX as u64 + 8)) as usize;
            for byte in bytes.iter_mut().take(length) {
                *byte = random.next() as u8;
            }
            let input = &bytes[..length];
            if decode_request::<scheduler::Request>(input).is_ok() {
                accepted += 1;
            }
            let _ = decode::<scheduler::Reply>(input);
            let _ = decode::<u64>(input);
        }
        // Sanity: the loop did exercise the decoder on inputs of every kind.
        assert!(accepted < 10_000);
    }
}
