//! `guard::FrameChecker::check` driven the way `Guarded::poll_read` drives it: bytes arrive
//! in chunks, each passed unit (protocol header or frame) is taken off the front, a
//! refused one ends the connection.
//!
//! Input: byte 0 picks the chunk size (1..=256), byte 1 the limits (the listener's
//! defaults or small ones), the rest is the byte stream from the peer. Checked: no panic,
//! bounded time and memory, progress (a passed unit is never empty nor longer than what
//! was read), and that no more than one frame of at most `max_frame_size` is ever held.
#![no_main]

use ferrule_messaging::fuzzing::FrameChecker;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [chunk, limits, stream @ ..] = data else { return };
    let chunk = *chunk as usize + 1;
    let (max_frame, max_message) = match limits % 3 {
        0 => (65_536, 1 << 20), // the listener's defaults
        1 => (512, 1024),
        _ => (4096, 64),
    };
    let mut checker = FrameChecker::new(max_frame, max_message);
    let mut buf: Vec<u8> = Vec::new();
    let mut read = 0;
    loop {
        match checker.check(&buf) {
            Ok(Some(n)) => {
                assert!(n > 0 && n <= buf.len(), "unit of {n} bytes out of {}", buf.len());
                buf.drain(..n);
            }
            Ok(None) => {
                assert!(buf.len() < (max_frame as usize).max(8), "{} bytes held", buf.len());
                if read == stream.len() {
                    break; // end of stream: a partial unit is never handed on
                }
                let n = chunk.min(stream.len() - read);
                buf.extend_from_slice(&stream[read..read + n]);
                read += n;
            }
            Err(_) => break, // the connection ends
        }
    }
});
