//! Mutation fuzzing of what peers send, on the stable toolchain (cargo-fuzz needs nightly,
//! which these machines cannot install): every input in `tests/corpus/<target>/` (valid
//! frames of every message type, edge cases, and any input that once broke something), then
//! `WSH_FUZZ_ITERS` mutants of them per target (bit flips, boundary bytes and lengths,
//! inserted, deleted, repeated and spliced runs), from a seed (`WSH_FUZZ_SEED`, printed).
//!
//! Targets: the frame decoder with every message enum (never a panic, never a frame over
//! the limit, a decoded message encodes again and decodes to itself), the sync path rules
//! (what they accept is a plain relative path), and the delta encoder (what it emits
//! rebuilds the target from the base). A failing input is written to
//! `target/fuzz-failures/` with the seed; add it to the corpus once fixed.
//!
//! `cargo test -p workspace-protocol --test fuzz` runs a short pass (the test command);
//! `WSH_FUZZ_ITERS=5000000 cargo test --release -p workspace-protocol --test fuzz -- --nocapture`
//! a long one. `WSH_FUZZ_WRITE_CORPUS=1` writes the generated seed inputs into the corpus.

use protocol::sync::delta::{Encoder, Op, SignatureBuilder};
use protocol::sync::{MAX_PATH_LEN, check_link_target, check_path};
use protocol::{FrameDecoder, MAX_FRAME_LEN, Message, encode_frame};
use std::path::{Path, PathBuf};

/// A small, seeded generator (xorshift64*): runs repeat from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn iterations() -> usize {
    std::env::var("WSH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn seed() -> u64 {
    std::env::var("WSH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// The corpus of `target`: the files kept in the repository and `generated` seeds.
fn corpus(target: &str, generated: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    if std::env::var_os("WSH_FUZZ_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), input).unwrap();
        }
    }
    let mut inputs = generated;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        inputs.extend(files.iter().map(|f| std::fs::read(f).unwrap()));
    }
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

/// One to eight random changes to a corpus input (or a splice of two).
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(8) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            2 if len >= 4 => {
                // A length or count field set to a boundary.
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, 0xff, 0xffff, 1 << 20, (1 << 20) + 1, u32::MAX][rng.below(7)];
                input[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(len - i);
                input.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let run = input[i..i + n].to_vec();
                input.splice(i..i, run);
            }
            6 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[rng.below(other.len() + 1)..]);
            }
            _ if len > 0 => input.truncate(rng.below(len)),
            _ => {}
        }
    }
    input
}

/// Runs `check` on every corpus input and on the mutants; a panic names the input, saved.
fn fuzz(target: &str, generated: Vec<Vec<u8>>, check: impl Fn(&[u8])) {
    let seed = seed();
    let corpus = corpus(target, generated);
    let mut rng = Rng(seed);
    let total = corpus.len() + iterations();
    for n in 0..total {
        let input = if n < corpus.len() {
            corpus[n].clone()
        } else {
            mutate(&mut rng, &corpus)
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if outcome.is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{target}-{seed}-{n}"));
            std::fs::write(&file, &input).unwrap();
            panic!(
                "{target}: input {n} (seed {seed}) failed; saved as {}",
                file.display()
            );
        }
    }
    println!("{target}: {total} inputs, seed {seed}");
}

/// Decodes every frame `bytes` holds as `M`, in pieces, checking what the decoder owes.
fn frames<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8], piece: usize) {
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    for chunk in bytes.chunks(piece.max(1)) {
        decoder.push(chunk);
        loop {
            match decoder.decode::<M>() {
                Ok(Some(msg)) => {
                    // A message that decodes encodes again, to the same message.
                    let frame = encode_frame(&msg).expect("a decoded message encodes");
                    assert!(frame.len() <= MAX_FRAME_LEN + 8);
                    let mut again = FrameDecoder::new(MAX_FRAME_LEN);
                    again.push(&frame);
                    assert_eq!(again.decode::<M>().unwrap(), Some(msg));
                }
                Ok(None) => break,
                // A typed error ends the stream, as the drivers do.
                Err(_) => return,
            }
        }
    }
}

/// Valid frames of every message type, from the round-trip tests' shapes.
fn frame_seeds() -> Vec<Vec<u8>> {
    use protocol::control::*;
    use protocol::stream::*;
    let mut seeds = vec![
        encode_frame(&ControlMsg::Ping(Ping { seq: 7 })).unwrap(),
        encode_frame(&ControlMsg::SyncSessions(SyncSessions::default())).unwrap(),
        encode_frame(&StreamHeader::TcpForward(TcpForwardOpen { port: 3000 })).unwrap(),
        encode_frame(&StreamReply::Accepted(Accepted {})).unwrap(),
        encode_frame(&ControlMsg::UpdateOffer(protocol::update::UpdateOffer {
            version: "0.9.1".into(),
            size: 5_000_000,
            sha256: [7; 32],
            signature: vec![9; 64],
        }))
        .unwrap(),
        encode_frame(&StreamHeader::AgentUpdate(
            protocol::update::AgentUpdateOpen {
                version: "0.9.1".into(),
                size: 5_000_000,
            },
        ))
        .unwrap(),
        encode_frame(&protocol::peer::PeerMsg::Leaving(
            protocol::peer::PeerLeaving {},
        ))
        .unwrap(),
        vec![0, 0, 0, 0],
        vec![0xff, 0xff, 0xff, 0xff, 0, 1],
    ];
    seeds.push(seeds[0].iter().chain(&seeds[1]).copied().collect());
    seeds
}

fn all_decoders(bytes: &[u8]) {
    use protocol::*;
    let piece = bytes.first().map_or(1, |b| 1 + *b as usize % 64);
    frames::<control::ControlMsg>(bytes, piece);
    frames::<stream::StreamHeader>(bytes, piece);
    frames::<stream::StreamReply>(bytes, piece);
    frames::<enroll::EnrollMsg>(bytes, piece);
    frames::<pty::PtyMsg>(bytes, piece);
    frames::<sync::SyncMsg>(bytes, piece);
    frames::<exec::ExecMsg>(bytes, piece);
    frames::<files::FileMsg>(bytes, piece);
    frames::<direct::DirectMsg>(bytes, piece);
    frames::<peer::PeerMsg>(bytes, piece);
    frames::<client::ClientMsg>(bytes, piece);
}

#[test]
fn frame_decoders_survive_mutated_frames() {
    fuzz("frames", frame_seeds(), all_decoders);
}

#[test]
fn sync_path_rules_accept_only_plain_relative_paths() {
    let seeds = [
        "src/main.rs",
        "a/b/c",
        "..",
        "a/../b",
        "/etc/passwd",
        "a//b",
        "",
        "a\0b",
    ]
    .map(|s| s.as_bytes().to_vec())
    .to_vec();
    fuzz("sync-paths", seeds, |bytes| {
        let Ok(path) = std::str::from_utf8(bytes) else {
            return;
        };
        if check_path(path).is_ok() {
            assert!(!path.is_empty() && path.len() <= MAX_PATH_LEN, "{path:?}");
            assert!(!path.starts_with('/') && !path.contains('\0'), "{path:?}");
            assert!(
                path.split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
                "{path:?}"
            );
        }
        // A link's target is split from the same input: it never panics either way, and an
        // accepted one does not climb out of the root from where the link is.
        if let Some((link, target)) = path.split_once('>')
            && check_link_target(link, target).is_ok()
        {
            assert!(!target.starts_with('/'), "{link:?} -> {target:?}");
        }
    });
}

#[test]
fn delta_encoding_rebuilds_the_target_from_the_base() {
    let seeds = vec![
        b"the quick brown fox jumps over the lazy dog".repeat(40),
        (0..4096u32).map(|i| (i * 7 % 251) as u8).collect(),
        Vec::new(),
    ];
    fuzz("delta", seeds, |bytes| {
        // The input is the target; its first half, changed, is the base.
        let split = bytes.len() / 2;
        let mut base: Vec<u8> = bytes[..split].to_vec();
        base.reverse();
        base.extend_from_slice(&bytes[split / 2..]);
        let block = 16 + bytes.first().map_or(0, |b| *b as u32 % 64);
        let mut signature = SignatureBuilder::new(block);
        signature.feed(&base);
        let blocks = signature.finish();
        let mut ops = Vec::new();
        let mut encoder = Encoder::new(block, blocks);
        for chunk in bytes.chunks(1 + bytes.len() % 97) {
            encoder.feed(chunk, |op| ops.push(op));
        }
        encoder.finish(|op| ops.push(op));
        let mut rebuilt = Vec::new();
        for op in ops {
            match op {
                Op::Copy { first, count } => {
                    let start = first as usize * block as usize;
                    let end = ((first + count) as usize * block as usize).min(base.len());
                    rebuilt.extend_from_slice(&base[start..end]);
                }
                Op::Literal(bytes) => rebuilt.extend_from_slice(&bytes),
            }
        }
        assert_eq!(rebuilt, bytes);
    });
}
