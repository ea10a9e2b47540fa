//! UDP over the h2 transport: HTTP Datagrams in DATAGRAM capsules (RFC 9297 §3.5) on a
//! `connect-udp` extended CONNECT stream (the shape of RFC 9298). Pure: encode, and an
//! incremental decoder that takes DATA frames as they come.
//!
//! ```text
//! capsule  = type:varint | length:varint | value
//! DATAGRAM = type 0x00, value = context_id:varint (0 = UDP payload) | payload
//! ```
//!
//! Capsules of other types, and datagrams with another context ID, are skipped, as RFC
//! 9297 asks. A capsule longer than [`MAX_CAPSULE`] is malformed: the stream is reset.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const DATAGRAM: u64 = 0x00;
/// The largest capsule accepted: a maximal UDP payload plus its context ID.
pub const MAX_CAPSULE: u64 = 65_535 + 8;

/// Encodes one UDP payload as a DATAGRAM capsule with context ID 0.
pub fn encode(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    put_varint(&mut b, DATAGRAM);
    put_varint(&mut b, payload.len() as u64 + 1);
    put_varint(&mut b, 0);
    b.put_slice(payload);
    b.freeze()
}

fn put_varint(b: &mut BytesMut, v: u64) {
    match v {
        0..=0x3f => b.put_u8(v as u8),
        0x40..=0x3fff => b.put_u16(0x4000 | v as u16),
        0x4000..=0x3fff_ffff => b.put_u32(0x8000_0000 | v as u32),
        _ => b.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// A varint at the start of `b`: its value and length, or `None` if incomplete.
fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    if b.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &x in &b[1..len] {
        v = (v << 8) | u64::from(x);
    }
    Some((v, len))
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("capsule of {0} bytes exceeds the maximum of {MAX_CAPSULE}")]
pub struct TooLarge(pub u64);

/// Reassembles capsules from a stream's DATA frames.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next UDP payload, `Ok(None)` when more bytes are needed.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, TooLarge> {
        loop {
            let Some((kind, a)) = get_varint(&self.buf) else {
                return Ok(None);
            };
            let Some((len, b)) = get_varint(&self.buf[a..]) else {
                return Ok(None);
            };
            if len > MAX_CAPSULE {
                return Err(TooLarge(len));
            }
            let len = len as usize;
            if self.buf.len() < a + b + len {
                return Ok(None);
            }
            self.buf.advance(a + b);
            let value = self.buf.split_to(len).freeze();
            if kind != DATAGRAM {
                continue;
            }
            match get_varint(&value) {
                Some((0, n)) => return Ok(Some(value.slice(n..))),
                // Another context, or an empty value: not a UDP payload.
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_round_trip_whatever_the_framing() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![],
            b"dns query".to_vec(),
            vec![7u8; 63],
            vec![8u8; 64],
            vec![9u8; 16_383],
            vec![1u8; 16_384],
            vec![2u8; 65_535],
        ];
        let stream: Vec<u8> = payloads.iter().flat_map(|p| encode(p).to_vec()).collect();
        // Fed whole, byte by byte, and in odd chunks: the same payloads come out.
        for chunk in [stream.len(), 1, 7, 1000] {
            let mut d = Decoder::default();
            let mut out = Vec::new();
            for part in stream.chunks(chunk) {
                d.push(part);
                while let Some(p) = d.next_datagram().unwrap() {
                    out.push(p.to_vec());
                }
            }
            assert_eq!(out, payloads, "chunks of {chunk}");
        }
    }

    #[test]
    fn other_capsules_and_contexts_are_skipped_and_oversize_is_refused() {
        let mut d = Decoder::default();
        // An unknown capsule type 0x2a with 3 bytes, a datagram on context 5, then ours.
        d.push(&[0x2a, 3, 1, 2, 3]);
        d.push(&[0x00, 2, 5, 0xff]);
        d.push(&encode(b"ok"));
        assert_eq!(d.next_datagram().unwrap().as_deref(), Some(&b"ok"[..]));
        assert_eq!(d.next_datagram().unwrap(), None);
        // A length beyond the maximum is an error at once, before its bytes arrive.
        let mut d = Decoder::default();
        d.push(&[0x00, 0x80, 0x01, 0x00, 0x09]);
        assert_eq!(d.next_datagram(), Err(TooLarge(65_545)));
    }
}
