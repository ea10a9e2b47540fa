//! Join tokens pasted by operators.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_catalog::token::JoinToken;

fuzz_target!(|s: &str| {
    if let Ok(t) = JoinToken::decode(s) {
        assert_eq!(JoinToken::decode(&t.encode()).as_ref(), Ok(&t));
    }
});
