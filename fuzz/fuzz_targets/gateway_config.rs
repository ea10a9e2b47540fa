//! Operator-written YAML: a clear error or a valid config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshfed_gateway::GatewayConfig;

fuzz_target!(|s: &str| {
    let _ = GatewayConfig::parse(s, std::path::Path::new("/fuzz/gateway.yaml"));
});
