//! A raw MQTT 3.1.1 client for the adapter tests: controls PUBACKs, subscribes and
//! publishes on one connection (mosquitto's command line clients cannot), and holds many
//! connections cheaply. Shared by tests/mqtt.rs and tests/mqtt_commands.rs.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawClient {
    pub stream: TcpStream,
}

pub struct Publish {
    pub topic: String,
    pub packet_id: Option<u16>,
    pub payload: Vec<u8>,
}

pub fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

impl RawClient {
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        credentials: Option<(&str, &str)>,
    ) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        stream.set_nodelay(true).expect("nodelay");
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(4); // 3.1.1
                      // Clean session (+ user name, password).
        body.push(if credentials.is_some() { 0xc2 } else { 0x02 });
        body.extend_from_slice(&60u16.to_be_bytes());
        string(client_id.as_bytes(), &mut body);
        if let Some((user, password)) = credentials {
            string(user.as_bytes(), &mut body);
            string(password.as_bytes(), &mut body);
        }
        stream.write_all(&packet(0x10, &body)).await.expect("CONNECT");
        let mut client = RawClient { stream };
        let (header, connack) = client.read_packet().await.expect("CONNACK");
        assert_eq!((header, connack), (0x20, vec![0, 0]), "{client_id} accepted");
        client
    }

    /// Sends a SUBSCRIBE without waiting for the SUBACK.
    pub async fn send_subscribe(&mut self, filter: &str, qos: u8, packet_id: u16) {
        let mut body = packet_id.to_be_bytes().to_vec();
        string(filter.as_bytes(), &mut body);
        body.push(qos);
        self.stream.write_all(&packet(0x82, &body)).await.expect("SUBSCRIBE");
    }

    /// Subscribes and returns the SUBACK return code (granted QoS or 0x80).
    pub async fn subscribe(&mut self, filter: &str, qos: u8, packet_id: u16) -> u8 {
        self.send_subscribe(filter, qos, packet_id).await;
        loop {
            let (header, body) = self.read_packet().await.expect("SUBACK");
            if header == 0x90 {
                assert_eq!(body[..2], packet_id.to_be_bytes());
                return body[2];
            }
        }
    }

    pub async fn unsubscribe(&mut self, filter: &str, packet_id: u16) {
        let mut body = packet_id.to_be_bytes().to_vec();
        string(filter.as_bytes(), &mut body);
        self.stream.write_all(&packet(0xa2, &body)).await.expect("UNSUBSCRIBE");
        loop {
            let (header, _) = self.read_packet().await.expect("UNSUBACK");
            if header == 0xb0 {
                return;
            }
        }
    }

    /// Publishes at QoS 1.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], packet_id: u16) {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.extend_from_slice(payload);
        // A closed connection shows up on the next read.
        let _ = self.stream.write_all(&packet(0x32, &body)).await;
    }

    pub async fn puback(&mut self, packet_id: u16) {
        let _ = self.stream.write_all(&packet(0x40, &packet_id.to_be_bytes())).await;
    }

    /// The next PUBLISH from the server (other packets skipped); `None` once closed.
    pub async fn next_publish(&mut self) -> Option<Publish> {
        loop {
            let (header, body) = self.read_packet().await?;
            if header & 0xf0 != 0x30 {
                continue;
            }
            let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let topic = String::from_utf8(body[2..2 + len].to_vec()).expect("UTF-8 topic");
            let mut at = 2 + len;
            let packet_id = if header & 0x06 != 0 {
                at += 2;
                Some(u16::from_be_bytes([body[at - 2], body[at - 1]]))
            } else {
                None
            };
            return Some(Publish { topic, packet_id, payload: body[at..].to_vec() });
        }
    }

    /// The next packet (first byte, body), or `None` once the server closed.
    pub async fn read_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        let read = async {
            let header = self.stream.read_u8().await.ok()?;
            let (mut length, mut shift) = (0usize, 0);
            loop {
                let byte = self.stream.read_u8().await.ok()?;
                length += usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; length];
            self.stream.read_exact(&mut body).await.ok()?;
            Some((header, body))
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("a packet or a close in time")
    }

    /// The type (high nibble) of the next packet, or `None` once the server closed.
    pub async fn packet_type(&mut self) -> Option<u8> {
        self.read_packet().await.map(|(header, _)| header >> 4)
    }

    /// True once the server has closed the connection (packets before that are skipped).
    pub async fn closed(&mut self) -> bool {
        while self.read_packet().await.is_some() {}
        true
    }
}
