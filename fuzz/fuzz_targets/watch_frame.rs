//! A Watch stream message as a gateway receives it from the federation: the frame, its
//! encoded changes (`meshfed_api::parts::event`), the parts assembler and the catalog the
//! changes apply to must never panic. A change that does not decode or apply is an error.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_api::{change_from_pb, parts, pb};
use meshfed_catalog::Catalog;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = pb::WatchFrame::decode(data) else {
        return;
    };
    // The same bytes read as the message an older watcher decodes.
    let old = pb::WatchEvent::decode(data);
    let Ok(ev) = parts::event(frame) else {
        return;
    };
    // Whatever decodes as a frame's changes decodes as a WatchEvent, to the same event.
    assert_eq!(old.as_ref().ok(), Some(&ev));
    let mut assembler = parts::Assembler::default();
    let Ok(Some(ev)) = assembler.push(ev) else {
        return;
    };
    let mut cat = Catalog::default();
    for c in ev.changes {
        if let Ok(d) = change_from_pb(c) {
            let _ = cat.apply(&d);
        }
    }
});
