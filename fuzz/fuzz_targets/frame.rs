//! Fuzz target: arbitrary bytes as a client, LB or worker would send them, through the frame
//! decoder, the strict header parser, the in-place rewrites (strip `service:`, seqid) and the
//! TApplicationException / HELLO body decoders. Invariants live in `rpc_frame::exercise`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    rpc_frame::exercise(data);
});
