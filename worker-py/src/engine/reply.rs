//! What goes back to the LB for a finished call: [`plan_reply`] turns the handler's
//! [`Outcome`] into the reply frame (or a code-6 `TApplicationException`, or nothing for a
//! ONEWAY) that the pool thread then writes to the connection.

use bytes::{BufMut, BytesMut};
use rpc_frame::{ExceptionCode, LENGTH_PREFIX, Message, MessageType, application_exception};

use super::{Level, Outcome};

/// What to write for a finished call, and what to log about it.
#[derive(Debug, Default)]
pub struct ReplyPlan {
    /// The whole frame to write (length prefix included), if any.
    pub frame: Option<BytesMut>,
    /// A line worth logging.
    pub note: Option<(Level, String)>,
}

/// Decides what goes back to the LB for `request` given the handler's `outcome`.
///
/// - CALL: the processor's reply with a length prefix; a code-6 `TApplicationException` with
///   the request's name and seqid if the handler failed, wrote nothing, or wrote more than
///   `max_frame_size` (the LB would drop the connection, and every call on it, over one
///   oversized frame).
/// - ONEWAY: nothing, ever (an answer would be read as the reply to another call).
pub fn plan_reply(request: &Message, outcome: Outcome, max_frame_size: usize) -> ReplyPlan {
    let name = request.name();
    let seqid = request.seqid();
    let failure =
        |text: String| application_exception(name, seqid, ExceptionCode::InternalError, &text);
    if request.message_type() == MessageType::Oneway {
        let note = match outcome {
            Outcome::Failed(text) => {
                Some((Level::Warning, format!("oneway {name} failed: {text}")))
            }
            Outcome::Reply(_) => Some((
                Level::Debug,
                format!("oneway {name}: the processor wrote a reply; not sent"),
            )),
            Outcome::NoReply => None,
        };
        return ReplyPlan { frame: None, note };
    }
    match outcome {
        Outcome::Reply(payload) if payload.len() > max_frame_size => {
            let text = format!(
                "the reply to {name} is {} bytes, over the maximum frame size of {max_frame_size}",
                payload.len()
            );
            ReplyPlan {
                frame: Some(failure(text.clone())),
                note: Some((Level::Error, text)),
            }
        }
        Outcome::Reply(payload) => {
            let mut frame = BytesMut::with_capacity(LENGTH_PREFIX + payload.len());
            // Bounded by max_frame_size above, which is far below 4 GiB.
            frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            frame.put_slice(&payload);
            ReplyPlan {
                frame: Some(frame),
                note: None,
            }
        }
        Outcome::NoReply => {
            let text = format!("the processor wrote no reply to {name}");
            ReplyPlan {
                frame: Some(failure(text.clone())),
                note: Some((Level::Error, text)),
            }
        }
        Outcome::Failed(text) => ReplyPlan {
            frame: Some(failure(text)),
            note: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use rpc_frame::encode_message;

    use super::*;

    #[test]
    fn plan_reply_cases() {
        let call = Message::parse(encode_message(MessageType::Call, "m", 3, b"\x00")).unwrap();
        let oneway = Message::parse(encode_message(MessageType::Oneway, "m", 3, b"\x00")).unwrap();
        let plan = plan_reply(&call, Outcome::Reply(vec![1, 2, 3]), 10);
        assert_eq!(&plan.frame.unwrap()[..], &[0, 0, 0, 3, 1, 2, 3]);
        let plan = plan_reply(&call, Outcome::Reply(vec![0; 11]), 10);
        let frame = Message::parse(plan.frame.unwrap()).unwrap();
        assert_eq!(
            (frame.message_type(), frame.seqid()),
            (MessageType::Exception, 3)
        );
        assert_eq!(plan.note.unwrap().0, Level::Error);
        for outcome in [
            Outcome::Reply(vec![1]),
            Outcome::NoReply,
            Outcome::Failed("x".into()),
        ] {
            assert!(plan_reply(&oneway, outcome, 10).frame.is_none());
        }
    }
}
