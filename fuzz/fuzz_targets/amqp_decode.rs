//! What the frame guard is for: every frame `FrameChecker::check` passes is decoded by
//! fe2o3-amqp exactly as the listener does next (SASL frames, AMQP performatives, and a
//! transfer's message once its last frame arrived), and that decode must neither panic,
//! nor overflow the stack, nor run out of time or memory.
//!
//! Input: a byte stream from the peer (the listener's default limits), cut into units by
//! the checker as in `amqp_frames`.
#![no_main]

use std::collections::HashMap;

use bytes::BytesMut;
use ferrule_messaging::fuzzing::fe2o3_amqp::frames::{amqp, sasl};
use ferrule_messaging::fuzzing::FrameChecker;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX_FRAME: u32 = 65_536;
const MAX_MESSAGE: usize = 1 << 20;
const MIN_MAX_FRAME_SIZE: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut checker = FrameChecker::new(MAX_FRAME, MAX_MESSAGE);
    // Deliveries being received, by (channel, handle), as fe2o3-amqp's receiver keeps them.
    // Deliveries being received, by (channel, handle), as fe2o3-amqp's receiver keeps them;
    // `None` once over the message size limit (the link refuses those undecoded).
    let mut partial: HashMap<(u16, u32), Option<Vec<u8>>> = HashMap::new();
    let mut rest = data;
    while let Ok(Some(n)) = checker.check(rest) {
        let (unit, next) = rest.split_at(n);
        rest = next;
        if unit.starts_with(b"AMQP") {
            continue; // protocol header
        }
        // fe2o3-amqp's length-delimited codec hands the frame on without its size field.
        let mut frame = BytesMut::from(&unit[4..]);
        if unit[5] == 1 {
            // Until the connection is open fe2o3-amqp refuses frames over 512 bytes
            // (MIN-MAX-FRAME-SIZE) before decoding them.
            if unit.len() <= MIN_MAX_FRAME_SIZE {
                let _ = sasl::FrameCodec {}.decode(&mut frame);
            }
            continue;
        }
        let Ok(Some(decoded)) = (amqp::FrameDecoder {}).decode(&mut frame) else { continue };
        let amqp::FrameBody::Transfer { performative, payload } = decoded.body else { continue };
        let key = (decoded.channel, performative.handle.0);
        if performative.aborted {
            partial.remove(&key);
            continue;
        }
        let entry = partial.entry(key).or_insert_with(|| Some(Vec::new()));
        if let Some(message) = entry {
            message.extend_from_slice(&payload);
            if message.len() > MAX_MESSAGE {
                *entry = None;
            }
        }
        if !performative.more {
            if let Some(Some(message)) = partial.remove(&key) {
                let _ = ferrule_messaging::message::decode(&message);
            }
        }
    }
});
