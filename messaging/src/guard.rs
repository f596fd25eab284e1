//! A guard on the read side of every AMQP connection, below fe2o3-amqp: it checks each
//! frame before the engine decodes it, so that no peer can make the decoder recurse
//! without bound.
//!
//! serde_amqp decodes described types, lists, maps and arrays recursively, with no depth
//! limit, and so does the drop glue of the decoded `Value`: one message nested 50,000
//! levels deep overflows a worker's stack and aborts the whole process. Nothing in
//! fe2o3-amqp's public API runs before that decode, so the guard sits in the byte stream:
//!
//! - it splits the stream into protocol headers and frames (a frame over the listener's
//!   `max_frame_size` ends the connection before it is buffered);
//! - it walks every performative (SASL and AMQP) with [`scan`], an iterative walker of
//!   AMQP 1.0 type encodings that refuses nesting deeper than [`MAX_DEPTH`] and any
//!   malformed encoding (a list whose count and size disagree, a value running past its
//!   container, ...), so that what it checked is exactly what a decoder will read;
//! - for transfers it walks the message payload the same way: at once for a one-frame
//!   delivery, or over a copy of the delivery's frames when the last one arrives (the
//!   engine decodes only then), holding back that last frame until it passed.
//!
//! A frame that fails ends the connection (the read returns an error; fe2o3-amqp stops
//! the connection and the peer sees the socket close), and is counted in
//! `ferrule_amqp_refused_total{reason="decode_limit"}`. No legitimate client nests 32
//! levels deep; Hono's messages use one or two.
//!
//! Size: about 570 lines of code; the rest are its tests (hostile encodings, one per rule).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deepest nesting of described types, lists, maps and arrays accepted in a frame.
pub const MAX_DEPTH: usize = 32;
/// Multi-frame deliveries being assembled at once on one connection.
const MAX_PARTIAL_DELIVERIES: usize = 64;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why an encoding was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("malformed AMQP encoding")]
    Malformed,
}

/// A container being walked.
#[derive(Debug, Clone, Copy)]
enum Node {
    /// List or map: `remaining` values, each with its own constructor, ending at `end`.
    Seq { end: usize, remaining: u32 },
    /// Array: `remaining` bodies of the element constructor `code`, ending at `end`.
    Array { end: usize, remaining: u32, code: u8 },
    /// A described value after its descriptor: its value is being read once `started`.
    /// (Also a depth marker in front of an array of described elements.)
    Described { started: bool },
}

/// Walks AMQP 1.0 encoded values in `bytes` without recursion. With `values = Some(n)`
/// it stops after `n` top-level values; with `None` the values must fill `bytes`
/// exactly. Returns the number of bytes the values took.
pub fn scan(bytes: &[u8], values: Option<usize>, max_depth: usize) -> Result<usize, ScanError> {
    let mut walker = Walker { bytes, pos: 0, stack: Vec::new(), max_depth };
    let mut started = 0;
    loop {
        match walker.stack.last_mut() {
            None => {
                let done = match values {
                    Some(n) => started == n,
                    None => walker.pos == bytes.len(),
                };
                if done {
                    return Ok(walker.pos);
                }
                started += 1;
                walker.value()?;
            }
            Some(Node::Seq { end, remaining }) => {
                let end = *end;
                if *remaining == 0 {
                    if walker.pos != end {
                        return Err(ScanError::Malformed);
                    }
                    walker.stack.pop();
                } else {
                    *remaining -= 1;
                    walker.value()?;
                }
            }
            Some(Node::Array { end, remaining, code }) => {
                let (end, code) = (*end, *code);
                if *remaining == 0 {
                    if walker.pos != end {
                        return Err(ScanError::Malformed);
                    }
                    walker.stack.pop();
                } else {
                    *remaining -= 1;
                    walker.body(code)?;
                }
            }
            Some(Node::Described { started }) => {
                if *started {
                    walker.stack.pop();
                } else {
                    *started = true;
                    walker.value()?;
                }
            }
        }
    }
}

struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Node>,
    max_depth: usize,
}

impl Walker<'_> {
    /// Where the innermost container ends (reads may not pass it).
    fn limit(&self) -> usize {
        self.stack
            .iter()
            .rev()
            .find_map(|node| match node {
                Node::Seq { end, .. } | Node::Array { end, .. } => Some(*end),
                Node::Described { .. } => None,
            })
            .unwrap_or(self.bytes.len())
    }

    fn take(&mut self, n: usize) -> Result<&[u8], ScanError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.limit())
            .ok_or(ScanError::Malformed)?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, ScanError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ScanError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn push(&mut self, node: Node) -> Result<(), ScanError> {
        if self.stack.len() >= self.max_depth {
            return Err(ScanError::TooDeep);
        }
        self.stack.push(node);
        Ok(())
    }

    /// A value with its constructor.
    fn value(&mut self) -> Result<(), ScanError> {
        let code = self.u8()?;
        if code == 0x00 {
            self.descriptor()?;
            // Counts as one level, as the decoder's `Described` does.
            self.push(Node::Described { started: false })?;
            return Ok(());
        }
        self.body(code)
    }

    /// A descriptor: a ulong or a symbol (AMQP 1.0 §1.2 reserves every other kind).
    fn descriptor(&mut self) -> Result<(), ScanError> {
        match self.u8()? {
            code @ (0x80 | 0x53 | 0x44 | 0xa3 | 0xb3) => self.body(code),
            _ => Err(ScanError::Malformed),
        }
    }

    /// The encoding of a value after its constructor `code`.
    fn body(&mut self, code: u8) -> Result<(), ScanError> {
        match code >> 4 {
            0x4 => Ok(()),
            0x5 => self.take(1).map(drop),
            0x6 => self.take(2).map(drop),
            0x7 => self.take(4).map(drop),
            0x8 => self.take(8).map(drop),
            0x9 => self.take(16).map(drop),
            0xa => {
                let n = self.u8()? as usize;
                self.take(n).map(drop)
            }
            0xb => {
                let n = self.u32()? as usize;
                self.take(n).map(drop)
            }
            0xc..=0xf => {
                let wide = matches!(code >> 4, 0xd | 0xf);
                let size = if wide { self.u32()? as usize } else { self.u8()? as usize };
                let start = self.pos;
                let end = start
                    .checked_add(size)
                    .filter(|end| *end <= self.limit())
                    .ok_or(ScanError::Malformed)?;
                let count = if wide { self.u32()? } else { self.u8()? as u32 };
                if code >> 4 <= 0xd {
                    // A map's count is keys and values: an odd one is malformed (serde_amqp
                    // subtracts two per entry and underflows; found by amqp_decode).
                    if code & 0x0f == 0x1 && count % 2 != 0 {
                        return Err(ScanError::Malformed);
                    }
                    return self.push(Node::Seq { end, remaining: count });
                }
                // Array: one element constructor (possibly described once), then bodies.
                let mut element = self.u8()?;
                let described = element == 0x00;
                if described {
                    self.descriptor()?;
                    element = self.u8()?;
                    if element == 0x00 {
                        return Err(ScanError::Malformed);
                    }
                }
                if described {
                    // Each element decodes as a described value: one more level.
                    self.push(Node::Described { started: true })?;
                }
                // Zero-width elements take no bytes: nothing to walk (and a count of
                // four billion must not cost four billion steps).
                let remaining = if element >> 4 == 0x4 { 0 } else { count };
                self.push(Node::Array { end, remaining, code: element })
            }
            _ => Err(ScanError::Malformed),
        }
    }
}

/// The container id of an `open` performative already passed by [`scan`] (descriptor
/// 0x10 as a small or full ulong); `None` for any other performative.
fn open_container_id(performative: &[u8]) -> Option<String> {
    const OPEN: u8 = 0x10;
    let is_open = matches!(
        performative,
        [0x00, 0x53, OPEN, ..] | [0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, OPEN, ..]
    );
    if !is_open {
        return None;
    }
    let open: fe2o3_amqp_types::performatives::Open = serde_amqp::from_slice(performative).ok()?;
    Some(open.container_id)
}

/// What the guard needs from a transfer performative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TransferFields {
    handle: u32,
    more: bool,
    aborted: bool,
}

/// Reads handle, more and aborted from a performative already passed by [`scan`]:
/// `Ok(None)` for any other performative, an error for a transfer this cannot read
/// (its payload must never pass unchecked).
fn transfer_fields(performative: &[u8]) -> Result<Option<TransferFields>, ()> {
    let mut r = Reader { bytes: performative, pos: 0 };
    if r.u8()? != 0x00 {
        return Err(());
    }
    let is_transfer = match r.u8()? {
        0x53 => r.u8()? == 0x14,
        0x80 => r.take(8)? == 0x14u64.to_be_bytes(),
        0x44 => false,
        0xa3 => {
            let n = r.u8()? as usize;
            r.take(n)? == b"amqp:transfer:list"
        }
        0xb3 => {
            let n = u32::from_be_bytes(r.take(4)?.try_into().map_err(drop)?) as usize;
            r.take(n)? == b"amqp:transfer:list"
        }
        _ => return Err(()),
    };
    if !is_transfer {
        return Ok(None);
    }
    let count = match r.u8()? {
        0xc0 => {
            r.take(1)?;
            r.u8()? as u32
        }
        0xd0 => {
            r.take(4)?;
            u32::from_be_bytes(r.take(4)?.try_into().map_err(drop)?)
        }
        // The handle is mandatory: an empty list is no transfer the engine accepts.
        _ => return Err(()),
    };
    let mut fields = TransferFields { handle: 0, more: false, aborted: false };
    for index in 0..count.min(10) {
        match index {
            0 => {
                fields.handle = match r.u8()? {
                    0x43 => 0,
                    0x52 => r.u8()? as u32,
                    0x70 => u32::from_be_bytes(r.take(4)?.try_into().map_err(drop)?),
                    _ => return Err(()),
                }
            }
            5 | 9 => {
                let flag = match r.u8()? {
                    0x41 => true,
                    0x42 | 0x40 => false,
                    0x56 => r.u8()? != 0,
                    _ => return Err(()),
                };
                if index == 5 {
                    fields.more = flag;
                } else {
                    fields.aborted = flag;
                }
            }
            _ => r.pos += scan(&performative[r.pos..], Some(1), MAX_DEPTH).map_err(drop)?,
        }
    }
    Ok(Some(fields))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ()> {
        let taken = self.bytes.get(self.pos..self.pos.checked_add(n).ok_or(())?).ok_or(())?;
        self.pos += n;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, ()> {
        Ok(self.take(1)?[0])
    }
}

/// Why a connection was ended by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is over the limit of {max}")]
    FrameTooLarge { size: u32, max: u32 },
    #[error("frame header is malformed")]
    BadHeader,
    #[error("performative refused: {0}")]
    Performative(ScanError),
    #[error("message refused: {0}")]
    Message(ScanError),
    #[error("transfer performative is malformed")]
    BadTransfer,
    #[error("more than {MAX_PARTIAL_DELIVERIES} multi-frame deliveries in progress")]
    TooManyPartialDeliveries,
}

/// A multi-frame delivery being copied for its check.
#[derive(Debug, Default)]
struct Partial {
    payload: Vec<u8>,
    /// Over `max_message_size`: fe2o3-amqp refuses it on its own (every receiver link
    /// has that limit) and never decodes it, so it is not copied further.
    oversize: bool,
}

/// Checks the incoming byte stream unit by unit (protocol header or frame).
#[derive(Debug)]
pub struct FrameChecker {
    max_frame_size: u32,
    max_message_size: usize,
    partial: HashMap<(u16, u32), Partial>,
    /// Where the peer's container id goes when its `open` passes (fe2o3-amqp does not
    /// tell its listeners what the peer's `open` said).
    container_id: Option<Arc<OnceLock<String>>>,
}

impl FrameChecker {
    pub fn new(max_frame_size: u32, max_message_size: usize) -> Self {
        Self { max_frame_size, max_message_size, partial: HashMap::new(), container_id: None }
    }

    /// Also records the container id of the peer's `open` in `slot` (the first one; a
    /// connection has one).
    #[must_use]
    pub fn recording_container_id(mut self, slot: Arc<OnceLock<String>>) -> Self {
        self.container_id = Some(slot);
        self
    }

    /// Checks the unit at the start of `buf`: `Ok(Some(n))` when its `n` bytes passed,
    /// `Ok(None)` when more bytes are needed.
    pub fn check(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(head) = buf.get(..8) else { return Ok(None) };
        if &head[..4] == b"AMQP" {
            return Ok(Some(8));
        }
        let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if size > self.max_frame_size {
            return Err(FrameError::FrameTooLarge { size, max: self.max_frame_size });
        }
        let doff = head[4] as usize * 4;
        if size < 8 || doff < 8 || doff > size as usize {
            return Err(FrameError::BadHeader);
        }
        let Some(frame) = buf.get(..size as usize) else { return Ok(None) };
        let body = &frame[doff..];
        if body.is_empty() {
            return Ok(Some(frame.len())); // heartbeat
        }
        // A performative is a described list (AMQP 1.0 §2.7, §5.3.3): a body starting any
        // other way could be grouped differently by the decoder than by the walker.
        if body[0] != 0x00 {
            return Err(FrameError::Performative(ScanError::Malformed));
        }
        let performative = scan(body, Some(1), MAX_DEPTH).map_err(FrameError::Performative)?;
        let rest = &body[performative..];
        // Type 0 is AMQP; SASL frames (type 1) carry no payload.
        if head[5] == 0 {
            let channel = u16::from_be_bytes([head[6], head[7]]);
            if let Some(transfer) =
                transfer_fields(&body[..performative]).map_err(|()| FrameError::BadTransfer)?
            {
                self.transfer(channel, transfer, rest)?;
                return Ok(Some(frame.len()));
            }
            if let Some(slot) = self.container_id.as_ref().filter(|slot| slot.get().is_none()) {
                if let Some(container_id) = open_container_id(&body[..performative]) {
                    let _ = slot.set(container_id);
                }
            }
        }
        // Nothing follows other performatives; whatever does is walked like the rest, so
        // that no decoder reading past the performative finds unchecked bytes.
        scan(rest, None, MAX_DEPTH).map_err(FrameError::Performative)?;
        Ok(Some(frame.len()))
    }

    fn transfer(
        &mut self,
        channel: u16,
        transfer: TransferFields,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        let key = (channel, transfer.handle);
        if transfer.aborted {
            self.partial.remove(&key);
            return Ok(());
        }
        if transfer.more {
            if !self.partial.contains_key(&key) && self.partial.len() >= MAX_PARTIAL_DELIVERIES {
                return Err(FrameError::TooManyPartialDeliveries);
            }
            let partial = self.partial.entry(key).or_default();
            if !partial.oversize {
                if partial.payload.len() + payload.len() > self.max_message_size {
                    *partial = Partial { payload: Vec::new(), oversize: true };
                    metrics::counter!("ferrule_amqp_refused_total", "reason" => "message_size")
                        .increment(1);
                } else {
                    partial.payload.extend_from_slice(payload);
                }
            }
            return Ok(());
        }
        match self.partial.remove(&key) {
            None => {
                if payload.len() > self.max_message_size {
                    // One frame over the limit: fe2o3-amqp refuses it (checked anyway).
                    metrics::counter!("ferrule_amqp_refused_total", "reason" => "message_size")
                        .increment(1);
                }
                scan(payload, None, MAX_DEPTH).map(drop)
            }
            Some(partial) if partial.oversize => Ok(()),
            Some(mut partial) => {
                partial.payload.extend_from_slice(payload);
                scan(&partial.payload, None, MAX_DEPTH).map(drop)
            }
        }
        .map_err(FrameError::Message)
    }
}

/// A connection's stream with its read side checked by a [`FrameChecker`]; writes pass.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    checker: FrameChecker,
    /// Bytes read from the socket; the first `ready` of them passed the checker.
    buf: BytesMut,
    ready: usize,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, checker: FrameChecker) -> Self {
        Self { inner, checker, buf: BytesMut::new(), ready: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            match this.checker.check(&this.buf) {
                Ok(Some(n)) => {
                    this.ready = n;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    metrics::counter!("ferrule_amqp_refused_total", "reason" => "decode_limit")
                        .increment(1);
                    tracing::info!(error = %e, "AMQP connection ended: input refused before decoding");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            }
            // Need more bytes: at most one frame is ever held here.
            this.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream; a partial unit is never handed on.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Body, Message, MessageAnnotations, Properties};
    use fe2o3_amqp_types::primitives::{Binary, Value};

    use crate::fuzzing::{nested_lists, transfer_performative as transfer};

    /// An amqp-value section (described, so one level) around `value`.
    fn amqp_value(value: &[u8]) -> Vec<u8> {
        [&[0x00, 0x53, 0x77][..], value].concat()
    }

    #[test]
    fn real_messages_pass() {
        let message = Message::builder()
            .properties(
                Properties::builder().message_id(String::from("m-1")).to("telemetry/t1").build(),
            )
            .message_annotations(MessageAnnotations::builder().insert("x-opt-retain", true).build())
            .application_properties(
                fe2o3_amqp_types::messaging::ApplicationProperties::builder()
                    .insert("device_id", "d1")
                    .build(),
            )
            .value(Value::List(vec![
                Value::Int(1),
                Value::Map(Default::default()),
                Value::String("x".into()),
            ]))
            .build();
        let bytes = serde_amqp::to_vec(
            &fe2o3_amqp_types::messaging::message::__private::Serializable(message),
        )
        .expect("encodes");
        assert_eq!(scan(&bytes, None, MAX_DEPTH), Ok(bytes.len()));
        let data = Message::builder().data(Binary::from(vec![1u8; 3000])).build();
        let bytes = serde_amqp::to_vec(
            &fe2o3_amqp_types::messaging::message::__private::Serializable(data),
        )
        .expect("encodes");
        assert_eq!(scan(&bytes, None, MAX_DEPTH), Ok(bytes.len()));
        let _ = Body::<Value>::Empty;
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        // The attack: 50,000 levels in one message (the decoder would overflow its stack).
        let deep = amqp_value(&nested_lists(50_000));
        assert_eq!(scan(&deep, None, MAX_DEPTH), Err(ScanError::TooDeep));
        // The limit itself: the section is one level, the lists the rest.
        let at_limit = amqp_value(&nested_lists(MAX_DEPTH - 1));
        assert_eq!(scan(&at_limit, None, MAX_DEPTH), Ok(at_limit.len()));
        let over = amqp_value(&nested_lists(MAX_DEPTH));
        assert_eq!(scan(&over, None, MAX_DEPTH), Err(ScanError::TooDeep));
        // Described values nest too (0x00 descriptor value, two bytes a level).
        let described: Vec<u8> =
            std::iter::repeat_n([0x00, 0x44], 100).flatten().chain([0x40]).collect();
        assert_eq!(scan(&described, None, MAX_DEPTH), Err(ScanError::TooDeep));
        // Arrays of arrays (the element constructor appears once per level).
        let arrays = |depth: usize| {
            let mut body = vec![2, 0, 0x40];
            for _ in 0..depth {
                body = [&[body.len() as u8 + 2, 1, 0xe0][..], &body].concat();
            }
            [&[0xe0][..], &body].concat()
        };
        assert_eq!(scan(&arrays(10), None, MAX_DEPTH), Ok(arrays(10).len()));
        assert_eq!(scan(&arrays(40), None, MAX_DEPTH), Err(ScanError::TooDeep));
    }

    #[test]
    fn malformed_encodings_are_refused() {
        // A list whose count promises more than its size holds: a decoder reading by
        // count would take the following bytes as elements (and nest through them).
        assert_eq!(scan(&[0xc0, 0x01, 0xff], None, MAX_DEPTH), Err(ScanError::Malformed));
        let chained: Vec<u8> = std::iter::repeat_n([0xc0, 0x01, 0x05], 100).flatten().collect();
        assert!(scan(&chained, None, MAX_DEPTH).is_err());
        // A list whose size runs past the buffer.
        assert_eq!(scan(&[0xc0, 0x10, 0x00], None, MAX_DEPTH), Err(ScanError::Malformed));
        // A string running past its list.
        assert_eq!(
            scan(&[0xc0, 0x03, 0x01, 0xa1, 0x05, b'a'], None, MAX_DEPTH),
            Err(ScanError::Malformed)
        );
        // A map with an odd count (keys and values come in pairs).
        assert_eq!(scan(&[0xc1, 0x02, 0x01, 0x40], None, MAX_DEPTH), Err(ScanError::Malformed));
        assert_eq!(scan(&[0xc1, 0x03, 0x02, 0x40, 0x40], None, MAX_DEPTH), Ok(5));
        // Reserved format codes and descriptors other than ulong/symbol.
        assert_eq!(scan(&[0x01], None, MAX_DEPTH), Err(ScanError::Malformed));
        assert_eq!(scan(&[0x00, 0x45, 0x40], None, MAX_DEPTH), Err(ScanError::Malformed));
        // Four billion nulls in a nine-byte array cost one step; extra bytes are refused.
        let nulls = [0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert_eq!(scan(&nulls, None, MAX_DEPTH), Ok(nulls.len()));
        let padded = [0xe0, 3, 9, 0x40, 0x00];
        assert_eq!(scan(&padded, None, MAX_DEPTH), Err(ScanError::Malformed));
        // An array of described elements counts a level for the description.
        let symbols = [0xe0, 0x08, 0x02, 0x00, 0x53, 0x01, 0xa3, 0x01, b'a', 0x00];
        assert_eq!(scan(&symbols, None, MAX_DEPTH), Ok(symbols.len()));
        assert_eq!(scan(&[], Some(1), MAX_DEPTH), Err(ScanError::Malformed));
    }

    fn frame(channel: u16, performative: &[u8], payload: &[u8]) -> Vec<u8> {
        let size = 8 + performative.len() + payload.len();
        let mut out = (size as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(performative);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn transfer_fields_are_read_from_real_performatives() {
        let fields = transfer_fields(&transfer(3, true)).expect("readable");
        assert_eq!(fields, Some(TransferFields { handle: 3, more: true, aborted: false }));
        let fields = transfer_fields(&transfer(70_000, false)).expect("readable");
        assert_eq!(fields, Some(TransferFields { handle: 70_000, more: false, aborted: false }));
        let flow = serde_amqp::to_vec(&fe2o3_amqp_types::performatives::Flow {
            next_incoming_id: None,
            incoming_window: 10,
            next_outgoing_id: 0,
            outgoing_window: 10,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        })
        .expect("encodes");
        assert_eq!(transfer_fields(&flow), Ok(None));
    }

    #[test]
    fn the_peers_container_id_is_recorded_from_its_open() {
        let slot = Arc::new(OnceLock::new());
        let mut checker = FrameChecker::new(65_536, 1 << 20).recording_container_id(slot.clone());
        let flow = frame(0, &transfer(1, false), &amqp_value(&[0x45]));
        checker.check(&flow).expect("passes");
        assert_eq!(slot.get(), None, "a transfer is no open");
        let open = frame(0, &crate::fuzzing::open_performative("app-7/eu"), &[]);
        assert_eq!(checker.check(&open), Ok(Some(open.len())));
        assert_eq!(slot.get().map(String::as_str), Some("app-7/eu"));
    }

    #[test]
    fn frames_are_checked_one_by_one() {
        let mut checker = FrameChecker::new(65_536, 1 << 20);
        assert_eq!(checker.check(b"AMQP\x00\x01\x00\x00rest"), Ok(Some(8)));
        let heartbeat = frame(0, &[], &[]);
        assert_eq!(checker.check(&heartbeat[..5]), Ok(None));
        assert_eq!(checker.check(&heartbeat), Ok(Some(8)));
        // A one-frame delivery with a deep body is refused at once.
        let deep = amqp_value(&nested_lists(100));
        let bad = frame(0, &transfer(0, false), &deep);
        assert_eq!(checker.check(&bad), Err(FrameError::Message(ScanError::TooDeep)));
        // Split over frames: refused when the last frame comes, whatever the split.
        let (first, second) = deep.split_at(deep.len() / 2);
        let mut checker = FrameChecker::new(65_536, 1 << 20);
        let one = frame(1, &transfer(2, true), first);
        assert_eq!(checker.check(&one), Ok(Some(one.len())));
        // Another link's delivery on the same session in between.
        let other = frame(1, &transfer(4, false), &amqp_value(&[0x45]));
        assert_eq!(checker.check(&other), Ok(Some(other.len())));
        let two = frame(1, &transfer(2, false), second);
        assert_eq!(checker.check(&two), Err(FrameError::Message(ScanError::TooDeep)));
        // A well-formed split delivery passes.
        let fine = amqp_value(&nested_lists(5));
        let (first, second) = fine.split_at(7);
        let one = frame(1, &transfer(2, true), first);
        let two = frame(1, &transfer(2, false), second);
        assert_eq!(checker.check(&one), Ok(Some(one.len())));
        assert_eq!(checker.check(&two), Ok(Some(two.len())));
        // Frames over the limit are refused before they are buffered.
        let mut huge = frame(0, &transfer(0, false), &[]);
        huge[..4].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(matches!(checker.check(&huge[..8]), Err(FrameError::FrameTooLarge { .. })));
        // A SASL frame whose body is not a described value, followed by deep values (found
        // by the amqp_decode fuzz target: fe2o3 took the first value as a descriptor and
        // decoded the rest as its value).
        let mut sasl = frame(0, &[0x53, 0x41], &[0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x41]);
        sasl[5] = 1;
        assert_eq!(checker.check(&sasl), Err(FrameError::Performative(ScanError::Malformed)));
        // Trailing bytes after a performative are walked too.
        let mut trailing = frame(0, &[0x00, 0x53, 0x41, 0x45], &nested_lists(40));
        trailing[5] = 1;
        assert_eq!(checker.check(&trailing), Err(FrameError::Performative(ScanError::TooDeep)));
        // A deep performative (e.g. attach properties).
        let deep_attach = [&[0x00, 0x53, 0x12][..], &nested_lists(40)].concat();
        let bad = frame(0, &deep_attach, &[]);
        assert_eq!(checker.check(&bad), Err(FrameError::Performative(ScanError::TooDeep)));
    }
}
