//! Stream headers and flow datagrams from an untrusted peer: decoding must never panic, and whatever
//! decodes must encode back to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_gateway::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(open) = wire::decode_open(data) {
        assert_eq!(&open.encode()[2..], data);
    }
    if let Ok(resp) = wire::decode_response(data) {
        assert_eq!(
            wire::decode_response(&resp.encode()[2..]).as_ref(),
            Ok(&resp)
        );
    }
    if let Ok((flow, payload)) = wire::decode_datagram(data) {
        assert_eq!(&wire::encode_datagram(flow, payload)[..], data);
    }
    if data.len() >= 2 {
        let _ = wire::check_len([data[0], data[1]]);
    }
});
