//! Runs the fuzz target's body over the kept seed corpus (`fuzz/corpus/frame`) on stable Rust,
//! so the corpus and the invariants stay in the test command between fuzzing sessions.

use std::path::Path;

#[test]
fn seed_corpus_keeps_every_invariant() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/frame");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/frame exists") {
        let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
        rpc_frame::exercise(&data);
        count += 1;
    }
    assert!(count >= 10, "the seed corpus has {count} files");
}
