//! Newline-delimited JSON (the gateway's `/api/v1/events`, Kubernetes watches): complete lines
//! out of a byte stream that splits them anywhere. Sans-IO: feed chunks, take lines.

/// Bytes received and not yet returned as a line.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buffer: Vec<u8>,
    /// Bytes before this offset were returned already.
    start: usize,
    /// No newline before this offset (so the search resumes here).
    scanned: usize,
}

impl LineBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete line, without its `\n` (blank lines included: a keepalive is one).
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        let from = self.scanned.max(self.start);
        match self.buffer[from..].iter().position(|b| *b == b'\n') {
            Some(offset) => {
                let end = from + offset;
                let line = self.buffer[self.start..end].to_vec();
                self.start = end + 1;
                self.scanned = self.start;
                Some(line)
            }
            None => {
                self.scanned = self.buffer.len();
                None
            }
        }
    }

    /// Bytes of an incomplete last line (a caller can bound what a peer makes it hold).
    pub fn pending(&self) -> usize {
        self.buffer.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> (Vec<String>, usize) {
        let mut buffer = LineBuffer::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buffer.push(chunk);
            while let Some(line) = buffer.next_line() {
                out.push(String::from_utf8(line).unwrap());
            }
        }
        (out, buffer.pending())
    }

    fn check(chunks: &[&[u8]], expected: &[&str], pending: usize) {
        let (got, left) = lines(chunks);
        assert_eq!(got, expected, "{chunks:?}");
        assert_eq!(left, pending, "{chunks:?}");
    }

    /// Lines split across chunks, several lines in one chunk, blank keepalive lines and an
    /// incomplete tail.
    #[test]
    fn splits_lines_across_and_within_chunks() {
        check(&[b"{\"a\":1}\n"], &["{\"a\":1}"], 0);
        check(
            &[b"{\"a\"", b":1}\n{\"b\"", b":2}\n"],
            &["{\"a\":1}", "{\"b\":2}"],
            0,
        );
        check(&[b"x\ny\nz\n"], &["x", "y", "z"], 0);
        check(&[b"\n", b"x\n\n"], &["", "x", ""], 0);
        check(&[b"x\nyz"], &["x"], 2);
        check(&[b"", b"abc", b"", b"d"], &[], 4);
    }

    /// Byte-by-byte delivery gives the same lines as one chunk.
    #[test]
    fn byte_by_byte_equals_one_chunk() {
        let text = b"{\"type\":\"snapshot\"}\n\n{\"type\":\"connected\",\"planeID\":\"p\"}\nrest";
        let single: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(lines(&single), lines(&[text]));
    }
}
