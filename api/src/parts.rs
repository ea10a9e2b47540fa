//! Watch events in parts: the federation splits an event whose changes would make one
//! large message (a snapshot of 100,000 services is several MB, past gRPC's default
//! 4 MiB limit) into parts of about [`PART_BYTES`], each but the last with `more` set; a
//! watcher puts them back together before it applies any. Only for a watcher that asked
//! (`WatchRequest.parts`).
//!
//! On the wire an event is a [`pb::WatchFrame`]: its changes stay encoded, so the
//! federation encodes each change once for all its watchers
//! ([`crate::change_to_wire`]) and a watcher decodes them ([`event`]); the bytes are a
//! [`pb::WatchEvent`]'s. Pure.

use prost::Message;

use crate::pb;

/// The event a frame carries, its changes decoded. Pure.
pub fn event(f: pb::WatchFrame) -> Result<pb::WatchEvent, PartsError> {
    let mut changes = Vec::with_capacity(f.changes.len());
    for (i, c) in f.changes.iter().enumerate() {
        let c = pb::Change::decode(c.as_ref()).map_err(|e| PartsError::Decode {
            index: i,
            message: e.to_string(),
        })?;
        changes.push(c);
    }
    Ok(pb::WatchEvent {
        snapshot: f.snapshot,
        revision: f.revision,
        changes,
        more: f.more,
    })
}

/// About the most change bytes one part carries (a single larger change travels alone).
pub const PART_BYTES: usize = 1024 * 1024;

/// The most changes a watcher holds for an event still arriving in parts.
pub const MAX_PENDING_CHANGES: usize = 4_000_000;

/// `ev` as parts of about [`PART_BYTES`] of changes each, in order: the same `snapshot`
/// and `revision` on every part, `more` on all but the last. An event that fits is one
/// part. Pure.
pub fn split(ev: pb::WatchFrame) -> Vec<pb::WatchFrame> {
    let part = |changes| pb::WatchFrame {
        snapshot: ev.snapshot,
        revision: ev.revision,
        changes,
        more: true,
    };
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for c in ev.changes {
        // As the message frames it: the field's tag, the length, the change.
        let len = c.len();
        let n = 1 + prost::length_delimiter_len(len) + len;
        if !cur.is_empty() && bytes + n > PART_BYTES {
            out.push(part(std::mem::take(&mut cur)));
            bytes = 0;
        }
        bytes += n;
        cur.push(c);
    }
    out.push(part(cur));
    if let Some(last) = out.last_mut() {
        last.more = false;
    }
    out
}

/// Why parts do not make an event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    #[error(
        "a part of revision {got} (snapshot {got_snapshot}) does not continue the event of revision {want} (snapshot {want_snapshot})"
    )]
    Mismatch {
        want: u64,
        want_snapshot: bool,
        got: u64,
        got_snapshot: bool,
    },
    #[error("an event in parts passed {MAX_PENDING_CHANGES} changes")]
    TooLarge,
    #[error("changes[{index}] of an event does not decode: {message}")]
    Decode { index: usize, message: String },
}

/// Puts a watcher's events back together from their parts.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Option<pb::WatchEvent>,
}

impl Assembler {
    /// The whole event once its last part is in (`None` while parts are missing).
    pub fn push(&mut self, ev: pb::WatchEvent) -> Result<Option<pb::WatchEvent>, PartsError> {
        let ev = match self.pending.take() {
            None => ev,
            Some(mut p) => {
                if p.snapshot != ev.snapshot || p.revision != ev.revision {
                    return Err(PartsError::Mismatch {
                        want: p.revision,
                        want_snapshot: p.snapshot,
                        got: ev.revision,
                        got_snapshot: ev.snapshot,
                    });
                }
                if p.changes.len() + ev.changes.len() > MAX_PENDING_CHANGES {
                    return Err(PartsError::TooLarge);
                }
                p.changes.extend(ev.changes);
                p.more = ev.more;
                p
            }
        };
        if ev.more {
            self.pending = Some(ev);
            return Ok(None);
        }
        Ok(Some(ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ev` as the Watch stream carries it: each change encoded.
    fn frame(ev: &pb::WatchEvent) -> pb::WatchFrame {
        pb::WatchFrame {
            snapshot: ev.snapshot,
            revision: ev.revision,
            changes: ev
                .changes
                .iter()
                .map(|c| c.encode_to_vec().into())
                .collect(),
            more: ev.more,
        }
    }

    fn change(i: usize, pad: usize) -> pb::Change {
        pb::Change {
            revision: i as u64,
            op: Some(pb::change::Op::DeleteSite(format!(
                "s{i}{}",
                "x".repeat(pad)
            ))),
        }
    }

    #[test]
    fn parts_put_back_together_are_the_event() {
        for (n, pad) in [(0, 0), (1, 0), (10, 0), (5000, 400), (3, 2 * PART_BYTES)] {
            let ev = pb::WatchEvent {
                snapshot: n % 2 == 0,
                revision: 77,
                changes: (0..n).map(|i| change(i, pad)).collect(),
                more: false,
            };
            let parts = split(frame(&ev));
            let large = ev.encoded_len() > PART_BYTES;
            assert_eq!(parts.len() > 1, large, "{n}×{pad}: split only when large");
            for p in &parts {
                // A part is at most one change past the bound.
                let biggest = p.changes.iter().map(|c| c.len()).max().unwrap_or(0);
                assert!(p.encoded_len() <= PART_BYTES + biggest + 64, "{n}×{pad}");
                assert_eq!((p.snapshot, p.revision), (ev.snapshot, 77));
            }
            let mut a = Assembler::default();
            let mut whole = None;
            for (i, p) in parts.iter().enumerate() {
                let r = a.push(event(p.clone()).unwrap()).unwrap();
                assert_eq!(
                    r.is_some(),
                    i + 1 == parts.len(),
                    "{n}×{pad}: only the last"
                );
                whole = r.or(whole);
            }
            assert_eq!(whole, Some(ev), "{n}×{pad}");
        }
    }

    #[test]
    fn a_part_of_another_event_is_refused() {
        let ev = |rev, more| pb::WatchEvent {
            snapshot: true,
            revision: rev,
            changes: vec![change(1, 0)],
            more,
        };
        let mut a = Assembler::default();
        assert_eq!(a.push(ev(5, true)), Ok(None));
        assert!(matches!(
            a.push(ev(6, false)),
            Err(PartsError::Mismatch {
                want: 5,
                got: 6,
                ..
            })
        ));
        // An event in one message passes as it is.
        let mut a = Assembler::default();
        assert_eq!(a.push(ev(6, false)), Ok(Some(ev(6, false))));
    }

    #[test]
    fn a_frame_is_a_watch_event_on_the_wire() {
        let ev = pb::WatchEvent {
            snapshot: true,
            revision: 9,
            changes: (0..5).map(|i| change(i, i)).collect(),
            more: true,
        };
        let f = frame(&ev);
        // Each way: a watcher built before frames reads them, and a frame reads an event.
        assert_eq!(pb::WatchEvent::decode(&*f.encode_to_vec()).unwrap(), ev);
        assert_eq!(pb::WatchFrame::decode(&*ev.encode_to_vec()).unwrap(), f);
        assert_eq!(event(f).unwrap(), ev);
        // A change that does not decode is an error, not a panic or a skipped change.
        let bad = pb::WatchFrame {
            changes: vec![prost::bytes::Bytes::from_static(&[0x12, 0x05, b'x'])],
            ..Default::default()
        };
        assert!(matches!(
            event(bad),
            Err(PartsError::Decode { index: 0, .. })
        ));
    }
}
