//! A minimal MQTT 3.1.1 codec over tokio sockets: CONNECT/CONNACK, PUBLISH, PUBACK,
//! SUBSCRIBE/SUBACK, PINGREQ/PINGRESP, DISCONNECT. Just enough for load generation.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// One decoded packet: the first header byte and the rest after the length.
#[derive(Debug)]
pub struct Packet {
    pub header: u8,
    pub body: Bytes,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
}

/// A received PUBLISH.
pub struct Publish {
    pub topic: Bytes,
    pub qos: u8,
    pub packet_id: u16,
    pub payload: Bytes,
}

impl Packet {
    pub fn publish(&self) -> io::Result<Publish> {
        let qos = (self.header >> 1) & 3;
        let mut b = self.body.clone();
        if b.len() < 2 {
            return Err(bad("short PUBLISH"));
        }
        let n = b.get_u16() as usize;
        if b.len() < n {
            return Err(bad("short PUBLISH topic"));
        }
        let topic = b.split_to(n);
        let packet_id = if qos > 0 {
            if b.len() < 2 {
                return Err(bad("short PUBLISH id"));
            }
            b.get_u16()
        } else {
            0
        };
        Ok(Publish { topic, qos, packet_id, payload: b })
    }

    /// The packet identifier at the start of the body (PUBACK, SUBACK).
    pub fn packet_id(&self) -> u16 {
        if self.body.len() >= 2 {
            u16::from_be_bytes([self.body[0], self.body[1]])
        } else {
            0
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The remaining length: 7 bits a byte, least significant first, the top bit set on
/// every byte but the last.
fn put_len(out: &mut BytesMut, mut n: usize) {
    while n >= 0x80 {
        out.put_u8((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.put_u8(n as u8);
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

pub fn connect(
    out: &mut BytesMut,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    keepalive: u16,
) {
    let mut flags = 0x02; // clean session
    let mut len = 10 + 2 + client_id.len();
    if let Some(u) = username {
        flags |= 0x80;
        len += 2 + u.len();
    }
    if let Some(p) = password {
        flags |= 0x40;
        len += 2 + p.len();
    }
    out.put_u8(CONNECT << 4);
    put_len(out, len);
    put_str(out, b"MQTT");
    out.put_u8(4);
    out.put_u8(flags);
    out.put_u16(keepalive);
    put_str(out, client_id.as_bytes());
    if let Some(u) = username {
        put_str(out, u.as_bytes());
    }
    if let Some(p) = password {
        put_str(out, p.as_bytes());
    }
}

pub fn publish(out: &mut BytesMut, topic: &[u8], qos: u8, packet_id: u16, payload: &[u8]) {
    out.put_u8((PUBLISH << 4) | (qos << 1));
    put_len(out, 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len());
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(packet_id);
    }
    out.put_slice(payload);
}

pub fn puback(out: &mut BytesMut, packet_id: u16) {
    out.put_u8(PUBACK << 4);
    out.put_u8(2);
    out.put_u16(packet_id);
}

pub fn subscribe(out: &mut BytesMut, packet_id: u16, filter: &str, qos: u8) {
    out.put_u8((SUBSCRIBE << 4) | 0x02);
    put_len(out, 2 + 2 + filter.len() + 1);
    out.put_u16(packet_id);
    put_str(out, filter.as_bytes());
    out.put_u8(qos);
}

pub fn pingreq(out: &mut BytesMut) {
    out.put_u8(PINGREQ << 4);
    out.put_u8(0);
}

pub fn disconnect(out: &mut BytesMut) {
    out.put_u8(DISCONNECT << 4);
    out.put_u8(0);
}

/// Buffered packet reader.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader { io, buf: BytesMut::with_capacity(4096) }
    }

    /// A small buffer (idle connections: keep memory per connection low).
    pub fn small(io: R) -> Self {
        Reader { io, buf: BytesMut::with_capacity(64) }
    }

    /// The next packet; None on a clean end of stream.
    pub async fn next(&mut self) -> io::Result<Option<Packet>> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(Some(p));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    /// A packet already in the buffer, without reading.
    pub fn try_next(&mut self) -> io::Result<Option<Packet>> {
        self.parse()
    }

    /// Reads more bytes into the buffer; 0 at the end of the stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(16 * 1024);
        }
        self.io.read_buf(&mut self.buf).await
    }

    fn parse(&mut self) -> io::Result<Option<Packet>> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = 1;
        loop {
            if i >= self.buf.len() {
                return Ok(None);
            }
            if i > 4 {
                return Err(bad("remaining length too long"));
            }
            let b = self.buf[i];
            len |= ((b & 0x7f) as usize) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            self.buf.reserve(i + len - self.buf.len());
            return Ok(None);
        }
        let header = self.buf[0];
        self.buf.advance(i);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(Packet { header, body }))
    }

    /// CONNECT, then wait for CONNACK: the return code (0 = accepted).
    pub async fn handshake<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
        keepalive: u16,
    ) -> io::Result<u8> {
        let mut out = BytesMut::with_capacity(64);
        connect(&mut out, client_id, username, password, keepalive);
        Ok(self.exchange(writer, &out, CONNACK, "CONNACK", 2).await?.body[1])
    }

    /// SUBSCRIBE one filter and wait for its SUBACK: the granted QoS (0x80 = refused).
    /// PUBLISHes arriving before the SUBACK are an error here (subscribe first).
    pub async fn subscribe_and_wait<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        filter: &str,
        qos: u8,
    ) -> io::Result<u8> {
        let mut out = BytesMut::with_capacity(64);
        subscribe(&mut out, 1, filter, qos);
        Ok(self.exchange(writer, &out, SUBACK, "SUBACK", 3).await?.body[2])
    }

    /// Writes `request`, then waits for its answer, a packet of type `kind` with a body
    /// of at least `min_len` bytes (PINGRESPs in between are passed over).
    async fn exchange<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        request: &[u8],
        kind: u8,
        name: &str,
        min_len: usize,
    ) -> io::Result<Packet> {
        writer.write_all(request).await?;
        loop {
            match self.next().await? {
                Some(p) if p.kind() == kind && p.body.len() >= min_len => return Ok(p),
                Some(p) if p.kind() == PINGRESP => continue,
                Some(p) => {
                    return Err(bad(&format!("expected {name}, got packet type {}", p.kind())))
                }
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let mut out = BytesMut::new();
        publish(&mut out, b"telemetry", 1, 7, &[1u8; 300]);
        puback(&mut out, 7);
        let mut r = Reader::new(&out[..]);
        let p = r.next().await.unwrap().unwrap();
        let publish = p.publish().unwrap();
        assert_eq!(
            (&publish.topic[..], publish.qos, publish.packet_id, publish.payload.len()),
            (&b"telemetry"[..], 1, 7, 300)
        );
        let ack = r.next().await.unwrap().unwrap();
        assert_eq!((ack.kind(), ack.packet_id()), (PUBACK, 7));
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn remaining_lengths() {
        for n in [0, 127, 128, 16_383, 16_384, 2_097_152] {
            let mut out = BytesMut::new();
            out.put_u8(PINGREQ << 4);
            put_len(&mut out, n);
            out.put_bytes(0, n);
            let p = Reader::new(&out[..]).next().await.unwrap().unwrap();
            assert_eq!(p.body.len(), n);
        }
    }
}
