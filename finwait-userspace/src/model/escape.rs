//! Process names and paths are chosen by the process: never print them raw to a terminal.

/// Replaces control characters (escape sequences, newlines) and invalid UTF-8 with visible
/// escapes, so a hostile `comm` cannot move the cursor or forge an output line.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\u{fffd}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_terminal_controls() {
        assert_eq!(super::sanitize("evil\x1b[2J\nx"), "evil\\u{1b}[2J\\nx");
        assert_eq!(super::sanitize("nginx: worker"), "nginx: worker");
    }
}
