//! The headless screen of one session, kept lazily.
//!
//! Parsing every byte through a terminal emulator costs more than the kernel PTY delivers
//! under bulk output (`vt100` parses plain text at about 65 MiB/s on this machine), so the
//! reader thread only appends to a backlog here and the backlog is parsed when it grows
//! past [`LAZY_BACKLOG`], when a client needs the screen, or on a resize. Before parsing,
//! a backlog that starts with a long run of plain text (printable characters, tab, CR, LF;
//! no escape sequence, no other control) drops the part of that run which cannot be visible
//! any more: the run's last `2 × rows + 3` line feeds, all inside the run, scroll every
//! earlier cell off a full-height scroll region, and plain text changes no mode, attribute
//! or tab stop. The screen is therefore the same as if every byte had been parsed
//! (`skipping_is_invisible` checks that against a full parse on arbitrary input).
//!
//! The skip needs two facts the emulator does not expose: that its parser is between
//! sequences, and that no scroll region is set. [`EscTracker`] follows just enough of the
//! escape syntax over the bytes that are parsed to know both, and says "not sure" for
//! anything it does not recognise.

/// Parse when this much output is waiting (a client asking for the screen parses earlier).
pub const LAZY_BACKLOG: usize = 256 * 1024;

pub struct Screen {
    parser: vt100::Parser,
    backlog: Vec<u8>,
    /// Offset one past the last byte handed to [`Screen::push`].
    end: u64,
    esc: EscTracker,
}

impl Screen {
    pub fn new(rows: u16, cols: u16) -> Self {
        Self {
            parser: vt100::Parser::new(nonzero(rows), nonzero(cols), 0),
            backlog: Vec::new(),
            end: 0,
            esc: EscTracker::default(),
        }
    }

    /// A screen showing what `snapshot` (from [`Screen::snapshot`]) drew, the live stream
    /// continuing at `end`: how a session crosses an agent update.
    pub fn restored(rows: u16, cols: u16, end: u64, snapshot: &[u8]) -> Self {
        let mut screen = Self::new(rows, cols);
        screen.backlog.extend_from_slice(snapshot);
        screen.catch_up();
        screen.end = end;
        screen
    }

    /// Records output (parsed later). Returns the offset after it.
    pub fn push(&mut self, bytes: &[u8]) -> u64 {
        self.backlog.extend_from_slice(bytes);
        self.end += bytes.len() as u64;
        if self.backlog.len() >= LAZY_BACKLOG {
            self.catch_up();
        }
        self.end
    }

    /// Resizes, after parsing what was written at the old size.
    pub fn resize(&mut self, rows: u16, cols: u16) {
        self.catch_up();
        self.parser.set_size(nonzero(rows), nonzero(cols));
    }

    /// The current screen as escape sequences (contents, cursor, modes, alternate screen),
    /// and the offset at which the live stream continues after it.
    pub fn snapshot(&mut self) -> (u64, Vec<u8>) {
        self.catch_up();
        let screen = self.parser.screen();
        let mut out = String::new();
        if screen.alternate_screen() {
            out.push_str("\x1b[?1049h");
        }
        out.push_str(&screen.state_formatted());
        (self.end, out.into_bytes())
    }

    fn catch_up(&mut self) {
        if self.backlog.is_empty() {
            return;
        }
        let rows = self.parser.screen().size().0.get();
        let skip = if self.esc.at_rest() {
            invisible_prefix(&self.backlog, rows)
        } else {
            0
        };
        let rest = &self.backlog[skip..];
        self.esc.scan(rest, rows);
        self.parser.process(rest);
        self.backlog.clear();
        if self.backlog.capacity() > 2 * LAZY_BACKLOG {
            self.backlog.shrink_to(LAZY_BACKLOG);
        }
    }
}

fn nonzero(n: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(n).unwrap_or(std::num::NonZeroU16::MIN)
}

/// How many leading bytes of `bytes` cannot affect the screen (see the module docs).
fn invisible_prefix(bytes: &[u8], rows: u16) -> usize {
    let controls = bytes
        .iter()
        .position(|&b| (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f)
        .unwrap_or(bytes.len());
    let plain = match std::str::from_utf8(&bytes[..controls]) {
        Ok(_) => controls,
        Err(e) => e.valid_up_to(),
    };
    let needed = 2 * usize::from(rows) + 3;
    let mut seen = 0;
    for (i, &b) in bytes[..plain].iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == needed {
                return i;
            }
        }
    }
    0
}

/// Follows the escape syntax just far enough to know whether the parser is between
/// sequences and whether a scroll region may be set.
#[derive(Debug, Default)]
struct EscTracker {
    state: EscState,
    /// A scroll region other than the whole screen may be in effect.
    region: bool,
    /// Parameter bytes of the CSI being read (bounded).
    params: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Ground,
    Esc,
    Csi,
    /// ESC followed by intermediate bytes (e.g. a character set designation).
    EscInter,
    /// OSC, DCS, SOS, PM, APC: until BEL or ST.
    Str,
    StrEsc,
    /// Text that ended inside a UTF-8 character.
    Unknown,
}

impl EscTracker {
    fn at_rest(&self) -> bool {
        self.state == EscState::Ground && !self.region
    }

    fn scan(&mut self, bytes: &[u8], rows: u16) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                EscState::Ground | EscState::Unknown => {
                    // Everything up to the next ESC is text or C0 controls, which end any
                    // sequence we could not follow.
                    match memchr_esc(&bytes[i..]) {
                        Some(at) => {
                            i += at;
                            self.state = EscState::Esc;
                        }
                        None => {
                            // A trailing partial UTF-8 character leaves the parser mid-way.
                            self.state = if ends_mid_utf8(bytes) {
                                EscState::Unknown
                            } else {
                                EscState::Ground
                            };
                            return;
                        }
                    }
                }
                EscState::Esc => {
                    self.state = match b {
                        b'[' => {
                            self.params.clear();
                            EscState::Csi
                        }
                        b']' | b'P' | b'X' | b'^' | b'_' => EscState::Str,
                        b'c' => {
                            self.region = false;
                            EscState::Ground
                        }
                        0x20..=0x2f => EscState::EscInter,
                        0x30..=0x7e => EscState::Ground,
                        0x1b => EscState::Esc,
                        _ => EscState::Esc,
                    }
                }
                EscState::EscInter => {
                    self.state = match b {
                        0x30..=0x7e => EscState::Ground,
                        0x1b => EscState::Esc,
                        _ => EscState::EscInter,
                    }
                }
                EscState::Csi => match b {
                    0x20..=0x3f if self.params.len() < 32 => self.params.push(b),
                    0x20..=0x3f => {}
                    0x40..=0x7e => {
                        if b == b'r' {
                            self.region = !full_region(&self.params, rows);
                        }
                        self.state = EscState::Ground;
                    }
                    0x1b => self.state = EscState::Esc,
                    0x18 | 0x1a => self.state = EscState::Ground,
                    _ => {}
                },
                EscState::Str => match b {
                    0x07 | 0x18 | 0x1a => self.state = EscState::Ground,
                    0x1b => self.state = EscState::StrEsc,
                    _ => {}
                },
                EscState::StrEsc => {
                    self.state = if b == b'\\' {
                        EscState::Ground
                    } else {
                        // ESC ends the string and starts a new sequence with this byte.
                        i -= 1;
                        EscState::Esc
                    };
                }
            }
            i += 1;
        }
        if self.state == EscState::Ground && ends_mid_utf8(bytes) {
            self.state = EscState::Unknown;
        }
    }
}

fn memchr_esc(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == 0x1b)
}

fn ends_mid_utf8(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(3)..];
    matches!(std::str::from_utf8(tail), Err(e) if e.error_len().is_none())
}

/// Whether DECSTBM parameters select the whole screen (`CSI r`, `CSI 1;<rows> r`).
fn full_region(params: &[u8], rows: u16) -> bool {
    let Ok(text) = std::str::from_utf8(params) else {
        return false;
    };
    if text.starts_with(['?', '<', '=', '>']) {
        // A private sequence ending in `r` (e.g. restore DEC modes) does not move margins,
        // but we do not know that for every terminal: be conservative.
        return false;
    }
    let mut parts = text.split(';');
    let top = parts.next().unwrap_or("");
    let bottom = parts.next().unwrap_or("");
    let top_ok = top.is_empty() || matches!(top.parse::<u32>(), Ok(0 | 1));
    let bottom_ok = bottom.is_empty()
        || matches!(bottom.parse::<u32>(), Ok(b) if b == 0 || b >= u32::from(rows));
    top_ok && bottom_ok && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full_parse(chunks: &[Vec<u8>], rows: u16, cols: u16) -> String {
        let mut p = vt100::Parser::new(nonzero(rows), nonzero(cols), 0);
        for c in chunks {
            p.process(c);
        }
        let s = p.screen();
        format!("{}{:?}", s.state_formatted(), s.alternate_screen())
    }

    fn lazy_parse(chunks: &[Vec<u8>], rows: u16, cols: u16, snapshot_every: usize) -> String {
        let mut screen = Screen::new(rows, cols);
        let mut out = String::new();
        for (i, c) in chunks.iter().enumerate() {
            screen.push(c);
            if snapshot_every > 0 && i % snapshot_every == 0 {
                screen.catch_up();
            }
        }
        screen.catch_up();
        let s = screen.parser.screen();
        out.push_str(&format!(
            "{}{:?}",
            s.state_formatted(),
            s.alternate_screen()
        ));
        out
    }

    /// Pieces that stress the skip: plain lines, long lines that wrap, escape sequences
    /// that set modes, attributes, scroll regions and the alternate screen, strings,
    /// UTF-8 (also cut in half by chunking), and stray controls.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            6 => "[a-z0-9 ]{0,12}\r\n".prop_map(String::into_bytes),
            2 => "[a-z]{0,100}\n".prop_map(String::into_bytes),
            1 => Just(b"\t\tx\r\n".to_vec()),
            1 => Just("héllo wörld ✓ 日本\r\n".as_bytes().to_vec()),
            1 => Just(b"\x1b[31m".to_vec()),
            1 => Just(b"\x1b[0m".to_vec()),
            1 => Just(b"\x1b[5;10r".to_vec()),
            1 => Just(b"\x1b[r".to_vec()),
            1 => Just(b"\x1b[?1049h".to_vec()),
            1 => Just(b"\x1b[?1049l".to_vec()),
            1 => Just(b"\x1b[4h".to_vec()),
            1 => Just(b"\x1b[20h".to_vec()),
            1 => Just(b"\x1b[H\x1b[2J".to_vec()),
            1 => Just(b"\x1b]0;title\x07".to_vec()),
            1 => Just(b"\x1bc".to_vec()),
            1 => Just(b"\x1b[3;1H".to_vec()),
            1 => Just(b"\x08\x0b\x0c".to_vec()),
            1 => Just(vec![0xe6]),
            1 => Just(vec![0x9b, b'3', b'1', b'm']),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn skipping_is_invisible(
            pieces in proptest::collection::vec(piece(), 0..400),
            split in 1usize..300,
            rows in 2u16..8,
            cols in 5u16..30,
            snapshot_every in 0usize..5,
        ) {
            let bytes: Vec<u8> = pieces.concat();
            let chunks: Vec<Vec<u8>> = bytes.chunks(split).map(<[u8]>::to_vec).collect();
            prop_assert_eq!(
                lazy_parse(&chunks, rows, cols, snapshot_every),
                full_parse(&chunks, rows, cols)
            );
        }
    }

    #[test]
    fn bulk_text_is_mostly_skipped() {
        let mut screen = Screen::new(24, 80);
        let line = b"0123456789 the quick brown fox\r\n";
        let text: Vec<u8> = line.iter().copied().cycle().take(1 << 20).collect();
        assert!(invisible_prefix(&text, 24) > (1 << 20) - 60 * line.len());
        screen.push(&text);
        let (offset, bytes) = screen.snapshot();
        assert_eq!(offset, 1 << 20);
        assert!(String::from_utf8_lossy(&bytes).contains("the quick brown fox"));
    }

    #[test]
    fn regions_and_strings_block_the_skip() {
        let mut t = EscTracker::default();
        t.scan(b"\x1b[2;10r", 24);
        assert!(!t.at_rest());
        t.scan(b"\x1b[1;24r", 24);
        assert!(t.at_rest());
        t.scan(b"\x1b]0;ti", 24);
        assert!(!t.at_rest());
        t.scan(b"tle\x1b\\", 24);
        assert!(t.at_rest());
        t.scan("é".as_bytes().split_at(1).0, 24);
        assert!(!t.at_rest());
    }
}
