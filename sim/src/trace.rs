//! The run's trace: a hash over every event and every lock event (the run-twice check compares
//! it), and, when asked for, one printable line per event.

/// FNV-1a offset basis: the hash of an empty trace.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) struct Trace {
    hash: u64,
    /// `Some` only for a traced run: building lines costs more than the run itself.
    lines: Option<Vec<String>>,
}

impl Trace {
    pub(crate) fn new() -> Trace {
        Trace {
            hash: FNV_OFFSET,
            lines: None,
        }
    }

    /// From now on, keep a line per event.
    pub(crate) fn keep_lines(&mut self) {
        self.lines = Some(Vec::new());
    }

    /// Folds `words` into the hash, byte by byte (little endian).
    pub(crate) fn hash(&mut self, words: &[u64]) {
        for w in words {
            for b in w.to_le_bytes() {
                self.hash ^= u64::from(b);
                self.hash = self.hash.wrapping_mul(FNV_PRIME);
            }
        }
    }

    /// The hash of everything folded in so far.
    pub(crate) fn digest(&self) -> u64 {
        self.hash
    }

    /// Adds a line if lines are kept; `line` is called only then.
    pub(crate) fn line(&mut self, line: impl FnOnce() -> String) {
        if let Some(lines) = self.lines.as_mut() {
            lines.push(line());
        }
    }

    /// The lines kept so far (empty for an untraced run).
    pub(crate) fn take_lines(&mut self) -> Vec<String> {
        self.lines.take().unwrap_or_default()
    }
}
