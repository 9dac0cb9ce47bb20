//! Command-line arguments shared by the benchmarks.
//!
//! Every benchmark takes `--smoke`: a few samples and small sizes, seconds in all, so that
//! `./scripts/test` runs each one (in the test profile) and a benchmark that breaks fails CI.
//! Sizes given on the command line win over both the full and the smoke defaults. An
//! unknown flag stops the benchmark, so that a typo never silently runs a full run.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Instant;

/// Reads everything a server on `127.0.0.1:port` sends on one connection; MiB/s.
pub async fn download(port: u16) -> f64 {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

pub struct BenchArgs {
    smoke: bool,
    values: HashMap<String, Vec<String>>,
}

impl BenchArgs {
    /// Parses the process's arguments; `known` names the flags that take a value.
    pub fn parse(known: &[&str]) -> Self {
        Self::from_iter(std::env::args().skip(1), known)
    }

    fn from_iter(args: impl IntoIterator<Item = String>, known: &[&str]) -> Self {
        let mut parsed = Self {
            smoke: false,
            values: HashMap::new(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--smoke" => parsed.smoke = true,
                // cargo bench passes --bench; cargo test passes nothing of its own.
                "--bench" => {}
                flag if known.contains(&flag) => {
                    let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
                    parsed.values.entry(arg).or_default().push(value);
                }
                other => panic!(
                    "unknown argument {other:?}; this benchmark takes --smoke and {}",
                    known.join(", ")
                ),
            }
        }
        parsed
    }

    /// True in smoke mode (`--smoke`).
    pub fn smoke(&self) -> bool {
        self.smoke
    }

    /// The value of `flag`: as given, else `smoke` in smoke mode, else `full`.
    pub fn num<T: FromStr>(&self, flag: &str, full: T, smoke: T) -> T {
        match self.values.get(flag).and_then(|v| v.last()) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("{flag} takes a number, not {v:?}")),
            None if self.smoke => smoke,
            None => full,
        }
    }

    /// The agents' QUIC keep-alive from `--keep-alive-ms` (the parser must know the flag):
    /// `link::AGENT_KEEP_ALIVE` unless given, `None` for 0 (heartbeats only).
    pub fn keep_alive(&self) -> Option<std::time::Duration> {
        let default = link::AGENT_KEEP_ALIVE.as_millis() as u64;
        Some(self.num("--keep-alive-ms", default, default))
            .filter(|&ms| ms > 0)
            .map(std::time::Duration::from_millis)
    }

    /// Every value given for a repeatable flag.
    pub fn all(&self, flag: &str) -> Vec<String> {
        self.values.get(flag).cloned().unwrap_or_default()
    }
}

/// `count` client endpoints on loopback, each with `buffer` bytes of socket buffers, pooled
/// for many in-process agents (fleet benchmarks).
pub fn endpoint_pool(count: usize, buffer: usize) -> std::sync::Arc<agent::EndpointPool> {
    agent::EndpointPool::new(
        (0..count)
            .map(|_| {
                let socket = link::bind_udp("127.0.0.1:0".parse().unwrap(), buffer).unwrap();
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    std::sync::Arc::new(quinn::TokioRuntime),
                )
                .unwrap()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::BenchArgs;

    fn parse(args: &[&str]) -> BenchArgs {
        BenchArgs::from_iter(args.iter().map(|s| s.to_string()), &["--samples", "--only"])
    }

    #[test]
    fn given_values_win_over_both_defaults() {
        let a = parse(&["--bench"]);
        assert!(!a.smoke());
        assert_eq!(a.num("--samples", 1000, 10), 1000);
        let a = parse(&["--smoke"]);
        assert_eq!(a.num("--samples", 1000, 10), 10);
        let a = parse(&["--smoke", "--samples", "3", "--only", "x", "--only", "y"]);
        assert_eq!(a.num("--samples", 1000usize, 10), 3);
        assert_eq!(a.all("--only"), ["x", "y"]);
    }

    #[test]
    #[should_panic(expected = "unknown argument")]
    fn unknown_flags_stop_the_benchmark() {
        parse(&["--sampels", "3"]);
    }
}
