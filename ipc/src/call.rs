//! The transport-level status of a call, operation idempotence, and the typed client.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::DomainIndex;
use crate::wire::{MESSAGE_MAX, WireError, decode, encode};

/// Whether an operation may be executed twice with the effect of once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Idempotence {
    /// Repeating it leaves the same state and the same (or an equivalent, documented) reply:
    /// clients retry it transparently after the peer restarts.
    Idempotent,
    /// Repeating it may change state twice (allocate, free, enqueue, ...): after a peer
    /// restart the client surfaces [`CallError::PeerRestarted`] and decides itself.
    NonIdempotent,
}

/// The status every call returns besides its reply: set by the core (peer state,
/// capabilities, lengths), or by the callee's receive loop ([`serve`]) when it cannot decode
/// the request.
///
/// It travels in two ways: the core's system-call status, which the runtime maps onto it, and
/// the `Err` side of a [`Response`] a callee writes back. Declaration order is the wire
/// format of the latter: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallError {
    /// The callee failed and was recovered while, or before, this call ran; the caller's
    /// [`crate::DomainId`] generation is stale. Fault: the callee. Retryable: yes for
    /// idempotent operations ([`call_with_retry`] does it); non-idempotent ones may or may
    /// not have taken effect, so the caller decides (the callee's undo logs make a retry
    /// start from a consistent state).
    PeerRestarted,
    /// The callee failed and is not recovered (or the recovery manager gave up on it).
    /// Fault: the callee. Retryable: not as a rule; the caller may wait and try again.
    PeerFailed,
    /// The caller holds no capability for this endpoint in the static manifest. Fault: the
    /// caller (or the manifest). Retryable: no.
    NoCapability,
    /// The request (or reply) bytes did not decode. Fault: the sender of those bytes.
    /// Retryable: no.
    Malformed,
    /// The request names an operation the callee's interface does not have (an old or new
    /// client). Fault: the caller. Retryable: no.
    UnknownOperation,
    /// The message is longer than [`MESSAGE_MAX`] or the peer's buffer. Fault: the sender.
    /// Retryable: no.
    Oversized,
    /// The callee's service thread on this CPU is already inside a call (a call cycle), or
    /// the callee is being recovered and the core does not queue. Fault: nobody (a cycle is
    /// the caller's design fault). Retryable: later, for any operation (it did not run).
    Busy,
}

impl CallError {
    /// Every status, in declaration order.
    pub const ALL: [CallError; 7] = [
        CallError::PeerRestarted,
        CallError::PeerFailed,
        CallError::NoCapability,
        CallError::Malformed,
        CallError::UnknownOperation,
        CallError::Oversized,
        CallError::Busy,
    ];
}

impl From<WireError> for CallError {
    /// What a receiver answers when a message does not decode (or a sender gets when it does
    /// not encode).
    fn from(error: WireError) -> CallError {
        match error {
            WireError::Oversized | WireError::BufferTooSmall => CallError::Oversized,
            WireError::UnknownOperation => CallError::UnknownOperation,
            WireError::Truncated | WireError::Malformed | WireError::TrailingBytes => {
                CallError::Malformed
            }
        }
    }
}

/// What a callee writes into its reply buffer: its interface's reply, or the status of a
/// request it could not serve (postcard `Result`: a `0` byte then the reply, or a `1` byte
/// then the [`CallError`]).
pub type Response<R> = Result<R, CallError>;

/// A request enum of one interface: its reply type, how many operations it has, and each
/// operation's tag and idempotence.
pub trait Operation: Serialize + DeserializeOwned {
    /// The interface's reply enum.
    type Reply: Serialize + DeserializeOwned;
    /// Number of operations (variants); a leading tag at or past it is an unknown operation.
    const OPERATION_COUNT: u16;
    /// This request's operation tag: its variant's declaration index, which is also the first
    /// byte of its encoding. Recorded as the in-flight operation in detections.
    fn tag(&self) -> u16;
    /// Whether this request may be repeated after the callee restarted.
    fn idempotence(&self) -> Idempotence;
}

/// Runs `attempt`, and runs it again after [`CallError::PeerRestarted`] when the operation is
/// idempotent, at most `max_retries` more times. Everything else (success, other errors, a
/// restart during a non-idempotent operation, the last restart) is returned as is.
pub fn call_with_retry<R>(
    idempotence: Idempotence,
    mut attempt: impl FnMut() -> Result<R, CallError>,
    max_retries: u32,
) -> Result<R, CallError> {
    let mut retries = 0;
    loop {
        match attempt() {
            Err(CallError::PeerRestarted)
                if idempotence == Idempotence::Idempotent && retries < max_retries =>
            {
                retries += 1;
            }
            outcome => return outcome,
        }
    }
}

/// The callee's side of one call: decodes `request` as interface `Q`, runs `handler` on it,
/// and writes the [`Response`] into `reply`, returning its length.
///
/// A request that does not decode never reaches the handler: the caller gets
/// [`CallError::Malformed`], [`CallError::UnknownOperation`] or [`CallError::Oversized`]. A
/// reply that does not encode (a bug in the callee: every reply type is tested to fit)
/// becomes [`CallError::Oversized`]. Fails only if `reply` cannot hold even a status (two
/// bytes).
pub fn serve<Q: Operation>(
    request: &[u8],
    reply: &mut [u8],
    handler: impl FnOnce(Q) -> Q::Reply,
) -> Result<usize, WireError> {
    let response: Response<Q::Reply> = match crate::wire::decode_request::<Q>(request) {
        Ok(request) => Ok(handler(request)),
        Err(error) => Err(CallError::from(error)),
    };
    match encode(&response, reply) {
        Ok(length) => Ok(length),
        Err(_) => encode(&Response::<Q::Reply>::Err(CallError::Oversized), reply),
    }
}

/// The raw call/reply mechanism: the runtime crate implements it with the core's system
/// call; tests implement it with fakes.
pub trait Transport {
    /// Sends `request` to `peer`'s current generation, waits for the reply, writes the reply
    /// bytes into `reply` and returns their length.
    fn call(
        &mut self,
        peer: DomainIndex,
        request: &[u8],
        reply: &mut [u8; MESSAGE_MAX],
    ) -> Result<usize, CallError>;
}

/// The typed client: encodes `request`, calls `peer` through `transport` (retrying after
/// [`CallError::PeerRestarted`] if the operation is idempotent) and decodes the callee's
/// [`Response`].
///
/// A request that does not encode gives [`CallError::Oversized`] (the caller's fault); a reply
/// that does not decode gives [`CallError::Malformed`] (the callee's fault); a status the
/// callee answered (it could not decode the request) comes back as that status.
pub fn call<T, Q>(
    transport: &mut T,
    peer: DomainIndex,
    request: &Q,
    max_retries: u32,
) -> Result<Q::Reply, CallError>
where
    T: Transport + ?Sized,
    Q: Operation,
{
    let mut request_bytes = [0u8; MESSAGE_MAX];
    let request_length = encode(request, &mut request_bytes)?;
    call_with_retry(
        request.idempotence(),
        || {
            let mut reply_bytes = [0u8; MESSAGE_MAX];
            let reply_length =
                transport.call(peer, &request_bytes[..request_length], &mut reply_bytes)?;
            let reply_bytes = reply_bytes
                .get(..reply_length)
                .ok_or(CallError::Oversized)?;
            decode::<Response<Q::Reply>>(reply_bytes).map_err(|_| CallError::Malformed)?
        },
        max_retries,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::assert_golden;
    use crate::timer::{self, TimerId};

    #[test]
    fn golden_statuses_and_envelope() {
        for (index, error) in CallError::ALL.iter().enumerate() {
            assert_golden(error, &[index as u8]);
        }
        assert_golden(
            &Response::<timer::Reply>::Ok(timer::Reply::Armed(TimerId(9))),
            &[0, 0, 9],
        );
        assert_golden(
            &Response::<timer::Reply>::Err(CallError::UnknownOperation),
            &[1, 4],
        );
    }

    #[test]
    fn serve_answers_statuses_for_bad_requests() {
        let mut reply = [0u8; MESSAGE_MAX];
        let handled = core::cell::Cell::new(0);
        let handler = |request: timer::Request| {
            handled.set(handled.get() + 1);
            assert_eq!(request, timer::Request::NextDeadline { cpu: 3 });
            timer::Reply::Deadline(None)
        };
        let length = serve(&[4, 3], &mut reply, handler).unwrap();
        assert_eq!(&reply[..length], &[0, 3, 0]);
        let cases: [(&[u8], CallError); 4] = [
            (&[9], CallError::UnknownOperation),
            (&[0, 1], CallError::Malformed),
            (&[4, 3, 0], CallError::Malformed),
            (&[0; MESSAGE_MAX + 1], CallError::Oversized),
        ];
        for (request, status) in cases {
            let length = serve(request, &mut reply, handler).unwrap();
            assert_eq!(
                decode::<Response<timer::Reply>>(&reply[..length]),
                Ok(Err(status))
            );
        }
        assert_eq!(handled.get(), 1, "bad requests never reach the handler");
        assert_eq!(
            serve(&[4, 3], &mut [0u8; 1], handler),
            Err(WireError::BufferTooSmall)
        );
    }

    #[test]
    fn wire_errors_map_to_call_errors() {
        assert_eq!(CallError::from(WireError::Oversized), CallError::Oversized);
        assert_eq!(
            CallError::from(WireError::UnknownOperation),
            CallError::UnknownOperation
        );
        assert_eq!(
            CallError::from(WireError::TrailingBytes),
            CallError::Malformed
        );
        assert_eq!(CallError::from(WireError::Truncated), CallError::Malformed);
    }

    /// Runs `call_with_retry` over scripted outcomes (the last one repeats) and returns its
    /// result and the number of attempts made.
    fn run(
        idempotence: Idempotence,
        outcomes: &[Result<u32, CallError>],
        max_retries: u32,
    ) -> (Result<u32, CallError>, usize) {
        let mut attempts = 0usize;
        let result = call_with_retry(
            idempotence,
            || {
                let outcome = outcomes[attempts.min(outcomes.len() - 1)];
                attempts += 1;
                outcome
            },
            max_retries,
        );
        (result, attempts)
    }

    #[test]
    fn idempotent_operations_are_retried_after_restart() {
        let outcomes = [
            Err(CallError::PeerRestarted),
            Err(CallError::PeerRestarted),
            Ok(7),
        ];
        assert_eq!(run(Idempotence::Idempotent, &outcomes, 3), (Ok(7), 3));
    }

    #[test]
    fn retries_are_bounded() {
        let outcomes = [Err(CallError::PeerRestarted)];
        assert_eq!(
            run(Idempotence::Idempotent, &outcomes, 2),
            (Err(CallError::PeerRestarted), 3)
        );
    }

    #[test]
    fn non_idempotent_operations_surface_the_restart() {
        let outcomes = [Err(CallError::PeerRestarted), Ok(1)];
        assert_eq!(
            run(Idempotence::NonIdempotent, &outcomes, 5),
            (Err(CallError::PeerRestarted), 1)
        );
    }

    #[test]
    fn other_errors_are_never_retried() {
        for error in CallError::ALL {
            if error == CallError::PeerRestarted {
                continue;
            }
            let outcomes = [Err(error), Ok(1)];
            assert_eq!(run(Idempotence::Idempotent, &outcomes, 5), (Err(error), 1));
        }
    }

    /// A fake transport: a timer domain that restarts `restarts` times before answering,
    /// counting the requests it decoded.
    struct FakeTimerDomain {
        restarts: u32,
        served: u32,
        reply_override: Option<&'static [u8]>,
    }

    impl Transport for FakeTimerDomain {
        fn call(
            &mut self,
            peer: DomainIndex,
            request: &[u8],
            reply: &mut [u8; MESSAGE_MAX],
        ) -> Result<usize, CallError> {
            assert_eq!(peer, DomainIndex::Timer);
            if self.restarts > 0 {
                self.restarts -= 1;
                return Err(CallError::PeerRestarted);
            }
            self.served += 1;
            if let Some(bytes) = self.reply_override {
                reply[..bytes.len()].copy_from_slice(bytes);
                return Ok(bytes.len());
            }
            let length = serve(request, reply, |request: timer::Request| match request {
                timer::Request::NextDeadline { .. } => timer::Reply::Deadline(Some(99)),
                _ => timer::Reply::Armed(TimerId(4)),
            })
            .unwrap();
            Ok(length)
        }
    }

    #[test]
    fn typed_client_retries_idempotent_and_decodes() {
        let mut domain = FakeTimerDomain {
            restarts: 2,
            served: 0,
            reply_override: None,
        };
        let reply = call(
            &mut domain,
            DomainIndex::Timer,
            &timer::Request::NextDeadline { cpu: 1 },
            3,
        );
        assert_eq!(reply, Ok(timer::Reply::Deadline(Some(99))));
        assert_eq!(domain.served, 1);
    }

    #[test]
    fn typed_client_surfaces_restart_of_non_idempotent() {
        let mut domain = FakeTimerDomain {
            restarts: 1,
            served: 0,
            reply_override: None,
        };
        let request = timer::Request::SetOneShot {
            cpu: 0,
            deadline: 10,
            cookie: 1,
        };
        assert_eq!(
            call(&mut domain, DomainIndex::Timer, &request, 3),
            Err(CallError::PeerRestarted)
        );
        assert_eq!(domain.served, 0);
    }

    #[test]
    fn typed_client_returns_the_callee_status() {
        let mut domain = FakeTimerDomain {
            restarts: 0,
            served: 0,
            // `Err(UnknownOperation)`, as an older timer domain would answer.
            reply_override: Some(&[1, 4]),
        };
        assert_eq!(
            call(
                &mut domain,
                DomainIndex::Timer,
                &timer::Request::NextDeadline { cpu: 0 },
                3
            ),
            Err(CallError::UnknownOperation)
        );
    }

    #[test]
    fn typed_client_blames_a_malformed_reply() {
        let mut domain = FakeTimerDomain {
            restarts: 0,
            served: 0,
            reply_override: Some(&[0xff, 0xff]),
        };
        assert_eq!(
            call(
                &mut domain,
                DomainIndex::Timer,
                &timer::Request::NextDeadline { cpu: 0 },
                3
            ),
            Err(CallError::Malformed)
        );
    }
}
